"""Spectral family: drift NSS (paper App. C.3; PNT §4.1) and the stable rank of an update (§4, notes §2)."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import WeightgeoError
from ..linalg.pairwise import pair_geometry
from ..linalg.spectra import stable_rank_from_values
from ..linalg.svd import compute_dtype, frobenius_sq, exact_spectral_norm
from ._inputs import as_tensor, check_finite, check_pair, dispatch_compare, same_compute_dtype, wants_dispatch

__all__ = ["spectral_drift", "stable_rank"]


def spectral_drift(base: Any, ft: Any) -> float:
    """Normalized spectral shift ``‖σ(W+) − σ(W0)‖₂ / ‖σ(W0)‖₂`` over all singular values (§1.3).

    >>> spectral_drift(torch.diag(torch.tensor([3.0, 4.0])), torch.diag(torch.tensor([3.0, 4.5])))
    0.1

    Args:
        base: W0 [out, in] (tensor/array) or a checkpoint source (then the engine's report is returned).
        ft: W+ [out, in].

    Returns:
        float ≥ 0, best (no drift) 0; ≤ ‖ΔW‖_F/‖W0‖_F (Mirsky). Reported: about 1e-3 (SFT), 1e-4 (OPD),
        1e-5 (RLVR). Computed from the update in W0's float64 eigenbasis (``linalg.pairwise``; float32
        SVD inflates NSS of near-identical matrices), measured error ≤ 1e-5 relative (docs/numerics.md);
        ill-conditioned matrices fall back to the policy's float64 values (``linalg.svd``).
        A zero base gives ``inf`` (0 when ft is zero too).
    """
    if wants_dispatch(base, ft):
        return dispatch_compare(base, ft, ["spectral_drift"])
    b, f = same_compute_dtype(*check_pair(base, ft, matrix=True, what="spectral_drift"))
    return float(pair_geometry(b, f, sides=()).nss)


def stable_rank(delta: Any) -> float:
    """Stable rank ``‖Δ‖_F² / ‖Δ‖₂²`` of one matrix, typically an update ΔW = W+ − W0 (notes §2).

    >>> stable_rank(torch.diag(torch.tensor([2.0, 2.0, 1.0])))
    2.25

    Args:
        delta: Δ [out, in] (tensor/array), floating, finite. Compute it as ``ft.float() - base.float()``:
            a bf16 difference rounds.

    Returns:
        float in [1, rank(Δ)]; a smooth lower bound of the rank (low = concentrated in few directions).
        The zero matrix gives 0.0 (our choice: no update has no rank). Paper: OPD flat at about 18–29.
    """
    d = as_tensor(delta, "delta")
    if d.ndim != 2:
        raise WeightgeoError(
            f"stable_rank: SVD metrics need matrices [out, in], got shape {tuple(d.shape)}; pass a 2-D update"
        )
    if d.numel() == 0:
        raise WeightgeoError(f"stable_rank: empty matrix (shape {tuple(d.shape)}); nothing to measure")
    check_finite(d, "delta")
    return _stable_rank(d.to(compute_dtype(d.dtype)))[0]


def _stable_rank(delta: torch.Tensor) -> tuple[float, float]:
    """(stable rank, ‖Δ‖_F) of a validated matrix in its compute dtype.

    ‖Δ‖_F² is summed in float64 (row blocks); ‖Δ‖₂ = σ₁ is exact from the float64 ``eigvalsh`` of the
    small-side Gram (``linalg.svd.exact_spectral_norm``, ≤ 5e-9 relative).
    """
    fro_sq = frobenius_sq(delta)
    s1 = exact_spectral_norm(delta)
    return float(stable_rank_from_values(s1[..., None], fro_sq)), float(fro_sq.sqrt())
