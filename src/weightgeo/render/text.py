"""Terminal tables that fit: 120 columns by default, the most telling columns first, the rest named.

Column headers longer than their values wrap onto two lines at an underscore (``max_principal`` over
``angle``), long tensor names are shortened in the middle, and columns that do not fit are left out and named
under the table with the way to see them. ``width=None`` shows everything.

>>> rows = [["layers.0.self_attn.q_proj.weight", "0.8054", "6.506e-05"]]
>>> print(fit_table(["name", "update_sparsity", "spectral_drift"], rows, width=60))
                                  update    spectral
name                              sparsity  drift
--------------------------------  --------  ---------
layers.0.self_attn.q_proj.weight    0.8054  6.506e-05
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

from ..defaults import TEXT_WIDTH as DEFAULT_WIDTH
from ..defaults import THRESHOLD
from ..validation import given, spell
from .cells import fmt, is_numeric_text, unmeasured
from .panels import final_rows, locking_of, report_kind, step_summary
from .vocabulary import NORM_KEYS, PAIR_PRIMARY, metric_keys

__all__ = [
    "fit_table",
    "table_columns",
    "rows_table",
    "summary_block",
    "accounting_lines",
    "not_measurable_lines",
    "side_by_side",
    "wrap_lines",
    "DEFAULT_WIDTH",
    "shorten_middle",
]

#: the terminal width tables are fitted to unless told otherwise
_GAP = 2
_NAME_MIN = 24

# after the metrics of the catalogue's first rank, in this order; identifiers last (the name carries them)
_PAIR_ORDER = (*PAIR_PRIMARY, "principal_overlap", "stable_rank", "principal_mask_overlap", "mean_principal_angle")
_TRAJ_ORDER = ("stable_rank", *NORM_KEYS, "hill_alpha", "final_subspace_similarity", "spectral_norm")
_LEAD = ("run", "group", "module", "step", "name", "expert", "shape")
_LATE = ("numel", "module", "layer", "method", "stored_dtype", "dtype", "base_name", "ft_name")


def shorten_middle(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters with an ellipsis in the middle (both ends of a tensor name say
    something: the layer and the module)."""
    if len(text) <= width:
        return text
    if width < 5:
        return text[:width]
    head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head) :]


def _split_header(h: str, room: int) -> tuple[str, str]:
    """One or two header lines: split at the underscore that makes the longer part shortest, when the header
    is longer than ``room`` (its column's values)."""
    if len(h) <= room or "_" not in h:
        return "", h
    cuts = [i for i, c in enumerate(h) if c == "_"]
    best = min(cuts, key=lambda i: max(i, len(h) - i - 1))
    return h[:best], h[best + 1 :]


def fit_table(
    columns: Sequence[str], cells: Sequence[Sequence[str]], *, width: int | None = DEFAULT_WIDTH, name_col: str = "name"
) -> str:
    """Lay out ``cells`` (already formatted) under ``columns``; with a ``width``, headers wrap and the
    ``name_col`` column is shortened until the table fits (columns are not dropped here: see
    :func:`table_columns`)."""
    cols = list(columns)
    val_w = [max([len(row[i]) for row in cells] + [1]) for i in range(len(cols))]
    heads = [_split_header(c, max(v, 6)) if width is not None else ("", c) for c, v in zip(cols, val_w)]
    widths = [max(v, len(a), len(b)) for v, (a, b) in zip(val_w, heads)]
    if width is not None and name_col in cols:
        i = cols.index(name_col)
        excess = sum(widths) + _GAP * (len(cols) - 1) - width
        if excess > 0:
            widths[i] = max(_NAME_MIN, len(name_col), widths[i] - excess)
    lines = []
    if any(a for a, _ in heads):
        lines.append((" " * _GAP).join(a.ljust(w) for (a, _), w in zip(heads, widths)).rstrip())
    lines.append((" " * _GAP).join(b.ljust(w) for (_, b), w in zip(heads, widths)).rstrip())
    lines.append((" " * _GAP).join("-" * w for w in widths))
    for row in cells:
        out = []
        for j, (v, w) in enumerate(zip(row, widths)):
            v = shorten_middle(v, w) if cols[j] == name_col else v
            out.append(v.rjust(w) if is_numeric_text(v) else v.ljust(w))
        lines.append((" " * _GAP).join(out).rstrip())
    return "\n".join(lines)


def _cell_width(col: str, values: Sequence[str]) -> int:
    val = max([len(v) for v in values] + [1])
    a, b = _split_header(col, max(val, 6))
    return max(val, len(a), len(b))


