"""`Report`: per-tensor rows, model-level summary and provenance, with JSON / CSV / pandas / text output."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint.names import expert_index, expert_tensor
from .errors import WeightgeoError
from .means import nanmean
from .metrics.catalog import NOT_SUMMARIZED, RENAMED, STREAM, SUMMED, WEIGHTED
from .outputs import atomic_write_text, check_output_path

__all__ = ["Report", "summarize_rows", "check_output_path"]

# Columns shown first in tables, in this order, when present.
_LEAD_COLUMNS = ("group", "step", "name", "expert", "shape", "numel", "module", "layer")
# Row keys that name or count rather than measure (never averaged), and those summarized as parameter-count
# weighted means (fractions of entries); the rest are unweighted means. Both come from the glossary.
_NOT_METRICS = NOT_SUMMARIZED
_WEIGHTED = WEIGHTED


def _jsonable(value: Any) -> Any:
    """NaN/inf are not JSON: write them as null (NaN) or a string (inf) so the file stays standard."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # 0-d tensors / numpy scalars
        return _jsonable(value.item())
    return value


def _from_json(value: Any) -> Any:
    if value == "inf":
        return math.inf
    if value == "-inf":
        return -math.inf
    if value is None:
        return math.nan
    if isinstance(value, dict):
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def _renamed_keys(rows: list[dict[str, Any]], summary: dict[str, Any], meta: dict[str, Any]) -> list[tuple[str, str]]:
    """Rename, in place, the keys an older weightgeo wrote (:data:`~weightgeo.metrics.catalog.RENAMED`: row
    keys, their summary means and ``n_`` counts; ``meta["ranks"]`` of process ranks); returns what was renamed.
    A stream report (rows with a ``step``) renames its stream keys, a pair report its pair keys."""
    stream = any("step" in r for r in rows) or meta.get("kind") == "rank_curve"
    names = {old: new for old, (new, where) in RENAMED.items() if (where == STREAM) == stream}
    names |= {f"n_{old}": f"n_{new}" for old, new in names.items()}
    done: dict[str, str] = {}

    def rename(d: dict[str, Any], deep: bool) -> None:
        for old in [k for k in d if k in names]:
            d[names[old]] = d.pop(old)
            done.setdefault(old, names[old])
        if deep:
            for v in d.values():
                if isinstance(v, dict):
                    rename(v, deep)

    for r in rows:
        rename(r, False)
    rename(summary, True)
    if "ranks" in meta and "processes" not in meta:  # process ranks: [{"rank": r, ...}] before 0.2
        meta["processes"] = [
            {("process_rank" if k == "rank" else k): v for k, v in p.items()} for p in meta.pop("ranks")
        ]
        done["ranks"] = "processes"
    return [(old, new) for old, new in done.items() if not old.startswith("n_")]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def summarize_rows(rows: Sequence[Mapping[str, Any]], *, by: str = "module") -> dict[str, Any]:
    """Model-level figures from per-tensor rows.

    ``update_sparsity`` (and ``step_sparsity``) is weighted by parameter count over the rows that have it
    (paper §3.1: a fraction of the model's entries); counts and byte sizes (``patch_bytes``, ...) are summed;
    every other metric is an unweighted mean over the rows that have it (over matrices, as the paper averages
    NSS and angles). ``max_principal_angle`` also gets its maximum over matrices.
    NaN values (undefined, e.g. overlaps of a matrix with no visible update) are left out of means. Rows of
    MoE experts (an ``expert`` field) also get per-tensor summaries, ``summary["experts"][tensor]``, over the
    experts of each expert tensor (a stack's name; a per-expert name with its ``experts.{j}.`` number removed).

    >>> rows = [{"name": "a", "numel": 3, "module": "q_proj", "update_sparsity": 1.0},
    ...         {"name": "b", "numel": 1, "module": "k_proj", "update_sparsity": 0.0}]
    >>> summarize_rows(rows)["update_sparsity"]
    0.75
    >>> summarize_rows(rows)["by_module"]["k_proj"]["update_sparsity"]
    0.0
    >>> moe = [{"name": "mlp.experts.down_proj", "expert": j, "numel": 4, "update_sparsity": j / 2} for j in (0, 1)]
    >>> summarize_rows(moe)["experts"]["mlp.experts.down_proj"]["update_sparsity"]
    0.25
    """
    summary: dict[str, Any] = _summarize_flat(rows)
    if by and any(by in r for r in rows):
        groups: dict[str, list[Mapping[str, Any]]] = {}
        for r in rows:
            groups.setdefault(str(r.get(by)), []).append(r)
        summary[f"by_{by}"] = {g: _summarize_flat(rs) for g, rs in sorted(groups.items())}
    experts: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        if r.get("expert") is not None:
            experts.setdefault(expert_tensor(str(r.get("name"))), []).append(r)
    if experts:
        summary["experts"] = {t: _summarize_flat(rs) for t, rs in experts.items()}
    return summary


