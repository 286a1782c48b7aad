"""Pair-suite benchmark: base-relative Gram method (linalg.pairwise) vs the float64 SVD route.

Synthetic Qwen2.5-0.5B-shaped bf16 pair: per layer q 896², k/v 128×896, o 896², gate/up 4864×896,
down 896×4864, power-law spectra σᵢ = i^-0.5 with random orthogonal factors, ΔW dense Gaussian of
relative size ``--rel`` of the weight RMS. The embedding (151936×896) is skipped: k = 512 subspaces of a
vocabulary matrix are not part of the paper's suite, and its exact SVD alone would dominate both routes.

* float64 route: ``torch.linalg.svd`` (float64, full_matrices=False) of both sides, then right-side
  angles via ``linalg.angles.subspace_angles`` and NSS. Timed on ``--ref-layers`` layers (every layer
  has the same shapes, so the per-layer time is scaled to ``--layers``); agreement is measured there.
* ours: ``pair_geometry`` per matrix, all ``--layers`` layers, with the base decomposition counted
  (and separately with the base reused: the amortised figure for several fine-tunes / checkpoints).
* optional (``--compare``): the whole ``weightgeo.compare`` suite on two safetensors files in a
  subprocess under ``/usr/bin/time -v`` (wall, streaming GB/s, peak RSS).
* optional (``--many N``): ``weightgeo.compare_many`` on a base and N fine-tunes against N ``compare`` calls.

Run: ``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_compare.py``.
Prints a markdown table. Timings on a shared machine are noisy: compare ratios from one run.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

from weightgeo.linalg.angles import subspace_angles
from weightgeo.linalg.pairwise import base_spectrum, pair_geometry

os.environ["WEIGHTGEO_CACHE"] = "off"  # time the computation, not the result cache (bench_resume.py times that)

SHAPES = {
    "q_proj": (896, 896),
    "k_proj": (128, 896),
    "v_proj": (128, 896),
    "o_proj": (896, 896),
    "gate_proj": (4864, 896),
    "up_proj": (4864, 896),
    "down_proj": (896, 4864),
}


def make_pair(m, n, rel, gen):
    p = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, p, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(n, p, generator=gen))
    W0 = ((U * torch.arange(1, p + 1, dtype=torch.float32).pow(-0.5)) @ V.T).bfloat16()
    rms = W0.float().pow(2).mean().sqrt()
    W1 = (W0.float() + rel * rms * torch.randn(m, n, generator=gen)).bfloat16()
    return W0, W1


def f64_route(W0, W1, k):
    U0, S0, V0h = torch.linalg.svd(W0.double(), full_matrices=False)
    U1, S1, V1h = torch.linalg.svd(W1.double(), full_matrices=False)
    k = min(k, *W0.shape)
    ang = torch.rad2deg(subspace_angles(V0h[:k].mT, V1h[:k].mT))
    return ang, (S1 - S0).norm() / S0.norm()


def timed(f):
    t = time.perf_counter()
    out = f()
    return time.perf_counter() - t, out


def run_compare(layers, rel, seed):
    """Whole weightgeo.compare on two safetensors files (subprocess, /usr/bin/time -v)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    d = tempfile.mkdtemp(prefix="wg_bench_")
    base, ft = {}, {}
    for layer in range(layers):
        for name, (m, n) in SHAPES.items():
            kind = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"model.layers.{layer}.{kind}.{name}.weight"
            base[key], ft[key] = make_pair(m, n, rel, gen)
    save_file(base, os.path.join(d, "base.safetensors"))
    save_file(ft, os.path.join(d, "ft.safetensors"))
    nbytes = sum(v.numel() * 2 for v in base.values()) * 2
    code = (
        "import weightgeo,time;t=time.perf_counter();"
        f"weightgeo.compare('{d}/base.safetensors','{d}/ft.safetensors',progress=False);"
        "print('WALL',time.perf_counter()-t)"
    )
    p = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", code], capture_output=True, text=True)
    if p.returncode != 0:
        return None, p.stderr[-2000:]
    wall = float(re.search(r"WALL (\S+)", p.stdout).group(1))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) / 2**20
    return (wall, nbytes / wall / 1e9, rss), None


