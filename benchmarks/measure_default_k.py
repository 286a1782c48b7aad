"""Which default ``k`` serves both an 8B model and a small one? A measurement on the real matrix shapes.

Shapes (out × in): Qwen2.5-0.5B q/o 896², k/v 128×896 (GQA), gate/up 4864×896; Qwen3-8B q/o 4096², k/v 1024×4096
(GQA); the miniature (examples/) 64² and 256×64. W0 has a pretrained-like power-law spectrum (σ_i = i^-0.5,
random orthogonal factors, bf16 as stored); W+ = W0 + a dense Gaussian update of relative size ``rel`` (1e-3:
SFT-like) of the weight RMS, the same relative size for every shape. No real weights are reachable offline, so
the spectra are synthetic; the shapes, and so what a given k covers of each matrix, are the real ones.

For each candidate default (absolute 512 / 256 / 128 / 64, and the fractions 1/4, 1/8, 1/16 of each matrix's
smaller side) and each shape: the k it gives, whether the top-k subspace is measurable at all (k < smaller side),
the rotation it reports for the same relative update (1 − principal_overlap on the input side) and W0's gap
σ_k/σ_{k+1}. A default serves both sizes when every matrix is measurable and the same relative update reads the
same on the small model and the large one (comparable numbers across model sizes), and when it reproduces the
paper at 8B (k = 512 on the 4096-wide matrices).

Run: ``python benchmarks/measure_default_k.py [--rel 1e-3] [--skip-8b]`` (the 8B shapes take minutes on 2 cores:
one float64 decomposition per shape, every k read off it). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_compare import make_pair  # the same synthetic pair (benchmarks/ is on the path when run)

from weightgeo.linalg.pairwise import base_spectrum, pair_angles, pair_eigen, pair_products, pair_spectrum, tall_like
from weightgeo.validation import resolve_size

SHAPES = {
    "0.5B q/o": (896, 896),
    "0.5B k/v": (128, 896),
    "0.5B gate/up": (4864, 896),
    "8B q/o": (4096, 4096),
    "8B k/v": (1024, 4096),
    "tiny attn": (64, 64),
    "tiny mlp": (256, 64),
}
CANDIDATES: tuple[int | float, ...] = (512, 256, 128, 64, 0.25, 0.125, 0.0625)


def measure(m: int, n: int, rel: float, seed: int) -> dict[int | float, tuple[int, float | None, float | None]]:
    """Per candidate: (k, 1 − overlap or None when not measurable, σ_k/σ_{k+1} of W0 or None)."""
    gen = torch.Generator().manual_seed(seed)
    W0, W1 = make_pair(m, n, rel, gen)
    base = base_spectrum(W0)
    A1 = tall_like(base, W1, "W1")
    prod = pair_products(base, A1, sides=("right",))
    eig = pair_eigen(base, prod, vectors=True)
    spec = pair_spectrum(base, A1, eig)
    p = min(m, n)
    out: dict[int | float, tuple[int, float | None, float | None]] = {}
    for cand in CANDIDATES:
        k = resolve_size(cand, p)
        if k >= p:
            out[cand] = (k, None, None)
            continue
        right, _ = pair_angles(base, prod, eig, spec, k, ("right",))
        assert right is not None
        overlap = float((torch.cos(torch.deg2rad(right[0])) ** 2).mean())
        gap = float(base.sigma[k - 1] / base.sigma[k])
        out[cand] = (k, 1.0 - overlap, gap)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rel", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-8b", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = {}
    for name, (m, n) in SHAPES.items():
        if args.skip_8b and name.startswith("8B"):
            continue
        t = time.perf_counter()
        results[name] = measure(m, n, args.rel, args.seed)
        print(f"# {name} {m}x{n}: {time.perf_counter() - t:.1f} s", flush=True)
    names = list(results)
    print(f"\nrelative update {args.rel:g} of the weight RMS; cell: k / 1 − principal_overlap / σ_k/σ_k+1 of W0")
    print("| default k | " + " | ".join(f"{n} {'x'.join(map(str, SHAPES[n]))}" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for cand in CANDIDATES:
        cells = []
        for n in names:
            k, deficit, gap = results[n][cand]
            cells.append(f"{k}: n/m" if deficit is None else f"{k}: {deficit:.2e} / {gap:.3f}")
        print(f"| {cand:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