def table_columns(
    rows: Sequence[Mapping[str, Any]], *, width: int | None = DEFAULT_WIDTH, trajectory: bool = False
) -> tuple[list[str], list[str]]:
    """(columns shown, columns left out) for a table of ``rows`` within ``width``: identifiers, then the
    metrics in order of interest, then bookkeeping; without a width, every column."""
    present: list[str] = []
    for r in rows:
        present += [k for k, v in r.items() if k not in present and not isinstance(v, (dict, list))]
    metrics = metric_keys(rows)
    order = _TRAJ_ORDER if trajectory else _PAIR_ORDER
    ranked = [c for c in _LEAD if c in present]
    ranked += [m for m in order if m in metrics]
    ranked += [m for m in metrics if m not in ranked]
    ranked += [c for c in present if c not in ranked and c not in _LATE]
    ranked += [c for c in _LATE if c in present]
    if width is None:
        return ranked, []
    shown: list[str] = []
    used = 0
    for c in ranked:
        w = _cell_width(c, [fmt(r.get(c)) for r in rows])
        if c == "name":
            w = min(w, 44)  # a long name is shortened rather than crowding out the metrics
        if shown and used + _GAP + w > width:
            continue
        shown.append(c)
        used += w + (_GAP if len(shown) > 1 else 0)
    return shown, [c for c in ranked if c not in shown]


def wrap_lines(lines: Sequence[str], width: int | None = DEFAULT_WIDTH) -> list[str]:
    """Prose lines wrapped to ``width`` (continuations indented); table lines are left alone."""
    if width is None:
        return list(lines)
    out: list[str] = []
    for line in lines:
        if len(line) <= width:
            out.append(line)
        else:
            lead = len(line) - len(line.lstrip())
            out += textwrap.wrap(
                line, width, subsequent_indent=" " * (lead + 2), break_long_words=False, break_on_hyphens=False
            )
    return out


def _summary_of(report: Any) -> Mapping[str, Any]:
    if report_kind(report) == "trajectory":
        step, _ = final_rows(report)
        return step_summary(report, step)
    return report.summary or {}


def side_by_side(runs: Mapping[str, Any], *, width: int | None = DEFAULT_WIDTH, threshold: float = THRESHOLD) -> str:
    """The model summaries of several runs in one table: a row per metric, a column per run (trajectories:
    means at each run's last checkpoint and the locking onset). Runs that do not fit ``width`` continue in a
    second block."""
    summaries = {lb: _summary_of(r) for lb, r in runs.items()}
    keys: list[str] = []
    for s in summaries.values():
        keys += [
            k
            for k, v in s.items()
            if k not in keys and not isinstance(v, (dict, list)) and not k.startswith("n_") and k != "numel"
        ]
    keys = [k for k in keys if k != "max_principal_angle_overall"]
    keys = metric_keys([{k: 0.0 for k in keys}])
    keys = [
        k
        for k in keys
        if not (k == "final_subspace_similarity" and all(report_kind(r) == "trajectory" for r in runs.values()))
    ]
    if "max_principal_angle" in keys and any("max_principal_angle_overall" in s for s in summaries.values()):
        keys.insert(keys.index("max_principal_angle") + 1, "max_principal_angle_overall")
    keys = [c for c in ("n_tensors", "numel") if any(c in s for s in summaries.values())] + keys
    table: dict[str, list[str]] = {k: [fmt(summaries[lb].get(k)) for lb in runs] for k in keys}
    if any(report_kind(r) == "trajectory" for r in runs.values()):
        onsets = []
        for r in runs.values():
            lock = locking_of(r, threshold) if report_kind(r) == "trajectory" else None
            onsets.append("-" if lock is None else "never" if lock.step is None else str(lock.step))
        table["locking_onset"] = onsets
        table = {"last_step": [str(final_rows(r)[0] or "-") for r in runs.values()], **table}
    labels = list(runs)
    first = max(len(k) for k in [*table, "metric"])
    blocks: list[list[int]] = [[]]
    used = first
    for j, lb in enumerate(labels):
        w = max(len(lb), *(len(v[j]) for v in table.values())) if table else len(lb)
        if width is not None and blocks[-1] and used + _GAP + w > width:
            blocks.append([])
            used = first
        blocks[-1].append(j)
        used += _GAP + w
    out = []
    for block in blocks:
        cols = ["metric", *[labels[j] for j in block]]
        cells = [[k, *[v[j] for j in block]] for k, v in table.items()]
        out.append(fit_table(cols, cells, width=None, name_col=""))
    return "\n\n".join(out)


_HIDDEN = ("base_name", "ft_name", "stored_dtype", "dtype", "not_measurable")


def rows_table(
    rows: Sequence[Mapping[str, Any]],
    *,
    columns: Sequence[str] | None = None,
    max_rows: int | None = None,
    width: int | None = DEFAULT_WIDTH,
    hint: str = "",
) -> str:
    """The per-tensor table of ``rows`` within ``width``; ``columns`` picks them (all shown); the columns left
    out are named under the table with ``hint`` (how to see them, in the caller's syntax)."""
    shown = rows if max_rows is None else rows[:max_rows]
    left: list[str] = []
    if columns:
        cols = list(columns)
    else:
        cols, left = table_columns(rows, width=width, trajectory=any("step" in r for r in rows))
        cols = [c for c in cols if c not in _HIDDEN]
        left = [c for c in left if c not in _HIDDEN]
    text = fit_table(cols, [[fmt(r[c]) if c in r else "-" for c in cols] for r in shown], width=width)
    if max_rows is not None and len(rows) > max_rows:
        text += f"\n... {len(rows) - max_rows} more rows"
    if left:
        text += "\n" + "\n".join(wrap_lines([f"({len(left)} more columns: {', '.join(left)}; {hint})"], width))
    return text


