"""Principal-angle rotation of the top-k singular subspaces (paper §3.1, App. C.3; PNT §4.1)."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import WeightgeoError
from ..linalg.angles import subspace_angles
from ..linalg.svd import Decomposition, _check_side, decompose
from ._inputs import check_pair, dispatch_compare, wants_dispatch

__all__ = ["principal_angles", "principal_overlap"]


def _check_k(k: int) -> int:
    if isinstance(k, bool) or int(k) != k or int(k) < 1:
        raise WeightgeoError(f"k must be a positive integer (number of singular directions, default 512), got {k!r}")
    return int(k)


def effective_k(d0: Decomposition, d1: Decomposition, k: int) -> int:
    """``min(k, m, n, rank(W0), rank(W+))``: singular vectors beyond the numerical rank are arbitrary."""
    return int(min(k, *d0.shape, int(d0.rank()), int(d1.rank())))


def _angles(
    A0: torch.Tensor, A1: torch.Tensor, d0: Decomposition, d1: Decomposition, k: int, side: str
) -> tuple[torch.Tensor, int]:
    """Angles in radians (float64, ascending) between the top-k_eff subspaces, and k_eff."""
    k_eff = effective_k(d0, d1, k)
    if k_eff == 0:
        return torch.zeros(0, dtype=torch.float64, device=A0.device), 0
    Q0 = d0.vectors_for(A0, k_eff, side)  # type: ignore[arg-type]
    Q1 = d1.vectors_for(A1, k_eff, side)  # type: ignore[arg-type]
    # Bases are float64-accurate; for ≤fp32 inputs the two small SVDs run in float32, which costs
    # ~1e-7 rad absolute (docs/metrics.md); fp64 inputs stay fp64 throughout.
    vd = torch.float64 if A0.dtype == torch.float64 and A1.dtype == torch.float64 else torch.float32
    return subspace_angles(Q0, Q1, values_dtype=vd).double(), k_eff


def principal_angles(base: Any, ft: Any, *, k: int = 512, side: str = "right") -> torch.Tensor:
    """Principal angles (degrees, ascending) between the top-k singular subspaces of W0 and W+ (§1.2).

    >>> W0 = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    >>> principal_angles(W0, W0, k=2)
    tensor([0., 0.], dtype=torch.float64)

    Args:
        base: W0 [out, in] (tensor/array) or a checkpoint source (then the engine's report is returned).
        ft: W+ [out, in].
        k: subspace dimension, default 512 (paper). Effective k = min(k, out, in, numerical rank of
            W0 and of W+); the returned vector has that length.
        side: "right" (V, input side, default) or "left" (U, output side).

    Returns:
        [k_eff] float64 degrees in [0, 90], ascending; best (no rotation) all 0. Small angles come from
        sines, so they are accurate to ~1e-5° even for near-identical matrices. Representative layer
        (paper): SFT > 10°, OPD ≈ 1°, RLVR < 0.5°. Angles mean something only where σ_k/σ_{k+1}
        (``spectral_gap``, see ``matrix_pair_metrics``) is clearly above 1.
    """
    if wants_dispatch(base, ft):
        return dispatch_compare(base, ft, ["principal_overlap"], k=k, side=side)
    k = _check_k(k)
    _check_side(side)
    b, f = check_pair(base, ft, matrix=True, what="principal_angles")
    d0, d1 = decompose(b), decompose(f)
    theta, k_eff = _angles(b, f, d0, d1, k, side)
    if k_eff == 0:
        raise WeightgeoError(
            f"principal_angles: numerical rank 0 (base rank {int(d0.rank())}, ft rank {int(d1.rank())}, "
            f"shape {tuple(b.shape)}): a zero matrix has no singular subspace"
        )
    return torch.rad2deg(theta)


def principal_overlap(base: Any, ft: Any, *, k: int = 512, side: str = "right") -> float:
    """Mean cos² of the principal angles between the top-k singular subspaces (§1.2; = Sim_k of §2).

    >>> principal_overlap(torch.eye(3), torch.eye(3), k=2)
    1.0

    Args:
        base: W0 [out, in] (tensor/array) or a checkpoint source (then the engine's report is returned).
        ft: W+ [out, in].
        k: subspace dimension (default 512; effective k as in :func:`principal_angles`).
        side: "right" (V, input side, default) or "left" (U, output side).

    Returns:
        float in [0, 1], higher = more aligned; 1 = same subspace.
    """
    if wants_dispatch(base, ft):
        return dispatch_compare(base, ft, ["principal_overlap"], k=k, side=side)
    theta = torch.deg2rad(principal_angles(base, ft, k=k, side=side))
    return float((torch.cos(theta) ** 2).mean().clamp(0, 1))
