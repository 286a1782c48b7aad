"""OPD vs SFT vs RLVR on a miniature in the paper's regime: train real checkpoint streams, check the regime,
measure the geometry, and give each of the paper's seven claims a verdict with a confidence interval.

    python examples/opd_vs_sft.py --quick            # <= 3 min on 2 idle cores, one seed -> runs/opd_vs_sft/quick/
    python examples/opd_vs_sft.py                    # full, 3 seeds, <= 30 min on 2 idle cores -> runs/opd_vs_sft/full/
    python examples/opd_vs_sft.py --controls         # then the controls (projection, head-only, sparsification,
                                                     #   off-policy, mixes), reusing the full run: <= 30 min
    python examples/opd_vs_sft.py --smoke --out DIR  # seconds-long end-to-end check (tests, CI); numbers mean nothing

Options: ``--jobs N`` parallel training / measurement processes (default 2, one per core), ``--threads T``
torch threads per process (default 1), ``--out DIR`` output folder (default runs/opd_vs_sft/<mode>).

Starting from the shipped bf16 student base and teacher (examples/assets, made by
``python -m weightgeo.train.pretrain --out examples/assets``), it runs SFT from the base (seed 0's final
checkpoint is the anchor), then the regime checks R1-R3 (printed before any geometry is measured), then OPD,
the null (OPD with its advantages permuted across the batch's tokens) and one 1000-step RLVR run per seed
from the anchor, read at step 300 (matched steps) and 1000 (the paper's ratio), each a ``checkpoint-<step>``
stream with fp32 masters beside it. It measures the streams with weightgeo's public API (``compare``,
``rank_curve``, a live ``Tracker`` on OPD checked against the offline results), decides every claim by the
rule fixed in docs/reproduction.md before the first run, and writes ``report.md``, ``report.json`` and the
figures into the output folder. Runs already in the output folder with the same configuration are reused.

Nothing here is tuned on geometry: the task, the assets and the regime thresholds were fixed on accuracy, KL
and lengths only; the criteria and the primary-K rule were committed before the first full run.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
import weightgeo
from safetensors.torch import load_file, save_file
from weightgeo.train import opd, rlvr, sft
from weightgeo.train.loop import lr_at
from weightgeo.train.model import GPT
from weightgeo.train.regime import RegimeThresholds, accuracy_matrix, regime_checks, reverse_kl
from weightgeo.train.stats import N_BOOT, bootstrap_links, cluster_bootstrap, paired_bootstrap, verdict
from weightgeo.train.task import ScratchpadAdditionTask

ASSETS = Path(__file__).resolve().parent / "assets"
TASK = ScratchpadAdditionTask()


# =====================================================================================================
# 1. The plan (fixed before any result; docs/reproduction.md)
# =====================================================================================================
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
SMOKE = Plan(seeds=1, sft_steps=6, opd_steps=4, rlvr_steps=8, rlvr_matched=4, every=2, rlvr_every=2, n_prompts=4,
             eval_prompts=48, eval_samples=2, controls=True, project_seeds=1, sparsify=(("topk", 0.5),),
             mix_alphas=(0.05,))

KS = (1, 2, 4, 16)  # Sim_K reported at every K; the primary K* is chosen by PRIMARY_K_RULE
PRIMARY_K_RULE = ("K* = the largest K in {1, 2, 4, 16} not above s, s = the smaller of SFT's and OPD's "
                  "seed-mean stable rank of ΔW (attention, bf16) at their first checkpoint at >= 20% of training")
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


# =====================================================================================================
# 2. Jobs: what to train and measure, run in parallel single-thread processes, reused when unchanged
# =====================================================================================================
def _file_id(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()[:16]


def build_jobs(plan: Plan, assets: Path) -> dict[str, dict]:
    """Every training and measurement job of ``plan``: {name: spec}. A spec is plain JSON (kind, deps, params)."""
    jobs: dict[str, dict] = {}
    ids = {"base": _file_id(assets / "base" / "model.safetensors"),
           "teacher": _file_id(assets / "teacher" / "model.safetensors")}
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
        add(f"sft_s{i}", "sft", cost=plan.sft_steps * 0.1, start="base", assets_id=ids, cfg={**sft_cfg, "seed": i},
            readings=[0, s80, plan.sft_steps], **ev)
    add("regime", "regime", deps=["sft_s0", "teacher"], cost=0.5, assets_id=ids, **ev)
    after = ["regime"]  # nothing downstream of the anchor (and no geometry) before the regime is printed
    for i in range(n_opd):
        add(f"opd_s{i}", "opd", deps=after, cost=plan.opd_steps * 0.25, start="anchor", assets_id=ids,
            cfg={**opd_cfg, "seed": 100 + i}, readings=[plan.opd_steps], track=i == 0, **ev)
    if plan.main:
        for i in range(plan.seeds):
            add(f"null_s{i}", "opd", deps=after, cost=plan.opd_steps * 0.25, start="anchor", assets_id=ids,
                cfg={**opd_cfg, "seed": 100 + i, "permute_advantages": True}, readings=[plan.opd_steps], **ev)
            add(f"rlvr_s{i}", "rlvr", deps=after, cost=plan.rlvr_steps * 0.17, start="anchor", assets_id=ids,
                cfg={**rlvr_cfg, "seed": 200 + i}, readings=[plan.rlvr_matched, plan.rlvr_steps], **ev)
    if plan.controls:
        p_sft, p_opd = round(plan.project_frac * plan.sft_steps), round(plan.project_frac * plan.opd_steps)
        for i in range(plan.project_seeds):
            for k in plan.project_ks:
                add(f"sft_proj_k{k}_s{i}", "sft", deps=after, cost=plan.sft_steps * 0.1, start="base", assets_id=ids,
                    cfg={**sft_cfg, "seed": i, "project_at": p_sft, "project_k": k}, readings=[plan.sft_steps], **ev)
                add(f"opd_proj_k{k}_s{i}", "opd", deps=after, cost=plan.opd_steps * 0.25, start="anchor",
                    assets_id=ids, cfg={**opd_cfg, "seed": 100 + i, "project_at": p_opd, "project_k": k},
                    readings=[plan.opd_steps], **ev)
            add(f"opd_head_s{i}", "opd", deps=after, cost=plan.opd_steps * 0.2, start="anchor", assets_id=ids,
                cfg={**opd_cfg, "seed": 100 + i, "trainable": HEAD_ONLY}, readings=[plan.opd_steps], **ev)
        ctrl = {f"ctrl_{m}_{r:g}": {"keep_ratio": r, "keep_mode": m} for m, r in plan.sparsify}
        if plan.offpolicy:
            ctrl["ctrl_offpolicy"] = {"rollout_source": "teacher"}
        ctrl.update({f"ctrl_mix_{a:g}": {"rlvr_alpha": a} for a in plan.mix_alphas})
        for name, kw in ctrl.items():
            add(name, "opd", deps=after, cost=plan.opd_steps * 0.25, start="anchor", assets_id=ids,
                cfg={**opd_cfg, "seed": 100, **kw}, readings=[plan.opd_steps], **ev)
    # measurement: one job per stream (and per RLVR reading), one per pair; all after the regime
    runs = [n for n, j in jobs.items() if j["kind"] in ("sft", "opd", "rlvr")]
    for n in runs:
        j = jobs[n]
        if "proj" in n or "head" in n:
            continue  # projected / head-only runs are judged by accuracy only
        lrs = _lr_schedule(j)
        add(f"m_{n}", "measure_stream", deps=[n, "regime"], cost=3.0, run=n, upto=None, lrs=lrs)
        if not n.split("_s")[0] in ("sft", "opd", "null", "rlvr"):
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
        return [lr_at(t, total=c["steps"], lr=d.lr, schedule="cosine", warmup_frac=d.warmup_frac, min_lr=d.min_lr)
                for t in range(c["steps"])]
    return [(opd.OPDConfig() if job["kind"] == "opd" else rlvr.RLVRConfig()).lr] * c["steps"]


def _spec(job: dict) -> str:
    return json.dumps({k: v for k, v in job.items() if k != "cost"}, sort_keys=True, default=str)


def run_job(job: dict, out: str, assets: str, threads: int) -> dict:
    """Run one job in this process (a worker, or the main process with --jobs 1); returns its result dict."""
    torch.set_num_threads(threads)
    t0, c0 = time.perf_counter(), time.process_time()
    out_p, assets_p = Path(out), Path(assets)
    kind = job["kind"]
    if kind in ("sft", "opd", "rlvr"):
        res = _train(job, out_p, assets_p)
    elif kind == "eval_model":
        res = _eval_model(job, out_p, assets_p)
    elif kind == "regime":
        res = _regime(job, out_p, assets_p)
    elif kind == "measure_stream":
        res = measure_stream(out_p / "runs" / job["run"], upto=job["upto"], lrs=job["lrs"])
    elif kind == "measure_pair":
        res = measure_pair(out_p, assets_p, job)
    else:
        raise ValueError(f"unknown job kind {kind!r}")
    res["wall_s"], res["cpu_s"] = round(time.perf_counter() - t0, 1), round(time.process_time() - c0, 1)
    res["spec"] = _spec(job)
    path = out_p / "results" / f"{job['name']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(res)) + "\n")
    return res


def _start_dir(job: dict, out: Path, assets: Path) -> Path:
    return assets / "base" if job["start"] == "base" else out / "runs" / "sft_s0" / "checkpoint-{}".format(
        json.loads((out / "results" / "sft_s0.json").read_text())["steps"])


def _save_eval(path: Path, mats: dict[str, dict]) -> dict:
    """Store correctness matrices {reading: {"t1", "greedy"}} and return their accuracies."""
    save_file({f"{k}@{r}": v.contiguous() for r, m in mats.items() for k, v in m.items()}, str(path))
    return {r: {"acc_t1": m["t1"].float().mean().item(), "acc_greedy": m["greedy"].float().mean().item()}
            for r, m in mats.items()}


def load_eval(out: Path, name: str, reading) -> dict[str, np.ndarray]:
    t = load_file(str(out / "runs" / name / "eval.safetensors"))
    return {"t1": t[f"t1@{reading}"].numpy(), "greedy": t[f"greedy@{reading}"].numpy()}


def _train(job: dict, out: Path, assets: Path) -> dict:
    cfg_kw = {k: tuple(v) if isinstance(v, list) else v for k, v in job["cfg"].items()}
    run_dir = out / "runs" / job["name"]
    model = GPT.from_pretrained(_start_dir(job, out, assets))
    tracker = hook = None
    if job.get("track"):
        tracker = weightgeo.Tracker(model, every=cfg_kw["save_every"], k=TRACK_K, include=ATTENTION, mode="exact")

        def hook(m, step):
            tracker.update(m.named_parameters(), step)
    kind = job["kind"]
    if kind == "sft":
        summary = sft.train(model, sft.SFTConfig(**cfg_kw), run_dir, task=TASK)
    elif kind == "opd":
        teacher = GPT.from_pretrained(assets / "teacher")
        summary = opd.train(model, teacher, opd.OPDConfig(**cfg_kw), run_dir, task=TASK, on_step=hook)
    else:
        summary = rlvr.train(model, rlvr.RLVRConfig(**cfg_kw), run_dir, task=TASK)
    mats = {r: accuracy_matrix(GPT.from_pretrained(run_dir / f"checkpoint-{r}"), TASK, n=job["eval_prompts"],
                               samples=job["eval_samples"]) for r in job["readings"]}
    res = {"name": job["name"], "kind": kind, "steps": cfg_kw["steps"], "run_dir": str(run_dir),
           "acc": _save_eval(run_dir / "eval.safetensors", mats),
           "summary": {k: v for k, v in summary.items() if k in ("steps_without_update", "opd_share_mean",
                                                                 "checkpoints", "final_loss")}}
    logs = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    res["train_s"] = logs[-1]["wall_s"] if logs else 0.0
    if kind == "rlvr":
        res["summary"]["kept_groups_mean"] = float(np.mean([r["kept_groups"] for r in logs])) if logs else math.nan
        res["summary"]["steps_without_kept_group_by_reading"] = {
            r: sum(1 for x in logs if x["step"] <= r and x["kept_groups"] == 0) for r in job["readings"]}
    if tracker is not None:
        res["tracker"] = tracker_agreement(tracker, run_dir)
    return res


def _eval_model(job: dict, out: Path, assets: Path) -> dict:
    d = out / "runs" / job["name"]
    d.mkdir(parents=True, exist_ok=True)
    m = GPT.from_pretrained(assets / job["path"])
    mats = {"final": accuracy_matrix(m, TASK, n=job["eval_prompts"], samples=job["eval_samples"])}
    return {"name": job["name"], "acc": _save_eval(d / "eval.safetensors", mats), "num_params": m.num_params()}


def _regime(job: dict, out: Path, assets: Path) -> dict:
    """Regime quantities (accuracy, KL, lengths; no geometry) and the checks R1-R3."""
    sft0 = json.loads((out / "results" / "sft_s0.json").read_text())
    teacher_r = json.loads((out / "results" / "teacher.json").read_text())
    steps = sorted(int(r) for r in sft0["acc"])
    last, at80 = steps[-1], steps[-2]
    anchor = GPT.from_pretrained(out / "runs" / "sft_s0" / f"checkpoint-{last}")
    teacher = GPT.from_pretrained(assets / "teacher")
    kl = reverse_kl(anchor, teacher, TASK, n=job["eval_prompts"], samples=job["eval_samples"])
    gain = paired_bootstrap(load_eval(out, "sft_s0", at80)["t1"], load_eval(out, "sft_s0", last)["t1"])
    values = {
        "teacher_acc_t1": teacher_r["acc"]["final"]["acc_t1"],
        "teacher_acc_greedy": teacher_r["acc"]["final"]["acc_greedy"],
        "anchor_acc_t1": sft0["acc"][str(last)]["acc_t1"], "anchor_acc_greedy": sft0["acc"][str(last)]["acc_greedy"],
        "reverse_kl_nats": kl["reverse_kl_nats"], "response_tokens": kl["response_tokens"],
        "param_ratio": teacher_r["num_params"] / anchor.num_params(), "sft_last_gain": gain["diff"],
    }
    checks = regime_checks(values)
    return {"values": values, "checks": checks, "passed": all(checks.values()), "sft_last_gain_ci95": gain["ci95"],
            "sft_reading_80pct": at80, "kl_sampled_token_estimate": kl["sampled_token_estimate"],
            "kl_by_position": kl["by_position"], "base_acc": sft0["acc"]["0"],
            "student_params": anchor.num_params(), "teacher_params": teacher_r["num_params"],
            "thresholds": asdict(RegimeThresholds())}


def _critical_path(jobs: dict[str, dict]) -> dict[str, float]:
    """Each job's cost plus the costliest chain of jobs that wait for it (its upward rank)."""
    children: dict[str, list[str]] = {n: [] for n in jobs}
    for n, j in jobs.items():
        for d in j["deps"]:
            children.setdefault(d, []).append(n)
    rank: dict[str, float] = {}

    def up(n: str) -> float:
        if n not in rank:
            rank[n] = jobs[n]["cost"] + max((up(c) for c in children[n] if c in jobs), default=0.0)
        return rank[n]
    for n in jobs:
        up(n)
    return rank


