"""Spectral summaries from singular values: stable rank, spectral drift (NSS), Hill tail index."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..errors import WeightgeoError

__all__ = ["stable_rank_from_values", "spectral_drift_from_values", "hill_tail_index"]


def stable_rank_from_values(S: torch.Tensor, frobenius_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Stable rank ``‖A‖_F² / ‖A‖₂²`` from singular values (paper-notes §2); 0 for a zero matrix.

    >>> stable_rank_from_values(torch.tensor([2.0, 2.0, 0.0]))
    tensor(2.)

    Args:
        S: [..., p] singular values, descending (only ``S[..., 0]`` is used when ``frobenius_sq`` is given).
        frobenius_sq: [...] ``‖A‖_F²`` computed directly (more accurate than ``Σσᵢ²`` for tiny σ).

    Returns:
        [...] in [1, rank] (0 for the zero matrix, our choice: "no update, no rank").
    """
    fro = (S * S).sum(-1) if frobenius_sq is None else frobenius_sq.to(S.dtype)
    top = S[..., 0] ** 2
    return torch.where(top > 0, fro / torch.where(top > 0, top, torch.ones_like(top)), torch.zeros_like(top))


def spectral_drift_from_values(S0: torch.Tensor, S1: torch.Tensor) -> torch.Tensor:
    """Spectral drift ``‖σ₁ − σ₀‖₂ / ‖σ₀‖₂`` from singular values (the paper's NSS, paper-notes §1.3).

    >>> spectral_drift_from_values(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.5]))
    tensor(0.1000)

    Args:
        S0: [..., p] singular values of the base, descending.
        S1: [..., p] singular values of the fine-tuned matrix, descending.

    Returns:
        [...] ≥ 0, best (no drift) 0. A zero base gives ``inf`` (0 if both are zero): our choice.
    """
    if S0.shape != S1.shape:
        raise WeightgeoError(
            f"spectral_drift_from_values: singular-value vectors differ in shape: {tuple(S0.shape)} vs {tuple(S1.shape)}"
        )
    num = torch.linalg.vector_norm(S1 - S0, dim=-1)
    den = torch.linalg.vector_norm(S0, dim=-1)
    return torch.where(
        den > 0,
        num / torch.where(den > 0, den, torch.ones_like(den)),
        torch.where(num > 0, torch.full_like(num, float("inf")), torch.zeros_like(num)),
    )


def hill_tail_index(S: torch.Tensor, k: int = 10) -> torch.Tensor:
    """Hill estimator ``α̂ = [(1/(k−1)) Σ_{i<k} log(σᵢ/σ_k)]⁻¹`` over the top ``k`` singular values (§2).

    >>> hill_tail_index(torch.tensor([4.0, 2.0, 1.0, 0.5]), k=3)
    tensor(0.9618)

    Args:
        S: [..., p] singular values, descending.
        k: number of top values (≥ 2, ≤ p); default 10 is one reimplementation's choice (the paper is silent).

    Returns:
        [...] > 0; heavier tail = smaller α̂. ``inf`` when the top k values are all equal,
        ``nan`` when ``σ_k = 0``.
    """
    k = int(k)
    if k < 2 or k > S.shape[-1]:
        raise WeightgeoError(f"hill_tail_index: k must be in [2, {S.shape[-1]}] (number of singular values), got {k}")
    top = S[..., :k].to(torch.float64)
    sk = top[..., -1:]
    mean_log = torch.log(top[..., :-1] / sk).sum(-1) / (k - 1)
    return torch.where(sk[..., 0] > 0, 1.0 / mean_log, torch.full_like(mean_log, float("nan"))).to(S.dtype)


def __getattr__(name: str) -> Any:
    """Deprecated names (PEP 562): ``spectral_shift`` is :func:`spectral_drift_from_values` until 0.3."""
    if name == "spectral_shift":
        warnings.warn(
            "weightgeo.linalg.spectral_shift is deprecated: use spectral_drift_from_values (spectral drift has one "
            "name); the alias goes in weightgeo 0.3",
            DeprecationWarning,
            stacklevel=2,
        )
        return spectral_drift_from_values
    raise AttributeError(f"module {__package__!r} has no attribute {name!r}")  # linalg resolves through here
