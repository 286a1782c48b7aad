"""Figures in the style of the paper (Figs. 2-5) from weightgeo reports; needs the ``plot`` extra (matplotlib).

One run or several runs side by side (``{"SFT": report, "OPD": report, ...}``): pair reports give per-matrix
principal angles and spectral drift (Fig. 2) and localization bars (Fig. 3); trajectory reports give stable
rank, ‖ΔW‖_F and Hill α vs step (Fig. 4) and, with locking results, Sim_K(t, t_end) vs step (Fig. 5).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import WeightgeoError
from .outputs import atomic_output

__all__ = ["plot_report", "plot_pair_reports", "plot_trajectories"]


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
            fig.savefig(tmp, dpi=130, bbox_inches="tight")
    finally:
        _pyplot().close(fig)
    return Path(path).expanduser()


def _finish(fig, axes, title: str | None, path: str | os.PathLike[str]) -> Path:
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _kind(report) -> str:
    kind = report.meta.get("kind")
    if kind:
        return kind
    return "rank_curve" if any("step" in r for r in report.rows) else "compare"


def plot_report(report, path: str | os.PathLike[str], **kwargs: Any) -> Path:
    """Draw one report's figures into one image file; returns the path."""
    if _kind(report) == "compare":
        return plot_pair_reports({report.meta.get("ft", "fine-tuned"): report}, path, **kwargs)
    return plot_trajectories({report.meta.get("stream", "run"): report}, path, **kwargs)


def _matrix_rows(report, key: str) -> list[dict[str, Any]]:
    return [r for r in report.rows if isinstance(r.get(key), (int, float)) and not math.isnan(r[key])]


def plot_pair_reports(
    reports: Mapping[str, Any], path: str | os.PathLike[str], *, alpha: float | None = None, title: str | None = None
) -> Path:
    """Fig. 2 (max principal angle and spectral drift per matrix, sorted by layer) and Fig. 3 (localization) for runs.

    Args:
        reports: label -> pair :class:`~weightgeo.report.Report` (from :func:`weightgeo.compare`).
        path: image file to write (PNG, PDF, SVG).
        alpha: the localization mask fraction, drawn as the random baseline; default from the reports' meta.
    """
    if not reports:
        raise WeightgeoError("plot_pair_reports: no reports given; pass {'label': weightgeo.compare(...)}")
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2), layout="constrained")
    for label, rep in reports.items():
        rows = _matrix_rows(rep, "max_principal_angle")
        axes[0].plot(range(len(rows)), [r["max_principal_angle"] for r in rows], ".", ms=4, label=label)
        rows = _matrix_rows(rep, "spectral_drift")
        axes[1].plot(range(len(rows)), [r["spectral_drift"] for r in rows], ".", ms=4, label=label)
    axes[0].set(
        title="max principal angle per matrix (Fig. 2)",
        xlabel="matrix (checkpoint order)",
        ylabel="degrees",
        yscale="log",
    )
    axes[1].set(
        title="spectral drift per matrix (Fig. 2)",
        xlabel="matrix (checkpoint order)",
        ylabel="spectral drift (NSS)",
        yscale="log",
    )
    for ax in axes[:2]:  # headroom (a decade on the log axis) so the legend does not hide points
        ys = [v for line in ax.get_lines() for v in line.get_ydata() if v > 0 and math.isfinite(v)]
        if ys:
            ax.set_ylim(top=max(ys) * 10)
    keys = ("density", "principal_mask_overlap", "low_magnitude_overlap")
    width = 0.8 / max(len(reports), 1)
    for j, (label, rep) in enumerate(reports.items()):
        vals = [100 * float(rep.summary.get(k, math.nan)) for k in keys]
        axes[2].bar([i + j * width for i in range(len(keys))], vals, width, label=label)
    a = (
        alpha
        if alpha is not None
        else next((rep.meta.get("params", {}).get("alpha") for rep in reports.values()), None)
    )
    if a is not None:  # the baseline of the two overlaps (not of the density)
        axes[2].hlines(
            100 * a,
            1 - width / 2,
            len(keys) - 1 + width * (len(reports) - 0.5),
            color="gray",
            ls="--",
            lw=1,
            label=f"random baseline α={a:g}",
        )
    axes[2].set_xticks(
        [i + width * (len(reports) - 1) / 2 for i in range(len(keys))],
        ["update\ndensity", "principal-mask\noverlap", "low-magnitude\noverlap"],
    )
    axes[2].set(title="update localization (Fig. 3)", ylabel="%")
    return _finish(fig, axes, title, path)


