"""One self-contained HTML page for one report or several side by side; and the compact notebook view.

The page opens offline: styles and figures are inline (SVG), nothing is fetched, and the only script sorts and
filters the per-tensor table. Content, top to bottom: a plain-language summary, the headline model numbers (each
with what it says and its random baseline), curves over training (trajectories, the locking onset marked), layer
× module heatmaps of every per-matrix metric on colour scales shared by the runs, per-module bars with the runs
side by side, the per-tensor table, what was skipped, unmatched or not measured and why, and provenance.

>>> from weightgeo.report import Report
>>> rows = [{"name": "layers.0.q_proj.weight", "shape": (4, 4), "numel": 16, "module": "q_proj", "layer": 0,
...          "update_sparsity": 0.5, "spectral_drift": None}]
>>> page = report_page({"SFT": Report(rows=rows, summary={"update_sparsity": 0.5}, meta={"kind": "compare"})})
>>> page.startswith("<!doctype html>") and "SFT" in page and "n/m" in page
True
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import re
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

from .._version import __version__
from ..defaults import THRESHOLD
from ..errors import WeightgeoError
from ..outputs import atomic_write_text
from ..validation import check_threshold
from .cells import NOT_MEASURED, fmt, measured, partial_reasons, reason
from .panels import Panel, final_rows, locking_of, pair_panels, report_kind, step_summary, trajectory_panels
from .svg import PALETTE, panel_svg
from .vocabulary import NORM_KEYS, PAIR_PRIMARY, describe, metric_keys, random_baseline
from .words import takeaways

__all__ = ["report_page", "write_html", "notebook_html", "summary_keys", "figures_html", "STYLE"]

#: the page's stylesheet (scoped to class ``wg``), for pages that embed :func:`figures_html`
STYLE = """
.wg{font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;color:#1d1d1f;line-height:1.45;
 max-width:1180px;margin:0 auto;padding:0 18px 40px}
