"""Principal-angle rotation of the top-k singular subspaces (paper §3.1, App. C.3; PNT §4.1)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..defaults import PAIR_K, SIDE
from ..errors import WeightgeoError
from ..linalg.pairwise import PairGeometry, pair_geometry
from ..linalg.policy import same_compute_dtype
from ..validation import check_pair, check_side, check_size, given, resolve_size

__all__ = ["principal_angles", "principal_overlap"]


def _geometry(base: Any, ft: Any, k: int | float, side: str, what: str) -> tuple[PairGeometry, torch.Tensor]:
    size = check_size(k)
    check_side(side)
    b, f = same_compute_dtype(*check_pair(base, ft, matrix=True, what=what))
    p = min(b.shape)
    if resolve_size(size, p) >= p:
        raise WeightgeoError(
            f"{what}: {given('k', k)} reaches {p}, the smaller side of the {b.shape[0]}x{b.shape[1]} matrices: the "
            f"top-k subspace is then the whole space and the angles are 0° whatever the update; pass a k below {p}, "
            f"e.g. {given('k', 0.125)} (an eighth of the smaller side, the default)"
        )
    return pair_geometry(b, f, k=resolve_size(size, p), sides=(side,)), b


def principal_angles(base: Any, ft: Any, *, k: int | float = PAIR_K, side: str = SIDE) -> torch.Tensor:
    """Principal angles (degrees, ascending) between the top-k singular subspaces of W0 and W+ (§1.2).

    >>> W0 = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    >>> principal_angles(W0, W0, k=2)
    tensor([0., 0.], dtype=torch.float64)

    Args:
        base: W0 [out, in] (torch tensor or NumPy array).
        ft: W+ [out, in].
        k: subspace dimension: a count, or a fraction in (0, 1) of min(out, in) (default 0.125, an eighth: the
            paper's 512 of 4096). Effective k = min(k, numerical rank of W0 and of W+); the returned vector has
            that length. A k at or above min(out, in) raises: the top-k subspace would be the whole space.
        side: "right" (V, input side, default) or "left" (U, output side).

    Returns:
        [k_eff] float64 degrees in [0, 90], ascending; best (no rotation) all 0. Small angles come from
        sines of the pair's float64 eigenproblem in W0's basis (``linalg.pairwise.pair_geometry``), accurate
        to ~1e-5° even for near-identical matrices. Representative layer
        (paper): SFT > 10°, OPD ≈ 1°, RLVR < 0.5°. Angles mean something only where σ_k/σ_{k+1}
        (``spectral_gap``, see ``matrix_pair_metrics``) is clearly above 1. A matrix of numerical rank 0
        has no singular subspace: that raises here (in a report its row has ``k_effective`` 0, an empty
        ``principal_angles`` and NaN statistics, as :func:`principal_overlap` gives NaN).
    """
    g, b = _geometry(base, ft, k, side, "principal_angles")
    if g.k == 0:
        raise WeightgeoError(
            f"principal_angles: numerical rank 0 (base rank {int(g.rank0)}, ft rank {int(g.rank1)}, "
            f"shape {tuple(b.shape)}): a zero matrix has no singular subspace"
        )
    return g.angles(side)


def principal_overlap(base: Any, ft: Any, *, k: int | float = PAIR_K, side: str = SIDE) -> float:
    """Mean cos² of the principal angles between the top-k singular subspaces (§1.2; = Sim_k of §2).

    >>> principal_overlap(torch.eye(3), torch.eye(3), k=2)
    1.0

    Args:
        base: W0 [out, in] (torch tensor or NumPy array).
        ft: W+ [out, in].
        k: subspace dimension (default 0.125 of the smaller side; as in :func:`principal_angles`).
        side: "right" (V, input side, default) or "left" (U, output side).

    Returns:
        float in [0, 1], higher = more aligned; 1 = same subspace. NaN when W0 or W+ has numerical rank 0
        (no subspace to compare), as in :func:`weightgeo.compare`'s rows.
    """
    g, _ = _geometry(base, ft, k, side, "principal_overlap")
    if g.k == 0:
        return math.nan
    theta = torch.deg2rad(g.angles(side))
    return float((torch.cos(theta) ** 2).mean().clamp(0, 1))
