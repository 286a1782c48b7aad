"""Figures of weightgeo reports as image files (PNG, PDF, SVG); needs the ``plot`` extra (matplotlib).

The panels are those of the HTML page (:mod:`weightgeo.render.panels`), painted with matplotlib: comparisons
give layer × module heatmaps of the §3 metrics (one colour scale per metric, shared by the runs) and the
model-level localization bars with their random baseline (paper Figs. 2-3); trajectories give the stable rank,
‖ΔW_t‖_F, Hill α and Sim_K(t, t_end) over training with each run's locking onset marked and labelled (Figs. 4-5),
and heatmaps of the final stable rank and of Sim_K at about 20% of training. Several runs go side by side
(``{"SFT": report, "OPD": report}``); legends carry those short labels, every panel a caption.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .defaults import THRESHOLD
from .errors import WeightgeoError
from .outputs import atomic_output
from .render.panels import (
    BarPanel,
    HeatmapPanel,
    LinePanel,
    Panel,
    pair_panels,
    report_kind,
    trajectory_panels,
)
from .render.svg import PALETTE, run_colour
from .render.words import default_label

__all__ = ["plot_report", "plot_runs", "plot_pair_reports", "plot_trajectories", "draw_panels"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plotting needs matplotlib: pip install 'weightgeo[plot]'") from e
    return plt


def _save(fig, path: str | os.PathLike[str]) -> Path:
    try:
        with atomic_output(path, what="figure") as tmp:
            fig.savefig(tmp, dpi=130)
    finally:
        _pyplot().close(fig)
    return Path(path).expanduser()


def _axes_of(p: Panel) -> int:
    return len(p.grids) if isinstance(p, HeatmapPanel) else 1


def _pack(panels: Sequence[Panel], max_axes: int) -> list[list[Panel]]:
    """Panels into rows of at most ``max_axes`` axes (a heatmap takes one per run), in order."""
    rows: list[list[Panel]] = [[]]
    for p in panels:
        if rows[-1] and sum(_axes_of(q) for q in rows[-1]) + _axes_of(p) > max_axes:
            rows.append([])
        rows[-1].append(p)
    return [r for r in rows if r]


def _height(row: Sequence[Panel]) -> float:
    h = 3.3
    for p in row:
        if isinstance(p, HeatmapPanel):
            n = len(p.grids[0][1].layers)
            longest = max((len(m) for m in p.grids[0][1].modules), default=4)
            h = max(h, 1.3 + 0.17 * n + 0.075 * longest + 0.5)
    return h + 0.55  # title and caption


def _caption(sub, text: str, width_in: float) -> None:
    chars = max(40, int(width_in * 15))
    sub.supxlabel("\n".join(textwrap.wrap(text, chars)), fontsize=7.5, ha="left", x=0.02, color="#333")


def _heatmap(sub, p: HeatmapPanel) -> None:
    import matplotlib.colors as mcolors
    import numpy as np

    axes = sub.subplots(1, len(p.grids), squeeze=False)[0]
    norm = mcolors.LogNorm(p.scale.lo, p.scale.hi) if p.scale.log else mcolors.Normalize(p.scale.lo, p.scale.hi)
    im = None
    for ax, (label, g) in zip(axes, p.grids):
        arr = np.array([[math.nan if v is None else v for v in row] for row in g.values], dtype=float)
        present = np.array([[bool(n) for n in row] for row in g.notes])
        ax.set_facecolor("white")
        im = ax.imshow(np.ma.masked_invalid(arr), cmap="viridis", norm=norm, aspect="auto", interpolation="none")
        for (i, j), ok in np.ndenumerate(present & np.isnan(arr)):
            if ok:  # a tensor whose value was not measured: hatched grey, never a colour
                ax.add_patch(_rect((j - 0.5, i - 0.5), fc="#eeeeee", hatch="///", ec="#bbbbbb", lw=0))
        ax.set_xticks(range(len(g.modules)), g.modules, rotation=55, ha="right", fontsize=7)
        every = max(1, math.ceil(len(g.layers) / 24))
        ticks = [i for i, lay in enumerate(g.layers) if lay is None or i % every == 0]
        ax.set_yticks(ticks, ["other" if g.layers[i] is None else f"L{g.layers[i]}" for i in ticks], fontsize=7)
        ax.set_title(label, fontsize=9, fontweight="bold")
        ax.tick_params(length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
    axes[0].set_ylabel("layer", fontsize=8)
    if im is not None:
        cb = sub.colorbar(im, ax=list(axes), shrink=0.9, pad=0.02)
        cb.ax.tick_params(labelsize=7)
        if p.unit:
            cb.set_label(p.unit, fontsize=8)


def _rect(xy, **kw):
    from matplotlib.patches import Rectangle

    return Rectangle(xy, 1, 1, **kw)


def _bars(sub, p: BarPanel, colours: Mapping[str, str] | None) -> None:
    ax = sub.subplots()
    n = max(len(p.series), 1)
    width = 0.8 / n
    for si, (label, ys) in enumerate(p.series):
        xs = [i + (si - (n - 1) / 2) * width for i in range(len(p.categories))]
        vals = [math.nan if v is None else v for v in ys]
        ax.bar(xs, vals, width, label=label, color=run_colour(label, si, colours))
    if p.baseline is not None:
        ax.axhline(p.baseline[0], color="#555", ls="--", lw=1, label=p.baseline[1])
    ax.set_xticks(range(len(p.categories)), p.categories, rotation=35 if len(p.categories) > 4 else 0, ha="right")
    ax.tick_params(labelsize=7.5)
    ax.set_ylabel(p.ylabel, fontsize=8)
    if p.log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7.5, loc="lower left", bbox_to_anchor=(0, 1.0), ncol=4, frameon=False)


def _lines(sub, p: LinePanel, colours: Mapping[str, str] | None) -> None:
    ax = sub.subplots()
    for si, s in enumerate(p.series):
        col = run_colour(s.label, si, colours)
        ys = [math.nan if v is None else v for v in s.y]
        ax.plot(s.x, ys, "o-", ms=3, color=col, label=s.label)
        if s.marker is not None:
            ax.axvline(s.marker[0], color=col, ls=":", lw=1.3, label=s.marker[1])
    if p.hline is not None:
        ax.axhline(p.hline[0], color="#555", ls="--", lw=1, label=p.hline[1])
    if p.log:
        ax.set_yscale("log")
    if p.ylim:
        ax.set_ylim(*p.ylim)
    ax.set_xlabel(p.xlabel, fontsize=8)
    ax.set_ylabel(p.ylabel, fontsize=8)
    ax.tick_params(labelsize=7.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left", bbox_to_anchor=(0, 1.0), ncol=2, frameon=False)


def draw_panels(
    panels: Sequence[Panel],
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    max_axes: int = 4,
    labels: Sequence[str] = (),
) -> Path:
    """Paint ``panels`` into one image file, row by row; ``labels``: the runs in order (each keeps its colour
    in every panel). Returns the path."""
    colours = {lb: PALETTE[i % len(PALETTE)] for i, lb in enumerate(labels)}
    if not panels:
        raise WeightgeoError("nothing to draw: the reports carry none of the metrics the figures show")
    plt = _pyplot()
    rows = _pack(panels, max_axes)
    per_axes = 3.9
    width = max(9.0, per_axes * max(sum(_axes_of(p) for p in r) for r in rows))
    heights = [_height(r) for r in rows]
    fig = plt.figure(figsize=(width, sum(heights) + (0.4 if title else 0)), layout="constrained")
    subs = fig.subfigures(len(rows), 1, height_ratios=heights, squeeze=False)[:, 0]
    for sub, row in zip(subs, rows):
        inner = sub.subfigures(1, len(row), width_ratios=[_axes_of(p) for p in row], squeeze=False)[0]
        for cell, p in zip(inner, row):
            cell.suptitle(p.title, fontsize=9.5, fontweight="bold", x=0.02, ha="left")
            _caption(cell, p.caption, width * _axes_of(p) / sum(_axes_of(q) for q in row))
            if isinstance(p, HeatmapPanel):
                _heatmap(cell, p)
            elif isinstance(p, BarPanel):
                _bars(cell, p, colours)
            else:
                _lines(cell, p, colours)
    if title:
        fig.suptitle(title, fontsize=12)
    return _save(fig, path)


def plot_runs(
    reports: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    threshold: float = THRESHOLD,
    x: str = "step",
) -> Path:
    """The figures of labelled reports (comparisons, trajectories, or both) in one image file."""
    if not reports:
        raise WeightgeoError("nothing to plot: pass {'label': report, ...}")
    pairs = {lb: r for lb, r in reports.items() if report_kind(r) == "compare"}
    trajs = {lb: r for lb, r in reports.items() if report_kind(r) == "trajectory"}
    panels: list[Panel] = []
    if trajs:
        tp = trajectory_panels(trajs, threshold=threshold, x=x)
        panels += [*tp.curves, *tp.heatmaps[:2]]
    if pairs:
        pp = pair_panels(pairs)
        panels += [*pp.heatmaps, *pp.model]
    return draw_panels(
        panels, path, title=title, max_axes=4 if len(reports) == 1 else max(4, len(reports)), labels=list(reports)
    )


def plot_report(report: Any, path: str | os.PathLike[str], *, label: str | None = None, **kwargs: Any) -> Path:
    """Draw one report's figures into one image file (the panels of its HTML page); returns the path."""
    return plot_runs({label or default_label(report): report}, path, **kwargs)


