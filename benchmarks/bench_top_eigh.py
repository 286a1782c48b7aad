"""The pair eigenproblem: weightgeo's ``top_eigh`` against a full ``eigh`` and SciPy's ranged ``eigh``, side by side.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_top_eigh.py [--n 896,2048,4096] [--threads 1]

The pair method needs every eigenvalue of W1's Gram in W0's basis, ``M1 = Λ0 + F``, but only its top-k
eigenvectors (linalg/eigen.py). The alternatives that give the same: torch's full ``eigh`` (what the pair method
ran before issue 22's change), and SciPy's ``eigh(subset_by_index=..., driver="evr")`` for the k vectors plus
torch's ``eigvalsh`` for every value (two reductions). The matrices are the method's own shape of problem: a
Wishart spectrum on the diagonal, descending, plus a seeded symmetric perturbation of 1e-6 of its largest value.
Each is timed at k = n/8 (the default k), n/4 and 0.4·n (the route's limit), with ``--threads`` torch threads
(``top_eigh`` takes its SciPy route only with one torch thread, as each lane of a 2-core machine runs); it prints the fastest of ``--repeats``,
the ratios, and the agreement with the full ``eigh``: the largest eigenvalue difference over λ_max and
1 − cos of the largest angle between the top-k subspaces.
"""

from __future__ import annotations

import argparse

import numpy as np
import scipy.linalg
import torch
from _timing import best_time, machine_line

from weightgeo.linalg.eigen import lapack_threads, top_eigh


def _problem(n: int, seed: int) -> torch.Tensor:
    g = np.random.default_rng(seed)
    a = g.standard_normal((n + n // 4, n))
    lam = np.linalg.eigvalsh(a.T @ a)[::-1]
    e = g.standard_normal((n, n)) * 1e-6 * lam[0]
    return torch.from_numpy(np.diag(lam) + (e + e.T) / 2)


def _scipy_ranged(M: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = M.shape[-1]
    w = torch.linalg.eigvalsh(M).flip(-1)
    with lapack_threads(torch.get_num_threads()):
        _, Z = scipy.linalg.eigh(M.numpy(), subset_by_index=[n - k, n - 1], driver="evr", check_finite=False)
    return w, torch.from_numpy(Z[:, ::-1].copy())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", default="896,2048,4096", help="matrix sides, comma-separated")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"- machine: {machine_line()}")
    print(f"- torch threads: {args.threads} (SciPy's LAPACK runs one; its routes are taken in one-thread lanes only)")
    print()
    print(
        "| n | k | full eigh (s) | SciPy ranged + eigvalsh (s) | top_eigh (s) | full / top_eigh | ranged / top_eigh "
        "| eigenvalues: max diff / λ_max | top-k subspace: 1 − cos |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n in (int(x) for x in args.n.split(",")):
        M = _problem(n, seed=n)
        reps = args.repeats if n <= 2048 else 1
        t_full = best_time(lambda: torch.linalg.eigh(-M), reps)
        mu, V = torch.linalg.eigh(-M)
        for k in (n // 8, n // 4, int(0.4 * n)):
            t_ranged = best_time(lambda k=k: _scipy_ranged(M, k), reps)
            t_top = best_time(lambda k=k: top_eigh(M, k), reps)
            w, Q = top_eigh(M, k)
            dw = float((w + mu).abs().max() / mu.abs().max())
            cos = torch.linalg.svdvals(V[:, :k].mT @ Q)
            print(
                f"| {n} | {k} | {t_full:.3f} | {t_ranged:.3f} | {t_top:.3f} | {t_full / t_top:.2f} | "
                f"{t_ranged / t_top:.2f} | {dw:.1e} | {float(1 - cos.min()):.1e} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