def _by_step(report, key: str) -> tuple[list[float], list[float]]:
    by_step = report.summary.get("by_step")
    if by_step:
        steps = sorted(by_step, key=float)
        pts = [(float(s), by_step[s].get(key, math.nan)) for s in steps]
    else:
        groups: dict[float, list[float]] = {}
        for r in report.rows:
            if isinstance(r.get(key), (int, float)):
                groups.setdefault(float(r["step"]), []).append(float(r[key]))
        pts = [(s, sum(v) / len(v)) for s, v in sorted(groups.items())]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_trajectories(
    reports: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    locking: Mapping[str, Any] | None = None,
    title: str | None = None,
    x: str = "step",
) -> Path:
    """Fig. 4 (stable rank, ‖ΔW_t‖_F, Hill α vs step), Fig. 5 (Sim_K(t, t_end) vs step) and, for reports that
    carry the sparsity curves, the fraction of entries unchanged since the base (solid) and since the previous
    checkpoint (dashed) vs step, for runs.

    Args:
        reports: label -> trajectory Report (from :func:`weightgeo.rank_curve` or ``Tracker.rank_curve``; a
            :func:`weightgeo.sparsity_curve` report draws the sparsity panel alone).
        locking: label -> locking result (from :func:`weightgeo.locking_onset`), adds the Sim_K panel; a
            dotted vertical line marks each run's onset.
        x: ``"step"`` or ``"fraction"`` (step / the run's last step: runs of different lengths side by side).
    """
    if not reports:
        raise WeightgeoError("plot_trajectories: no reports given; pass {'label': weightgeo.rank_curve(...)}")
    if x not in ("step", "fraction"):
        raise WeightgeoError(f"plot_trajectories: x={x!r}; use 'step' or 'fraction'")
    plt = _pyplot()
    spectra = any("stable_rank" in rep.summary.get("curves", {"stable_rank": 0}) for rep in reports.values())
    panels = (
        [
            ("stable_rank", "stable rank of ΔW_t"),
            ("delta_frobenius", "‖ΔW_t‖_F"),
            ("hill_alpha", "Hill tail index α̂"),
        ]
        if spectra
        else []
    )
    sparsity = any("update_sparsity" in rep.summary.get("curves", {}) for rep in reports.values())
    n = len(panels) + (1 if locking else 0) + (1 if sparsity else 0)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 4), layout="constrained", squeeze=False)
    axes = list(axes[0])
    xlabel = "step" if x == "step" else "fraction of training (step / last step)"

    def scale(steps: list[float], last: float) -> list[float]:
        return steps if x == "step" or not last else [s / last for s in steps]

    for ax, (key, name) in zip(axes, panels):
        for label, rep in reports.items():
            xs, ys = _by_step(rep, key)
            ax.plot(scale(xs, max(xs, default=0.0)), ys, "o-", ms=3, label=label)
        # norms of different runs span orders of magnitude
        positive = [v for line in ax.get_lines() for v in line.get_ydata() if not math.isnan(v)]
        if key == "delta_frobenius" and positive and min(positive) > 0:
            ax.set_yscale("log")
        ax.set(title=f"{name} (Fig. 4)", xlabel=xlabel)
    if sparsity:
        ax = axes[len(panels)]
        for label, rep in reports.items():
            if "update_sparsity" not in rep.summary.get("curves", {}):
                continue
            xs, ys = _by_step(rep, "update_sparsity")
            (line,) = ax.plot(scale(xs, max(xs, default=0.0)), ys, "o-", ms=3, label=f"{label}: since the base")
            xs, ys = _by_step(rep, "step_sparsity")
            ax.plot(
                scale(xs, max(xs, default=0.0)),
                ys,
                "s--",
                ms=3,
                color=line.get_color(),
                label=f"{label}: since the previous checkpoint",
            )
        ax.set(title="entries unchanged (bf16 rule, all tensors)", xlabel=xlabel, ylabel="fraction", ylim=(-0.02, 1.02))
    if locking:
        ax = axes[-1]
        for label, res in locking.items():
            sims = res.mean_similarity
            steps = sorted(sims, key=float)
            last = float(getattr(res, "final_step", None) or max(float(s) for s in steps))
            (line,) = ax.plot(scale([float(s) for s in steps], last), [sims[s] for s in steps], "o-", ms=3, label=label)
            if res.step is not None:
                ax.axvline(scale([float(res.step)], last)[0], color=line.get_color(), ls=":", lw=1)
        thr = next((getattr(r, "threshold", None) for r in locking.values()), None)
        if thr is not None:
            ax.axhline(thr, color="gray", ls="--", lw=1, label=f"threshold {thr:g}")
        k = next((getattr(r, "k", None) for r in locking.values()), None)
        ax.set(title=f"Sim_{k or 'K'}(t, t_end) (Fig. 5)", xlabel=xlabel, ylim=(0, 1.02))
    return _finish(fig, axes, title, path)
