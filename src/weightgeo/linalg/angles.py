"""Principal angles between subspaces, small angles from sines (Björck–Golub; Knyazev–Argentati 2002).

``arccos`` of cosines near 1 loses everything below about ``sqrt(eps)`` radians (3e-4 rad = 0.02° in
float32); sines do not. Paper-notes §1.2.
"""

from __future__ import annotations

import torch

from ..errors import WeightgeoError

__all__ = ["subspace_angles"]


def subspace_angles(Q1: torch.Tensor, Q2: torch.Tensor, *, values_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Principal angles (radians, ascending) between the column spans of orthonormal ``Q1`` and ``Q2``.

    >>> Q1 = torch.eye(3)[:, :2]
    >>> c, s = torch.cos(torch.tensor(1e-4)), torch.sin(torch.tensor(1e-4))
    >>> Q2 = torch.stack([torch.tensor([1.0, 0, 0]), torch.stack([0 * c, c, s])], 1)
    >>> subspace_angles(Q1, Q2)
    tensor([0.0000e+00, 1.0000e-04])

    Args:
        Q1: [..., n, k1] with orthonormal columns.
        Q2: [..., n, k2] with orthonormal columns (batch dims broadcast with Q1's).
        values_dtype: dtype of the two small SVDs (default: the inputs' dtype). The products are
            formed in the inputs' dtype first, so float32 here costs only ~1e-7 rad of absolute error.

    Returns:
        [..., min(k1, k2)] angles in [0, π/2], ascending. ``θᵢ = arcsin(sᵢ)`` where ``sᵢ² < 1/2``,
        else ``arccos(cᵢ)``, with cosines ``cᵢ = σᵢ(Q1ᵀQ2)`` and sines ``sᵢ = σᵢ((I − Q1Q1ᵀ)Q2)``
        (the roles swapped so that the sines come from the narrower basis). Symmetric in Q1, Q2.
    """
    if Q1.ndim < 2 or Q2.ndim < 2 or Q1.shape[-2] != Q2.shape[-2]:
        raise WeightgeoError(
            f"subspace_angles needs bases [..., n, k] with the same n, got {tuple(Q1.shape)} and {tuple(Q2.shape)}"
        )
    if Q1.shape[-1] < Q2.shape[-1]:
        Q1, Q2 = Q2, Q1
    dt = torch.promote_types(Q1.dtype, Q2.dtype)
    Q1, Q2 = Q1.to(dt), Q2.to(dt)
    vd = values_dtype or dt
    C = Q1.mT @ Q2  # [..., k1, k2], k1 >= k2
    S = Q2 - Q1 @ C  # [..., n, k2]
    cos = torch.linalg.svdvals(C.to(vd)).clamp(0, 1)  # descending -> angles ascending
    sin = torch.linalg.svdvals(S.to(vd)).flip(-1).clamp(0, 1)  # ascending
    return torch.where(sin * sin < 0.5, torch.arcsin(sin), torch.arccos(cos))