def _summarize_flat(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    keys: list[str] = []
    for r in rows:
        for key, v in r.items():
            if key not in _NOT_METRICS and _is_number(v) and key not in keys:
                keys.append(key)
    out: dict[str, Any] = {"n_tensors": len(rows), "numel": sum(int(r.get("numel", 0)) for r in rows)}
    for key in keys:
        have = [r for r in rows if _is_number(r.get(key))]
        vals = [float(r[key]) for r in have]
        if key in SUMMED:  # counts and byte sizes: exact integer sums over the rows that have them
            out[key] = sum(int(r[key]) for r in have if not math.isnan(float(r[key])))
        elif key in _WEIGHTED:
            out[key] = nanmean(vals, [float(r.get("numel", 1)) for r in have])
        else:
            out[key] = nanmean(vals)
            out[f"n_{key}"] = len(have)
        if key == "max_principal_angle" and vals:
            out["max_principal_angle_overall"] = max(vals)
    return out


@dataclass(frozen=True)
class Report:
    """The result of a checkpoint-level call: one row per tensor, a model summary and provenance.

    Attributes:
        rows: one dict per analysed tensor (``name``, ``shape``, ``numel``, ``module``, ``layer`` and one key
            per metric; trajectory reports add ``step``).
        summary: model-level figures (see :func:`summarize_rows`), plus ``by_module`` breakdowns.
        meta: provenance: weightgeo version, sources, metrics and parameters, device, world size, seconds,
            and what was skipped or unmatched and why.

    >>> r = Report(rows=[{"name": "w", "shape": (2, 2), "numel": 4, "module": "w", "layer": None,
    ...                   "update_sparsity": 0.5}], summary={"update_sparsity": 0.5}, meta={})
    >>> r.to_dicts()[0]["update_sparsity"]
    0.5
    """

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)

    # --- convenience views ---------------------------------------------------------------------
    @property
    def skipped(self) -> list[dict[str, str]]:
        """Tensors present in both checkpoints but not analysed, each with the reason."""
        return list(self.meta.get("skipped", []))

    @property
    def unmatched(self) -> dict[str, list[str]]:
        """Names found in only one of the checkpoints (``only_base``, ``only_ft``)."""
        return dict(self.meta.get("unmatched", {}))

    def to_dicts(self) -> list[dict[str, Any]]:
        """The rows as plain dicts (copies)."""
        return [dict(r) for r in self.rows]

    def columns(self) -> list[str]:
        cols = [c for c in _LEAD_COLUMNS if any(c in r for r in self.rows)]
        for r in self.rows:
            cols.extend(k for k in r if k not in cols)
        return cols

    def __getitem__(self, name: str) -> dict[Any, Any]:
        """The row of one tensor by name (for trajectory reports, the rows of that name, by step; for an expert
        stack [E, out, in], its experts' rows, by ``expert``)."""
        hits = [r for r in self.rows if r.get("name") == name]
        if not hits:
            raise KeyError(name)
        if "step" not in hits[0] and hits[0].get("expert") is not None and expert_index(name) is None:
            return {r["expert"]: r for r in hits}  # a stack's experts (even one of them)
        return hits[0] if len(hits) == 1 else {r.get("step"): r for r in hits}

    # --- output --------------------------------------------------------------------------------
    def to_json(self, path: str | os.PathLike[str] | None = None, *, indent: int = 2) -> str:
        """Write ``{"rows": [...], "summary": {...}, "meta": {...}}`` (NaN as null) and return the text.

        The file is written to a temporary name and renamed, so an interrupted run never leaves half a file.
        Missing parent folders are created; a ``path`` that is an existing directory raises WeightgeoError.
        """
        text = json.dumps(_jsonable({"rows": self.rows, "summary": self.summary, "meta": self.meta}), indent=indent)
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> Report:
        """Read a report written by :meth:`to_json`. A file written before a rename (CHANGELOG.md) is read
        under today's names, with a ``DeprecationWarning`` saying which; re-save it to update the file."""
        try:
            data = json.loads(Path(path).read_text())
            rows = [_from_json(r) for r in data["rows"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise WeightgeoError(f"{path}: not a weightgeo report JSON ({e}); write one with Report.to_json") from e
        for r in rows:
            if isinstance(r.get("shape"), list):
                r["shape"] = tuple(r["shape"])
        summary, meta = _from_json(data.get("summary", {})), data.get("meta", {})
        renamed = _renamed_keys(rows, summary, meta)
        if renamed:
            warnings.warn(
                f"{path} was written by an older weightgeo: read with today's names ("
                + ", ".join(f"{old} -> {new}" for old, new in renamed)
                + "); re-save it with Report.to_json to update the file (CHANGELOG.md)",
                DeprecationWarning,
                stacklevel=2,
            )
        return cls(rows=rows, summary=summary, meta=meta)

    def to_csv(self, path: str | os.PathLike[str]) -> None:
        """Write the rows as CSV (shape as ``"896x896"``), atomically; missing parent folders are created."""
        cols = self.columns()
        import io

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in self.rows:
            w.writerow({k: _csv_cell(r.get(k)) for k in cols})
        atomic_write_text(path, buf.getvalue())

    def to_pandas(self):  # -> pandas.DataFrame
        """The rows as a pandas DataFrame (requires the ``pandas`` extra)."""
        try:
            import pandas as pd
        except ImportError as e:
            raise ImportError("Report.to_pandas needs pandas: pip install 'weightgeo[pandas]'") from e
        return pd.DataFrame(self.rows, columns=self.columns())

    def plot(self, path: str | os.PathLike[str], **kwargs: Any) -> Path:
        """Draw the report's figures to ``path`` (PNG/PDF; requires the ``plot`` extra)."""
        from .plot import plot_report

        return plot_report(self, path, **kwargs)

    def table(self, *, columns: Sequence[str] | None = None, max_rows: int | None = None) -> str:
        """A fixed-width text table of the rows."""
        cols = list(columns) if columns else [c for c in self.columns() if c != "stored_dtype"]
        rows = self.rows if max_rows is None else self.rows[:max_rows]
        cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
        widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
        lines.append("  ".join("-" * w for w in widths))
        lines += [
            "  ".join(v.rjust(w) if _numeric_cell(v) else v.ljust(w) for v, w in zip(row, widths)) for row in cells
        ]
        if max_rows is not None and len(self.rows) > max_rows:
            lines.append(f"... {len(self.rows) - max_rows} more rows")
        return "\n".join(lines)

    def summary_text(self) -> str:
        lines = ["summary:"]
        flat = {k: v for k, v in self.summary.items() if not isinstance(v, dict)}
        for k, v in flat.items():
            lines.append(f"  {k:<28} {_fmt(v)}")
        for k, v in self.summary.items():
            if isinstance(v, dict) and v and all(isinstance(x, dict) for x in v.values()):
                lines.append(f"{k}:")
                sub = Report(
                    rows=[
                        {
                            "group": g,
                            **{
                                m: x
                                for m, x in vals.items()
                                if not isinstance(x, (dict, list)) and (not m.startswith("n_") or m == "n_tensors")
                            },
                        }
                        for g, vals in v.items()
                    ],
                    summary={},
                )
                lines += ["  " + line for line in sub.table().splitlines()]
        unmatched = self.unmatched
        lines += _checkpoint_lines([c for c in self.skipped if c.get("kind") == "checkpoint"])
        lines += _skipped_lines([c for c in self.skipped if c.get("kind") != "checkpoint"])
        for side, names in unmatched.items():
            if names:
                lines.append(
                    f"{side}: {len(names)} tensor(s) without a partner: "
                    + ", ".join(names[:5])
                    + (" ..." if len(names) > 5 else "")
                )
        in_out = [r["name"] for r in self.rows if r.get("layout") == "in_out"]
        if in_out:
            lines.append(
                f"{len(in_out)} matri{'x is' if len(in_out) == 1 else 'ces are'} stored [in, out] "
                f"(Conv1D, e.g. {in_out[0]}): there side='right' is the output side; use side='left' "
                f"for their input side"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table() + "\n\n" + self.summary_text()

    def __repr__(self) -> str:
        return f"Report(rows={len(self.rows)}, summary_keys={list(self.summary)[:6]})"


def _checkpoint_lines(ckpts: Sequence[Mapping[str, Any]]) -> list[str]:
    """Checkpoints a stream left out: a corrupt one (not the newest) loudly, the others in one line."""
    lines = [
        f"CORRUPT checkpoint {c['name']} (step {c.get('step')}) was left out: {c.get('reason')}; it is not "
        f"the newest, so its save failed or it was damaged: re-save or remove it"
        for c in ckpts
        if c.get("state") == "corrupt"
    ]
    rest = [c for c in ckpts if c.get("state") != "corrupt"]
    if rest:
        lines.append(
            f"left out {len(rest)} incomplete checkpoint(s): "
            + "; ".join(
                f"{c['name']} ({'still being written?' if c.get('state') == 'in_progress' else c.get('state')}: "
                f"{c.get('reason')})"
                for c in rest[:5]
            )
            + (" ..." if len(rest) > 5 else "")
        )
    return lines


def _skipped_lines(skipped: Sequence[Mapping[str, Any]]) -> list[str]:
    """The summary's account of what was skipped: tensors of the pair not analysed, then the entries each
    source holds that are not weights (``side`` base / ft), counted by side and by reason."""
    lines = []
    tensors = [s for s in skipped if "side" not in s]
    if tensors:
        lines.append(
            f"skipped {len(tensors)} tensor(s): "
            + "; ".join(f"{s['name']} ({s['reason']})" for s in tensors[:5])
            + (" ..." if len(tensors) > 5 else "")
        )
    entries = [s for s in skipped if "side" in s]
    if entries:
        sides: dict[str, int] = {}
        reasons: dict[str, int] = {}
        for s in entries:
            sides[str(s["side"])] = sides.get(str(s["side"]), 0) + 1
            why = re.sub(r"'[^']*'", "*", str(s["reason"]))  # "FP8 scales of 'w'" counts with the others
            reasons[why] = reasons.get(why, 0) + 1
        by_reason = sorted(reasons.items(), key=lambda kv: -kv[1])
        lines.append(
            f"not weights, not analysed: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'} ("
            + ", ".join(f"{side} {n}" for side, n in sides.items())
            + "): "
            + "; ".join(f"{n} {why}" for why, n in by_reason[:4])
            + (" ..." if len(by_reason) > 4 else "")
            + " (meta['skipped'])"
        )
    return lines


def _numeric_cell(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if v == 0 or 1e-3 <= abs(v) < 1e5:
            return f"{v:.4f}"
        return f"{v:.3e}"
    if isinstance(v, tuple):
        return "x".join(str(d) for d in v)
    if isinstance(v, list):  # a vector (principal_angles): its length in a table, the values in JSON/CSV
        return f"[{len(v)} values]"
    return str(v)


def _csv_cell(v: Any) -> Any:
    if isinstance(v, tuple):
        return "x".join(str(d) for d in v)
    if isinstance(v, float) and math.isnan(v):
        return ""
    return v
