"""The miniature's figures (matplotlib): trajectories with seed bands and the null run's noise floor."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .claims import Data, agg
from .plan import KS

COLORS = {"sft": "tab:blue", "opd": "tab:orange", "rlvr": "tab:green", "null": "gray"}
LABEL = {"sft": "SFT", "opd": "OPD", "rlvr": "RLVR", "null": "null (OPD, permuted advantages)"}
YLABEL = {
    "density": "fraction of entries changed",
    "fro": "‖ΔW_t‖_F",
    "srank": "stable rank (bf16 checkpoints)",
    "srank_fp32": "stable rank (fp32 masters)",
}


def _series(D: Data, method: str, seeds: int, key, *, frac: bool):
    """(x [T], values [n_seeds, T, n_matrices]) of one per-matrix stream quantity; x = step or fraction."""
    st = D.stream(method, 0)["steps"]
    x = np.array(st, dtype=float) / (D.totals[method] if frac else 1.0)
    per = []
    for s in range(seeds):
        S = D.stream(method, s)
        per.append([key(S, t) for t in st])
    arr = np.array(per, dtype=np.float64)
    return x, arr


def _band(arr: np.ndarray):
    """Null band: mean over seeds of the per-seed mean ± 2 sd over seeds (>= 2 seeds), else ± 2 s.e. over matrices."""
    if arr.ndim == 3:
        seed_means = np.nanmean(arr, 2)
        if arr.shape[0] >= 2:
            m, sd = seed_means.mean(0), seed_means.std(0, ddof=1)
        else:
            m, sd = seed_means[0], np.nanstd(arr[0], 1, ddof=1) / math.sqrt(arr.shape[2])
    else:
        m = arr.mean(0)
        sd = arr.std(0, ddof=1) if arr.shape[0] >= 2 else np.zeros_like(m)
    return m - 2 * sd, m + 2 * sd, m


def _band_label(seeds: int) -> str:
    return "null: mean ± 2 sd over seeds" if seeds >= 2 else "null: mean ± 2 s.e. over matrices (1 seed)"


def write_figures(D: Data, out: Path, K: int, details: list[dict]) -> list[str]:
    """fig_trajectories (density, ‖ΔW‖_F, stable rank bf16 / fp32), fig_simk (Sim_K for every K), and with the
    controls fig_projection and fig_controls; each trajectory panel carries the null band. Returns file names."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    pl, made = D.plan, []
    seeds = pl.seeds
    if D.has(*[f"m_{m}_s{i}" for m in ("sft", "opd", "rlvr", "null") for i in range(seeds)]):
        meths = ("sft", "opd", "rlvr")
        q = {
            "density": (
                lambda S, t: S["density"][str(t)]["per_matrix"],
                False,
                "update density, all 2-D weights: since checkpoint-0 (solid), per step (dotted)",
            ),
            "fro": (lambda S, t: S["fro"][str(t)], False, "‖ΔW_t‖_F (attention, bf16)"),
            "srank": (lambda S, t: S["srank"][str(t)], True, "stable rank of ΔW_t (attention, bf16)"),
            "srank_fp32": (lambda S, t: S["srank_fp32"][str(t)], True, "stable rank of ΔW_t (attention, fp32 masters)"),
        }
        fig, axs = plt.subplots(2, 2, figsize=(12, 8.5), layout="constrained")
        for ax, (key, (fn, frac, title)) in zip(axs.flat, q.items()):
            x, arr = _series(D, "null", seeds, fn, frac=frac)
            lo, hi, m = _band(arr)
            ax.fill_between(x, lo, hi, color="gray", alpha=0.25, lw=0, label=_band_label(seeds))
            ax.plot(x, m, color="gray", ls="--", lw=1, label="null: mean")
            for meth in meths:
                x, arr = _series(D, meth, seeds, fn, frac=frac)
                y = np.nanmean(arr, 2)
                if seeds > 1:  # the seeds themselves, thin, under their mean
                    for s in range(seeds):
                        ax.plot(x, y[s], color=COLORS[meth], lw=0.7, alpha=0.4)
                ax.plot(x, y.mean(0), color=COLORS[meth], lw=2, label=LABEL[meth])
                if key == "density" and "step_density" in D.stream(meth, 0):
                    # density of the step: entries changed since the previous checkpoint (1 - step sparsity)
                    x, arr = _series(D, meth, seeds, lambda S, t: S["step_density"][str(t)]["per_matrix"], frac=frac)
                    ax.plot(x, np.nanmean(arr, 2).mean(0), color=COLORS[meth], lw=1.6, ls=":")
            if key == "density":
                ax.plot([], [], color="k", lw=1.6, ls=":", label="step: since the previous checkpoint")
            ax.set(title=title, xlabel="fraction of training" if frac else "step", ylabel=YLABEL[key])
            if key in ("density", "fro"):
                ax.set_xscale("log")
            if key == "fro":
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        _legend_below(fig, axs[0, 0])
        seed_text = "1 seed" if seeds == 1 else f"{seeds} seeds; thick = seed mean, thin = each seed"
        fig.suptitle(f"Trajectories of the cumulative update ΔW_t ({seed_text}; RLVR to step {pl.rlvr_steps})")
        made.append(_save(fig, out, "fig_trajectories"))

        fig, axs = plt.subplots(1, len(KS), figsize=(4 * len(KS), 4.4), layout="constrained", sharey=True)
        for ax, k in zip(axs, KS):
            fn = lambda S, t, k=k: S["sim"][str(k)][str(t)]  # noqa: E731
            x, arr = _series(D, "null", seeds, fn, frac=True)
            lo, hi, m = _band(arr)
            ax.fill_between(x, lo, hi, color="gray", alpha=0.25, lw=0, label=_band_label(seeds))
            for meth in meths:
                x, arr = _series(D, meth, seeds, fn, frac=True)
                ax.plot(x, np.nanmean(arr, 2).mean(0), color=COLORS[meth], lw=2, marker="o", ms=3, label=LABEL[meth])
            ax.axhline(k / 64, color="k", ls=":", lw=0.8, label="random subspaces (K/64)")
            ax.set(
                title=f"Sim_{k}(t, t_end)" + ("  (primary K*)" if k == K else ""),
                xlabel="fraction of training",
                ylim=(0, 1.02),
            )
            ax.grid(alpha=0.3)
        axs[0].set_ylabel("similarity to the final top-K subspace")
        _legend_below(fig, axs[0])  # below the panels: inside, it hid the OPD curve and the null band
        made.append(_save(fig, out, "fig_simk"))
    det = {d["id"]: d for d in details}
    if 6 in det and not det[6].get("not_run"):
        d6 = det[6]
        fig, ax = plt.subplots(figsize=(8, 4.2), layout="constrained")
        ks = list(d6["per_k"])
        for j, (key, col, lab) in enumerate(
            (
                ("sft_proj_minus_plain", "tab:blue", "SFT: projected − plain"),
                ("opd_proj_minus_plain", "tab:orange", "OPD: projected − plain"),
            )
        ):
            ys = [d6["per_k"][k][key]["statistic"] for k in ks]
            ci = [d6["per_k"][k][key]["ci95"] or (y, y) for k, y in zip(ks, ys)]
            xs = np.arange(len(ks)) + (j - 0.5) * 0.3
            err = [[y - c[0] for y, c in zip(ys, ci)], [c[1] - y for y, c in zip(ys, ci)]]
            ax.bar(xs, ys, 0.3, color=col, label=lab, yerr=err, capsize=3)
        g, h = d6["opd_gain"], d6["head_only_gain"]
        ax.axhline(
            g["statistic"], color="tab:orange", ls="--", lw=1, label=f"OPD gain over the anchor {g['statistic']:+.4f}"
        )
        ax.axhline(h["statistic"], color="tab:red", ls=":", lw=1, label=f"head-only OPD gain {h['statistic']:+.4f}")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(len(ks)), [f"K={k}" + (" (K*)" if int(k) == K else "") for k in ks])
        ax.set(ylabel="Δ T=1 accuracy (95% CI)", title="Projection onto early V_K (every 2-D weight projected)")
        ax.grid(alpha=0.3, axis="y")
        _legend_below(fig, ax)
        made.append(_save(fig, out, "fig_projection"))
    if 7 in det and not det[7].get("not_run"):
        fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
        ref = D.res["m_opd_s0"]
        x = np.array(ref["steps"], dtype=float)
        if D.has(*[f"m_null_s{i}" for i in range(seeds)]):
            _, arr = _series(D, "null", seeds, lambda S, t: S["srank"][str(t)], frac=False)
            lo, hi, _m = _band(arr)
            ax.fill_between(x, lo, hi, color="gray", alpha=0.25, lw=0, label=_band_label(seeds))
        ax.plot(x, [agg(ref["srank"][str(s)]) for s in ref["steps"]], color="k", lw=2.5, label="OPD (seed 0)")
        for n in sorted(n[2:] for n in D.res if n.startswith("m_ctrl_")):
            S = D.res[f"m_{n}"]
            ax.plot(
                x,
                [agg(S["srank"][str(s)]) for s in ref["steps"]],
                lw=1.2,
                ls="--" if "mix" in n else "-",
                label=n.removeprefix("ctrl_"),
            )
        ax.set(xlabel="step", ylabel="stable rank of ΔW_t (attention, bf16)", title="OPD controls (paper §5)")
        ax.grid(alpha=0.3)
        _legend_below(fig, ax)
        made.append(_save(fig, out, "fig_controls"))
    return made


