"""Trajectory benchmark: marginal cost of one more checkpoint vs a fresh pair comparison; sketch vs exact.

    python benchmarks/bench_trajectory.py [--layers 24] [--checkpoints 6] [--threads 2] [--repeats 3]

Synthetic stream of Qwen2.5-0.5B attention shapes (q/o 896×896, k/v 128×896 per layer), bf16 safetensors
checkpoints on disk; each ΔW_t is a drifting power-law low-rank update plus small full-rank noise (realistic:
fast-decaying spectrum, stable rank ≈ 5–20). Prints markdown tables for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from weightgeo import compare, rank_curve
from weightgeo.track import Tracker

os.environ["WEIGHTGEO_CACHE"] = "off"  # time the computation, not the result cache (bench_resume.py times that)

SHAPES = {"q_proj": (896, 896), "k_proj": (128, 896), "v_proj": (128, 896), "o_proj": (896, 896)}


def make_stream(root: Path, layers: int, checkpoints: int, seed: int = 0) -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(seed)
    base, state, drift = {}, {}, {}
    for i in range(layers):
        for mod, (m, n) in SHAPES.items():
            name = f"model.layers.{i}.self_attn.{mod}.weight"
            base[name] = 0.02 * torch.randn(m, n, generator=g)
            U = torch.linalg.qr(torch.randn(m, 32, generator=g)).Q
            V = torch.linalg.qr(torch.randn(n, 32, generator=g)).Q
            drift[name] = (U * torch.arange(1, 33) ** -0.7, V)
            state[name] = torch.zeros(m, n)
    cks = []
    save_file({k: v.bfloat16() for k, v in base.items()}, str(root / "base.safetensors"))
    for t in range(checkpoints):
        ck = {}
        for name, (C, V) in drift.items():
            m, n = state[name].shape
            R = torch.linalg.qr(torch.eye(32) + 0.2 * torch.randn(32, 32, generator=g)).Q
            drift[name] = (C, V @ R)
            state[name] += 2e-2 * C @ (V @ R).T + 2e-6 * torch.randn(m, n, generator=g)
            ck[name] = (base[name] + state[name]).bfloat16()
        save_file(ck, str(root / f"ck{t}.safetensors"))
        cks.append(ck)
    return {k: v.bfloat16() for k, v in base.items()}, cks


def timed(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--checkpoints", type=int, default=6)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        base_sd, cks = make_stream(root, a.layers, a.checkpoints)
        files = [root / f"ck{t}.safetensors" for t in range(a.checkpoints)]
        base = root / "base.safetensors"
        steps = [64 * (t + 1) for t in range(a.checkpoints)]
        n_mat = a.layers * len(SHAPES)
        kw = dict(include="attention", k=16, hill_k=10)
        t_one = timed(lambda: rank_curve(files[:1], base=base, steps=steps[:1], **kw), a.repeats)
        t_all = timed(lambda: rank_curve(files, base=base, steps=steps, **kw), a.repeats)
        marginal = (t_all - t_one) / (a.checkpoints - 1)
        t_pair = timed(lambda: compare(base, files[-1], metrics=["stable_rank"], progress=False), a.repeats)
        t_pair_all = timed(lambda: compare(base, files[-1], metrics=None, progress=False), 1)
        rep = rank_curve(files, base=base, steps=steps, **kw)
        methods = {m: sum(r["method"] == m for r in rep.rows) for m in ("randomized", "exact")}

        print(
            f"### Trajectory: marginal cost per checkpoint ({a.layers} layers × q/k/v/o of Qwen2.5-0.5B = "
            f"{n_mat} matrices, bf16 safetensors, {a.threads} threads, median of {a.repeats})\n"
        )
        print("| quantity | seconds | ratio to fresh pair (stable_rank) |")
        print("|---|---|---|")
        print(f"| fresh pair `compare(base, ft, metrics=['stable_rank'])` | {t_pair:.3f} | 1.00 |")
        print(f"| fresh pair `compare(base, ft)` (all pair metrics) | {t_pair_all:.3f} | {t_pair_all / t_pair:.2f} |")
        print(f"| `rank_curve` base + 1 checkpoint (k=16, hill_k=10, Sim_K) | {t_one:.3f} | {t_one / t_pair:.2f} |")
        print(f"| `rank_curve` base + {a.checkpoints} checkpoints | {t_all:.3f} | {t_all / t_pair:.2f} |")
        print(
            f"| **marginal cost of one more checkpoint** | {marginal:.3f} | **{marginal / t_pair:.2f}** (goal ≤ 0.20) |"
        )
        print(
            f"\nrows by method: {methods}; mean stable rank at the last step "
            f"{rep.summary['by_step'][steps[-1]]['stable_rank']:.2f}\n"
        )

        # sketch vs exact on the same stream, through the Tracker (fp32 'training' == the bf16 checkpoints)
        res = {}
        for mode in ("exact", "sketch"):
            tr = Tracker(base_sd, mode=mode, k=16, hill_k=10)
            t0 = time.perf_counter()
            for s, ck in zip(steps, cks):
                tr.update(ck, s)
            res[mode] = (tr, (time.perf_counter() - t0) / len(steps))
        ex, sk = res["exact"][0], res["sketch"][0]
        re_, rs_ = ex.rank_curve().rows, sk.rank_curve().rows
        err = {
            key: [abs(b[key] - a_[key]) / abs(a_[key]) for a_, b in zip(re_, rs_)]
            for key in ("delta_frobenius", "stable_rank", "spectral_norm", "hill_alpha")
        }
        err["final_subspace_similarity"] = [
            abs(b["final_subspace_similarity"] - a_["final_subspace_similarity"]) for a_, b in zip(re_, rs_)
        ]
        print(f"### Tracker: sketch vs exact ({n_mat} matrices, {len(steps)} tracked steps)\n")
        print("| mode | W0 state (MiB) | per-step history (MiB) | update (s/step) | onset |")
        print("|---|---|---|---|---|")
        for mode, (tr, t) in res.items():
            mem = tr.memory_bytes()
            print(
                f"| {mode} | {mem['base'] / 2**20:.1f} | {mem['history'] / len(steps) / 2**20:.2f} | {t:.3f} | "
                f"{tr.locking_onset().step} |"
            )
        print("\n| sketch error vs exact (per row) | median | max |")
        print("|---|---|---|")
        for key, v in err.items():
            kind = "abs" if key == "final_subspace_similarity" else "rel"
            print(f"| {key} ({kind}) | {statistics.median(v):.2e} | {max(v):.2e} |")
        s = sk.sketch_rank
        print(
            f"\nsketch: s = {s}, l = {2 * s + 1}, float64: 8·(m·s + l·n) bytes per matrix "
            f"(896×896: {8 * (896 * s + (2 * s + 1) * 896) / 2**20:.2f} MiB vs bf16 copy "
            f"{2 * 896 * 896 / 2**20:.2f} MiB; 128×896: sketch {8 * (128 * s + (2 * s + 1) * 896) / 2**20:.2f} vs "
            f"{2 * 128 * 896 / 2**20:.2f} MiB)"
        )


if __name__ == "__main__":
    main()
