"""`Report`: per-tensor rows, model-level summary and provenance, with JSON / CSV / pandas / text output."""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint.names import expert_index, expert_tensor
from .defaults import THRESHOLD
from .errors import WeightgeoError
from .jsonfile import read_json
from .means import nanmean
from .metrics.catalog import NOT_SUMMARIZED, RENAMED, STREAM, SUMMED, WEIGHTED
from .outputs import atomic_write_text, check_output_path
from .render.cells import fmt, unmeasured
from .render.text import DEFAULT_WIDTH, rows_table, summary_block

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
    missing: dict[str, int] = {}  # metric -> rows where it is not measurable (null)
    for r in rows:
        for key, v in r.items():
            if key not in _NOT_METRICS and (_is_number(v) or v is None and key in unmeasured(r)) and key not in keys:
                keys.append(key)
        for key in unmeasured(r):
            missing[key] = missing.get(key, 0) + 1
    out: dict[str, Any] = {"n_tensors": len(rows), "numel": sum(int(r.get("numel", 0)) for r in rows)}
    for key in keys:
        have = [r for r in rows if _is_number(r.get(key))]
        vals = [float(r[key]) for r in have]
        mean: float | None = None  # nothing measurable: null, as in the rows
        if key in SUMMED:  # counts and byte sizes: exact integer sums over the rows that have them
            out[key] = sum(int(r[key]) for r in have if not math.isnan(float(r[key])))
            if key in missing:
                out[f"n_{key}"] = len(have)
            continue
        if have and key in _WEIGHTED:
            mean = nanmean(vals, [float(r.get("numel", 1)) for r in have])
        elif have:
            mean = nanmean(vals)
        out[key] = mean
        if key not in _WEIGHTED or key in missing:
            out[f"n_{key}"] = len(have)
        if key == "max_principal_angle" and vals:
            out["max_principal_angle_overall"] = max(vals)
    if missing:
        out["n_not_measurable"] = dict(sorted(missing.items()))
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
        fix = "write one with Report.to_json"
        data = read_json(path, what="weightgeo report", fix=fix)
        try:
            rows = [_from_json(r) for r in data["rows"]]
        except (KeyError, TypeError) as e:
            raise WeightgeoError(f"{path}: not a weightgeo report JSON (no rows: {e}); {fix}") from e
        for r in rows:
            if isinstance(r.get("shape"), list):
                r["shape"] = tuple(r["shape"])
            for key in unmeasured(r):  # null because not measurable (not NaN, undefined): None again
                r[key] = None
        summary, meta = _from_json(data.get("summary", {})), data.get("meta", {})
        _restore_nulls(summary)
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

    def to_pandas(self, *, summary: bool = False):  # -> pandas.DataFrame
        """The rows as a pandas DataFrame, or with ``summary=True`` the model summary (requires the ``pandas``
        extra).

        Rows: one per tensor (per step and tensor for trajectories) with ``layer`` as a nullable integer
        (``<NA>`` outside the blocks), ``rows`` and ``cols`` (the matrix's [out, in]; ``cols`` is ``<NA>``
        for a vector) in place of the ``shape`` tuple, and one float column per metric (NaN = not measured).
        Summary: one row per group, ``"model"`` first and then each module (comparisons), or one per step
        (trajectories), one column per metric.
        """
        from .render.frames import rows_frame, summary_frame

        return summary_frame(self) if summary else rows_frame(self.rows, self.columns())

    def plot(self, path: str | os.PathLike[str], **kwargs: Any) -> Path:
        """Draw the report's figures to ``path`` (PNG/PDF/SVG; requires the ``plot`` extra): the layer x module
        heatmaps and localization bars of a comparison, the curves (with the locking onset) and heatmaps of a
        trajectory; the same panels as :meth:`to_html`."""
        from .plot import plot_report

        return plot_report(self, path, **kwargs)

    def to_html(
        self,
        path: str | os.PathLike[str],
        *,
        label: str | None = None,
        title: str | None = None,
        threshold: float = THRESHOLD,
    ) -> Path:
        """Write one self-contained HTML page of the report (inline SVG, no network): the numbers in words,
        layer x module heatmaps, per-module bars, curves over training, the sortable table, what was skipped
        and why, provenance. Several reports side by side: :func:`weightgeo.write_html`.

        Args:
            path: the ``.html`` file (written atomically; missing folders are created).
            label: the run's name on the page (default: its source's last path components).
            title: the page title. threshold: the locking threshold on Sim_K for trajectories (default 0.9).
        """
        from .render.html import write_html
        from .render.words import default_label

        return write_html({label or default_label(self): self}, path, title=title, threshold=threshold)

    def _repr_html_(self) -> str:
        """The notebook view: summary in words, headline numbers, a heatmap and the head of the table."""
        from .render.html import notebook_html
        from .render.words import default_label

        return notebook_html(self, label=default_label(self))

    def table(
        self,
        *,
        columns: Sequence[str] | None = None,
        max_rows: int | None = None,
        width: int | None = DEFAULT_WIDTH,
    ) -> str:
        """A fixed-width text table of the rows, within ``width`` characters (default 120; ``None``: every
        column at full width). Without ``columns``, the most telling columns that fit are shown and the others
        named under the table."""
        return rows_table(self.rows, columns=columns, max_rows=max_rows, width=width, hint=_MORE_HINT)

    def summary_text(self, *, width: int | None = DEFAULT_WIDTH) -> str:
        """The model summary in a few lines: the model-level numbers, the per-module (or per-step) table and
        what was skipped, unmatched or left out, within ``width`` characters."""
        return summary_block(self, width=width, hint=_MORE_HINT)

    def __str__(self) -> str:
        return self.table() + "\n\n" + self.summary_text()

    def __repr__(self) -> str:
        kind = self.meta.get("kind") or ("rank_curve" if any("step" in r for r in self.rows) else "compare")
        src = self.meta.get("ft") or self.meta.get("stream") or self.meta.get("source")
        head = f"Report({kind}" + (f", {src!s}" if src else "") + f": {len(self.rows)} rows"
        if "steps" in self.summary:
            steps = self.summary["steps"]
            head += f", steps {steps[0]}..{steps[-1]}" if steps else ""
        nums = [f"{k}={fmt(v)}" for k, v in self.summary.items() if k in _REPR_KEYS and not isinstance(v, (dict, list))]
        return head + ("; " + ", ".join(nums) if nums else "") + ")"


def _restore_nulls(summary: dict[str, Any]) -> None:
    """In a summary read from JSON, the means of metrics no row could measure are None again (not NaN)."""
    for key in dict(summary.get("n_not_measurable") or {}):
        if summary.get(f"n_{key}") == 0:
            summary[key] = None
    for v in summary.values():
        if isinstance(v, dict):
            _restore_nulls(v)


_MORE_HINT = "table(width=None) shows all, table(columns=[...]) picks"
# the summary numbers a plain repr shows, in this order when present
_REPR_KEYS = (
    "update_sparsity",
    "max_principal_angle",
    "spectral_drift",
    "low_magnitude_overlap",
    "stable_rank",
    "locking_onset",
)


def _csv_cell(v: Any) -> Any:
    if isinstance(v, tuple):
        return "x".join(str(d) for d in v)
    if isinstance(v, dict):  # not_measurable: "metric, metric: reason; ..."
        by: dict[str, list[str]] = {}
        for key, why in v.items():
            by.setdefault(str(why), []).append(str(key))
        return "; ".join(f"{', '.join(keys)}: {why}" for why, keys in by.items())
    if isinstance(v, float) and math.isnan(v):
        return ""
    return v
