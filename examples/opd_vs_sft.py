"""OPD vs SFT vs RLVR on a miniature: train real checkpoint streams, measure their geometry, check the claims.

    python examples/opd_vs_sft.py --quick            # <= 3 min on 2 idle cores -> runs/opd_vs_sft/quick/
    python examples/opd_vs_sft.py                    # full run, <= 30 min on 2 idle cores -> runs/opd_vs_sft/full/
    python examples/opd_vs_sft.py --quick --threads 1 --out DIR   # busy machine; files go to DIR itself
    python examples/opd_vs_sft.py --smoke --out DIR  # ~15 s end-to-end check (tests, CI); numbers mean nothing

Starting from the shipped bf16 student base and 4x teacher (examples/assets, made by
``python -m weightgeo.train.pretrain --out examples/assets``), it runs SFT from the base, then OPD and RLVR
from the SFT anchor, the subspace-constrained variants (gradients projected onto V16 of ΔW at 20% of
training, paper §4.2) and the paper's §5 controls, each writing a ``checkpoint-<step>`` stream. Then it
measures the streams with weightgeo's public API (``compare`` for the pairs, ``rank_curve`` and
``locking_onset`` for the streams, a live ``Tracker`` on the OPD run checked against the offline results),
writes ``report.md``, ``report.json``, weightgeo's own JSON reports and PNG figures into the output folder,
and prints the seven claims of the paper notes §5 with measured values and reproduced yes/no.

Every hyperparameter and every claim criterion below was fixed before any claim was measured; none may be
tuned to make a claim pass (docs/reproduction.md). Seeded and deterministic on one machine and thread count.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import weightgeo
from weightgeo.train import opd, rlvr, sft
from weightgeo.train.model import GPT, GPTConfig
from weightgeo.train.task import AdditionTask

ASSETS = Path(__file__).resolve().parent / "assets"


# =====================================================================================================
# 1. The plan: hyperparameters per mode (fixed in advance; see docs/reproduction.md)
# =====================================================================================================
@dataclass
class Plan:
    sft_steps: int = 300  # SFT optimizer steps (paper: not stated)
    opd_steps: int = 300  # OPD steps (paper: 299)
    rlvr_steps: int = 1000  # RLVR steps (paper: about 1k)
    n_checkpoints: int = 10  # checkpoints per stream after checkpoint-0
    project_frac: float = 0.2  # V16 taken at this fraction of training (paper: about 20%)
    eval_n: int = 1000  # held-out prompts for accuracy at start/end of each run
    sparsify: list = field(default_factory=lambda: [("topk", 0.25), ("topk", 0.5), ("random", 0.25), ("random", 0.5)])
    offpolicy: bool = True
    mix_alphas: list = field(default_factory=lambda: [0.75, 0.5, 0.25, 0.05, 0.01])
    gate_steps: int = 200  # bf16-gate check: fresh init (std 0.02), AdamW lr 1e-6 constant, this many steps (0: skip)
    seed: int = 0
    threads: int = 2


SMOKE = Plan(sft_steps=4, opd_steps=4, rlvr_steps=4, n_checkpoints=2, eval_n=32,  # seconds; for tests
             sparsify=[("topk", 0.5)], offpolicy=True, mix_alphas=[0.05], gate_steps=4)
QUICK = Plan(sft_steps=64, opd_steps=64, rlvr_steps=192, n_checkpoints=8, eval_n=500,
             sparsify=[("random", 0.5)], offpolicy=True, mix_alphas=[0.05], gate_steps=0)

# lrs, betas, schedules: the algorithm files' defaults, which are the paper's values (SFT 1e-5 cosine -> 1e-6,
# 10% warm-up, Adam (0.9, 0.95); OPD and RLVR 1e-6 constant, Adam (0.9, 0.98); wd 0.1 everywhere).


# =====================================================================================================
# 2. Training
# =====================================================================================================
def _every(steps: int, n: int) -> int:
    return max(1, steps // n)


def train_all(plan: Plan, out: Path, assets: Path = ASSETS, log=print) -> tuple[dict, dict]:
    """Train every run of ``plan`` into ``out``; returns ({runs, timings_s}, {run name: live Tracker})."""
    task = AdditionTask()
    torch.set_num_threads(plan.threads)
    base_dir, teacher_dir = assets / "base", assets / "teacher"
    teacher = GPT.from_pretrained(teacher_dir)
    runs: dict[str, dict] = {}
    timings: dict[str, float] = {}
    trackers: dict[str, weightgeo.Tracker] = {}  # live objects, kept out of training.json

    def timed(name, fn):
        t0, c0 = time.perf_counter(), time.process_time()
        res = fn()
        timings[name] = round(time.perf_counter() - t0, 1)
        res["wall_s"], res["cpu_s"] = timings[name], round(time.process_time() - c0, 1)
        runs[name] = res
        end = res.get("end", {})
        log(f"  {name:<16} wall {timings[name]:6.1f}s  cpu {res['cpu_s']:6.1f}s  "
            f"acc greedy {end.get('acc_greedy', float('nan')):.3f}  T=1 {end.get('acc_t1', float('nan')):.3f}")
        return res

    s_cfg = dict(steps=plan.sft_steps, save_every=_every(plan.sft_steps, plan.n_checkpoints), eval_n=plan.eval_n,
                 seed=plan.seed)
    p_sft = round(plan.project_frac * plan.sft_steps)
    timed("sft", lambda: sft.train(GPT.from_pretrained(base_dir), sft.SFTConfig(**s_cfg), out / "sft", task=task))
    timed("sft_proj", lambda: sft.train(GPT.from_pretrained(base_dir), sft.SFTConfig(**s_cfg, project_at=p_sft),
                                        out / "sft_proj", task=task))
    anchor = out / "sft" / f"checkpoint-{plan.sft_steps}"

    o_cfg = dict(steps=plan.opd_steps, save_every=_every(plan.opd_steps, plan.n_checkpoints), eval_n=plan.eval_n,
                 seed=plan.seed + 1)
    p_opd = round(plan.project_frac * plan.opd_steps)

    def run_opd(name, track=False, **kw):
        student = GPT.from_pretrained(anchor)
        tracker, hook = make_tracker(student, every=o_cfg["save_every"]) if track else (None, None)
        res = timed(name, lambda: opd.train(student, teacher, opd.OPDConfig(**o_cfg, **kw), out / name, task=task,
                                            on_step=hook))
        if tracker is not None:
            trackers[name] = tracker
        return res

    run_opd("opd", track=True)
    run_opd("opd_proj", project_at=p_opd)
    timed("rlvr", lambda: rlvr.train(
        GPT.from_pretrained(anchor),
        rlvr.RLVRConfig(steps=plan.rlvr_steps, save_every=_every(plan.rlvr_steps, plan.n_checkpoints),
                        eval_n=plan.eval_n, seed=plan.seed + 2), out / "rlvr", task=task))
    for mode, rho in plan.sparsify:
        run_opd(f"ctrl_{mode}_{rho:g}", keep_ratio=rho, keep_mode=mode)
    if plan.offpolicy:
        run_opd("ctrl_offpolicy", rollout_source="teacher")
    for a in plan.mix_alphas:
        run_opd(f"ctrl_mix_{a:g}", rlvr_alpha=a)
    if plan.gate_steps:  # the timings doc's bf16-gate statement, measured on this miniature
        cfg = json.loads((base_dir / "config.json").read_text())["weightgeo_gpt_config"]
        fresh = GPT(GPTConfig(**cfg), seed=plan.seed)
        timed("gate_fresh_lr1e-6", lambda: sft.train(fresh, sft.SFTConfig(
            steps=plan.gate_steps, lr=1e-6, min_lr=1e-6, warmup_frac=0.0, save_every=max(1, plan.gate_steps // 4),
            eval_n=0, seed=plan.seed), out / "gate_fresh_lr1e-6", task=task))
    return {"runs": runs, "timings_s": timings}, trackers


# =====================================================================================================
# 3. Measurement, all through weightgeo's public API
# =====================================================================================================
BLOCK = ["attention", "mlp"]  # the 24 block matrices (q, k, v, o, up, down): pair diagnostics
ATTENTION = "attention"  # the 16 attention matrices (the paper's set): trajectories
K_SUB = 16  # top-k subspace size: d/8 = 16, the paper's 512/4096 ratio; also its K = 16 for Sim_K
LOC_ALPHA = 0.3  # localization mask fraction, as the paper's Fig. 3
LOC_RANK = 16  # rank of W0's reconstruction for the principal mask (= K_SUB)


def stream_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*"))


def make_tracker(model: GPT, *, every: int):
    """A live weightgeo.Tracker on the OPD run; returns (tracker, on_step hook)."""
    tracker = weightgeo.Tracker(model, every=every, k=K_SUB, include=ATTENTION, mode="exact")

    def hook(m: GPT, step: int) -> None:
        tracker.update(m.named_parameters(), step)

    return tracker, hook


def unchanged_fraction(base: Path, ft: Path) -> float:
    """bf16-rule unchanged fraction over every tensor, parameter-count weighted (notes §1.1)."""
    return weightgeo.compare(base, ft, metrics="update_sparsity", progress=False).summary["update_sparsity"]


def measure_pair(base_dir: Path, ft_dir: Path) -> tuple[dict, "weightgeo.Report"]:
    """Table 1 / Figs 2-3 numbers for one (base, fine-tuned) pair of bf16 checkpoints.

    Unchanged fraction over every tensor; NSS, principal angles (top-16 right subspaces) and localization
    (α = 0.3, r = 16) over the block matrices. Density and overlaps pool the entries of all block matrices
    (updated entries / entries; hits / updated entries), as fixed before any result; weightgeo's own summary
    (unweighted means over matrices, what Fig. 3's bars show) is kept next to them."""
    rep = weightgeo.compare(base_dir, ft_dir, include=BLOCK, k=K_SUB, side="right", rank=LOC_RANK,
                            alpha=LOC_ALPHA, progress=False)
    numel = sum(r["numel"] for r in rep.rows)
    upd = {r["name"]: r["density"] * r["numel"] for r in rep.rows}
    n_upd = sum(upd.values())

    def pooled(key: str) -> float:
        return sum(r[key] * upd[r["name"]] for r in rep.rows if upd[r["name"]] > 0) / n_upd if n_upd else math.nan

    S = rep.summary
    return {
        "unchanged_frac": unchanged_fraction(base_dir, ft_dir),
        "unchanged_frac_block": S["update_sparsity"],
        "nss_mean": S["spectral_drift"],
        "max_angle_mean_deg": S["max_principal_angle"],
        "max_angle_per_matrix_deg": {r["name"]: r["max_principal_angle"] for r in rep.rows},
        "density": n_upd / numel,
        "low_mag_overlap": pooled("low_magnitude_overlap"),
        "principal_overlap": pooled("principal_mask_overlap"),
        "matrix_mean": {k: S[k] for k in ("density", "low_magnitude_overlap", "principal_mask_overlap")},
        "loc_alpha": LOC_ALPHA, "k": K_SUB, "rank": LOC_RANK, "n_matrices": len(rep.rows),
    }, rep


def measure_stream(run_dir: Path, *, gate: bool = True) -> tuple[dict, "weightgeo.Report", "weightgeo.LockingOnset"]:
    """Trajectory numbers (Figs 4-5, 7) over the attention matrices: mean stable rank, ‖ΔW_t‖_F and Hill α per
    checkpoint, Sim_16(t, t_end) to the final subspace and its locking onset; with ``gate``, the unchanged
    fraction of all weights vs checkpoint-0 per checkpoint (the bf16 gate table)."""
    rc = weightgeo.rank_curve(run_dir, include=ATTENTION, k=K_SUB)
    lock = weightgeo.locking_onset(rc, threshold=LOCK_THRESHOLD)
    steps = rc.summary["steps"]
    curves = rc.summary["curves"]
    out = {"steps": steps, "srank": curves["stable_rank"], "fro": curves["frobenius_norm"],
           "hill_alpha": curves["hill_alpha"],
           "sim_to_final": [lock.mean_similarity.get(s, math.nan) for s in steps],
           "locking_onset_step": lock.step, "locked_fraction": lock.locked_fraction,
           "sim_random_baseline": K_SUB / rc.rows[0]["shape"][1]}
    if gate:
        out["unchanged_frac"] = [unchanged_fraction(run_dir / "checkpoint-0", run_dir / f"checkpoint-{s}")
                                 for s in steps]
    return out, rc, lock


def measure_gate(run_dir: Path) -> dict:
    """Fraction of all weights whose bf16 value differs from checkpoint-0, per checkpoint."""
    steps = stream_steps(run_dir)[1:]
    return {"steps": steps, "changed_frac": [1 - unchanged_fraction(run_dir / "checkpoint-0", run_dir /
                                                                     f"checkpoint-{s}") for s in steps]}


def tracker_results(tracker, offline_rc, offline_lock) -> dict:
    """The live Tracker's rank curve and locking onset as JSON fields, and their agreement with the offline
    rank_curve / locking_onset of the same run's bf16 checkpoints (max differences over (step, matrix))."""
    trc, tlo = tracker.rank_curve(), tracker.locking_onset(threshold=LOCK_THRESHOLD)
    off = {(r["step"], r["name"]): r for r in offline_rc.rows}
    diff: dict[str, dict] = {}
    for key in ("stable_rank", "frobenius_norm", "spectral_norm", "hill_alpha", "final_subspace_similarity"):
        ab = rel = 0.0
        for r in trc.rows:
            o = off.get((r["step"], r["name"]))
            if o is None or not (math.isfinite(r[key]) and math.isfinite(o[key])):
                continue
            d = abs(r[key] - o[key])
            ab, rel = max(ab, d), max(rel, d / max(abs(o[key]), 1e-30))
        diff[key] = {"max_abs": ab, "max_rel": rel}
    shared = [s for s in tlo.mean_similarity if s in offline_lock.mean_similarity]
    sim_diff = max((abs(tlo.mean_similarity[s] - offline_lock.mean_similarity[s]) for s in shared), default=math.nan)
    matched = sum((r["step"], r["name"]) in off for r in trc.rows)
    return {
        "rank_curve": {"steps": trc.summary["steps"], "curves": trc.summary["curves"], "n_rows": len(trc.rows),
                       "mode": trc.meta.get("mode")},
        "locking_onset": {"step": tlo.step, "per_matrix": tlo.per_matrix, "mean_similarity": tlo.mean_similarity,
                          "k": tlo.k, "threshold": tlo.threshold, "final_step": tlo.final_step,
                          "locked_fraction": tlo.locked_fraction},
        "agreement_with_offline": {"rows_matched": matched, "rows_tracker": len(trc.rows),
                                   "rows_offline": len(offline_rc.rows), "max_diff": diff,
                                   "mean_similarity_max_abs": sim_diff,
                                   "same_steps": trc.summary["steps"] == offline_rc.summary["steps"],
                                   "same_onset": tlo.step == offline_lock.step},
    }


# =====================================================================================================
# 4. Claims (criteria fixed in advance; docs/reproduction.md)
# =====================================================================================================
FLAT_BAND = 0.25  # |relative change| of the stable rank below this = "flat"
LOCK_THRESHOLD = 0.9  # Sim_16 at/above this = locked (weightgeo's locking_onset default)
CURVE_TOLERANCE = 0.25  # a control "keeps" OPD's curve if its mean |relative deviation| stays below this


def _at_frac(stream: dict, frac: float, total: int) -> int:
    """Index of the first checkpoint at or after ``frac`` of training."""
    for i, s in enumerate(stream["steps"]):
        if s >= frac * total - 1e-9:
            return i
    return len(stream["steps"]) - 1


def _shape(stream: dict, total: int) -> tuple[str, float]:
    i = _at_frac(stream, 0.2, total)
    a, b = stream["srank"][i], stream["srank"][-1]
    if not (a > 0 and b > 0):  # ΔW_t == 0 (nothing passed the bf16 gate yet): no shape
        return "undefined", float("nan")
    rel = (b - a) / a
    return ("flat" if abs(rel) < FLAT_BAND else "rising" if rel > 0 else "falling"), rel


def _curve_dev(ctrl: dict, ref: dict) -> float:
    """Mean |relative deviation| of ``ctrl``'s stable-rank curve from ``ref``'s over the checkpoints both have
    (NaN when none: an undefined curve can neither keep nor change anything)."""
    r_at = dict(zip(ref["steps"], ref["srank"]))
    pairs = [(c, r_at[s]) for s, c in zip(ctrl["steps"], ctrl["srank"]) if s in r_at and r_at[s] > 0]
    return sum(abs(c - r) / r for c, r in pairs) / len(pairs) if pairs else math.nan


def _diff_se(a: dict, b: dict) -> float:
    return math.sqrt(a["acc_t1_se"] ** 2 + b["acc_t1_se"] ** 2)


def evaluate_claims(plan: Plan, pairs: dict, streams: dict, runs: dict) -> list[dict]:
    S, O, R = pairs["sft"], pairs["opd"], pairs["rlvr"]
    claims = []

    def add(n, text, values, ok):
        claims.append({"claim": n, "text": text, "values": values, "reproduced": bool(ok)})

    add(1, "Unchanged fraction: SFT < OPD < RLVR",
        {m: round(p["unchanged_frac"], 4) for m, p in pairs.items()},
        S["unchanged_frac"] < O["unchanged_frac"] < R["unchanged_frac"])
    add(2, "NSS and principal angles: SFT > OPD > RLVR",
        {"nss": {m: float(f"{p['nss_mean']:.3e}") for m, p in pairs.items()},
         "max_angle_deg": {m: round(p["max_angle_mean_deg"], 3) for m, p in pairs.items()}},
        S["nss_mean"] > O["nss_mean"] > R["nss_mean"]
        and S["max_angle_mean_deg"] > O["max_angle_mean_deg"] > R["max_angle_mean_deg"])
    add(3, "Update density SFT > OPD > RLVR; low-magnitude overlap SFT < OPD < RLVR",
        {"density": {m: round(p["density"], 4) for m, p in pairs.items()},
         "low_mag_overlap": {m: round(p["low_mag_overlap"], 4) for m, p in pairs.items()}},
        S["density"] > O["density"] > R["density"]
        and S["low_mag_overlap"] < O["low_mag_overlap"] < R["low_mag_overlap"])
    totals = {"sft": plan.sft_steps, "opd": plan.opd_steps, "rlvr": plan.rlvr_steps}
    shapes = {m: _shape(streams[m], totals[m]) for m in ("sft", "opd", "rlvr")}
    add(4, "Stable rank of ΔW_t: OPD flat, SFT rising, RLVR falling",
        {m: {"shape": s, "rel_change_from_20pct": round(r, 3),
             "srank": [round(x, 2) for x in streams[m]["srank"]]} for m, (s, r) in shapes.items()},
        shapes["opd"][0] == "flat" and shapes["sft"][0] == "rising" and shapes["rlvr"][0] == "falling")
    sim = {m: streams[m]["sim_to_final"][_at_frac(streams[m], 0.2, totals[m])] for m in ("sft", "opd", "rlvr")}
    add(5, "OPD's Sim_16 to its final subspace is high from the first checkpoint (~20%); SFT's rises gradually",
        {"sim16_at_20pct": {m: round(v, 3) for m, v in sim.items()},
         "sft_curve": [round(x, 3) for x in streams["sft"]["sim_to_final"]],
         "opd_curve": [round(x, 3) for x in streams["opd"]["sim_to_final"]],
         "locking_onset_step": {m: streams[m]["locking_onset_step"] for m in ("sft", "opd", "rlvr")},
         "random_baseline": streams["opd"]["sim_random_baseline"]},
        sim["opd"] >= LOCK_THRESHOLD and sim["sft"] < LOCK_THRESHOLD)
    o, op, s_, sp = (runs[n]["end"] for n in ("opd", "opd_proj", "sft", "sft_proj"))
    d_opd, d_sft = op["acc_t1"] - o["acc_t1"], sp["acc_t1"] - s_["acc_t1"]
    add(6, "Projecting gradients onto the early V16 keeps OPD's accuracy and hurts SFT's",
        {"opd_acc_t1": [round(o["acc_t1"], 3), round(op["acc_t1"], 3)],
         "sft_acc_t1": [round(s_["acc_t1"], 3), round(sp["acc_t1"], 3)],
         "delta_opd": round(d_opd, 3), "delta_sft": round(d_sft, 3),
         "two_se": {"opd": round(2 * _diff_se(o, op), 3), "sft": round(2 * _diff_se(s_, sp), 3)}},
        d_opd >= -2 * _diff_se(o, op) and d_sft < -2 * _diff_se(s_, sp))
    keep_names = [n for n in streams if n.startswith("ctrl_") and not n.startswith("ctrl_mix")]
    small_mix = [n for n in streams if n.startswith("ctrl_mix") and float(n.split("_")[-1]) <= 0.05]
    opd_shape = shapes["opd"][0]
    devs = {n: round(_curve_dev(streams[n], streams["opd"]), 3) for n in streams if n.startswith("ctrl_")}
    cshape = {n: _shape(streams[n], plan.opd_steps)[0] for n in streams if n.startswith("ctrl_")}
    kept = all(devs[n] < CURVE_TOLERANCE and cshape[n] == opd_shape for n in keep_names)
    changed = bool(small_mix) and all(devs[n] >= CURVE_TOLERANCE or cshape[n] != opd_shape for n in small_mix)
    add(7, "Token sparsification and off-policy rollouts keep OPD's stable-rank curve; a small OPD share changes it",
        {"mean_rel_deviation_from_opd": devs, "shape": cshape, "opd_shape": opd_shape}, kept and changed)
    return claims


# =====================================================================================================
# 5. Report and figures
# =====================================================================================================
LABELS = {"sft": "SFT", "opd": "OPD", "rlvr": "RLVR"}


def write_figures(out: Path, pair_reports: dict, rank_curves: dict, lockings: dict, runs: dict) -> list[str]:
    """Figs. 2-3 and 4-5 via weightgeo.plot; Fig. 6 (projection) here; Fig. 7 (controls) via plot_trajectories.
    Returns the file names written ([] without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from weightgeo.plot import plot_pair_reports, plot_trajectories
    except ImportError:
        return []
    made = []
    main3 = ("sft", "opd", "rlvr")
    plot_pair_reports({LABELS[m]: pair_reports[m] for m in main3}, out / "fig2_3_pair_geometry.png", alpha=LOC_ALPHA,
                      title="Pair geometry: SFT = base -> SFT anchor; OPD, RLVR = anchor -> final (block matrices, "
                            f"k = {K_SUB})")
    made.append("fig2_3_pair_geometry.png")
    plot_trajectories({LABELS[m]: rank_curves[m] for m in main3}, out / "fig4_5_trajectories.png",
                      locking={LABELS[m]: lockings[m] for m in main3}, x="fraction",
                      title="Trajectories of ΔW_t = W_t − W_0 (attention matrices, means over matrices; "
                            "dotted: locking onset)")
    made.append("fig4_5_trajectories.png")

    fig, ax = plt.subplots(1, 2, figsize=(11, 4.4), layout="constrained")  # Fig 6
    colors = {"sft": "tab:blue", "opd": "tab:orange"}
    for name, axi, key in (("sft", ax[0], "loss"), ("opd", ax[1], "reverse_kl")):
        for suffix, ls in (("", "-"), ("_proj", "--")):
            recs = [json.loads(l) for l in (Path(runs[name + suffix]["run_dir"]) / "log.jsonl").read_text().splitlines()]
            ys = [r[key] for r in recs]
            w = max(1, len(ys) // 20)
            sm = [sum(ys[max(0, i - w + 1):i + 1]) / len(ys[max(0, i - w + 1):i + 1]) for i in range(len(ys))]
            acc = runs[name + suffix].get("end", {}).get("acc_t1")
            axi.plot([r["step"] for r in recs], sm, ls, color=colors[name],
                     label=LABELS[name] + (" projected onto early V16" if suffix else "")
                     + (f" (final acc T=1 {acc:.3f})" if acc is not None else ""))
        pa = json.loads((Path(runs[name + "_proj"]["run_dir"]) / "run_config.json").read_text()).get("project_at")
        if pa:
            axi.axvline(pa, color="gray", ls=":", lw=1, label=f"projection starts (step {pa})")
        axi.set(title=f"{LABELS[name]}: {key.replace('_', ' ')} (moving mean over {w} step{'s' * (w > 1)})",
                xlabel="step",
                ylabel=key.replace("_", " "))
        axi.grid(alpha=0.3)
        axi.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    fig.suptitle("Subspace-constrained training (paper §4.2, Fig. 6)")
    fig.savefig(out / "fig6_projection.png", dpi=110)
    plt.close(fig)
    made.append("fig6_projection.png")

    ctrl = {"OPD": rank_curves["opd"], **{n.removeprefix("ctrl_"): rc for n, rc in rank_curves.items()
                                         if n.startswith("ctrl_")}}
    plot_trajectories(ctrl, out / "fig7_controls.png",
                      title="OPD controls (paper §5, Fig. 7): token sparsification, off-policy rollouts, "
                            "OPD+RLVR advantage mix")
    made.append("fig7_controls.png")
    return made


def _json_safe(v):
    """NaN -> null, ±inf -> "inf"/"-inf" (standard JSON), recursively; dict keys as strings."""
    if isinstance(v, float):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else v
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def write_report(out: Path, plan: Plan, mode: str, trained: dict, pairs: dict, streams: dict, claims: list,
                 figures: list, wall: float, cpu: float, gate: dict, tracker: dict, measure_s: dict) -> None:
    runs = trained["runs"]
    report = {"mode": mode, "plan": asdict(plan), "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
              "timings_s": trained["timings_s"], "cpu_s_per_run": {n: r["cpu_s"] for n, r in runs.items()},
              "measure_s": measure_s, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "weightgeo": weightgeo.__version__,
              "measurement": {"api": "weightgeo.compare / rank_curve / locking_onset / Tracker",
                              "pair_include": BLOCK, "trajectory_include": ATTENTION, "k": K_SUB,
                              "loc_alpha": LOC_ALPHA, "loc_rank": LOC_RANK, "lock_threshold": LOCK_THRESHOLD},
              "accuracy": {n: {"start": r["start"], "end": r["end"]} for n, r in runs.items()},
              "pairs": pairs, "streams": streams, "tracker_opd": tracker, "bf16_gate_fresh": gate,
              "claims": claims, "figures": figures}
    (out / "report.json").write_text(json.dumps(_json_safe(report), indent=2) + "\n")
    agree = tracker["agreement_with_offline"]
    L = [f"# OPD vs SFT vs RLVR on a miniature ({mode} run)", "",
         f"Wall time {wall:.0f} s (process CPU {cpu:.0f} s) on {torch.get_num_threads()} thread(s) "
         f"(torch {torch.__version__}, weightgeo {weightgeo.__version__}). Every number below comes from weightgeo's "
         "public API: `compare` (pairs), `rank_curve` + `locking_onset` (streams), a live `Tracker` on the OPD run.",
         "", "## Table 1: pair diagnostics", "",
         "| method | unchanged % | NSS | mean max angle (°) | density % | low-mag overlap % | principal overlap % |",
         "|---|---|---|---|---|---|---|"]
    for m, p in pairs.items():
        L.append(f"| {LABELS[m]} | {100 * p['unchanged_frac']:.1f} | {p['nss_mean']:.2e} | {p['max_angle_mean_deg']:.3f} | "
                 f"{100 * p['density']:.1f} | {100 * p['low_mag_overlap']:.1f} | {100 * p['principal_overlap']:.1f} |")
    L += ["", f"SFT: base -> SFT anchor; OPD, RLVR: anchor -> final checkpoint. Unchanged % over every tensor; the "
              f"rest over the {pairs['sft']['n_matrices']} block matrices (k = {K_SUB}, right side). Localization: "
              f"α = {LOC_ALPHA} (random baseline = α), r = {LOC_RANK}; density and overlaps pool the entries of all "
              "block matrices. Fig. 3's bars are weightgeo's summary, unweighted means over matrices: "
          + "; ".join(f"{LABELS[m]} density {100 * p['matrix_mean']['density']:.1f}%, low-mag "
                      f"{100 * p['matrix_mean']['low_magnitude_overlap']:.1f}%, principal "
                      f"{100 * p['matrix_mean']['principal_mask_overlap']:.1f}%" for m, p in pairs.items()) + ".",
          "", "## Accuracy (held-out, T=1 and greedy; ± 1 s.e.)", "",
          "| run | start T=1 | end T=1 | end greedy | wall s | CPU s |", "|---|---|---|---|---|---|"]
    for n, r in runs.items():
        if not r.get("end"):
            continue
        L.append(f"| {n} | {r['start']['acc_t1']:.3f} | {r['end']['acc_t1']:.3f} ± {r['end']['acc_t1_se']:.3f} | "
                 f"{r['end']['acc_greedy']:.3f} | {r['wall_s']} | {r['cpu_s']} |")
    L += ["", "## Trajectories (attention matrices, means over matrices)", "",
          "| run | steps | stable rank | ‖ΔW_t‖_F | Sim_16(t, t_end) | locking onset (0.9) |", "|---|---|---|---|---|---|"]
    for n, st in streams.items():
        L.append(f"| {n} | {st['steps'][0]}..{st['steps'][-1]} | " + ", ".join(f"{x:.2f}" for x in st["srank"])
                 + " | " + f"{st['fro'][0]:.2e} -> {st['fro'][-1]:.2e}" + " | "
                 + ", ".join(f"{x:.2f}" for x in st["sim_to_final"]) + f" | {st['locking_onset_step']} |")
    L += ["", f"Live `Tracker` on OPD (exact mode, every {_every(plan.opd_steps, plan.n_checkpoints)} steps) vs offline "
              f"`rank_curve` on its bf16 checkpoints: {agree['rows_matched']}/{agree['rows_tracker']} rows matched, "
              "max |difference|: " + ", ".join(f"{k} {v['max_abs']:.1e} (rel {v['max_rel']:.1e})"
                                               for k, v in agree["max_diff"].items())
          + f"; mean Sim_16 {agree['mean_similarity_max_abs']:.1e}; same onset: {agree['same_onset']}.",
          "", "## bf16 gate: fraction of weights whose bf16 value changed since checkpoint-0", "",
          "| run | checkpoint step: changed % |", "|---|---|"]
    for n in ("sft", "opd", "rlvr"):
        st = streams[n]
        L.append(f"| {n} (lr {'1e-5 cosine' if n == 'sft' else '1e-6'}) | " + ", ".join(
            f"{s}: {100 * (1 - u):.1f}" for s, u in zip(st["steps"], st["unchanged_frac"])) + " |")
    for n, g in gate.items():
        L.append("| fresh init std 0.02, AdamW lr 1e-6 constant | " + ", ".join(
            f"{s}: {100 * c:.1f}" for s, c in zip(g["steps"], g["changed_frac"])) + " |")
    L += ["", "## Claims (paper notes §5; criteria fixed beforehand, docs/reproduction.md)", ""]
    for c in claims:
        L.append(f"{c['claim']}. **{'yes' if c['reproduced'] else 'no'}**: {c['text']}  ")
        L.append(f"   `{json.dumps(_json_safe(c['values']))}`")
    L += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    (out / "report.md").write_text("\n".join(L) + "\n")


# =====================================================================================================
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the <= 3 minute version (reduced controls)")
    ap.add_argument("--smoke", action="store_true", help="a seconds-long run of the whole pipeline (tests, CI); "
                                                         "its numbers mean nothing")
    ap.add_argument("--out", default=None, help="output folder (default runs/opd_vs_sft/<full|quick|smoke>)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (use 1 on a busy machine)")
    ap.add_argument("--train-only", action="store_true", help="train and time, skip measurement")
    ap.add_argument("--assets", default=str(ASSETS), help="folder with base/ and teacher/ (default: shipped)")
    args = ap.parse_args(argv)
    plan = copy.deepcopy(SMOKE if args.smoke else QUICK if args.quick else Plan())
    plan.threads = args.threads
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    assets = Path(args.assets)
    out = Path(args.out) if args.out else Path("runs") / "opd_vs_sft" / mode
    if not (assets / "base" / "model.safetensors").is_file() or not (assets / "teacher" / "model.safetensors").is_file():
        print(f"missing {assets}/base or teacher: run `python -m weightgeo.train.pretrain --out {assets}` (~6 min)")
        return 1
    out.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), time.process_time()
    print(f"[{mode}] training into {out.resolve()} ({plan.threads} thread{'s' if plan.threads > 1 else ''})")
    trained, trackers = train_all(plan, out, assets)
    (out / "training.json").write_text(json.dumps(trained, indent=2, default=str) + "\n")
    if args.train_only:
        print(f"trained in {time.perf_counter() - t0:.0f}s wall, {time.process_time() - c0:.0f}s CPU: {out.resolve()}")
        return 0
    print("measuring")
    tm, cm = time.perf_counter(), time.process_time()
    base, anchor = assets / "base", out / "sft" / f"checkpoint-{plan.sft_steps}"
    measured = {"sft": measure_pair(base, anchor),
                "opd": measure_pair(anchor, out / "opd" / f"checkpoint-{plan.opd_steps}"),
                "rlvr": measure_pair(anchor, out / "rlvr" / f"checkpoint-{plan.rlvr_steps}")}
    pairs = {m: v[0] for m, v in measured.items()}
    pair_reports = {m: v[1] for m, v in measured.items()}
    streams, rank_curves, lockings = {}, {}, {}
    for n, r in trained["runs"].items():
        if n.endswith("_proj") or n.startswith("gate"):
            continue
        streams[n], rank_curves[n], lockings[n] = measure_stream(Path(r["run_dir"]), gate=n in ("sft", "opd", "rlvr"))
    gate = {n: measure_gate(Path(r["run_dir"])) for n, r in trained["runs"].items() if n.startswith("gate")}
    tracker = tracker_results(trackers["opd"], rank_curves["opd"], lockings["opd"])
    claims = evaluate_claims(plan, pairs, streams, trained["runs"])
    measure_s = {"wall": round(time.perf_counter() - tm, 1), "cpu": round(time.process_time() - cm, 1)}
    figures = write_figures(out, pair_reports, rank_curves, lockings, trained["runs"])
    for m, rep in pair_reports.items():
        rep.to_json(out / f"compare_{m}.json")
    for n, rep in rank_curves.items():
        rep.to_json(out / f"rank_curve_{n}.json")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    write_report(out, plan, mode, trained, pairs, streams, claims, figures, wall, cpu, gate, tracker, measure_s)
    agree = tracker["agreement_with_offline"]
    worst = max(v["max_abs"] for k, v in agree["max_diff"].items() if k != "final_subspace_similarity")
    print(f"tracker vs offline rank_curve (OPD, {agree['rows_matched']}/{agree['rows_tracker']} rows): max |diff| "
          f"{worst:.1e} (norms, stable rank, Hill), Sim_16 {agree['max_diff']['final_subspace_similarity']['max_abs']:.1e};"
          f" onset {tracker['locking_onset']['step']} (offline {lockings['opd'].step})")
    n_yes = sum(c["reproduced"] for c in claims)
    print(f"\nclaims (paper notes §5), {mode} run: {n_yes}/{len(claims)} reproduced; wall {wall:.0f}s, "
          f"CPU {cpu:.0f}s (measurement {measure_s['wall']:.0f}s wall, {measure_s['cpu']:.0f}s CPU)")
    for c in claims:
        print(f"  {c['claim']}. {'YES' if c['reproduced'] else 'no '}  {c['text']}")
        print(f"       {json.dumps(_json_safe(c['values']))[:400]}")
    print(f"\nwrote to {out.resolve()}:\n  report.md, report.json, training.json, compare_*.json, rank_curve_*.json"
          + (f"\n  {', '.join(figures)}" if figures else "\n  (no figures: pip install matplotlib)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
