"""The figures of a report, as data: one builder per kind of report, drawn by two painters.

:func:`pair_panels` and :func:`trajectory_panels` turn labelled reports (``{"SFT": report, "OPD": report}``)
into panels: layer × module heatmaps on one colour scale per metric shared by every run, bars per module with
the runs side by side, model-level localization bars with their random baseline, and curves over training with
the locking onset marked. :mod:`weightgeo.render.svg` paints them for the HTML page and the notebook,
:mod:`weightgeo.plot` with matplotlib for image files, so the page, the notebook, ``Report.plot`` and the command
line show the same panels under the same titles and captions.

>>> from weightgeo.report import Report
>>> rows = [{"name": f"layers.{i}.q_proj.weight", "module": "q_proj", "layer": i, "numel": 4,
...          "update_sparsity": 0.5 + i / 10} for i in range(3)]
>>> p = pair_panels({"run": Report(rows=rows, summary={"update_sparsity": 0.6}, meta={})})
>>> [type(x).__name__ for x in p.heatmaps], p.heatmaps[0].title
(['HeatmapPanel'], 'unchanged fraction per layer and module')
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..defaults import THRESHOLD
from ..metrics.trajectory import build_locking
from .cells import fmt, number, partial_reasons
from .grid import Grid, column_of, layer_module_grid, module_order
from .vocabulary import (
    NORM_KEYS,
    PAIR_PRIMARY,
    TRAJECTORY_PRIMARY,
    describe,
    first_key,
    metric_keys,
)

__all__ = [
    "Scale",
    "HeatmapPanel",
    "BarPanel",
    "LinePanel",
    "Series",
    "Panel",
    "PairPanels",
    "TrajectoryPanels",
    "pair_panels",
    "trajectory_panels",
    "report_kind",
    "final_rows",
    "locking_of",
    "step_summary",
    "LOCAL_KEYS",
    "value_text",
    "shared_scale",
]

#: the model-level localization bars (paper Fig. 3)
LOCAL_KEYS = ("density", "principal_mask_overlap", "low_magnitude_overlap")


@dataclass(frozen=True)
class Scale:
    """A colour (or axis) scale from ``lo`` to ``hi``, logarithmic when ``log``."""

    lo: float
    hi: float
    log: bool = False

    def position(self, v: float) -> float:
        """Where ``v`` falls in [0, 1] (clamped)."""
        if self.log:
            lo, hi, v = math.log10(self.lo), math.log10(self.hi), math.log10(max(v, self.lo))
        else:
            lo, hi = self.lo, self.hi
        return 0.5 if hi == lo else min(1.0, max(0.0, (v - lo) / (hi - lo)))

    def ticks(self, n: int = 5) -> list[float]:
        if self.hi == self.lo:
            return [self.lo]
        if self.log:
            a, b = math.log10(self.lo), math.log10(self.hi)
            return [10 ** (a + (b - a) * i / (n - 1)) for i in range(n)]
        return [self.lo + (self.hi - self.lo) * i / (n - 1) for i in range(n)]


def shared_scale(values: Sequence[float], *, log: bool) -> Scale:
    """One scale over ``values`` (every run's), log only when all are positive and they span 20x or more."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return Scale(0.0, 1.0)
    lo, hi = min(finite), max(finite)
    if log and lo > 0 and hi / lo >= 20:
        return Scale(lo, hi, True)
    return Scale(lo, hi)


@dataclass(frozen=True)
class HeatmapPanel:
    """One metric's layer × module grid for each run, on one shared scale."""

    key: str
    title: str
    caption: str
    grids: list[tuple[str, Grid]]
    scale: Scale
    unit: str = ""


@dataclass(frozen=True)
class BarPanel:
    """Bars per category (modules, or model-level metrics) with the runs side by side."""

    key: str
    title: str
    caption: str
    categories: list[str]
    series: list[tuple[str, list[float | None]]]
    ylabel: str
    baseline: tuple[float, str] | None = None
    log: bool = False


@dataclass(frozen=True)
class Series:
    """One run's curve; ``marker``: (x, text) of a marked point, e.g. the locking onset."""

    label: str
    x: list[float]
    y: list[float | None]
    marker: tuple[float, str] | None = None


@dataclass(frozen=True)
class LinePanel:
    """Curves over training (one per run)."""

    key: str
    title: str
    caption: str
    xlabel: str
    ylabel: str
    series: list[Series]
    log: bool = False
    hline: tuple[float, str] | None = None
    ylim: tuple[float, float] | None = None


Panel = HeatmapPanel | BarPanel | LinePanel


@dataclass(frozen=True)
class PairPanels:
    heatmaps: list[HeatmapPanel]
    more_heatmaps: list[HeatmapPanel]
    modules: list[BarPanel]
    model: list[BarPanel] = field(default_factory=list)


@dataclass(frozen=True)
class TrajectoryPanels:
    curves: list[LinePanel]
    heatmaps: list[HeatmapPanel]
    more_heatmaps: list[HeatmapPanel]
    modules: list[BarPanel]


def report_kind(report: Any) -> str:
    """``"trajectory"`` for a stream report (rows carry ``step``), else ``"compare"``."""
    kind = (report.meta or {}).get("kind")
    if kind in ("rank_curve", "trajectory"):
        return "trajectory"
    if kind:
        return "compare"
    return "trajectory" if any("step" in r for r in report.rows) else "compare"


def _axes(grids_rows: Sequence[Sequence[Mapping[str, Any]]], key: str) -> tuple[list[int | None], list[str]]:
    layers: set[int | None] = set()
    cols: list[str] = []
    for rows in grids_rows:
        for r in rows:
            if key in r:
                lay = r.get("layer")
                layers.add(int(lay) if isinstance(lay, (int, float)) and lay == lay else None)
                cols.append(column_of(r))
    ordered = sorted(x for x in layers if x is not None) + ([None] if None in layers else [])
    return ordered, module_order(cols)


def _heatmap(
    key: str, runs: Sequence[tuple[str, Sequence[Mapping[str, Any]], Mapping[str, str]]], *, when: str = ""
) -> HeatmapPanel | None:
    layers, modules = _axes([rows for _, rows, _ in runs], key)
    if not layers or not modules:
        return None
    grids = [
        (label, layer_module_grid(rows, key, layers=layers, modules=modules, partial=p)) for label, rows, p in runs
    ]
    words = describe(key)
    values = [v for _, g in grids for v in g.measured_values()]
    scale = shared_scale(values, log=words.log)
    shared = " One colour scale for every run." if len(runs) > 1 else ""
    caption = f"{_sentence(words.sentence)}." if words.sentence else f"{key}."
    return HeatmapPanel(key, f"{words.label} per layer and module{when}", caption + shared, grids, scale, words.unit)


def _module_bars(
    key: str, runs: Mapping[str, Any], by_module: Mapping[str, Mapping[str, Any]], when: str = ""
) -> BarPanel | None:
    cats = module_order(m for groups in by_module.values() for m, g in groups.items() if number(g.get(key)) is not None)
    if not cats:
        return None
    words = describe(key)
    series = [(label, [number(by_module[label].get(c, {}).get(key)) for c in cats]) for label in runs]
    values = [v for _, ys in series for v in ys if v is not None]
    log = words.log and bool(values) and min(values) > 0 and max(values) / min(values) >= 20
    weighting = "parameter-weighted" if key == "update_sparsity" else "mean over matrices"
    return BarPanel(
        key,
        f"{words.label} by module{when}",
        f"Each module type's {weighting} over the layers"
        + (", runs side by side." if len(runs) > 1 else ".")
        + (f" {_sentence(words.sentence)}." if words.sentence else ""),
        cats,
        series,
        words.label + (f" ({words.unit})" if words.unit else ""),
        log=log,
    )


def _sentence(text: str) -> str:
    """``text`` with a capital first letter when that is a Latin letter (σ_k must not become Σ_k)."""
    return text[:1].upper() + text[1:] if text[:1].isascii() else text


def pair_panels(runs: Mapping[str, Any], *, keys: Sequence[str] | None = None) -> PairPanels:
    """The panels of comparison reports (labels -> reports): heatmaps of ``keys`` (default: the §3 metrics
    present) first, of every other per-matrix metric in ``more_heatmaps``; per-module bars of ``keys``; the
    model-level localization bars with α, the overlaps' random baseline."""
    data = [(label, rep.rows, partial_reasons(rep.meta or {})) for label, rep in runs.items()]
    all_keys = metric_keys([r for rep in runs.values() for r in rep.rows])
    primary = [k for k in (keys or PAIR_PRIMARY) if k in all_keys]
    heat = [h for h in (_heatmap(k, data) for k in primary) if h is not None]
    more = [h for h in (_heatmap(k, data) for k in all_keys if k not in primary) if h is not None]
    by_module = {label: (rep.summary or {}).get("by_module", {}) for label, rep in runs.items()}
    bars = [b for b in (_module_bars(k, runs, by_module) for k in primary) if b is not None]
    model: list[BarPanel] = []
    local = [k for k in LOCAL_KEYS if any(number((rep.summary or {}).get(k)) is not None for rep in runs.values())]
    if local:
        alpha = next(
            (rep.meta.get("params", {}).get("alpha") for rep in runs.values() if (rep.meta or {}).get("params")), None
        )
        model.append(
            BarPanel(
                "localization",
                "where the update lands (model level)",
                "Update density, and the shares of changed entries on the principal (low-rank reconstruction) and "
                "the low-magnitude weights, in % (paper Fig. 3). The dashed line is what updates placed at random "
                "would give for the two overlaps.",
                [describe(k).label for k in local],
                [(label, [_pct(rep.summary.get(k)) for k in local]) for label, rep in runs.items()],
                "% of entries",
                baseline=None if not isinstance(alpha, (int, float)) else (100 * alpha, f"random: α = {alpha:g}"),
            )
        )
    return PairPanels(heat, more, bars, model)


def _pct(v: Any) -> float | None:
    x = number(v)
    return None if x is None else 100 * x


def final_rows(report: Any) -> tuple[int | None, list[Mapping[str, Any]]]:
    """The last step of a trajectory report and its rows."""
    steps = [r["step"] for r in report.rows if "step" in r]
    if not steps:
        return None, list(report.rows)
    last = max(steps)
    return last, [r for r in report.rows if r.get("step") == last]


def step_summary(report: Any, step: Any) -> Mapping[str, Any]:
    """``summary["by_step"][step]`` of a trajectory report, whether its keys are ints or (read back from
    JSON) strings; {} when absent."""
    by_step = (report.summary or {}).get("by_step") or {}
    return by_step.get(step) or by_step.get(str(step)) or {}


def locking_of(report: Any, threshold: float = THRESHOLD):  # -> LockingOnset | None
    """The locking onset from a trajectory report's own similarity curves (None when it carries none)."""
    sims = (report.meta or {}).get("similarity")
    k = ((report.meta or {}).get("params") or {}).get("k") or (report.summary or {}).get("k")
    if not sims or not k:
        return None
    curves = {n: {int(s): (math.nan if v is None else float(v)) for s, v in c.items()} for n, c in sims.items() if c}
    if not curves:
        return None
    return build_locking(curves, k=int(k), threshold=threshold)


def _by_step(report: Any, key: str) -> tuple[list[float], list[float | None]]:
    by_step = (report.summary or {}).get("by_step") or {}
    if by_step:
        steps = sorted(by_step, key=float)
        return [float(s) for s in steps], [number(by_step[s].get(key)) for s in steps]
    groups: dict[float, list[float]] = {}
    for r in report.rows:
        v = number(r.get(key))
        if v is not None and "step" in r:
            groups.setdefault(float(r["step"]), []).append(v)
    xs = sorted(groups)
    return xs, [sum(groups[s]) / len(groups[s]) for s in xs]


def _near(steps: Sequence[int], frac: float) -> int:
    """The checkpoint closest to ``frac`` of the last step, before the last one when there is one."""
    last = steps[-1]
    cands = list(steps[:-1]) or [last]
    return min(cands, key=lambda s: abs(s - frac * last))


def trajectory_panels(runs: Mapping[str, Any], *, threshold: float = THRESHOLD, x: str = "step") -> TrajectoryPanels:
    """The panels of trajectory reports (labels -> reports): curves of the stable rank, ‖ΔW_t‖_F, Hill α, the
    sparsity curves (when the reports carry them) and Sim_K(t, t_end) (the threshold drawn, each run's locking onset marked and labelled); heatmaps of the final
    stable rank, Sim_K at about 20% of training and each matrix's onset; bars per module of the final stable
    rank. ``x``: ``"step"`` or ``"fraction"`` (of each run's last step, for runs of different lengths)."""
    xlabel = "step" if x == "step" else "fraction of training (step / last step)"
    all_rows = [r for rep in runs.values() for r in rep.rows]
    norm = first_key(all_rows, NORM_KEYS) or "frobenius_norm"

    def scaled(xs: list[float]) -> list[float]:
        last = max(xs, default=0.0)
        return xs if x == "step" or not last else [s / last for s in xs]

    curves: list[LinePanel] = []
    for key, title, caption in (
        ("stable_rank", "stable rank of ΔW_t", "Mean over matrices of ‖ΔW_t‖²_F / ‖ΔW_t‖²₂ (paper Fig. 4)."),
        (norm, "‖ΔW_t‖_F", "Mean over matrices of the size of the cumulative update W_t − W_0."),
        ("hill_alpha", "Hill tail index α̂ of ΔW_t", "Mean over matrices; lower = heavier-tailed spectrum."),
    ):
        if not any(key in r for r in all_rows):
            continue
        series = []
        for label, rep in runs.items():
            xs, ys = _by_step(rep, key)
            series.append(Series(label, scaled(xs), ys))
        vals = [v for s in series for v in s.y if v is not None]
        log = key == norm and bool(vals) and min(vals) > 0 and max(vals) / min(vals) >= 20
        curves.append(LinePanel(key, title, caption, xlabel, describe(key).label, series, log=log))
    for key, title, caption in (  # the sparsity curves (rank_curve(sparsity=True), sparsity_curve): model-weighted
        (
            "update_sparsity",
            "entries unchanged since the base",
            "Fraction of all floating entries with W_t equal to W_0 under the bf16 rule (parameter-weighted over "
            "the model); 1 − this is the update's density.",
        ),
        (
            "step_sparsity",
            "entries unchanged since the previous checkpoint",
            "Fraction of entries equal to the previous complete checkpoint's (the first against the base): how "
            "sparse each interval's patch is.",
        ),
    ):
        series = []
        for label, rep in runs.items():
            xs, ys = _by_step(rep, key)
            if any(v is not None for v in ys):
                series.append(Series(label, scaled(xs), ys))
        if series:
            curves.append(LinePanel(key, title, caption, xlabel, "fraction", series, ylim=(-0.02, 1.02)))
    sims: list[Series] = []
    k_used = None
    for label, rep in runs.items():
        lock = locking_of(rep, threshold)
        if lock is None:
            xs, ys = _by_step(rep, "final_subspace_similarity")
            if xs:
                sims.append(Series(label, scaled(xs), ys))
            continue
        k_used = lock.k
        steps = sorted(lock.mean_similarity)
        xs = scaled([float(s) for s in steps])
        onset = None
        if lock.step is not None:
            ox = scaled([float(s) for s in steps] + [float(lock.step)])[-1] if x == "fraction" else float(lock.step)
            onset = (ox, f"{label}: onset step {lock.step}")
        sims.append(Series(label, xs, [number(lock.mean_similarity[s]) for s in steps], marker=onset))
    if sims:
        k_text = k_used or next((rep.summary.get("k") for rep in runs.values() if rep.summary.get("k")), "K")
        curves.append(
            LinePanel(
                "final_subspace_similarity",
                f"Sim_{k_text}(t, t_end): locking",
                f"Mean over matrices of the similarity of ΔW_t's top-{k_text} input subspace to the final one "
                f"(paper Fig. 5). The subspace has locked once the curve stays above the threshold "
                f"({threshold:g}, dashed); the dotted line marks that onset. A run without a marker never locks "
                f"before its last checkpoint.",
                xlabel,
                "Sim_K",
                sims,
                hline=(threshold, f"threshold {threshold:g}"),
                ylim=(0.0, 1.02),
            )
        )
    finals = {label: final_rows(rep) for label, rep in runs.items()}
    data = [
        (label, rows, partial_reasons(rep.meta or {})) for (label, (_, rows)), rep in zip(finals.items(), runs.values())
    ]
    last = ", ".join(f"{label} step {s}" for label, (s, _) in finals.items())
    heat: list[HeatmapPanel] = []
    sr = _heatmap("stable_rank", data, when=" at the last checkpoint")
    if sr is not None:
        heat.append(_with_caption(sr, f" Last checkpoint: {last}."))
    early: list[tuple[str, list[Mapping[str, Any]], Mapping[str, str]]] = []
    when = []
    for label, rep in runs.items():
        steps = sorted({int(r["step"]) for r in rep.rows if "step" in r})
        if len(steps) < 2:
            continue
        s20 = _near(steps, 0.2)
        when.append(f"{label} step {s20}")
        early.append((label, [r for r in rep.rows if r.get("step") == s20], partial_reasons(rep.meta or {})))
    sim20 = _heatmap("final_subspace_similarity", early, when=" at about 20% of training") if early else None
    if sim20 is not None:
        heat.append(
            _with_caption(
                sim20, f" Read at the checkpoint nearest 20% of training: {', '.join(when)}; 1 = already locked."
            )
        )
    onset_rows: list[tuple[str, list[Mapping[str, Any]], Mapping[str, str]]] = []
    for label, rep in runs.items():
        lock = locking_of(rep, threshold)
        if lock is None:
            continue
        _, rows = finals[label]
        per = lock.per_matrix
        onset_rows.append(
            (
                label,
                [
                    {
                        **{f: r.get(f) for f in ("name", "module", "layer", "numel")},
                        "locking_onset": per.get(str(r.get("name"))),
                        "reason": "never locks before the last checkpoint",
                    }
                    for r in rows
                ],
                {},
            )
        )
    onset_map = _heatmap("locking_onset", onset_rows) if onset_rows else None
    if onset_map is not None:
        heat.append(
            _with_caption(
                onset_map, f" Per matrix, threshold {threshold:g}; grey = never locks before the last checkpoint."
            )
        )
    more = [
        h
        for h in (
            _heatmap(k, data, when=" at the last checkpoint")
            for k in metric_keys([r for _, rows, _ in data for r in rows])
            if k not in TRAJECTORY_PRIMARY
        )
        if h is not None
    ]
    last_by_module = {
        label: step_summary(rep, s).get("by_module", {}) for (label, (s, _)), rep in zip(finals.items(), runs.values())
    }
    bars = [
        b
        for b in (_module_bars(k, runs, last_by_module, " at the last checkpoint") for k in ("stable_rank", norm))
        if b
    ]
    return TrajectoryPanels(curves, heat, more, bars)


def _with_caption(h: HeatmapPanel, tail: str) -> HeatmapPanel:
    return HeatmapPanel(h.key, h.title, h.caption + tail, h.grids, h.scale, h.unit)


def value_text(v: float | None, unit: str = "") -> str:
    """A panel's value as text (tooltips, colour-bar ticks)."""
    return fmt(v) + (unit if v is not None and unit else "")
