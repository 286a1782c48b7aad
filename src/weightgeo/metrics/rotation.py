"""Principal-angle rotation of the top-k singular subspaces (paper §3.1, App. C.3; PNT §4.1)."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import WeightgeoError
from ..linalg.pairwise import PairGeometry, pair_geometry
from ..linalg.svd import _check_side
from ._inputs import check_pair, dispatch_compare, same_compute_dtype, wants_dispatch

__all__ = ["principal_angles", "principal_overlap"]


def _check_k(k: int) -> int:
    if isinstance(k, bool) or int(k) != k or int(k) < 1:
        raise WeightgeoError(f"k must be a positive integer (number of singular directions, default 512), got {k!r}")
    return int(k)


def _angles_deg(g: PairGeometry, side: str) -> torch.Tensor:
    """The angle vector of ``side`` (degrees, float64, ascending, length ``g.k``) from a pair geometry."""
    a = g.angles_right if side == "right" else g.angles_left
    assert a is not None
    return a


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
        sines of the pair's float64 eigenproblem in W0's basis (``linalg.pairwise.pair_geometry``), accurate
        to ~1e-5° even for near-identical matrices. Representative layer
        (paper): SFT > 10°, OPD ≈ 1°, RLVR < 0.5°. Angles mean something only where σ_k/σ_{k+1}
        (``spectral_gap``, see ``matrix_pair_metrics``) is clearly above 1.
    """
    if wants_dispatch(base, ft):
        return dispatch_compare(base, ft, ["principal_overlap"], k=k, side=side)
    k = _check_k(k)
    _check_side(side)
    b, f = same_compute_dtype(*check_pair(base, ft, matrix=True, what="principal_angles"))
    g = pair_geometry(b, f, k=k, sides=(side,))
    if g.k == 0:
        raise WeightgeoError(
            f"principal_angles: numerical rank 0 (base rank {int(g.rank0)}, ft rank {int(g.rank1)}, "
            f"shape {tuple(b.shape)}): a zero matrix has no singular subspace"
        )
    return _angles_deg(g, side)


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
