"""Running the plan's jobs: training, evaluation and the regime check in parallel single-thread processes,
reused when an output folder already holds a job with the same spec."""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import weightgeo
from weightgeo.train import opd, rlvr, sft
from weightgeo.train.model import GPT
from weightgeo.train.regime import RegimeThresholds, accuracy_matrix, regime_checks, reverse_kl
from weightgeo.train.stats import paired_bootstrap

from .measure import measure_pair, measure_stream, tracker_agreement
from .plan import ATTENTION, TASK, TRACK_K, start_dir


def _spec(job: dict) -> str:
    return json.dumps({k: v for k, v in job.items() if k != "cost"}, sort_keys=True, default=str)


def json_safe(v):
    """NaN -> null, ±inf -> "inf"/"-inf", numpy scalars/arrays -> Python, tuples -> lists, keys -> str."""
    if isinstance(v, (np.floating, np.integer)):
        v = v.item()
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if isinstance(v, float):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else v
    if isinstance(v, dict):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v


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
    path.write_text(json.dumps(json_safe(res)) + "\n")
    return res


def _save_eval(path: Path, mats: dict[str, dict]) -> dict:
    """Store correctness matrices {reading: {"t1", "greedy"}} and return their accuracies."""
    save_file({f"{k}@{r}": v.contiguous() for r, m in mats.items() for k, v in m.items()}, str(path))
    return {
        r: {"acc_t1": m["t1"].float().mean().item(), "acc_greedy": m["greedy"].float().mean().item()}
        for r, m in mats.items()
    }


def load_eval(out: Path, name: str, reading) -> dict[str, np.ndarray]:
    t = load_file(str(out / "runs" / name / "eval.safetensors"))
    return {"t1": t[f"t1@{reading}"].numpy(), "greedy": t[f"greedy@{reading}"].numpy()}


def _train(job: dict, out: Path, assets: Path) -> dict:
    cfg_kw = {k: tuple(v) if isinstance(v, list) else v for k, v in job["cfg"].items()}
    run_dir = out / "runs" / job["name"]
    model = GPT.from_pretrained(start_dir(job, out, assets))
    tracker = hook = None
    if job.get("track"):
        # the loop trains fp32 masters and saves bf16 checkpoints: the tracker measures what it saves
        tracker = weightgeo.Tracker(
            model, every=cfg_kw["save_every"], k=TRACK_K, include=ATTENTION, mode="exact", dtype=torch.bfloat16
        )

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
    mats = {
        r: accuracy_matrix(
            GPT.from_pretrained(run_dir / f"checkpoint-{r}"), TASK, n=job["eval_prompts"], samples=job["eval_samples"]
        )
        for r in job["readings"]
    }
    res = {
        "name": job["name"],
        "kind": kind,
        "steps": cfg_kw["steps"],
        "run_dir": str(run_dir),
        "acc": _save_eval(run_dir / "eval.safetensors", mats),
        "summary": {
            k: v
            for k, v in summary.items()
            if k in ("steps_without_update", "opd_share_mean", "checkpoints", "final_loss")
        },
    }
    logs = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    res["train_s"] = logs[-1]["wall_s"] if logs else 0.0
    if kind == "rlvr":
        res["summary"]["kept_groups_mean"] = float(np.mean([r["kept_groups"] for r in logs])) if logs else math.nan
        res["summary"]["steps_without_kept_group_by_reading"] = {
            r: sum(1 for x in logs if x["step"] <= r and x["kept_groups"] == 0) for r in job["readings"]
        }
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
        "anchor_acc_t1": sft0["acc"][str(last)]["acc_t1"],
        "anchor_acc_greedy": sft0["acc"][str(last)]["acc_greedy"],
        "reverse_kl_nats": kl["reverse_kl_nats"],
        "response_tokens": kl["response_tokens"],
        "param_ratio": teacher_r["num_params"] / anchor.num_params(),
        "sft_last_gain": gain["diff"],
    }
    checks = regime_checks(values)
    return {
        "values": values,
        "checks": checks,
        "passed": all(checks.values()),
        "sft_last_gain_ci95": gain["ci95"],
        "sft_reading_80pct": at80,
        "kl_sampled_token_estimate": kl["sampled_token_estimate"],
        "kl_by_position": kl["by_position"],
        "base_acc": sft0["acc"]["0"],
        "student_params": anchor.num_params(),
        "teacher_params": teacher_r["num_params"],
        "thresholds": asdict(RegimeThresholds()),
    }


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


def run_all(
    jobs: dict[str, dict], out: Path, assets: Path, *, n_workers: int, threads: int, log=print, on_done=None
) -> dict[str, dict]:
    """Run ``jobs`` respecting their deps, longest ready job first, in ``n_workers`` processes (1: in this
    process). A job whose result file holds the same spec is reused (and so are its outputs)."""
    results: dict[str, dict] = {}
    for name, job in jobs.items():
        f = out / "results" / f"{name}.json"
        if f.is_file():
            r = json.loads(f.read_text())
            newer_dep = any(
                (out / "results" / f"{d}.json").stat().st_mtime > f.stat().st_mtime
                for d in job["deps"]
                if (out / "results" / f"{d}.json").is_file()
            )
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
        res = json.loads(json.dumps(json_safe(res)))  # as a reused result reads back: string keys, NaN -> None
        results[name] = res
        pending.pop(name, None)
        if jobs[name]["kind"] in ("sft", "opd", "rlvr", "eval_model"):
            log(
                f"  {name:<22} {res['wall_s']:6.1f}s  "
                + "  ".join(f"@{r}: T=1 {a['acc_t1']:.3f} greedy {a['acc_greedy']:.3f}" for r, a in res["acc"].items()),
                flush=True,
            )
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