.wg h1{font-size:1.6em;margin:.6em 0 .1em}.wg h2{font-size:1.25em;margin:1.6em 0 .4em;border-bottom:1px solid #ddd}
.wg h3{font-size:1.02em;margin:1.1em 0 .2em}.wg .sub{color:#555;margin:0 0 .8em}
.wg nav a{margin-right:1em;color:#0b63b6;text-decoration:none;font-size:.92em}
.wg table{border-collapse:collapse;font-size:.86em;margin:.4em 0}
.wg th,.wg td{border-bottom:1px solid #e6e6e6;padding:3px 8px;text-align:left;vertical-align:top}
.wg td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.wg td.nm,.wg span.nm{color:#999;font-style:italic;cursor:help}
.wg th{background:#f6f6f6;position:sticky;top:0;white-space:nowrap}.wg th.s{cursor:pointer;white-space:nowrap}
.wg th.s:after{content:' ⇅';color:#aaa;font-size:.8em}
.wg figure{margin:.6em 0 1.2em}.wg figcaption{color:#444;font-size:.88em;max-width:920px}
.wg .row{display:flex;flex-wrap:wrap;gap:14px 26px;align-items:flex-start}
.wg .run{display:inline-block;width:.8em;height:.8em;border-radius:2px;margin-right:.3em;vertical-align:-1px}
.wg .lead li{margin:.15em 0}.wg details{margin:.5em 0}.wg summary{cursor:pointer;color:#0b63b6}
.wg input.filter{padding:4px 8px;width:320px;margin:.3em 0;border:1px solid #bbb;border-radius:4px}
.wg .scroll{max-height:640px;overflow:auto;border:1px solid #eee}
.wg code{font-size:.92em;color:#444}.wg td.lb{white-space:nowrap}
"""

_JS = """
document.querySelectorAll('table.sortable').forEach(function(t){
 t.querySelectorAll('th').forEach(function(th,i){th.classList.add('s');th.addEventListener('click',function(){
  var b=t.tBodies[0],rs=Array.prototype.slice.call(b.rows),d=th.dataset.d==='1'?-1:1;th.dataset.d=d===1?'1':'0';
  rs.sort(function(x,y){var a=x.cells[i],c=y.cells[i],p=a.dataset.v,q=c.dataset.v;
   if(p!==undefined||q!==undefined){p=p===undefined?NaN:parseFloat(p);q=q===undefined?NaN:parseFloat(q);
    if(isNaN(p))return 1;if(isNaN(q))return -1;return d*(p-q);}
   return d*a.textContent.localeCompare(c.textContent);});
  rs.forEach(function(r){b.appendChild(r);});});});});
document.querySelectorAll('input.filter').forEach(function(inp){inp.addEventListener('input',function(){
 var q=inp.value.toLowerCase(),t=document.getElementById(inp.dataset.table);
 Array.prototype.forEach.call(t.tBodies[0].rows,function(r){
  r.style.display=r.textContent.toLowerCase().indexOf(q)<0?'none':'';});});});
"""

_SUMMARY_SKIP = ("n_tensors", "numel", "max_principal_angle_overall")
# the headline numbers of the compact notebook view (the page shows them all)
_NOTEBOOK_KEYS = (*PAIR_PRIMARY, "stable_rank", *NORM_KEYS, "hill_alpha")


def summary_keys(summary: Mapping[str, Any]) -> list[str]:
    """The metric keys of a model summary (not counts, not breakdowns)."""
    return [
        k
        for k, v in summary.items()
        if not isinstance(v, (dict, list)) and not k.startswith("n_") and k not in _SUMMARY_SKIP
    ]


def _e(x: Any) -> str:
    return escape(str(x))


def _num_cell(v: Any, why: str = "") -> str:
    if measured(v):
        f = float(v)
        data = f' data-v="{f!r}"' if math.isfinite(f) else f' data-v="{"1e308" if f > 0 else "-1e308"}"'
        return f'<td class="n"{data}>{_e(fmt(v))}</td>'
    if v is None or (isinstance(v, float) and math.isnan(v)) or why:
        return f'<td class="n nm" title="{_e(why or "not measured")}">{NOT_MEASURED}</td>'
    return f"<td>{_e(fmt(v))}</td>"


def _run_dot(i: int) -> str:
    return f'<span class="run" style="background:{PALETTE[i % len(PALETTE)]}"></span>'


# ------------------------------------------------------------------------------------------------------------
# sections
def _headline(runs: Mapping[str, Any], kind: str, *, only: Sequence[str] | None = None) -> str:
    labels = list(runs)
    rows_html = []
    if kind == "trajectory":
        summaries = {}
        for lb, rep in runs.items():
            step, _ = final_rows(rep)
            summaries[lb] = step_summary(rep, step)
    else:
        summaries = {lb: rep.summary or {} for lb, rep in runs.items()}
    keys: list[str] = []
    for s in summaries.values():
        keys += [k for k in summary_keys(s) if k not in keys]
    keys = [k for k in metric_keys([{k: 0.0 for k in keys}]) if k in keys]
    if kind == "trajectory":  # Sim_K(t_end, t_end) = 1 by construction: the curves and the 20% heatmap say it
        keys = [k for k in keys if k != "final_subspace_similarity"]
    if only is not None:
        keys = [k for k in keys if k in only]
    for key in keys:
        words = describe(key)
        base = [random_baseline(key, rep.meta or {}, rep.rows) for rep in runs.values()]
        base_txt = ""
        if any(b is not None for b in base):
            vals = sorted({round(b, 4) for b in base if b is not None})
            base_txt = ", ".join(fmt(v) for v in vals) + (f" ({words.baseline})" if words.baseline else "")
        elif words.baseline:
            base_txt = words.baseline
        cells = "".join(_num_cell(summaries[lb].get(key), "not measured in this run") for lb in labels)
        rows_html.append(
            f"<tr><td><b>{_e(words.label)}</b><br><code>{_e(key)}</code></td>{cells}"
            f"<td>{_e(words.sentence)}</td><td>{_e(base_txt)}</td></tr>"
        )
    if kind == "trajectory":
        cells = ""
        for rep in runs.values():
            lock = locking_of(rep)
            v = None if lock is None else lock.step
            cells += (
                f'<td class="n">{_e(v)}</td>' if v is not None else '<td class="n nm" title="never locks">never</td>'
            )
        rows_html.append(
            f"<tr><td><b>locking onset</b><br><code>locking_onset</code></td>{cells}"
            f"<td>{_e(describe('locking_onset').sentence)}</td><td></td></tr>"
        )
    head = "".join(f"<th>{_run_dot(i)}{_e(lb)}</th>" for i, lb in enumerate(labels))
    which = " (means over matrices at each run's last checkpoint)" if kind == "trajectory" else ""
    return (
        f'<section id="headline"><h2>Headline numbers{_e(which)}</h2>'
        f'<table class="headline"><thead><tr><th>metric</th>{head}<th>what it says</th><th>random baseline</th>'
        f"</tr></thead><tbody>{''.join(rows_html)}</tbody></table>"
        "<p class='sub'>Model-level values: <code>update_sparsity</code> weighted by parameters, the rest "
        "unweighted means over the matrices that have them; n/m = not measured (hover for why).</p></section>"
    )


def _figures(panels: Sequence[Panel], *, row: bool = False, colours: Mapping[str, str] | None = None) -> str:
    figs = []
    for p in panels:
        svg = panel_svg(p, colours)
        width = re.search(r'width="(\d+)"', svg)
        style = f' style="width:{max(int(width.group(1)), 300)}px"' if width else ""
        figs.append(
            f'<figure data-key="{_e(p.key)}"{style}><figcaption><b>{_e(p.title)}.</b></figcaption>{svg}'
            f"<figcaption>{_e(p.caption)}</figcaption></figure>"
        )
    return f'<div class="row">{"".join(figs)}</div>' if row else "".join(figs)


def _table(runs: Mapping[str, Any], kind: str, tid: str, *, max_rows: int | None = None) -> str:
    multi = len(runs) > 1
    data: list[tuple[str, Mapping[str, Any], Mapping[str, str], Mapping[str, Any]]] = []
    note = ""
    for lb, rep in runs.items():
        partial = partial_reasons(rep.meta or {})
        rows: list[Mapping[str, Any]] = list(rep.rows)
        onsets: Mapping[str, Any] = {}
        if kind == "trajectory":
            step, rows = final_rows(rep)
            lock = locking_of(rep)
            onsets = {} if lock is None else lock.per_matrix
            note = f" Trajectories: the rows of each run's last checkpoint (step {step}); every step is in the JSON."
        data += [(lb, r, partial, onsets) for r in rows]
    keys = metric_keys([r for _, r, _, _ in data])
    ident = ["name", "shape", "layer", "module"] + (["expert"] if any("expert" in r for _, r, _, _ in data) else [])
    if kind == "trajectory":
        ident = ["step", *ident]
        keys = [*keys, "locking_onset"]
    head = ("<th>run</th>" if multi else "") + "".join(f"<th>{_e(c)}</th>" for c in ident)
    head += "".join(f'<th title="{_e(describe(k).sentence)}">{_e(k)}</th>' for k in keys)
    body = []
    shown = data if max_rows is None else data[:max_rows]
    labels = list(runs)
    for lb, r, why_partial, onsets in shown:
        cells = [f"<td class='lb'>{_run_dot(labels.index(lb))}{_e(lb)}</td>"] if multi else []
        for c in ident:
            v = r.get(c)
            if c == "layer":
                lay = int(v) if isinstance(v, (int, float)) and measured(v) else None  # JSON's NaN = no layer
                cells.append(f'<td class="n" data-v="{lay}">{lay}</td>' if lay is not None else "<td></td>")
            else:
                cells.append(f"<td>{_e(fmt(v) if v is not None else '')}</td>")
        for k in keys:
            if k == "locking_onset":
                on = onsets.get(str(r.get("name")))
                cells.append(_num_cell(on, "") if on is not None else '<td class="n nm" title="never locks">never</td>')
                continue
            v = r.get(k)
            why = "" if measured(v) else reason(r, k, why_partial)
            cells.append(_num_cell(v, why) if (k in r or why) else '<td class="n nm" title="not computed">—</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    table = f'<table class="sortable" id="{tid}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
    if max_rows is not None:
        more = f"<p class='sub'>… {len(data) - max_rows} more rows</p>" if len(data) > max_rows else ""
        return table + more
    return (
        f'<p class="sub">Click a column to sort; type to filter.{_e(note)} n/m = not measured, hover for why.</p>'
        f'<input class="filter" data-table="{tid}" placeholder="filter rows (name, module, run …)">'
        f'<div class="scroll">{table}</div>'
    )


def _count_by_reason(items: Sequence[tuple[str, str]]) -> list[tuple[str, int, list[str]]]:
    groups: dict[str, list[str]] = {}
    for name, why in items:
        groups.setdefault(why, []).append(name)
    return sorted(((w, len(ns), ns) for w, ns in groups.items()), key=lambda t: -t[1])


def _accounting(runs: Mapping[str, Any], kind: str) -> str:
    """What was skipped, unmatched or not measured, per run, grouped by reason (counts, then the names)."""
    out = []
    for i, (lb, rep) in enumerate(runs.items()):
        meta = rep.meta or {}
        lines: list[tuple[str, str, int, list[str]]] = []
        skipped = meta.get("skipped", []) or []
        ckpts = [s for s in skipped if s.get("kind") == "checkpoint"]
        tensors = [s for s in skipped if "side" not in s and s.get("kind") != "checkpoint"]
        entries = [s for s in skipped if "side" in s]
        for why, n, names in _count_by_reason([(str(s.get("name")), str(s.get("reason"))) for s in ckpts]):
            lines.append(("checkpoints left out", why, n, names))
        for why, n, names in _count_by_reason([(str(s.get("name")), str(s.get("reason"))) for s in tensors]):
            lines.append(("tensors skipped", why, n, names))
        for why, n, names in _count_by_reason(
            [(f"{s.get('side')}: {s.get('name')}", str(s.get("reason"))) for s in entries]
        ):
            lines.append(("entries that are not weights", why, n, names))
        for side, names in (meta.get("unmatched") or {}).items():
            if names:
                lines.append(("unmatched", f"{side}: found in one checkpoint only", len(names), list(names)))
        for why, n, names in _count_by_reason(
            [(str(p.get("name")), str(p.get("reason"))) for p in meta.get("partial", []) or []]
        ):
            lines.append(("SVD metrics not computed", why, n, names))
        zero = meta.get("zero_updates") or []
        for why, n, names in _count_by_reason(
            [(f"{z.get('name')} @ {z.get('step')}", str(z.get("reason"))) for z in zero]
        ):
            lines.append(("no row", why, n, names))
        partial = partial_reasons(meta)
        _, rows = final_rows(rep) if kind == "trajectory" else (None, rep.rows)
        nm: list[tuple[str, str]] = []
        for r in rows:
            if str(r.get("name")) in partial:
                continue
            for k in metric_keys([r]):
                if k in r and not measured(r.get(k)):
                    nm.append((f"{r.get('name')}: {k}", reason(r, k, partial)))
        for why, n, names in _count_by_reason(nm):
            lines.append(("values not measurable", why, n, names))
        if meta.get("in_out_layout"):
            lines.append(
                (
                    "stored [in, out]",
                    "Conv1D layout: side='right' is the output side",
                    len(meta["in_out_layout"]),
                    list(meta["in_out_layout"]),
                )
            )
        body = "".join(
            f"<tr><td>{_e(what)}</td><td class='n'>{n}</td><td>{_e(why)}</td><td><details><summary>"
            f"{_e(names[0])}{' …' if n > 1 else ''}</summary>{_e(', '.join(names))}</details></td></tr>"
            for what, why, n, names in lines
        )
        table = (
            f"<table><thead><tr><th>what</th><th>count</th><th>why</th><th>which</th></tr></thead>"
            f"<tbody>{body}</tbody></table>"
            if lines
            else "<p>Nothing was skipped, unmatched or left unmeasured.</p>"
        )
        out.append(f"<h3>{_run_dot(i)}{_e(lb)}</h3>{table}")
    return (
        '<section id="accounting"><h2>Skipped, unmatched, not measured</h2>'
        "<p class='sub'>Nothing is dropped silently: every tensor or value without a number is counted here with "
        "the reason.</p>" + "".join(out) + "</section>"
    )


_PROVENANCE = (
    "kind",
    "base",
    "ft",
    "stream",
    "source",
    "steps",
    "metrics",
    "params",
    "device",
    "hardware",
    "pass_dtype",
    "world_size",
    "seconds",
    "weightgeo_version",
    "torch_version",
    "cache",
)


def _short(v: Any) -> str:
    if isinstance(v, Mapping):
        return "; ".join(f"{k}={_short(x)}" for k, x in v.items() if x is not None and not isinstance(x, (list, dict)))
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v[:12]) + (f" … ({len(v)})" if len(v) > 12 else "")
    return str(v)


def _provenance(runs: Mapping[str, Any]) -> str:
    labels = list(runs)
    keys = [k for k in _PROVENANCE if any(k in (rep.meta or {}) for rep in runs.values())]
    keys += sorted(
        {
            k
            for rep in runs.values()
            for k, v in (rep.meta or {}).items()
            if k not in keys and not isinstance(v, (list, dict)) and k not in ("kind",)
        }
    )
    head = "".join(f"<th>{_run_dot(i)}{_e(lb)}</th>" for i, lb in enumerate(labels))
    body = "".join(
        f"<tr><td><code>{_e(k)}</code></td>"
        + "".join(f"<td>{_e(_short((rep.meta or {}).get(k, '')))}</td>" for rep in runs.values())
        + "</tr>"
        for k in keys
    )
    writer = (
        f"Page written {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')} by weightgeo "
        f"{__version__} (Python {platform.python_version()}). Measurements are as recorded in each report's meta."
    )
    return (
        f'<section id="provenance"><h2>Provenance</h2><p class="sub">{_e(writer)}</p>'
        f"<table><thead><tr><th>field</th>{head}</tr></thead><tbody>{body}</tbody></table></section>"
    )


# ------------------------------------------------------------------------------------------------------------
def report_page(runs: Mapping[str, Any], *, title: str | None = None, threshold: float = THRESHOLD) -> str:
    """The page of ``runs`` (label -> report; comparisons, trajectories or both) as one HTML string."""
    kinds = [report_kind(r) for r in runs.values()]
    pairs = {lb: r for lb, r in runs.items() if report_kind(r) == "compare"}
    trajs = {lb: r for lb, r in runs.items() if report_kind(r) == "trajectory"}
    kind = "trajectory" if set(kinds) == {"trajectory"} else "compare"
    labels = list(runs)
    title = title or (("weightgeo: " + " vs ".join(labels)) if len(labels) > 1 else f"weightgeo {kind}: {labels[0]}")
    nav = ["headline", "figures", "table", "accounting", "provenance"]
    parts = [
        f'<header><h1>{_e(title)}</h1><p class="sub">'
        + " · ".join(f"{_run_dot(i)}{_e(lb)}" for i, lb in enumerate(labels))
        + f" · {_e(', '.join(sorted(set(kinds))))}</p>"
        + "<nav>"
        + "".join(f'<a href="#{n}">{n}</a>' for n in nav)
        + "</nav></header>",
        "<section id='summary'><h2>In short</h2><ul class='lead'>"
        + "".join(f"<li>{_e(t)}</li>" for t in takeaways(runs, threshold=threshold))
        + "</ul></section>",
    ]
    if pairs:
        parts.append(_headline(pairs, "compare"))
    if trajs:
        parts.append(_headline(trajs, "trajectory") if not pairs else "")
    parts.append(figures_html(runs, threshold=threshold))
    table_parts = []
    if pairs:
        table_parts.append(_table(pairs, "compare", "rows-pairs"))
    if trajs:
        table_parts.append(_table(trajs, "trajectory", "rows-trajectories"))
    parts.append('<section id="table"><h2>Per tensor</h2>' + "".join(table_parts) + "</section>")
    parts.append(_accounting(runs, kind))
    parts.append(_provenance(runs))
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>{_e(title)}</title><style>{STYLE}</style></head><body><div class='wg'>"
        + "".join(parts)
        + f"</div><script>{_JS}</script></body></html>\n"
    )


def _folded(summary: str, panels: Sequence[Panel], colours: Mapping[str, str]) -> str:
    """Panels behind a click ('' when there are none)."""
    if not panels:
        return ""
    return f"<details><summary>{_e(summary)}</summary>{_figures(panels, row=True, colours=colours)}</details>"


def figures_html(runs: Mapping[str, Any], *, threshold: float = THRESHOLD) -> str:
    """The figures section of :func:`report_page` on its own (for embedding in another page that uses
    :data:`STYLE`): curves over training, layer x module heatmaps on shared scales, per-module bars."""
    pairs = {lb: r for lb, r in runs.items() if report_kind(r) == "compare"}
    trajs = {lb: r for lb, r in runs.items() if report_kind(r) == "trajectory"}
    labels = list(runs)
    colours = {lb: PALETTE[i % len(PALETTE)] for i, lb in enumerate(labels)}
    figs = ['<section id="figures"><h2>Figures</h2>']
    if trajs:
        tp = trajectory_panels(trajs, threshold=threshold)
        figs.append("<h3>Over training</h3>" + _figures(tp.curves, row=True, colours=colours))
        figs.append("<h3>Where in the network</h3>" + _figures(tp.heatmaps, row=True, colours=colours))
        figs.append(_folded("more per-matrix metrics", tp.more_heatmaps, colours))
        if tp.modules:
            figs.append("<h3>By module</h3>" + _figures(tp.modules, row=True, colours=colours))
    if pairs:
        pp = pair_panels(pairs)
        figs.append("<h3>Where in the network</h3>" + _figures(pp.heatmaps, row=True, colours=colours))
        figs.append(_folded("heatmaps of the other per-matrix metrics", pp.more_heatmaps, colours))
        if pp.modules or pp.model:
            figs.append(
                "<h3>By module and for the model</h3>" + _figures([*pp.model, *pp.modules], row=True, colours=colours)
            )
    figs.append("</section>")
    return "".join(figs)


def write_html(
    reports: Mapping[str, Any], path: str | os.PathLike[str], *, title: str | None = None, threshold: float = THRESHOLD
) -> Path:
    """Write one self-contained HTML page with several reports side by side (comparisons, trajectories or
    both): shared colour scales, every run's label in every figure; returns the path.

    >>> import tempfile, weightgeo
    >>> rows = [{"name": "layers.0.q_proj.weight", "shape": (4, 4), "numel": 16, "module": "q_proj", "layer": 0,
    ...          "update_sparsity": 0.5}]
    >>> r = weightgeo.Report(rows=rows, summary={"update_sparsity": 0.5}, meta={"kind": "compare"})
    >>> weightgeo.write_html({"SFT": r, "OPD": r}, tempfile.mkdtemp() + "/page.html").suffix
    '.html'

    Args:
        reports: label -> :class:`~weightgeo.Report` (``compare`` / ``rank_curve`` results, or
            ``Report.from_json`` of saved ones), in the order to show them.
        path: the ``.html`` file, written atomically (missing folders are created).
        title: the page title (default: the labels). threshold: the locking threshold on Sim_K (default 0.9).
    """
    if not isinstance(reports, Mapping) or not reports:
        raise WeightgeoError("write_html: pass {'label': report, ...} with at least one report")
    for label, rep in reports.items():
        if not isinstance(label, str) or not all(hasattr(rep, a) for a in ("rows", "summary", "meta")):
            raise WeightgeoError(
                f"write_html: {label!r} -> {type(rep).__name__}; give string labels and weightgeo Reports "
                "(weightgeo.compare, rank_curve or Report.from_json)"
            )
    check_threshold(threshold)
    return atomic_write_text(path, report_page(reports, title=title, threshold=threshold), what="HTML report")


def notebook_html(report: Any, *, label: str, max_rows: int = 10) -> str:
    """The compact notebook view: the plain summary, the headline numbers, the first heatmap and the head of
    the per-tensor table (no script: notebooks do not run it)."""
    runs = {label: report}
    kind = report_kind(report)
    if kind == "trajectory":
        tp = trajectory_panels(runs)
        panels: list[Panel] = [*[p for p in tp.curves if p.key == "final_subspace_similarity"][:1], *tp.heatmaps[:1]]
    else:
        panels = [*pair_panels(runs).heatmaps[:1]]
    n = len(final_rows(report)[1]) if kind == "trajectory" else len(report.rows)
    return (
        f"<div class='wg' style='max-width:none;padding:0'><style>{STYLE}</style>"
        f"<b>weightgeo {kind} report</b> · {_e(label)} · {n} tensors"
        + "<ul class='lead'>"
        + "".join(f"<li>{_e(t)}</li>" for t in takeaways(runs))
        + "</ul>"
        + _headline(runs, kind, only=_NOTEBOOK_KEYS).replace("<h2>", "<h3>").replace("</h2>", "</h3>")
        + _figures(panels, row=True)
        + _table(runs, kind, "wg-head", max_rows=max_rows)
        + "<p class='sub'>Report.to_html(path) writes the full page; Report.to_pandas() the table.</p></div>"
    )