def run_many(layers, rel, seed, n):
    """``compare_many(base, [ft_1..ft_n])`` against n ``compare(base, ft_i)`` calls, in this process."""
    from safetensors.torch import save_file

    import weightgeo

    gen = torch.Generator().manual_seed(seed)
    d = tempfile.mkdtemp(prefix="wg_many_")
    base, fts = {}, [{} for _ in range(n)]
    for layer in range(layers):
        for name, (m, n_) in SHAPES.items():
            kind = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"model.layers.{layer}.{kind}.{name}.weight"
            base[key], fts[0][key] = make_pair(m, n_, rel, gen)
            w = base[key].float()
            rms = w.pow(2).mean().sqrt()
            for ft in fts[1:]:
                ft[key] = (w + rel * rms * torch.randn(w.shape, generator=gen)).bfloat16()
    save_file(base, os.path.join(d, "base.safetensors"))
    paths = []
    for i, ft in enumerate(fts):
        paths.append(os.path.join(d, f"ft{i}.safetensors"))
        save_file(ft, paths[-1])
    b = os.path.join(d, "base.safetensors")
    weightgeo.compare(b, paths[0], progress=False, include=r"layers\.0\.")  # warm-up
    t_sep, _ = timed(lambda: [weightgeo.compare(b, p, progress=False) for p in paths])
    t_many, _ = timed(lambda: weightgeo.compare_many(b, paths, progress=False))
    return t_sep, t_many


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--ref-layers", type=int, default=1, help="layers timed with the float64 route")
    ap.add_argument("--rel", type=float, default=1e-3, help="ΔW size relative to the weight RMS")
    ap.add_argument("--k", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--compare", action="store_true", help="also time the whole weightgeo.compare suite")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--many",
        type=int,
        default=0,
        metavar="N",
        help="also time compare_many(base, N fine-tunes) against N compare calls",
    )
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    gen = torch.Generator().manual_seed(a.seed)
    rows = []
    tot = {"f64": 0.0, "ours": 0.0, "pair": 0.0}
    worst_ang, worst_tol, worst_nss = 0.0, 0.0, 0.0
    pair_geometry(*make_pair(64, 48, a.rel, gen), k=16)  # warm-up
    for name, (m, n) in SHAPES.items():
        t64, tours, tpair, nref = [], [], [], 0
        for layer in range(a.layers):
            W0, W1 = make_pair(m, n, a.rel, gen)
            tb, base = timed(lambda: base_spectrum(W0))
            tp, g = timed(lambda: pair_geometry(None, W1, k=a.k, base=base))
            tours.append(tb + tp)
            tpair.append(tp)
            if layer < a.ref_layers:
                t, (ang, nss) = timed(lambda: f64_route(W0, W1, a.k))
                t64.append(t)
                e = (g.angles_right - ang.sort().values).abs()
                tol = 0.02 * ang.sort().values.abs() + 0.005
                worst_ang = max(worst_ang, float(e.max()))
                worst_tol = max(worst_tol, float((e / tol).max()))
                worst_nss = max(worst_nss, abs(float(g.spectral_drift / nss) - 1))
                nref += 1
        f64 = sum(t64) / len(t64) * a.layers
        ours, pair = sum(tours), sum(tpair)
        tot["f64"] += f64
        tot["ours"] += ours
        tot["pair"] += pair
        rows.append((name, f"{m}×{n}", f64, ours, pair, float(g.gap)))
    print(
        f"\n### Pair suite, {a.layers} layers × 7 matrices, ΔW rel {a.rel:g}, k={a.k}, "
        f"{torch.get_num_threads()} threads (float64 route timed on {a.ref_layers} layer(s), scaled)\n"
    )
    print(
        "| matrix | shape | float64 SVD route (s) | ours incl. base (s) | ours, base reused (s) | speed-up | amortised | σ_k/σ_k+1 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, shape, f64, ours, pair, gap in rows:
        print(
            f"| {name} | {shape} | {f64:.2f} | {ours:.2f} | {pair:.2f} | {f64 / ours:.1f}× | {f64 / pair:.1f}× | {gap:.4f} |"
        )
    print(
        f"| **all** | | **{tot['f64']:.1f}** | **{tot['ours']:.1f}** | **{tot['pair']:.1f}** | "
        f"**{tot['f64'] / tot['ours']:.1f}×** | **{tot['f64'] / tot['pair']:.1f}×** | |"
    )
    print(
        f"\nAgreement with float64 (right-side angles, reference layers): max |Δangle| = {worst_ang:.2e}°, "
        f"max |Δangle| / (2 % + 0.005°) = {worst_tol:.2e}, max NSS relative error = {worst_nss:.2e}"
    )
    if a.compare:
        res, err = run_compare(a.layers, a.rel, a.seed)
        if res is None:
            print(f"\nweightgeo.compare failed:\n```\n{err}\n```")
        else:
            wall, gbs, rss = res
            print("\n| weightgeo.compare suite | wall (s) | streaming (GB/s, both files) | peak RSS (GiB) |")
            print("|---|---|---|---|")
            print(f"| {a.layers} layers | {wall:.1f} | {gbs:.3f} | {rss:.2f} |")
    if a.many:
        t_sep, t_many = run_many(a.layers, a.rel, a.seed, a.many)
        print(
            f"\n| fine-tunes of one base ({a.layers} layers, all metrics) | {a.many} × compare (s) | "
            "compare_many (s) | ratio |"
        )
        print("|---|---|---|---|")
        print(f"| {a.many} | {t_sep:.2f} | {t_many:.2f} | {t_many / t_sep:.2f} |")


if __name__ == "__main__":
    main()
