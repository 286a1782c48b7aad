"""The miniature's plan, fixed before any result (docs/reproduction.md): steps, cadences, evaluation sizes,
the primary-K rule, the claims' texts, and the job graph that trains and measures it."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from weightgeo.train import opd, rlvr, sft
from weightgeo.train.loop import lr_at
from weightgeo.train.task import ScratchpadAdditionTask

ASSETS = Path(__file__).resolve().parents[1] / "assets"
TASK = ScratchpadAdditionTask()


@dataclass
class Plan:
    seeds: int = 3  # training seeds of SFT, OPD, the null and RLVR (SFT seed 0's last checkpoint = the anchor)
    sft_steps: int = 300  # SFT optimizer steps (cosine 1e-5 -> 1e-6, 10% warm-up; paper: steps not stated)
    opd_steps: int = 300  # OPD and null steps (paper: 299)
    rlvr_steps: int = 1000  # one RLVR run per seed (paper: about 1k) ...
    rlvr_matched: int = 300  # ... also read at this step (= opd_steps: matched steps)
    every: int = 30  # checkpoint cadence of SFT, OPD, the null, and RLVR up to rlvr_matched
    rlvr_every: int = 100  # RLVR's cadence after rlvr_matched
    n_prompts: int = 16  # RL prompts per step (x 8 samples: 128 rollouts)
    eval_prompts: int = 1000  # held-out prompts for every accuracy ...
    eval_samples: int = 4  # ... x T=1 samples each (same prompts and sampling seeds for every model)
    main: bool = True  # SFT / OPD / null / RLVR (claims 1-5)
    controls: bool = False  # projection, head-only, sparsification, off-policy, mixes (claims 6-7)
    project_ks: tuple = (1, 2, 4, 16)  # projection subspace sizes K
    project_frac: float = 0.2  # V_K taken from ΔW at this fraction of training (paper: about 20%)
    project_seeds: int = 3  # seeds of the projection and head-only runs (paired with the plain runs' seeds)
    sparsify: tuple = (("topk", 0.25), ("topk", 0.5), ("random", 0.25), ("random", 0.5))  # §5 controls (seed 0)
    offpolicy: bool = True  # OPD on teacher-sampled rollouts (seed 0)
    mix_alphas: tuple = (0.75, 0.5, 0.25, 0.05, 0.01)  # A = α A_OPD + (1 − α) A_RLVR (seed 0)


FULL = Plan()
QUICK = Plan(seeds=1, opd_steps=100, rlvr_steps=333, rlvr_matched=100, every=10, rlvr_every=50)
SMOKE = Plan(
    seeds=1,
    sft_steps=6,
    opd_steps=4,
    rlvr_steps=8,
    rlvr_matched=4,
    every=2,
    rlvr_every=2,
    n_prompts=4,
    eval_prompts=48,
    eval_samples=2,
    controls=True,
    project_seeds=1,
    sparsify=(("topk", 0.5),),
    mix_alphas=(0.05,),
)

KS = (1, 2, 4, 16)  # Sim_K reported at every K; the primary K* is chosen by PRIMARY_K_RULE
PRIMARY_K_RULE = (
    "K* = the largest K in {1, 2, 4, 16} not above s, s = the smaller of SFT's and OPD's "
    "seed-mean stable rank of ΔW (attention, bf16) at their first checkpoint at >= 20% of training"
)
ATTENTION = "attention"  # trajectories: the 16 attention matrices (the paper's set)
BLOCK = ["attention", "mlp"]  # pair diagnostics: the 24 block matrices
LOC_ALPHA = 0.3  # localization mask fraction (paper's Fig. 3)
FLAT_BAND = 0.25  # |relative change of the stable rank| below this = flat (claim 4)
CURVE_TOL = 0.25  # a control keeps OPD's stable-rank curve if its mean relative deviation stays below this (claim 7)
SMALL_MIX = 0.05  # nominal OPD share α at or below which a mix is "small" (claim 7)
TRACK_K = 4  # K of the live Tracker cross-check
HEAD_ONLY = r"^(lm_head|model\.embed_tokens|model\.embed_positions)\.weight$"  # head-only control's trainables
CLAIM_TEXT = {
    1: "Unchanged fraction: SFT < OPD < RLVR",
    2: "NSS and principal angles: SFT > OPD > RLVR",
    3: "Update density SFT > OPD > RLVR; low-magnitude overlap SFT < OPD < RLVR",
    4: "Stable rank of ΔW_t: OPD flat, SFT rising, RLVR falling",
    5: "OPD's Sim_K to its final subspace is high from the first checkpoint (~20%); SFT's rises gradually",
    6: "Projecting gradients onto the early V_K keeps OPD's accuracy and hurts SFT's",
    7: "Token sparsification and off-policy rollouts keep OPD's stable-rank curve; a small OPD share changes it",
}


def _file_id(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()[:16]


def build_jobs(plan: Plan, assets: Path) -> dict[str, dict]:
    """Every training and measurement job of ``plan``: {name: spec}. A spec is plain JSON (kind, deps, params)."""
    jobs: dict[str, dict] = {}
    ids = {
        "base": _file_id(assets / "base" / "model.safetensors"),
        "teacher": _file_id(assets / "teacher" / "model.safetensors"),
    }
    ev = {"eval_prompts": plan.eval_prompts, "eval_samples": plan.eval_samples}

    def add(name, kind, deps=(), cost=1.0, **params):
        jobs[name] = {"name": name, "kind": kind, "deps": list(deps), "cost": cost, **params}

    def common(steps, every, save_at=()):
        return dict(steps=steps, save_every=every, save_at=list(save_at), save_fp32=True, eval_n=0)

    s80 = math.ceil(0.8 * plan.sft_steps)
    sft_cfg = common(plan.sft_steps, plan.every, [s80])
    opd_cfg = dict(common(plan.opd_steps, plan.every), n_prompts=plan.n_prompts)
    rl_at = list(range(plan.every, plan.rlvr_matched + 1, plan.every)) + [plan.rlvr_matched]
    rlvr_cfg = dict(common(plan.rlvr_steps, plan.rlvr_every, rl_at), n_prompts=plan.n_prompts)
    rlvr_cfg["save_every"] = plan.rlvr_every if plan.rlvr_every else 0
    add("teacher", "eval_model", cost=0.2, path="teacher", assets_id=ids, **ev)
    n_sft = max(plan.seeds if plan.main else 0, plan.project_seeds if plan.controls else 0, 1)
    n_opd = max(plan.seeds if plan.main else 0, plan.project_seeds if plan.controls else 0, 1)
    for i in range(n_sft):
        add(
            f"sft_s{i}",
            "sft",
            cost=plan.sft_steps * 0.1,
            start="base",
            assets_id=ids,
            cfg={**sft_cfg, "seed": i},
            readings=[0, s80, plan.sft_steps],
            **ev,
        )
    add("regime", "regime", deps=["sft_s0", "teacher"], cost=0.5, assets_id=ids, **ev)
    after = ["regime"]  # nothing downstream of the anchor (and no geometry) before the regime is printed
    for i in range(n_opd):
        add(
            f"opd_s{i}",
            "opd",
            deps=after,
            cost=plan.opd_steps * 0.25,
            start="anchor",
            assets_id=ids,
            cfg={**opd_cfg, "seed": 100 + i},
            readings=[plan.opd_steps],
            track=i == 0,
            **ev,
        )
    if plan.main:
        for i in range(plan.seeds):
            add(
                f"null_s{i}",
                "opd",
                deps=after,
                cost=plan.opd_steps * 0.25,
                start="anchor",
                assets_id=ids,
                cfg={**opd_cfg, "seed": 100 + i, "permute_advantages": True},
                readings=[plan.opd_steps],
                **ev,
            )
            add(
                f"rlvr_s{i}",
                "rlvr",
                deps=after,
                cost=plan.rlvr_steps * 0.17,
                start="anchor",
                assets_id=ids,
                cfg={**rlvr_cfg, "seed": 200 + i},
                readings=[plan.rlvr_matched, plan.rlvr_steps],
                **ev,
            )
    if plan.controls:
        p_sft, p_opd = round(plan.project_frac * plan.sft_steps), round(plan.project_frac * plan.opd_steps)
        for i in range(plan.project_seeds):
            for k in plan.project_ks:
                add(
                    f"sft_proj_k{k}_s{i}",
                    "sft",
                    deps=after,
                    cost=plan.sft_steps * 0.1,
                    start="base",
                    assets_id=ids,
                    cfg={**sft_cfg, "seed": i, "project_at": p_sft, "project_k": k},
                    readings=[plan.sft_steps],
                    **ev,
                )
                add(
                    f"opd_proj_k{k}_s{i}",
                    "opd",
                    deps=after,
                    cost=plan.opd_steps * 0.25,
                    start="anchor",
                    assets_id=ids,
                    cfg={**opd_cfg, "seed": 100 + i, "project_at": p_opd, "project_k": k},
                    readings=[plan.opd_steps],
                    **ev,
                )
            add(
                f"opd_head_s{i}",
                "opd",
                deps=after,
                cost=plan.opd_steps * 0.2,
                start="anchor",
                assets_id=ids,
                cfg={**opd_cfg, "seed": 100 + i, "trainable": HEAD_ONLY},
                readings=[plan.opd_steps],
                **ev,
            )
        ctrl = {f"ctrl_{m}_{r:g}": {"keep_ratio": r, "keep_mode": m} for m, r in plan.sparsify}
        if plan.offpolicy:
            ctrl["ctrl_offpolicy"] = {"rollout_source": "teacher"}
        ctrl.update({f"ctrl_mix_{a:g}": {"rlvr_alpha": a} for a in plan.mix_alphas})
        for name, kw in ctrl.items():
            add(
                name,
                "opd",
                deps=after,
                cost=plan.opd_steps * 0.25,
                start="anchor",
                assets_id=ids,
                cfg={**opd_cfg, "seed": 100, **kw},
                readings=[plan.opd_steps],
                **ev,
            )
    # measurement: one job per stream (and per RLVR reading), one per pair; all after the regime
    runs = [n for n, j in jobs.items() if j["kind"] in ("sft", "opd", "rlvr")]
    for n in runs:
        j = jobs[n]
        if "proj" in n or "head" in n:
            continue  # projected / head-only runs are judged by accuracy only
        lrs = _lr_schedule(j)
        add(f"m_{n}", "measure_stream", deps=[n, "regime"], cost=3.0, run=n, upto=None, lrs=lrs)
        if n.split("_s")[0] not in ("sft", "opd", "null", "rlvr"):
            continue  # controls are judged by their stable-rank curves only
        base = "base" if j["start"] == "base" else "anchor"
        add(f"p_{n}", "measure_pair", deps=[n, "regime"], cost=1.0, run=n, start=base, step=j["cfg"]["steps"])
        if j["kind"] == "rlvr":
            m = plan.rlvr_matched
            add(f"m_{n}@{m}", "measure_stream", deps=[n, "regime"], cost=2.0, run=n, upto=m, lrs=lrs[:m])
            add(f"p_{n}@{m}", "measure_pair", deps=[n, "regime"], cost=1.0, run=n, start=base, step=m)
    return jobs


def _lr_schedule(job: dict) -> list[float]:
    """The lr of every optimizer step of a training job (for C̃'s denominator sqrt(Σ lr_t²))."""
    c = job["cfg"]
    if job["kind"] == "sft":
        d = sft.SFTConfig()
        return [
            lr_at(t, total=c["steps"], lr=d.lr, schedule="cosine", warmup_frac=d.warmup_frac, min_lr=d.min_lr)
            for t in range(c["steps"])
        ]
    return [(opd.OPDConfig() if job["kind"] == "opd" else rlvr.RLVRConfig()).lr] * c["steps"]


def start_dir(job: dict, out: Path, assets: Path) -> Path:
    return (
        assets / "base"
        if job["start"] == "base"
        else out
        / "runs"
        / "sft_s0"
        / "checkpoint-{}".format(json.loads((out / "results" / "sft_s0.json").read_text())["steps"])
    )