def plot_pair_reports(
    reports: Mapping[str, Any], path: str | os.PathLike[str], *, alpha: float | None = None, title: str | None = None
) -> Path:
    """Layer × module heatmaps (unchanged fraction, max principal angle, NSS, density, low-magnitude overlap) and
    the localization bars for comparison reports side by side (paper Figs. 2-3).

    Args:
        reports: label -> pair :class:`~weightgeo.report.Report` (from :func:`weightgeo.compare`).
        path: image file to write (PNG, PDF, SVG).
        alpha: the localization mask fraction, drawn as the overlaps' random baseline; default from the
            reports' meta.
    """
    if not reports:
        raise WeightgeoError("plot_pair_reports: no reports given; pass {'label': weightgeo.compare(...)}")
    pp = pair_panels(reports)
    model = [
        BarPanel(b.key, b.title, b.caption, b.categories, b.series, b.ylabel, (100 * alpha, f"random: α = {alpha:g}"))
        if alpha is not None
        else b
        for b in pp.model
    ]
    return draw_panels([*pp.heatmaps, *model], path, title=title, max_axes=4 if len(reports) == 1 else len(reports))


def plot_trajectories(
    reports: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    locking: Mapping[str, Any] | None = None,
    title: str | None = None,
    x: str = "step",
    threshold: float | None = None,
) -> Path:
    """Stable rank, ‖ΔW_t‖_F, Hill α and Sim_K(t, t_end) over training (paper Figs. 4-5), each run's locking
    onset marked and labelled, the sparsity curves (entries unchanged since the base and since the previous
    checkpoint) when the reports carry them, and heatmaps of the final stable rank and of Sim_K at about 20% of
    training.

    Args:
        reports: label -> trajectory Report (from :func:`weightgeo.rank_curve` or ``Tracker.rank_curve``); the
            Sim_K panel and the onsets come from the reports themselves.
        locking: optional label -> :class:`~weightgeo.LockingOnset`, whose threshold is used (kept for callers
            of earlier versions; not needed).
        x: ``"step"`` or ``"fraction"`` (step / the run's last step: runs of different lengths side by side).
        threshold: the locking threshold on Sim_K (default: ``locking``'s, else 0.9).
    """
    if not reports:
        raise WeightgeoError("plot_trajectories: no reports given; pass {'label': weightgeo.rank_curve(...)}")
    if x not in ("step", "fraction"):
        raise WeightgeoError(f"plot_trajectories: x={x!r}; use 'step' or 'fraction'")
    if threshold is None:
        threshold = next((float(getattr(r, "threshold", THRESHOLD)) for r in (locking or {}).values()), THRESHOLD)
    tp = trajectory_panels(reports, threshold=threshold, x=x)
    return draw_panels([*tp.curves, *tp.heatmaps[:2]], path, title=title, max_axes=4)