def _legend_below(fig, ax) -> None:
    """One legend for the figure, under its panels, where it hides no curve."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False)


def _save(fig, out: Path, stem: str) -> str:
    """The PNG (report.md) and the SVG (inlined in report.html) of a figure; returns the PNG's name."""
    import matplotlib.pyplot as plt

    fig.savefig(out / f"{stem}.png", dpi=110)
    fig.savefig(out / f"{stem}.svg")
    plt.close(fig)
    return f"{stem}.png"


def captions(D: Data, made: list[str]) -> dict[str, str]:
    """A caption for each figure made: what is drawn, and what a reader needs to read it."""
    seeds = D.plan.seeds
    band = "the null's band (OPD with permuted advantages: no signal) is " + _band_label(seeds).split(": ")[1]
    out = {
        "fig_trajectories.png": (
            "Update density, ‖ΔW_t‖_F and the stable rank of ΔW_t over training for SFT, OPD and RLVR; "
            f"{band}. The two stable-rank panels measure different updates: the bf16 checkpoints keep only the "
            "entries whose update crossed half a bf16 ULP, a sparse, noise-like pattern that raises the stable "
            f"rank{_srank_gap(D)}; the fp32 masters hold the optimizer's full update, which is low-rank for "
            "every method and for the null."
        ),
        "fig_simk.png": (
            "Sim_K(t, t_end): how much of ΔW_t's top-K input subspace is already the final one, for K = "
            + ", ".join(str(k) for k in KS)
            + f"; the dotted line is what random subspaces give (K/64), the grey band the null ({band.split(' is ')[1]})."
        ),
        "fig_projection.png": (
            "Accuracy change when training is projected onto the early top-K subspace, against plain training "
            "(bars, 95% CI), with OPD's own gain over the anchor and the head-only OPD gain as lines (claim 6)."
        ),
        "fig_controls.png": (
            "Stable rank of ΔW_t for OPD seed 0 and its controls (token sparsification, off-policy rollouts, "
            "mixes with RLVR; dashed = mixes), over the null's band (claim 7)."
        ),
    }
    return {m: out[m] for m in made if m in out}


def _srank_gap(D: Data) -> str:
    """'(final mean x in bf16 vs y in fp32 for OPD)' from the streams, when both are measured."""
    try:
        S = D.stream("opd", 0)
        last = str(S["steps"][-1])
        bf, fp = agg(S["srank"][last]), agg(S["srank_fp32"][last])
    except (KeyError, IndexError):
        return ""
    return f" (OPD at its last step: {bf:.1f} in bf16 vs {fp:.1f} in fp32)"