def run_all(jobs: dict[str, dict], out: Path, assets: Path, *, n_workers: int, threads: int, log=print,
            on_done=None) -> dict[str, dict]:
    """Run ``jobs`` respecting their deps, longest ready job first, in ``n_workers`` processes (1: in this
    process). A job whose result file holds the same spec is reused (and so are its outputs)."""
    results: dict[str, dict] = {}
    for name, job in jobs.items():
        f = out / "results" / f"{name}.json"
        if f.is_file():
            r = json.loads(f.read_text())
            newer_dep = any((out / "results" / f"{d}.json").stat().st_mtime > f.stat().st_mtime
                            for d in job["deps"] if (out / "results" / f"{d}.json").is_file())
            if r.get("spec") == _spec(job) and not newer_dep and all(d in results for d in job["deps"]):
                results[name] = r
                r["reused"] = True
    pending = {n: j for n, j in jobs.items() if n not in results}
    if results:
        log(f"  reusing {len(results)} finished job(s) from {out}", flush=True)
    for name in [n for n in jobs if n in results]:
        if on_done:
            on_done(name, results[name])

    rank = _critical_path(jobs)

    def ready():  # the job with the longest chain of work behind it first (critical-path scheduling)
        return sorted((n for n, j in pending.items() if all(d in results for d in j["deps"])), key=lambda n: -rank[n])

    def finish(name, res):
        res = json.loads(json.dumps(_json_safe(res)))  # as a reused result reads back: string keys, NaN -> None
        results[name] = res
        pending.pop(name, None)
        if jobs[name]["kind"] in ("sft", "opd", "rlvr", "eval_model"):
            log(f"  {name:<22} {res['wall_s']:6.1f}s  " + "  ".join(
                f"@{r}: T=1 {a['acc_t1']:.3f} greedy {a['acc_greedy']:.3f}" for r, a in res["acc"].items()), flush=True)
        if on_done:
            on_done(name, res)

    if n_workers <= 1:
        while pending:
            todo = ready()
            if not todo:
                raise RuntimeError(f"jobs with unmet dependencies: {sorted(pending)}")
            finish(todo[0], run_job(jobs[todo[0]], str(out), str(assets), threads))
        return results
    with ProcessPoolExecutor(n_workers, mp_context=get_context("spawn")) as ex:
        running = {}
        while pending or running:
            for n in ready():
                if len(running) >= n_workers:
                    break
                if n not in running.values():
                    running[ex.submit(run_job, jobs[n], str(out), str(assets), threads)] = n
            if not running:
                raise RuntimeError(f"jobs with unmet dependencies: {sorted(pending)}")
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                finish(running.pop(fut), fut.result())
    return results


