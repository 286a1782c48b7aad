"""Shared helpers for the benchmarks: medians of seeded runs, a machine line, markdown tables.

    from _timing import median_time, machine_line, markdown_table

Run benchmarks as ``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/<name>.py``: some
images set those two variables, and they change numpy/scipy's OpenBLAS kernels.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence


def median_time(fn: Callable[[int], object], *, repeats: int = 5, warmup: int = 1) -> tuple[float, list[float], list]:
    """Run ``fn(seed)`` ``warmup`` times (seed -1, -2, ...), then for seeds 0..repeats-1.

    Returns (median seconds, all seconds, the results of the timed runs).
    """
    for w in range(warmup):
        fn(-1 - w)
    times, outs = [], []
    for seed in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        out = fn(seed)
        times.append(time.perf_counter() - t0)
        outs.append(out)
    return statistics.median(times), times, outs


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` runs of ``fn`` (seconds), for long calls where the minimum is the least noisy."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine_line() -> str:
    """One line: CPU model, cores, ISA extensions that matter for GEMMs, library versions, load."""
    import numpy
    import torch

    flags = cpu_flags()
    isa = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    parts = [
        f"{cpu_model()} ({os.cpu_count()} cores; {', '.join(isa) or 'no AVX-512'})",
        f"torch {torch.__version__} ({torch.get_num_threads()} threads, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()})",
        f"numpy {numpy.__version__}",
    ]
    try:
        import scipy

        parts.append(f"scipy {scipy.__version__}")
    except ImportError:
        pass
    try:
        import sklearn

        parts.append(f"scikit-learn {sklearn.__version__}")
    except ImportError:
        pass
    try:
        parts.append("load avg {:.1f}/{:.1f}/{:.1f}".format(*os.getloadavg()))
    except OSError:
        pass
    env = [
        v for v in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS", "MKL_NUM_THREADS") if v in os.environ
    ]
    if env:
        parts.append("set: " + ", ".join(f"{v}={os.environ[v]}" for v in env))
    return "; ".join(parts)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def fmt(x: object) -> str:
        if x is None:
            return ""
        if isinstance(x, float):
            if x != x:
                return "–"
            return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
        return str(x)

    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(out)