def summary_block(report: Any, *, width: int | None = DEFAULT_WIDTH, hint: str = "") -> str:
    """The model summary in a few lines: the model-level numbers (two to a line at 120 columns), the
    per-module (or per-step) table and what was skipped, unmatched or left out, within ``width``."""
    summary = report.summary or {}
    flat = {k: v for k, v in summary.items() if not isinstance(v, (dict, list))}
    n, numel = flat.pop("n_tensors", None), flat.pop("numel", None)
    counts = {k[2:]: v for k, v in flat.items() if k.startswith("n_") and isinstance(v, int)}
    svd = max(counts.values(), default=None)
    head = "summary:"
    if n is not None:
        head += f" {n} tensors" + (f" ({numel:,} parameters)" if isinstance(numel, int) else "")
        if svd is not None and svd != n:
            head += f"; SVD metrics over {svd} matrices"
    lines = [head]
    cells = [f"{k:<27} {fmt(v):>10}" for k, v in flat.items() if not k.startswith("n_")]
    per_line = 1 if width is None else max(1, (width - 2) // 40)
    lines += ["  " + "   ".join(cells[i : i + per_line]).rstrip() for i in range(0, len(cells), per_line)]
    fewer = [f"{k} over {c}" for k, c in counts.items() if svd is not None and c != svd]
    if fewer:
        lines.append("  measured on fewer matrices (the others not measurable): " + ", ".join(fewer))
    table_lines = []
    for k, v in summary.items():
        if isinstance(v, dict) and v and all(isinstance(x, dict) for x in v.values()):
            group = k.removeprefix("by_") if k.startswith("by_") else "group"
            group_rows = [
                {
                    group: g,
                    **{
                        m: x
                        for m, x in vals.items()
                        if not isinstance(x, (dict, list)) and not m.startswith("n_") and m != "numel"
                    },
                }
                for g, vals in v.items()
            ]
            inner = None if width is None else width - 2
            table_lines.append(f"{k}:")
            table_lines += ["  " + line for line in rows_table(group_rows, width=inner, hint=hint).splitlines()]
    return "\n".join(wrap_lines(lines, width) + table_lines + accounting_lines(report, width=width))


def accounting_lines(report: Any, *, width: int | None = DEFAULT_WIDTH) -> list[str]:
    """What a report left out, in words: metrics not measurable (and why), mixed storage formats, checkpoints,
    skipped tensors, entries that are not weights, unmatched names, Conv1D layouts (empty when nothing was)."""
    notes = not_measurable_lines(report.rows)
    mixed = (report.meta or {}).get("mixed_formats") or {}
    if mixed:
        notes.append(
            f"{sum(mixed.values())} tensor(s) stored in different float formats in base and fine-tune ("
            + "; ".join(f"{how}: {n}" for how, n in mixed.items())
            + f"): the rows' compared_in says the rule; {spell('dtype')} chooses the format instead"
        )
    skipped = list((report.meta or {}).get("skipped", []))
    notes += _checkpoint_lines([c for c in skipped if c.get("kind") == "checkpoint"])
    notes += _skipped_lines([c for c in skipped if c.get("kind") != "checkpoint"])
    for side, names in ((report.meta or {}).get("unmatched") or {}).items():
        if names:
            notes.append(
                f"{side}: {len(names)} tensor(s) without a partner: "
                + ", ".join(names[:5])
                + (" ..." if len(names) > 5 else "")
            )
    in_out = [r["name"] for r in report.rows if r.get("layout") == "in_out"]
    if in_out:
        notes.append(
            f"{len(in_out)} matri{'x is' if len(in_out) == 1 else 'ces are'} stored [in, out] "
            f"(Conv1D, e.g. {in_out[0]}): there side='right' is the output side; use side='left' "
            f"for their input side"
        )
    return wrap_lines(notes, width)


def not_measurable_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The summary's account of null metrics: which, in how many rows, why, and the option that measures them (in
    the syntax of the interface in use)."""
    groups: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for r in rows:
        by_reason: dict[str, list[str]] = {}
        for key, why in unmeasured(r).items():
            by_reason.setdefault(str(why), []).append(key)
        for why, names in by_reason.items():
            groups.setdefault((why.split(" ", 1)[0], tuple(names)), []).append(why)
    lines = []
    for (option, keys), reasons in groups.items():
        fix = {  # what measures them, in the syntax of the interface in use
            "k": f"a {spell('k')} below the smaller side measures them, e.g. {given('k', 0.125)} (an eighth of "
            f"each matrix's smaller side, the default)",
            "rank": f"a {spell('rank')} below the smaller side measures it, e.g. {given('rank', 0.125)}",
            "K": f"a {spell('k')} below the smaller side measures them",
        }.get(option, "")
        lines.append(
            f"NOT MEASURABLE (null, n/m in the table) in {len(reasons)} of {len(rows)} rows: {', '.join(keys)}: "
            f"e.g. {reasons[0]}; {fix}"
        )
    return lines


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
