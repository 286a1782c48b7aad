"""The eigen floor of the pair suite: torch's float64 ``eigh`` / ``eigvalsh`` against NumPy's, side by side.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OPENBLAS_NUM_THREADS=1 python benchmarks/bench_eigh.py [--n 896,2048,4096]

The full suite solves two float64 ``eigh`` and one ``eigvalsh`` of an n x n matrix per pair matrix (BENCHMARKS.md,
issue 22): they are most of its time on a CPU. torch calls the LAPACK it was built with (MKL in the pip wheels),
NumPy the one it ships (OpenBLAS in the pip wheels); on some CPU kinds one is markedly faster. This times both on
the same symmetric matrices (a Wishart matrix plus a spread diagonal, seeded), one call at a time and two at once
from two threads (the two lanes of the pair kernel), with one thread each: torch by ``torch.set_num_threads(1)``,
NumPy's OpenBLAS by ``OPENBLAS_NUM_THREADS=1`` in the environment (it reads it once, at import). The third row of each
size is weightgeo's values-only route where the policy takes SciPy's LAPACK (``linalg.eigen.eigvalsh(lapack="scipy")``:
``dsytrd`` + ``dsterf``, one thread) in the NumPy columns. It prints the
fastest of ``--repeats`` runs, the ratios, and the largest eigenvalue difference relative to the largest
eigenvalue (both are backward-stable divide and conquer: differences at rounding level).
"""

from __future__ import annotations

import argparse
import os
import threading
from collections.abc import Callable

import numpy as np
import torch
from _timing import best_time, machine_line

from weightgeo.linalg.eigen import eigvalsh


def _matrix(n: int, seed: int) -> np.ndarray:
    g = np.random.default_rng(seed)
    a = g.standard_normal((n, n))
    return a @ a.T / n + np.diag(np.arange(n, 0, -1.0))


def _two_at_once(fn: Callable[[], object], repeats: int) -> float:
    def one_thread() -> None:
        torch.set_num_threads(1)  # thread-local: a new thread starts with torch's default (every core), as lanes do not
        fn()

    def run() -> None:
        threads = [threading.Thread(target=one_thread) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    return best_time(run, repeats)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", default="896,2048,4096", help="matrix sides, comma-separated")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"- machine: {machine_line()}")
    print(f"- OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', '(unset: OpenBLAS uses every core)')}")
    print()
    print(
        "| n | call | torch (s) | NumPy (s) | torch / NumPy | two at once: torch (s) | NumPy (s) | torch / NumPy | max eigenvalue difference / λ_max |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n in (int(x) for x in args.n.split(",")):
        m = _matrix(n, seed=n)
        t = torch.from_numpy(m)
        reps = args.repeats if n <= 2048 else 1
        for name, tf, nf in (
            ("eigh", lambda t=t: torch.linalg.eigh(t), lambda m=m: np.linalg.eigh(m)),
            ("eigvalsh", lambda t=t: torch.linalg.eigvalsh(t), lambda m=m: np.linalg.eigvalsh(m)),
            # what weightgeo runs where the policy takes SciPy's LAPACK (dsytrd + dsterf, one thread): in the NumPy column
            (
                "eigvalsh, weightgeo's SciPy route",
                lambda t=t: torch.linalg.eigvalsh(t),
                lambda t=t: eigvalsh(t, lapack="scipy"),
            ),
        ):
            one_t, one_n = best_time(tf, reps), best_time(nf, reps)
            two_t, two_n = _two_at_once(tf, reps), _two_at_once(nf, reps)
            w_t = torch.linalg.eigvalsh(t).numpy()
            w_n = eigvalsh(t, lapack="scipy").numpy() if "weightgeo" in name else np.linalg.eigvalsh(m)
            diff = float(np.abs(w_t - w_n).max() / np.abs(w_n).max())
            print(
                f"| {n} | {name} | {one_t:.3f} | {one_n:.3f} | {one_t / one_n:.2f} | {two_t:.3f} | {two_n:.3f} | "
                f"{two_t / two_n:.2f} | {diff:.1e} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
