"""Shared case matrix for the metric tests (small shapes; float64 references cached)."""

from __future__ import annotations

import functools

import numpy as np
import reference as R
import torch

M, N, K, RANK = 96, 64, 32, 8
CASES = [(kind, upd) for kind in R.KINDS for upd in R.UPDATES]


@functools.cache
def case(kind: str, upd: str, m: int = M, n: int = N):
    """(base, ft) as stored (bf16 or fp32 tensors), and their float32 values as NumPy arrays."""
    seed = (R.KINDS.index(kind) * 10 + R.UPDATES.index(upd)) * 7919 % 1000
    base, ft, storage = R.make_pair(kind, upd, m, n, seed)
    conv = (lambda a: torch.from_numpy(a).bfloat16()) if storage == "bf16" else torch.from_numpy
    return conv(base), conv(ft), base, ft


def angle_tolerance(ref_deg: np.ndarray) -> np.ndarray:
    """The issue's tolerance for angles: 2% + 0.005°."""
    return 0.02 * ref_deg + 0.005
