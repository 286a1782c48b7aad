"""Measurement of the trained streams and pairs, all through weightgeo's public API."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

import weightgeo
from weightgeo.train.model import GPT

from .plan import ATTENTION, BLOCK, KS, LOC_ALPHA, TRACK_K, start_dir

# The example reuses whole jobs from its output folder (results/*.json); weightgeo's per-tensor result cache
# (~/.cache/weightgeo) would only add tens of thousands of entries per run that no later run can use.
CACHE = False


def _module_type(name: str) -> str:
    return name.rsplit(".", 2)[-2] if name.endswith(".weight") else name


def measure_stream(run_dir: Path, *, upto: int | None, lrs: list[float]) -> dict:
    """Per checkpoint t (ΔW_t = W_t − checkpoint-0), per attention matrix: stable rank and ‖ΔW_t‖_F of the bf16
    checkpoints, Sim_K(t, t_end) for every K (``rank_curve``); stable rank of the fp32 masters and, per matrix
    type, rms(ΔW_fp32) and C̃ = rms / sqrt(Σ lr_t²) (``rank_curve`` on ``fp32/``); the bf16 update density of
    every tensor against checkpoint-0 and against the previous checkpoint, and the sparse patch of each step
    (``sparsity_curve``: one pass over the stream)."""
    steps = sorted(int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*"))
    steps = [s for s in steps if upto is None or s <= upto]
    ck = [run_dir / f"checkpoint-{s}" for s in steps]
    res: dict = {"steps": steps[1:], "sim": {}}
    for K in KS:
        rc = weightgeo.rank_curve(ck, steps=steps, include=ATTENTION, k=K, cache=CACHE)
        rows = sorted(rc.rows, key=lambda r: (r["step"], r["name"]))
        res["matrices"] = sorted({r["name"] for r in rows})
        res["sim"][str(K)] = {
            str(s): [r["final_subspace_similarity"] for r in rows if r["step"] == s] for s in steps[1:]
        }
        if K == KS[0]:
            res["srank"] = {str(s): [r["stable_rank"] for r in rows if r["step"] == s] for s in steps[1:]}
            res["fro"] = {str(s): [r["delta_frobenius"] for r in rows if r["step"] == s] for s in steps[1:]}
    rc32 = weightgeo.rank_curve([run_dir / "fp32" / f"checkpoint-{s}" for s in steps], steps=steps, k=1, cache=CACHE)
    att = set(res["matrices"])
    res["srank_fp32"] = {
        str(s): [
            r["stable_rank"] for r in sorted(rc32.rows, key=lambda r: r["name"]) if r["step"] == s and r["name"] in att
        ]
        for s in steps[1:]
    }
    res["consistency"] = {}
    for s in steps[1:]:
        by: dict[str, list[float]] = {}
        for r in rc32.rows:
            if r["step"] == s:
                by.setdefault(_module_type(r["name"]), []).append((r["delta_frobenius"] ** 2, r["numel"]))
        denom = math.sqrt(sum(x * x for x in lrs[:s]))
        res["consistency"][str(s)] = {
            t: {
                "rms": math.sqrt(sum(a for a, _ in v) / sum(n for _, n in v)),
                "c_tilde": math.sqrt(sum(a for a, _ in v) / sum(n for _, n in v)) / denom,
            }
            for t, v in by.items()
        }
    # one pass over the stream: every tensor against checkpoint-0 and against the previous checkpoint
    curve = weightgeo.sparsity_curve(ck, steps=steps, cache=CACHE)
    res["density"], res["unchanged_rows"], res["step_density"], res["patch_bytes"] = {}, {}, {}, {}
    for s in steps[1:]:
        rows = sorted((r for r in curve.rows if r["step"] == s), key=lambda r: r["name"])
        res["unchanged_rows"][str(s)] = [[r["name"], r["numel"], r["update_sparsity"]] for r in rows]
        mats = [r for r in rows if len(r["shape"]) == 2]
        unchanged = sum(r["numel"] * r["update_sparsity"] for r in rows) / sum(r["numel"] for r in rows)
        res["density"][str(s)] = {"all": 1 - unchanged, "per_matrix": [1 - r["update_sparsity"] for r in mats]}
        by = curve.summary["by_step"][s]
        res["step_density"][str(s)] = {
            "all": 1 - by["step_sparsity"],
            "per_matrix": [1 - r["step_sparsity"] for r in mats],
        }
        res["patch_bytes"][str(s)] = {"patch": by["patch_bytes"], "dense": by["dense_bytes"]}
    return res


def measure_pair(out: Path, assets: Path, job: dict) -> dict:
    """Pair diagnostics over the 24 block matrices (``compare``): unchanged fraction, NSS, max principal angle
    (top-k right subspaces, k = d/8, the paper's 512/4096), density and low-magnitude overlap (α = 0.3,
    principal-mask rank = k); weightgeo's own JSON report is written beside the run."""
    base = assets / "base" if job["start"] == "base" else start_dir({"start": "anchor"}, out, assets)
    run = out / "runs" / job["run"]
    ft = run / f"checkpoint-{job['step']}"
    d = json.loads((ft / "config.json").read_text())["hidden_size"]
    k = max(1, d // 8)
    rep = weightgeo.compare(
        base, ft, include=BLOCK, k=k, side="right", rank=k, alpha=LOC_ALPHA, progress=False, cache=CACHE
    )
    rep.to_json(run / f"compare_{job['step']}.json")
    keys = (
        "name",
        "numel",
        "module",
        "update_sparsity",
        "spectral_drift",
        "max_principal_angle",
        "density",
        "low_magnitude_overlap",
    )
    return {"rows": [{x: r[x] for x in keys} for r in sorted(rep.rows, key=lambda r: r["name"])], "k": k}


def tracker_agreement(tracker, run_dir: Path) -> dict:
    """The live Tracker's rank curve against the offline ``rank_curve`` of the same run's bf16 checkpoints."""
    trc = tracker.rank_curve()
    offline = weightgeo.rank_curve(run_dir, include=ATTENTION, k=TRACK_K, cache=CACHE)
    off = {(r["step"], r["name"]): r for r in offline.rows}
    diff = {}
    for key in ("stable_rank", "delta_frobenius", "spectral_norm", "final_subspace_similarity"):
        ab = 0.0
        for r in trc.rows:
            o = off.get((r["step"], r["name"]))
            if o is not None and math.isfinite(r[key]) and math.isfinite(o[key]):
                scale = 1.0 if key == "final_subspace_similarity" else max(abs(o[key]), 1e-30)  # Sim: absolute
                ab = max(ab, abs(r[key] - o[key]) / scale)
        diff[key] = ab
    return {
        "rows_tracker": len(trc.rows),
        "rows_matched": sum((r["step"], r["name"]) in off for r in trc.rows),
        "rows_offline": len(off),
        "max_rel_diff": diff,
        "k": TRACK_K,
    }


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
    return {
        t: dict(zip(("p10", "p50", "p90"), torch.quantile(torch.cat(v), torch.tensor([0.1, 0.5, 0.9])).tolist()))
        for t, v in out.items()
    }
