"""The pair method against float64 NumPy/SciPy on the case table of docs/numerics.md (Qwen2.5-0.5B shapes).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_accuracy.py
    PYTHONPATH=/path/to/older/src python benchmarks/bench_accuracy.py     # the same table for another tree

W0 has σᵢ = i^-0.5 with random orthogonal factors, stored in bf16; W1 = bf16(W0 + ΔW) with ΔW dense Gaussian or
rank-8 of relative size 1e-2, 1e-3 or 2e-4 of the weight RMS; k = 512 (capped at min(m, n)). The reference is
``np.linalg.svd`` in float64 of both bf16 matrices with ``scipy.linalg.subspace_angles``. Each angle cell is the
worst |Δangle| divided by the tolerance (2 % + 0.005°); NSS is the relative error. Prints the weightgeo it imported.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = [(896, 896), (128, 896), (4864, 896), (896, 4864)]
UPDATES = [("dense", 1e-2), ("rank-8", 1e-2), ("dense", 1e-3), ("rank-8", 1e-3), ("dense", 2e-4), ("rank-8", 2e-4)]


def make_pair(m: int, n: int, kind: str, rel: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    p = min(m, n)
    U, _ = np.linalg.qr(rng.standard_normal((m, p)))
    V, _ = np.linalg.qr(rng.standard_normal((n, p)))
    W0 = torch.from_numpy(((U * np.arange(1, p + 1) ** -0.5) @ V.T).astype(np.float32)).bfloat16()
    rms = float(W0.float().pow(2).mean().sqrt())
    if kind == "dense":
        D = rng.standard_normal((m, n)) * rel * rms
    else:
        D = rng.standard_normal((m, 8)) @ rng.standard_normal((8, n))
        D *= rel * rms * np.sqrt(m * n) / np.linalg.norm(D)
    return W0, (W0.float() + torch.from_numpy(D.astype(np.float32))).bfloat16()


def reference(W0: torch.Tensor, W1: torch.Tensor, k: int) -> dict:
    A0, A1 = W0.double().numpy(), W1.double().numpy()
    U0, s0, V0h = np.linalg.svd(A0, full_matrices=False)
    U1, s1, V1h = np.linalg.svd(A1, full_matrices=False)
    return {
        "right": np.sort(np.degrees(scipy.linalg.subspace_angles(V0h[:k].T, V1h[:k].T))),
        "left": np.sort(np.degrees(scipy.linalg.subspace_angles(U0[:, :k], U1[:, :k]))),
        "nss": float(np.linalg.norm(s1 - s0) / np.linalg.norm(s0)),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, default=512)
    ap.add_argument("--shapes", default=",".join(f"{m}x{n}" for m, n in SHAPES))
    args = ap.parse_args(argv)
    import weightgeo
    from weightgeo.linalg.pairwise import pair_geometry

    print(f"weightgeo from {Path(weightgeo.__file__).parent}")
    print("\n| shape | ΔW | NSS (ref) | NSS rel. err | right angles: max abs (°) / of tol | left angles |")
    print("|---|---|---|---|---|---|")
    worst = {"angle": 0.0, "nss": 0.0}
    for shape in args.shapes.split(","):
        m, n = (int(x) for x in shape.split("x"))
        k = min(args.k, m, n)
        for kind, rel in UPDATES:
            W0, W1 = make_pair(m, n, kind, rel, seed=m + 7 * n + int(1e6 * rel) + (kind == "dense"))
            ref = reference(W0, W1, k)
            g = pair_geometry(W0, W1, k=k, sides=("right", "left"))
            cells = []
            for side in ("right", "left"):
                a = getattr(g, f"angles_{side}").numpy()
                r = ref[side][: a.shape[-1]]
                err = np.abs(a - r)
                frac = float(np.max(err / (0.02 * np.abs(r) + 0.005))) if err.size else 0.0
                worst["angle"] = max(worst["angle"], frac)
                cells.append(f"{float(err.max()) if err.size else 0.0:.1e} / {frac:.1e}")
            nss_err = abs(float(g.spectral_drift) / ref["nss"] - 1)
            worst["nss"] = max(worst["nss"], nss_err)
            print(
                f"| {m}×{n} | {kind} {rel:g} | {ref['nss']:.1e} | {nss_err:.1e} | {cells[0]} | {cells[1]} |", flush=True
            )
    print(f"\nworst angle error: {worst['angle']:.2e} of the tolerance; worst NSS relative error: {worst['nss']:.1e}")


if __name__ == "__main__":
    main()
