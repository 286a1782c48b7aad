"""The per-matrix kernel the engine calls for 2-D pairs: every decomposition computed once, shared.

W0's decomposition serves the principal angles, NSS and the localization reconstruction; W+'s serves
the angles and NSS. Policy and accuracy: :mod:`weightgeo.linalg.svd`, docs/metrics.md.
"""

from __future__ import annotations

import math
from typing import AbstractSet

import torch

from ..errors import WeightgeoError
from ..linalg.spectra import spectral_shift
from ..linalg.svd import _check_side, compute_dtype, decompose
from ._inputs import check_pair
from .drift import _stable_rank
from .localization import _check_loc_args, _localization
from .rotation import _angles, _check_k
from .sparsity import _check_eta

__all__ = ["PAIR_METRICS", "ALL_METRICS", "matrix_pair_metrics"]

#: metrics computed per matrix by :func:`matrix_pair_metrics` (the engine chunks update_sparsity itself)
PAIR_METRICS: tuple[str, ...] = ("principal_overlap", "spectral_drift", "update_localization", "stable_rank")
#: every metric name the engine accepts
ALL_METRICS: tuple[str, ...] = ("update_sparsity",) + PAIR_METRICS


def matrix_pair_metrics(
    w0: torch.Tensor,
    w1: torch.Tensor,
    *,
    metrics: AbstractSet[str],
    k: int = 512,
    side: str = "right",
    rank: int = 64,
    alpha: float = 0.5,
    eta: float = 1e-3,
) -> dict[str, float]:
    """All requested SVD-family metrics of one [out, in] pair, sharing the decompositions.

    >>> W0 = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    >>> out = matrix_pair_metrics(W0, W0, metrics=frozenset({"principal_overlap", "spectral_drift"}), k=2)
    >>> out["principal_overlap"], out["spectral_drift"], out["k_effective"], out["spectral_gap"]
    (1.0, 0.0, 2.0, 2.0)

    Args:
        w0: W0 [out, in], floating (bf16/fp16/fp32/fp64), finite.
        w1: W+ [out, in].
        metrics: subset of :data:`PAIR_METRICS` ("update_sparsity" is accepted and ignored: the engine
            computes it in row chunks with ``sparsity._unchanged_count``).
        k, side: principal-angle options (§1.2); rank, alpha, eta: localization options (§1.4).

    Returns:
        ``{name: float}``. "principal_overlap" → ``principal_overlap`` (mean cos², [0, 1]),
        ``max_principal_angle`` and ``mean_principal_angle`` (degrees), ``k_effective``, ``spectral_gap``
        (σ_k/σ_{k+1} of W0, inf when k = min(out, in)); "spectral_drift" → ``spectral_drift`` (NSS);
        "update_localization" → ``density``, ``principal_mask_overlap``, ``low_magnitude_overlap``;
        "stable_rank" → ``stable_rank`` and ``delta_frobenius`` of ΔW = W+ − W0 (fp32; fp64 for fp64).
        A zero W0 or W+ gives NaN angle statistics with ``k_effective`` 0.
    """
    wanted = set(metrics)
    unknown = wanted - set(ALL_METRICS)
    if unknown:
        raise WeightgeoError(f"unknown metric(s) {sorted(unknown)}; known: {list(ALL_METRICS)}")
    k = _check_k(k)
    _check_side(side)
    rank, alpha = _check_loc_args(rank, alpha)
    eta = _check_eta(eta)
    b, f = check_pair(w0, w1, matrix=True, what="matrix_pair_metrics")
    rot, nss, loc = "principal_overlap" in wanted, "spectral_drift" in wanted, "update_localization" in wanted
    out: dict[str, float] = {}
    d0 = decompose(b, vectors=rot or loc) if (rot or nss or loc) else None
    d1 = decompose(f, vectors=rot) if (rot or nss) else None
    if rot:
        theta, k_eff = _angles(b, f, d0, d1, k, side)  # type: ignore[arg-type]
        deg = torch.rad2deg(theta)
        p = min(b.shape)
        if k_eff == 0:
            out.update(principal_overlap=math.nan, max_principal_angle=math.nan, mean_principal_angle=math.nan,
                       k_effective=0.0, spectral_gap=math.nan)
        else:
            s = d0.S  # type: ignore[union-attr]
            gap = math.inf if k_eff >= p or float(s[k_eff]) == 0 else float(s[k_eff - 1] / s[k_eff])
            out.update(
                principal_overlap=float((torch.cos(theta) ** 2).mean().clamp(0, 1)),
                max_principal_angle=float(deg.max()),
                mean_principal_angle=float(deg.mean()),
                k_effective=float(k_eff),
                spectral_gap=gap,
            )
    if nss:
        out["spectral_drift"] = float(spectral_shift(d0.S, d1.S))  # type: ignore[union-attr]
    if loc:
        res = _localization(b, f, d0, rank=rank, alpha=alpha, eta=eta)  # type: ignore[arg-type]
        out.update(density=res.density, principal_mask_overlap=res.principal_overlap,
                   low_magnitude_overlap=res.low_magnitude_overlap)
    if "stable_rank" in wanted:
        sr, fro = _stable_rank(f.to(compute_dtype(f.dtype)) - b.to(compute_dtype(b.dtype)))
        out.update(stable_rank=sr, delta_frobenius=fro)
    return out
