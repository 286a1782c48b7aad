"""The per-matrix kernel the engine calls for 2-D pairs: one base decomposition, one ΔW, shared.

W0 is decomposed once (:func:`weightgeo.linalg.pairwise.base_spectrum`: the policy's float64 Gram
``eigh``); that serves the principal angles, NSS (both from one :func:`~weightgeo.linalg.pairwise.pair_geometry`
in W0's eigenbasis) and the localization's rank-r reconstruction. ΔW = W+ − W0 is formed once in the
compute dtype and used by the pair geometry and the stable rank. Accuracy: docs/numerics.md.
"""

from __future__ import annotations

import math
from typing import AbstractSet

import torch

from ..errors import WeightgeoError
from ..linalg.pairwise import base_spectrum, pair_geometry
from ..linalg.svd import _check_side, compute_dtype
from ._inputs import check_pair, same_compute_dtype
from .drift import _stable_rank
from .localization import _check_loc_args, _localization
from .rotation import _angles_deg, _check_k
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
    b, f = same_compute_dtype(*check_pair(w0, w1, matrix=True, what="matrix_pair_metrics"))
    rot, nss, loc = "principal_overlap" in wanted, "spectral_drift" in wanted, "update_localization" in wanted
    srank = "stable_rank" in wanted
    out: dict[str, float] = {}
    base = base_spectrum(b) if (rot or nss or loc) else None
    # One ΔW in the compute dtype (exact for bf16 pairs), shared by the pair geometry and the stable rank.
    delta = f.to(compute_dtype(f.dtype)) - b.to(compute_dtype(b.dtype)) if (rot or nss or srank) else None
    if rot or nss:
        g = pair_geometry(None, f, k=k, sides=(side,) if rot else (), base=base, delta=delta)
        if rot:
            if g.k == 0:
                out.update(principal_overlap=math.nan, max_principal_angle=math.nan, mean_principal_angle=math.nan,
                           k_effective=0.0, spectral_gap=math.nan)
            else:
                deg = _angles_deg(g, side)
                theta = torch.deg2rad(deg)
                out.update(
                    principal_overlap=float((torch.cos(theta) ** 2).mean().clamp(0, 1)),
                    max_principal_angle=float(deg.max()),
                    mean_principal_angle=float(deg.mean()),
                    k_effective=float(g.k),
                    spectral_gap=float(g.gap),
                )
        if nss:
            out["spectral_drift"] = float(g.nss)
        del g
    if srank:
        sr, fro = _stable_rank(delta)  # type: ignore[arg-type]
        out.update(stable_rank=sr, delta_frobenius=fro)
    del delta  # localization's temporaries are the largest; do not hold ΔW alongside them
    if loc:
        res = _localization(b, f, base, rank=rank, alpha=alpha, eta=eta)  # type: ignore[arg-type]
        out.update(density=res.density, principal_mask_overlap=res.principal_overlap,
                   low_magnitude_overlap=res.low_magnitude_overlap)
    return out