# =====================================================================================================
# 3. Measurement, all through weightgeo's public API
# =====================================================================================================
def _module_type(name: str) -> str:
    return name.rsplit(".", 2)[-2] if name.endswith(".weight") else name


def measure_stream(run_dir: Path, *, upto: int | None, lrs: list[float]) -> dict:
    """Per checkpoint t (ΔW_t = W_t − checkpoint-0), per attention matrix: stable rank and ‖ΔW_t‖_F of the bf16
    checkpoints, Sim_K(t, t_end) for every K (``rank_curve``); stable rank of the fp32 masters and, per matrix
    type, rms(ΔW_fp32) and C̃ = rms / sqrt(Σ lr_t²) (``rank_curve`` on ``fp32/``); the bf16 update density of
    every tensor (``compare(..., metrics="update_sparsity")``)."""
    steps = sorted(int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*"))
    steps = [s for s in steps if upto is None or s <= upto]
    ck = [run_dir / f"checkpoint-{s}" for s in steps]
    res: dict = {"steps": steps[1:], "sim": {}}
    for K in KS:
        rc = weightgeo.rank_curve(ck, steps=steps, include=ATTENTION, k=K)
        rows = sorted(rc.rows, key=lambda r: (r["step"], r["name"]))
        res["matrices"] = sorted({r["name"] for r in rows})
        res["sim"][str(K)] = {str(s): [r["final_subspace_similarity"] for r in rows if r["step"] == s]
                              for s in steps[1:]}
        if K == KS[0]:
            res["srank"] = {str(s): [r["stable_rank"] for r in rows if r["step"] == s] for s in steps[1:]}
            res["fro"] = {str(s): [r["frobenius_norm"] for r in rows if r["step"] == s] for s in steps[1:]}
    rc32 = weightgeo.rank_curve([run_dir / "fp32" / f"checkpoint-{s}" for s in steps], steps=steps, k=1)
    att = set(res["matrices"])
    res["srank_fp32"] = {str(s): [r["stable_rank"] for r in sorted(rc32.rows, key=lambda r: r["name"])
                             if r["step"] == s and r["name"] in att] for s in steps[1:]}
    res["consistency"] = {}
    for s in steps[1:]:
        by: dict[str, list[float]] = {}
        for r in rc32.rows:
            if r["step"] == s:
                by.setdefault(_module_type(r["name"]), []).append((r["frobenius_norm"] ** 2, r["numel"]))
        denom = math.sqrt(sum(x * x for x in lrs[:s]))
        res["consistency"][str(s)] = {t: {"rms": math.sqrt(sum(a for a, _ in v) / sum(n for _, n in v)),
                                     "c_tilde": math.sqrt(sum(a for a, _ in v) / sum(n for _, n in v)) / denom}
                                 for t, v in by.items()}
    res["density"], res["unchanged_rows"] = {}, {}
    for s, c in zip(steps[1:], ck[1:]):
        rep = weightgeo.compare(ck[0], c, metrics="update_sparsity", progress=False)
        rows = sorted(rep.rows, key=lambda r: r["name"])
        res["unchanged_rows"][str(s)] = [[r["name"], r["numel"], r["update_sparsity"]] for r in rows]
        mats = [r for r in rows if len(r["shape"]) == 2]
        unchanged = sum(r["numel"] * r["update_sparsity"] for r in rows) / sum(r["numel"] for r in rows)
        res["density"][str(s)] = {"all": 1 - unchanged, "per_matrix": [1 - r["update_sparsity"] for r in mats]}
    return res


def measure_pair(out: Path, assets: Path, job: dict) -> dict:
    """Pair diagnostics over the 24 block matrices (``compare``): unchanged fraction, NSS, max principal angle
    (top-k right subspaces, k = d/8, the paper's 512/4096), density and low-magnitude overlap (α = 0.3,
    principal-mask rank = k); weightgeo's own JSON report is written beside the run."""
    base = assets / "base" if job["start"] == "base" else _start_dir({"start": "anchor"}, out, assets)
    run = out / "runs" / job["run"]
    ft = run / f"checkpoint-{job['step']}"
    d = json.loads((ft / "config.json").read_text())["hidden_size"]
    k = max(1, d // 8)
    rep = weightgeo.compare(base, ft, include=BLOCK, k=k, side="right", rank=k, alpha=LOC_ALPHA, progress=False)
    rep.to_json(run / f"compare_{job['step']}.json")
    keys = ("name", "numel", "module", "update_sparsity", "spectral_drift", "max_principal_angle", "density",
            "low_magnitude_overlap")
    return {"rows": [{x: r[x] for x in keys} for r in sorted(rep.rows, key=lambda r: r["name"])], "k": k}


def tracker_agreement(tracker, run_dir: Path) -> dict:
    """The live Tracker's rank curve against the offline ``rank_curve`` of the same run's bf16 checkpoints."""
    trc = tracker.rank_curve()
    off = {(r["step"], r["name"]): r for r in weightgeo.rank_curve(run_dir, include=ATTENTION, k=TRACK_K).rows}
    diff = {}
    for key in ("stable_rank", "frobenius_norm", "spectral_norm", "final_subspace_similarity"):
        ab = 0.0
        for r in trc.rows:
            o = off.get((r["step"], r["name"]))
            if o is not None and math.isfinite(r[key]) and math.isfinite(o[key]):
                scale = 1.0 if key == "final_subspace_similarity" else max(abs(o[key]), 1e-30)  # Sim: absolute
                ab = max(ab, abs(r[key] - o[key]) / scale)
        diff[key] = ab
    return {"rows_tracker": len(trc.rows), "rows_matched": sum((r["step"], r["name"]) in off for r in trc.rows),
            "rows_offline": len(off), "max_rel_diff": diff, "k": TRACK_K}


def half_ulp_over_lr(ckpt: Path, lr: float) -> dict:
    """Per matrix type, quantiles of (half a bf16 ULP of each weight) / lr: the number of maximal Adam steps
    (each moves a weight by about lr) before a weight's bf16 value can change."""
    out = {}
    for name, p in GPT.from_pretrained(ckpt).named_parameters():
        if p.ndim != 2:
            continue
        w = p.detach().to(torch.bfloat16).float().flatten()
        w = w[w != 0]
        _, e = torch.frexp(w)  # |w| in [2^(e-1), 2^e): ULP = 2^(e-1-7)
        steps = torch.ldexp(torch.ones_like(w), e - 9) / lr
        out.setdefault(_module_type(name), []).append(steps)
    return {t: dict(zip(("p10", "p50", "p90"), torch.quantile(torch.cat(v), torch.tensor([0.1, 0.5, 0.9])).tolist()))
            for t, v in out.items()}


# =====================================================================================================
# 4. Claims: one statistic per claim (paper's ordering > 0), a CI, per-seed values, the verdict rule
# =====================================================================================================
class Data:
    """The measured streams, pairs and accuracies, addressed by method and seed."""

    def __init__(self, plan: Plan, results: dict, out: Path):
        self.plan, self.res, self.out = plan, results, out
        self.m = plan.rlvr_matched
        self.totals = {"sft": plan.sft_steps, "opd": plan.opd_steps, "null": plan.opd_steps,
                       "rlvr": plan.rlvr_steps, f"rlvr@{self.m}": self.m}

    def run_name(self, method: str, seed: int) -> str:
        return f"rlvr_s{seed}@{self.m}" if method == f"rlvr@{self.m}" else f"{method}_s{seed}"

    def stream(self, method, seed) -> dict:
        return self.res[f"m_{self.run_name(method, seed)}"]

    def pair(self, method, seed) -> list[dict]:
        return self.res[f"p_{self.run_name(method, seed)}"]["rows"]

    def at20(self, method, seed) -> int:
        st = self.stream(method, seed)["steps"]
        return next((s for s in st if s >= 0.2 * self.totals[method] - 1e-9), st[-1])

    def has(self, *names) -> bool:
        return all(n in self.res for n in names)


def _agg(vals) -> float:
    v = np.asarray(vals, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else math.nan


def _ci(lo_hi):
    return None if lo_hi is None else [round(float(lo_hi[0]), 6), round(float(lo_hi[1]), 6)]


def primary_k(D: Data, seeds: int) -> dict:
    """K* by PRIMARY_K_RULE (fixed before the first run)."""
    s = {m: float(np.mean([_agg(D.stream(m, i)["srank"][str(D.at20(m, i))]) for i in range(seeds)]))
         for m in ("sft", "opd")}
    smin = min(s.values())
    k = max([K for K in KS if K <= smin], default=1)
    return {"k": k, "rule": PRIMARY_K_RULE, "stable_rank_at_20pct": s, "s": smin}


def _claim(cid, links: dict, n_seeds, n_items, *, testable=True, note=None, extra=None) -> tuple[dict, dict]:
    """Claim statistic = min over its links (each link: paper direction > 0). Returns (claim, details)."""
    r, lk = bootstrap_links(links, n_seeds, n_items, n_boot=N_BOOT)
    claim = {"id": cid, "text": CLAIM_TEXT[cid], "verdict": verdict(r["per_seed"], r["ci95"], testable=testable),
             "statistic": round(r["statistic"], 6), "ci95": _ci(r["ci95"]),
             "per_seed": [round(v, 6) for v in r["per_seed"]]}
    det = {"id": cid, "links": {n: {"statistic": v["statistic"], "ci95": _ci(v["ci95"]), "per_seed": v["per_seed"],
                                    "verdict": verdict(v["per_seed"], v["ci95"])} for n, v in lk.items()},
           "note": note, **(extra or {})}
    return claim, det


def _not_run(cid, why) -> tuple[dict, dict]:
    # No data at all is not "inconclusive" (that reads as measured but undecided): the runs it needs are absent.
    return ({"id": cid, "text": CLAIM_TEXT[cid], "verdict": "untestable", "statistic": None, "ci95": None,
             "per_seed": []}, {"id": cid, "links": {}, "note": f"not run in this mode: {why}", "not_run": True})


def pair_claims(D: Data, rl: str, seeds: int, testable: bool) -> list[tuple[dict, dict]]:
    """Claims 1-3 (pairs) with RLVR read at ``rl`` ("rlvr" = its last step, or "rlvr@300")."""
    out = []
    # 1. unchanged fraction over every tensor, parameter-weighted (stream's last density reading = the pair)
    def u_rows(m, s):
        st = D.stream(m, s)
        return np.array([[n, u] for _, n, u in st["unchanged_rows"][str(st["steps"][-1])]], dtype=np.float64)
    U = {m: [u_rows(m, s) for s in range(seeds)] for m in ("sft", "opd", rl)}

    def u(m, s, idx):
        x = U[m][s][idx]
        return float((x[:, 0] * x[:, 1]).sum() / x[:, 0].sum())
    n_all = len(U["sft"][0])
    out.append(_claim(1, {"OPD − SFT": lambda s, i: u("opd", s, i) - u("sft", s, i),
                          "RLVR − OPD": lambda s, i: u(rl, s, i) - u("opd", s, i)}, seeds, n_all, testable=testable,
                      extra={"values": {m: [u(m, s, np.arange(n_all)) for s in range(seeds)] for m in U}}))
    # 2-3. block matrices
    cols = ("numel", "spectral_drift", "max_principal_angle", "density", "low_magnitude_overlap")
    P = {m: [np.array([[r[c] for c in cols] for r in D.pair(m, s)], dtype=np.float64) for s in range(seeds)]
         for m in ("sft", "opd", rl)}
    n_blk = len(P["sft"][0])

    def col(m, s, idx, c):
        return P[m][s][idx][:, cols.index(c)]

    def nss(m, s, i):
        return float(np.mean(col(m, s, i, "spectral_drift")))

    def ang(m, s, i):
        return float(np.mean(col(m, s, i, "max_principal_angle")))

    def dens(m, s, i):
        n, d = col(m, s, i, "numel"), col(m, s, i, "density")
        return float((n * d).sum() / n.sum())

    def low(m, s, i):
        w = col(m, s, i, "numel") * col(m, s, i, "density")
        return float((w * col(m, s, i, "low_magnitude_overlap")).sum() / w.sum()) if w.sum() > 0 else math.nan

    def lg(a, b):
        return math.log(a / b) if a > 0 and b > 0 else math.nan
    vals = lambda f: {m: [f(m, s, np.arange(n_blk)) for s in range(seeds)] for m in P}  # noqa: E731
    out.append(_claim(2, {"log NSS SFT/OPD": lambda s, i: lg(nss("sft", s, i), nss("opd", s, i)),
                          "log NSS OPD/RLVR": lambda s, i: lg(nss("opd", s, i), nss(rl, s, i)),
                          "log angle SFT/OPD": lambda s, i: lg(ang("sft", s, i), ang("opd", s, i)),
                          "log angle OPD/RLVR": lambda s, i: lg(ang("opd", s, i), ang(rl, s, i))}, seeds, n_blk,
                      testable=testable, extra={"values": {"nss": vals(nss), "max_angle_deg": vals(ang)}}))
    out.append(_claim(3, {"density SFT − OPD": lambda s, i: dens("sft", s, i) - dens("opd", s, i),
                          "density OPD − RLVR": lambda s, i: dens("opd", s, i) - dens(rl, s, i),
                          "low-mag OPD − SFT": lambda s, i: low("opd", s, i) - low("sft", s, i),
                          "low-mag RLVR − OPD": lambda s, i: low(rl, s, i) - low("opd", s, i)}, seeds, n_blk,
                      testable=testable, extra={"values": {"density": vals(dens), "low_mag_overlap": vals(low)},
                                                "loc_alpha": LOC_ALPHA}))
    return out


def trajectory_claims(D: Data, rl: str, seeds: int, K: int, testable: bool) -> list[tuple[dict, dict]]:
    """Claims 4-5 (streams) with RLVR read at ``rl``."""
    meths = ("sft", "opd", rl)
    def ends(m, s):  # per-matrix stable rank at the 20% checkpoint and at the last one
        st = D.stream(m, s)
        return (np.array(st["srank"][str(D.at20(m, s))], dtype=np.float64),
                np.array(st["srank"][str(st["steps"][-1])], dtype=np.float64))
    SR = {m: [ends(m, s) for s in range(seeds)] for m in meths}
    n = len(SR["sft"][0][0])

    def rho(m, s, i):
        a, b = np.nanmean(SR[m][s][0][i]), np.nanmean(SR[m][s][1][i])
        return float((b - a) / a) if a > 0 else math.nan
    allv = np.arange(n)
    c4 = _claim(4, {"ρ SFT − ρ OPD": lambda s, i: rho("sft", s, i) - rho("opd", s, i),
                    "ρ OPD − ρ RLVR": lambda s, i: rho("opd", s, i) - rho(rl, s, i),
                    f"{FLAT_BAND} − |ρ OPD|": lambda s, i: FLAT_BAND - abs(rho("opd", s, i))}, seeds, n,
                testable=testable, extra={"rel_change_from_20pct": {m: [rho(m, s, allv) for s in range(seeds)]
                                                                   for m in meths}, "flat_band": FLAT_BAND})
    SIM = {m: [np.array(D.stream(m, s)["sim"][str(K)][str(D.at20(m, s))], dtype=np.float64) for s in range(seeds)]
           for m in ("sft", "opd", rl, "null")}

    def sim(m, s, i):
        return float(np.nanmean(SIM[m][s][i]))
    c5 = _claim(5, {f"Sim_{K} OPD − SFT at 20%": lambda s, i: sim("opd", s, i) - sim("sft", s, i)}, seeds, n,
                testable=testable, extra={"k": K, "random_baseline": K / 64,
                                          "sim_at_20pct": {m: [sim(m, s, allv) for s in range(seeds)] for m in SIM}})
    return [c4, c5]


def _mean_ci(x: np.ndarray) -> dict:
    """Mean over seeds and prompts of per-(seed, prompt) differences x [n_seeds, n_prompts], seed x prompt CI."""
    return cluster_bootstrap(lambda s, i: float(x[s, i].mean()), x.shape[0], x.shape[1], n_boot=N_BOOT)


def projection_claim(D: Data, K: int, testable: bool) -> tuple[dict, dict]:
    """Claim 6: per prompt, [acc(OPD_proj) − acc(OPD)] − [acc(SFT_proj) − acc(SFT)] > 0 (SFT loses more), K = K*.
    Precondition (else untestable): OPD's gain over the anchor has every seed > 0 and a CI above 0."""
    pl = D.plan
    n_s = pl.project_seeds

    def acc(name, reading):
        return load_eval(D.out, name, reading)["t1"].astype(np.float64).mean(1)
    anchor = acc("sft_s0", pl.sft_steps)
    opd_ = [acc(f"opd_s{i}", pl.opd_steps) for i in range(n_s)]
    sft_ = [acc(f"sft_s{i}", pl.sft_steps) for i in range(n_s)]
    gain = np.array([o - anchor for o in opd_])
    g = _mean_ci(gain)
    keep = verdict(g["per_seed"], g["ci95"]) == "reproduced"
    per_k = {}
    for k in pl.project_ks:
        r_opd = np.array([acc(f"opd_proj_k{k}_s{i}", pl.opd_steps) - opd_[i] for i in range(n_s)])
        r_sft = np.array([acc(f"sft_proj_k{k}_s{i}", pl.sft_steps) - sft_[i] for i in range(n_s)])
        d = r_opd - r_sft
        per_k[k] = {"d": d, "opd_proj_minus_plain": _mean_ci(r_opd), "sft_proj_minus_plain": _mean_ci(r_sft)}
    head = np.array([acc(f"opd_head_s{i}", pl.opd_steps) - anchor for i in range(n_s)])
    hb = _mean_ci(head)
    d = per_k[K]["d"]
    note = None if keep else "OPD did not raise accuracy over the anchor (CI of the gain includes 0): nothing to keep"
    extra = {"k": K, "opd_gain": g, "head_only_gain": hb,
             "per_k": {k: {"statistic": _mean_ci(v["d"]), "opd_proj_minus_plain": v["opd_proj_minus_plain"],
                           "sft_proj_minus_plain": v["sft_proj_minus_plain"]} for k, v in per_k.items()}}
    return _claim(6, {f"OPD cost − SFT cost of projection (K={K})": lambda s, i: float(d[s, i].mean())}, n_s,
                  len(anchor), testable=testable and keep, note=note, extra=extra)


def controls_claim(D: Data, testable: bool) -> tuple[dict, dict]:
    """Claim 7 on seed 0's controls: keep-controls within CURVE_TOL of OPD's stable-rank curve, small mixes beyond."""
    names = [n[2:] for n in D.res if n.startswith("m_ctrl_")]
    keep = [n for n in names if not n.startswith("ctrl_mix")]
    small = [n for n in names if n.startswith("ctrl_mix") and float(n.rsplit("_", 1)[1]) <= SMALL_MIX]
    ref = D.res["m_opd_s0"]
    steps = ref["steps"]
    R = np.array([ref["srank"][str(s)] for s in steps], dtype=np.float64)  # [T, matrices]
    C = {n: np.array([D.res[f"m_{n}"]["srank"][str(s)] for s in steps], dtype=np.float64) for n in names}

    def dev(n, idx):
        r, c = np.nanmean(R[:, idx], 1), np.nanmean(C[n][:, idx], 1)
        ok = np.isfinite(r) & np.isfinite(c) & (r > 0)
        return float(np.mean(np.abs(c[ok] - r[ok]) / r[ok])) if ok.any() else math.nan
    allv = np.arange(R.shape[1])
    null_dev = None
    if "m_null_s0" in D.res:
        Nl = np.array([D.res["m_null_s0"]["srank"][str(s)] for s in steps], dtype=np.float64)
        r, c = np.nanmean(R, 1), np.nanmean(Nl, 1)
        ok = np.isfinite(r) & np.isfinite(c) & (r > 0)
        null_dev = float(np.mean(np.abs(c[ok] - r[ok]) / r[ok])) if ok.any() else None
    shares = {n: D.res[n]["summary"].get("opd_share_mean") for n in names if n.startswith("ctrl_mix")}
    if not keep or not small:
        return _not_run(7, f"needs a sparsification / off-policy control and a mix with α <= {SMALL_MIX}")
    links = {f"{CURVE_TOL} − max dev(keep controls)": lambda s, i: CURVE_TOL - max(dev(n, i) for n in keep),
             f"min dev(mixes α <= {SMALL_MIX}) − {CURVE_TOL}":
                 lambda s, i: min(dev(n, i) for n in small) - CURVE_TOL}
    return _claim(7, links, 1, R.shape[1], testable=testable,
                  extra={"deviation_from_opd": {n: dev(n, allv) for n in names}, "null_deviation_from_opd": null_dev,
                         "realised_opd_share": shares, "seed": 0, "curve_tol": CURVE_TOL})


def evaluate_claims(D: Data, regime: dict) -> dict:
    """All seven claims (RLVR read at its last step; the matched-step reading in ``secondary``) and K*."""
    pl, ok = D.plan, regime["passed"]
    out: dict = {"claims": [], "details": [], "secondary": [], "primary_k": None}
    main_ok = D.has(*[f"m_{m}_s{i}" for m in ("sft", "opd", "rlvr", "null") for i in range(pl.seeds)])
    if main_ok:
        pk = primary_k(D, pl.seeds)
        out["primary_k"] = pk
        for rl, dest in (("rlvr", "main"), (f"rlvr@{pl.rlvr_matched}", "secondary")):
            cs = pair_claims(D, rl, pl.seeds, ok) + trajectory_claims(D, rl, pl.seeds, pk["k"], ok)
            if dest == "main":
                out["claims"] += [c for c, _ in cs]
                out["details"] += [d for _, d in cs]
            else:
                out["secondary"] = [{"id": c["id"], "verdict": c["verdict"], "statistic": c["statistic"],
                                     "ci95": c["ci95"], "per_seed": c["per_seed"], "links": d["links"]} for c, d in cs]
    else:
        for cid in range(1, 6):
            c, d = _not_run(cid, "the main runs (SFT, OPD, the null, RLVR) are missing")
            out["claims"].append(c)
            out["details"].append(d)
    ctrl_ok = pl.controls and D.has("m_opd_s0", *[f"m_{n}" for n in
                                                    [f"ctrl_mix_{a:g}" for a in pl.mix_alphas]])
    if ctrl_ok:
        if out["primary_k"] is None:
            out["primary_k"] = primary_k(D, 1) if D.has("m_sft_s0") else {"k": 4, "rule": PRIMARY_K_RULE}
        for c, d in (projection_claim(D, out["primary_k"]["k"], ok), controls_claim(D, ok)):
            out["claims"].append(c)
            out["details"].append(d)
    else:
        for cid in (6, 7):
            c, d = _not_run(cid, "the controls; run again with --controls (it reuses this run)")
            out["claims"].append(c)
            out["details"].append(d)
    return out


# =====================================================================================================
# 5. Figures (matplotlib; the miniature's own)
# =====================================================================================================
COLORS = {"sft": "tab:blue", "opd": "tab:orange", "rlvr": "tab:green", "null": "gray"}
LABEL = {"sft": "SFT", "opd": "OPD", "rlvr": "RLVR", "null": "null (OPD, permuted advantages)"}


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
        q = {"density": (lambda S, t: S["density"][str(t)]["per_matrix"], False, "update density (all 2-D weights)"),
             "fro": (lambda S, t: S["fro"][str(t)], False, "‖ΔW_t‖_F (attention, bf16)"),
             "srank": (lambda S, t: S["srank"][str(t)], True, "stable rank of ΔW_t (attention, bf16)"),
             "srank_fp32": (lambda S, t: S["srank_fp32"][str(t)], True,
                            "stable rank of ΔW_t (attention, fp32 masters)")}
        fig, axs = plt.subplots(2, 2, figsize=(12, 8.5), layout="constrained")
        for ax, (key, (fn, frac, title)) in zip(axs.flat, q.items()):
            x, arr = _series(D, "null", seeds, fn, frac=frac)
            lo, hi, m = _band(arr)
            ax.fill_between(x, lo, hi, color="gray", alpha=0.25, lw=0, label=_band_label(seeds))
            ax.plot(x, m, color="gray", ls="--", lw=1)
            for meth in meths:
                x, arr = _series(D, meth, seeds, fn, frac=frac)
                y = np.nanmean(arr, 2)
                for s in range(seeds):
                    ax.plot(x, y[s], color=COLORS[meth], lw=0.7, alpha=0.4)
                ax.plot(x, y.mean(0), color=COLORS[meth], lw=2, label=LABEL[meth])
            ax.set(title=title, xlabel="fraction of training" if frac else "step")
            if key in ("density", "fro"):
                ax.set_xscale("log")
            if key == "fro":
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        axs[0, 0].legend(fontsize=8)
        fig.suptitle(f"Trajectories ({seeds} seed(s); thick = seed mean, thin = seeds; RLVR to step {pl.rlvr_steps})")
        fig.savefig(out / "fig_trajectories.png", dpi=110)
        plt.close(fig)
        made.append("fig_trajectories.png")

        fig, axs = plt.subplots(1, len(KS), figsize=(4 * len(KS), 3.8), layout="constrained", sharey=True)
        for ax, k in zip(axs, KS):
            fn = lambda S, t, k=k: S["sim"][str(k)][str(t)]  # noqa: E731
            x, arr = _series(D, "null", seeds, fn, frac=True)
            lo, hi, m = _band(arr)
            ax.fill_between(x, lo, hi, color="gray", alpha=0.25, lw=0, label=_band_label(seeds))
            for meth in meths:
                x, arr = _series(D, meth, seeds, fn, frac=True)
                ax.plot(x, np.nanmean(arr, 2).mean(0), color=COLORS[meth], lw=2, marker="o", ms=3, label=LABEL[meth])
            ax.axhline(k / 64, color="k", ls=":", lw=0.8, label="random (K/64)")
            ax.set(title=f"Sim_{k}(t, t_end)" + ("  (primary K*)" if k == K else ""), xlabel="fraction of training",
                   ylim=(0, 1.02))
            ax.grid(alpha=0.3)
        axs[0].legend(fontsize=7)
        fig.savefig(out / "fig_simk.png", dpi=110)
        plt.close(fig)
        made.append("fig_simk.png")
    det = {d["id"]: d for d in details}
    if 6 in det and not det[6].get("not_run"):
        d6 = det[6]
        fig, ax = plt.subplots(figsize=(8, 4.2), layout="constrained")
        ks = list(d6["per_k"])
        for j, (key, col, lab) in enumerate((("sft_proj_minus_plain", "tab:blue", "SFT: projected − plain"),
                                             ("opd_proj_minus_plain", "tab:orange", "OPD: projected − plain"))):
            ys = [d6["per_k"][k][key]["statistic"] for k in ks]
            ci = [d6["per_k"][k][key]["ci95"] or (y, y) for k, y in zip(ks, ys)]
            xs = np.arange(len(ks)) + (j - 0.5) * 0.3
            err = [[y - c[0] for y, c in zip(ys, ci)], [c[1] - y for y, c in zip(ys, ci)]]
            ax.bar(xs, ys, 0.3, color=col, label=lab, yerr=err, capsize=3)
        g, h = d6["opd_gain"], d6["head_only_gain"]
        ax.axhline(g["statistic"], color="tab:orange", ls="--", lw=1,
                   label=f"OPD gain over the anchor {g['statistic']:+.4f}")
        ax.axhline(h["statistic"], color="tab:red", ls=":", lw=1, label=f"head-only OPD gain {h['statistic']:+.4f}")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(len(ks)), [f"K={k}" + (" (K*)" if int(k) == K else "") for k in ks])
        ax.set(ylabel="Δ T=1 accuracy (95% CI)", title="Projection onto early V_K (every 2-D weight projected)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        fig.savefig(out / "fig_projection.png", dpi=110)
        plt.close(fig)
        made.append("fig_projection.png")
    if 7 in det and not det[7].get("not_run"):
        fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
        ref = D.res["m_opd_s0"]
        x = np.array(ref["steps"], dtype=float)
        if D.has(*[f"m_null_s{i}" for i in range(seeds)]):
            _, arr = _series(D, "null", seeds, lambda S, t: S["srank"][str(t)], frac=False)
            lo, hi, _m = _band(arr)
            ax.fill_between(x, lo, hi, color="gray", alpha=0.25, lw=0, label=_band_label(seeds))
        ax.plot(x, [_agg(ref["srank"][str(s)]) for s in ref["steps"]], color="k", lw=2.5, label="OPD (seed 0)")
        for n in sorted(n[2:] for n in D.res if n.startswith("m_ctrl_")):
            S = D.res[f"m_{n}"]
            ax.plot(x, [_agg(S["srank"][str(s)]) for s in ref["steps"]], lw=1.2, ls="--" if "mix" in n else "-",
                    label=n.removeprefix("ctrl_"))
        ax.set(xlabel="step", ylabel="stable rank of ΔW_t (attention, bf16)", title="OPD controls (paper §5)")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
        fig.savefig(out / "fig_controls.png", dpi=110)
        plt.close(fig)
        made.append("fig_controls.png")
    return made


# =====================================================================================================
# 6. Report
# =====================================================================================================
def _json_safe(v):
    """NaN -> null, ±inf -> "inf"/"-inf", numpy scalars/arrays -> Python, tuples -> lists, keys -> str."""
    if isinstance(v, (np.floating, np.integer)):
        v = v.item()
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if isinstance(v, float):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else v
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def regime_line(reg: dict) -> str:
    v, c = reg["values"], reg["checks"]
    return (f"regime: teacher T=1 {v['teacher_acc_t1']:.3f} (greedy {v['teacher_acc_greedy']:.3f}), anchor T=1 "
            f"{v['anchor_acc_t1']:.3f} (greedy {v['anchor_acc_greedy']:.3f}), reverse KL {v['reverse_kl_nats']:.3f} "
            f"nats/token, response {v['response_tokens']:.1f} tokens, teacher/student params {v['param_ratio']:.2f}, "
            f"SFT last-20% gain {v['sft_last_gain']:+.3f} -> R1 {'pass' if c['R1'] else 'FAIL'}, R2 "
            f"{'pass' if c['R2'] else 'FAIL'}, R3 {'pass' if c['R3'] else 'FAIL'}")


def _accuracy_table(D: Data, results: dict) -> dict:
    """Accuracy of every run reading with a paired-bootstrap CI of its difference to its start (same prompts)."""
    pl = D.plan
    rows = {}
    anchor = load_eval(D.out, "sft_s0", pl.sft_steps)["t1"]
    base = load_eval(D.out, "sft_s0", 0)["t1"]
    for name, r in results.items():
        if r.get("kind") not in ("sft", "opd", "rlvr"):
            continue
        ref = base if r["kind"] == "sft" else anchor
        for reading, a in r["acc"].items():
            if r["kind"] == "sft" and reading != str(r["steps"]):
                continue
            pb = paired_bootstrap(ref, load_eval(D.out, name, reading)["t1"])
            rows[f"{name}@{reading}"] = {**a, "vs_start": pb["diff"], "vs_start_ci95": pb["ci95"]}
    return rows


def write_report(out: Path, mode: str, plan: Plan, results: dict, regime: dict, ev: dict, D: Data, figures: list,
                 wall: float, machine: dict) -> dict:
    acc = _accuracy_table(D, results)
    train_runs = {n: r for n, r in results.items() if r.get("kind") in ("sft", "opd", "rlvr")}
    mech: dict = {}
    anchor_dir = out / "runs" / "sft_s0" / f"checkpoint-{plan.sft_steps}"
    mech["half_ulp_over_lr_anchor"] = {"lr": 1e-6, "by_type": half_ulp_over_lr(anchor_dir, 1e-6)}
    mech["consistency_c_tilde"] = {n[2:]: {"step": r["steps"][-1], "by_type": r["consistency"][str(r["steps"][-1])]}
                                   for n, r in results.items() if n.startswith("m_") and "consistency" in r}
    mech["rlvr_steps_without_kept_group"] = {n: r["summary"].get("steps_without_kept_group_by_reading")
                                             for n, r in train_runs.items() if r["kind"] == "rlvr"}
    mech["realised_opd_share"] = {n: r["summary"].get("opd_share_mean") for n, r in train_runs.items()
                                  if "opd_share_mean" in r["summary"]}
    nulls = [n for n in results if n.startswith("m_null_s")]
    if nulls:
        mech["null_final"] = {"density": [results[n]["density"][str(results[n]["steps"][-1])]["all"] for n in nulls],
                              "fro_mean": [_agg(results[n]["fro"][str(results[n]["steps"][-1])]) for n in nulls],
                              "srank_mean": [_agg(results[n]["srank"][str(results[n]["steps"][-1])]) for n in nulls]}
    tracker = next((r["tracker"] for r in train_runs.values() if "tracker" in r), None)
    report = {"mode": mode, "plan": asdict(plan), "regime": {**{k: regime["values"][k] for k in (
        "teacher_acc_t1", "teacher_acc_greedy", "anchor_acc_t1", "anchor_acc_greedy", "reverse_kl_nats",
        "response_tokens")}, "checks": regime["checks"], "passed": regime["passed"]},
        "claims": ev["claims"], "regime_details": regime, "primary_k": ev["primary_k"], "claim_details": ev["details"],
        "rlvr_at_matched_steps": ev["secondary"], "accuracy": acc, "mechanism": mech, "tracker_opd": tracker,
        "timings": {"wall_s": round(wall, 1),
                    "jobs": {n: {"wall_s": r.get("wall_s"), "cpu_s": r.get("cpu_s"), "reused": bool(r.get("reused"))}
                             for n, r in results.items()}},
        "machine": machine, "figures": figures, "weightgeo": weightgeo.__version__, "torch": torch.__version__}
    report = _json_safe(report)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(report_md(report) + "\n")
    return report


def _ci_text(ci) -> str:
    return f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else ""


def _fmt(x, p=3):
    return "–" if x is None else f"{x:+.{p}f}" if isinstance(x, float) else str(x)


def report_md(R: dict) -> str:
    reg, rd = R["regime"], R["regime_details"]
    th = rd["thresholds"]
    L = [f"# OPD vs SFT vs RLVR on a miniature ({R['mode']} run)", "",
         f"{R['machine']['date']}, {R['machine']['cpu']} ({R['machine']['cpu_capability']}), torch {R['torch']}, "
         f"weightgeo {R['weightgeo']}; {R['machine']['jobs']} job(s) x {R['machine']['threads']} thread(s); wall "
         f"{R['timings']['wall_s']:.0f} s; load average at start / end {R['machine']['load_start']} / "
         f"{R['machine']['load_end']}.", "", "## Regime (checked before any geometry)", "",
         "| quantity | measured | required |", "|---|---|---|",
         f"| teacher T=1 / greedy accuracy | {reg['teacher_acc_t1']:.4f} / {reg['teacher_acc_greedy']:.4f} | T=1 >= "
         f"{th['teacher_acc_t1_min']} and >= anchor + {th['teacher_gap_min']} (R1) |",
         f"| teacher / student parameters | {rd['teacher_params']:,} / {rd['student_params']:,} = "
         f"{rd['values']['param_ratio']:.2f}x | >= {th['param_ratio_min']}x (R1) |",
         f"| reverse KL(anchor ‖ teacher), anchor's samples | {reg['reverse_kl_nats']:.4f} nats/token (sampled-token "
         f"estimate {rd['kl_sampled_token_estimate']:.4f}) | >= {th['reverse_kl_min']} (R1) |",
         f"| anchor T=1 / greedy accuracy | {reg['anchor_acc_t1']:.4f} / {reg['anchor_acc_greedy']:.4f} (base "
         f"{rd['base_acc']['acc_t1']:.4f} / {rd['base_acc']['acc_greedy']:.4f}) | T=1 in "
         f"{th['anchor_acc_t1_range']} (R2) |",
         f"| SFT T=1 gain, step {rd['sft_reading_80pct']} -> last | {rd['values']['sft_last_gain']:+.4f} (95% CI "
         f"{_fmt(rd['sft_last_gain_ci95'][0], 4)}, {_fmt(rd['sft_last_gain_ci95'][1], 4)}) | > 0, still improving "
         "(R2) |",
         f"| anchor response length | {reg['response_tokens']:.2f} tokens | >= {th['response_tokens_min']} (R3) |", "",
         f"Checks: R1 {reg['checks']['R1']}, R2 {reg['checks']['R2']}, R3 {reg['checks']['R3']} -> "
         f"{'passed' if reg['passed'] else 'FAILED: every claim is untestable'}.", ""]
    pk = R.get("primary_k")
    if pk:
        L += [f"Primary K* = {pk['k']} ({pk['rule']}; stable ranks at 20%: "
              + ", ".join(f"{m} {v:.2f}" for m, v in (pk.get("stable_rank_at_20pct") or {}).items()) + ").", ""]
    L += ["## Claims", "", "Verdict rule: *reproduced* = the paper's ordering (statistic > 0) holds in every seed "
          "and the 95% CI excludes 0; *contradicted* = the reverse, the same way; *untestable* = a precondition "
          "failed; *inconclusive* otherwise. The statistic is the smallest of the claim's links (each oriented so "
          "that > 0 is the paper's direction); CIs: bootstrap over seeds and matrices (claims 1-5, 7) or seeds and "
          "prompts (6).", "",
          "| # | claim | verdict | statistic | 95% CI | per seed |", "|---|---|---|---|---|---|"]
    for c in R["claims"]:
        ci = "–" if c["ci95"] is None else f"[{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]"
        L.append(f"| {c['id']} | {c['text']} | **{c['verdict']}** | {_fmt(c['statistic'], 4)} | {ci} | "
                 + ", ".join(f"{v:+.4f}" for v in c["per_seed"]) + " |")
    L += ["", "Links of each claim (statistic, 95% CI, link verdict):", ""]
    for d in R["claim_details"]:
        if d.get("not_run"):
            L.append(f"- {d['id']}: {d['note']}")
            continue
        L.append(f"- {d['id']}: " + "; ".join(
            f"{n} {_fmt(v['statistic'], 4)} {_ci_text(v['ci95'])} ({v['verdict']})" for n, v in d["links"].items())
            + (f". Note: {d['note']}" if d.get("note") else ""))
    if R["rlvr_at_matched_steps"]:
        L += ["", f"RLVR read at matched steps ({R['plan']['rlvr_matched']}) instead of {R['plan']['rlvr_steps']}: "
              + "; ".join(f"claim {c['id']} {c['verdict']} ({_fmt(c['statistic'], 4)} {_ci_text(c['ci95'])})"
                          for c in R["rlvr_at_matched_steps"]), ""]
    L += ["", "## Accuracy (held-out 1000 prompts x T=1 samples; Δ vs the run's start, paired bootstrap 95% CI)", "",
          "| run@step | T=1 | greedy | Δ T=1 vs start | 95% CI |", "|---|---|---|---|---|"]
    for n, a in R["accuracy"].items():
        L.append(f"| {n} | {a['acc_t1']:.4f} | {a['acc_greedy']:.4f} | {a['vs_start']:+.4f} | "
                 f"[{a['vs_start_ci95'][0]:+.4f}, {a['vs_start_ci95'][1]:+.4f}] |")
    M = R["mechanism"]
    ulp = "; ".join(f"{t} {v['p10']:.0f} / {v['p50']:.0f} / {v['p90']:.0f}"
                    for t, v in M["half_ulp_over_lr_anchor"]["by_type"].items())
    L += ["", "## Mechanism numbers", "", "Half a bf16 ULP / lr (lr = 1e-6) over the anchor's weights, per matrix "
          f"type (10 / 50 / 90 %): {ulp} steps.", "",
          "Consistency C̃(T) = rms(ΔW_fp32) / sqrt(Σ lr_t²) at each stream's last step (≈ 1: random walk; grows "
          "like √T for consistent drift):", "",
          "| stream | T | " + " | ".join(_TYPES) + " |", "|---|---|" + "---|" * len(_TYPES)]
    for n, c in M["consistency_c_tilde"].items():
        L.append(f"| {n} | {c['step']} | " + " | ".join(
            f"{c['by_type'][t]['c_tilde']:.2f}" if t in c["by_type"] else "–" for t in _TYPES) + " |")
    if M.get("null_final"):
        nf = M["null_final"]
        L += ["", "Null (permuted advantages) at its last step, per seed: density "
              + ", ".join(f"{x:.4f}" for x in nf["density"]) + "; mean ‖ΔW‖_F "
              + ", ".join(f"{x:.2e}" for x in nf["fro_mean"]) + "; mean stable rank "
              + ", ".join(f"{x:.2f}" for x in nf["srank_mean"]) + "."]
    if M.get("realised_opd_share"):
        L += ["", "Realised OPD share of the mixed advantage (Σ|α A_OPD| / Σ|A|, mean over steps): "
              + ", ".join(f"{n} {v:.3f}" for n, v in M["realised_opd_share"].items()) + "."]
    L += ["", "RLVR steps without any kept group (up to each reading): "
          + "; ".join(f"{n} {v}" for n, v in M["rlvr_steps_without_kept_group"].items()) + "."]
    t = R.get("tracker_opd")
    if t:
        L += ["", f"Live `Tracker` on OPD seed 0 (exact, k={t['k']}) vs offline `rank_curve` on its bf16 checkpoints: "
              f"{t['rows_matched']}/{t['rows_tracker']} rows matched, max relative difference "
              + ", ".join(f"{k} {v:.1e}" for k, v in t["max_rel_diff"].items()) + "."]
    L += ["", "## Figures", ""] + [f"![{f}]({f})" for f in R["figures"]]
    return "\n".join(L)


_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "embed_tokens", "embed_positions", "lm_head")


# =====================================================================================================
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one seed, OPD 100 / RLVR 333 steps, no controls (<= 3 min)")
    ap.add_argument("--smoke", action="store_true", help="seconds-long run of the whole pipeline (meaningless numbers)")
    ap.add_argument("--controls", action="store_true", help="add the controls (claims 6-7); reuses the runs in --out")
    ap.add_argument("--out", default=None, help="output folder (default runs/opd_vs_sft/<full|quick|smoke>)")
    ap.add_argument("--jobs", type=int, default=2, help="parallel processes (default 2; 1 = in this process)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    ap.add_argument("--assets", default=str(ASSETS), help="folder with base/ and teacher/ (default: shipped)")
    ap.add_argument("--train-only", action="store_true", help="train and check the regime; measure no geometry")
    args = ap.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    plan = copy.deepcopy(SMOKE if args.smoke else QUICK if args.quick else FULL)
    plan.controls = plan.controls or args.controls
    assets = Path(args.assets)
    out = Path(args.out) if args.out else Path("runs") / "opd_vs_sft" / mode
    if not all((assets / n / "model.safetensors").is_file() for n in ("base", "teacher")):
        print(f"missing {assets}/base or teacher: run `python -m weightgeo.train.pretrain --out {assets}` (~3 min)")
        return 1
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    machine = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "cpu": _cpu_name(), "cores": os.cpu_count(), "jobs": args.jobs, "threads": args.threads,
               "load_start": [round(x, 2) for x in os.getloadavg()]}
    label = mode + (" + controls" if plan.controls and mode != "smoke" else "")
    print(f"[{label}] {out.resolve()}: {args.jobs} job(s) x {args.threads} thread(s)", flush=True)
    jobs = build_jobs(plan, assets)
    if args.train_only:
        jobs = {n: j for n, j in jobs.items() if not j["kind"].startswith("measure")}
    regime_box: dict = {}

    def on_done(name, res):
        if name == "regime":
            regime_box.update(res)
            print("  " + regime_line(res) + ("" if res["passed"] else "  => every claim is untestable"), flush=True)
            print("  measuring geometry only from here on", flush=True)

    results = run_all(jobs, out, assets, n_workers=args.jobs, threads=args.threads, on_done=on_done)
    if args.train_only:
        print(f"trained in {time.perf_counter() - t0:.0f} s wall (no geometry measured): {out.resolve()}")
        return 0
    torch.set_num_threads(args.threads)
    D = Data(plan, results, out)
    ev = evaluate_claims(D, regime_box)
    K = (ev["primary_k"] or {"k": 4})["k"]
    figures = write_figures(D, out, K, ev["details"])
    machine["load_end"] = [round(x, 2) for x in os.getloadavg()]
    wall = time.perf_counter() - t0
    R = write_report(out, label, plan, results, regime_box, ev, D, figures, wall, machine)
    t = R.get("tracker_opd")
    if t:
        print(f"tracker vs offline rank_curve (OPD seed 0): {t['rows_matched']}/{t['rows_tracker']} rows, max rel diff "
              + ", ".join(f"{k} {v:.1e}" for k, v in t["max_rel_diff"].items()))
    print(f"\nwrote {out.resolve()}/report.md, report.json" + (f", {', '.join(figures)}" if figures else "")
          + f"; wall {wall:.0f} s")
    print("\n" + regime_line(regime_box))
    for c in R["claims"]:
        d = next(x for x in R["claim_details"] if x["id"] == c["id"])
        ci = "" if c["ci95"] is None else f"  CI [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]"
        st = "" if c["statistic"] is None else f"  statistic {c['statistic']:+.4f}"
        print(f"  {c['id']}. {c['verdict'].upper():<12} {c['text']}{st}{ci}"
              + ("  (not run in this mode)" if d.get("not_run") else ""))
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
