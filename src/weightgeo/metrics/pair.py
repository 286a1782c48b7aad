"""The per-matrix kernel the engine calls for 2-D pairs: one base decomposition, one ΔW, shared.

W0 is decomposed once (:func:`weightgeo.linalg.pairwise.base_spectrum`: the policy's float64 Gram
``eigh``); that serves the principal angles, NSS (both from one :func:`~weightgeo.linalg.pairwise.pair_geometry`
in W0's eigenbasis) and the localization's rank-r reconstruction. The small-side products of ΔW = W+ − W0
(``A0ᵀΔ``, ``ΔᵀΔ``, ‖Δ‖_F²) come from one pass over row blocks and serve the pair geometry and the stable
rank; no whole-matrix float32 copy of W0, W+ or ΔW is made. Everything runs on a batch of same-shape pairs
(:func:`batched_pair_metrics`, the engine's shape groups). Accuracy: docs/numerics.md.
"""

from __future__ import annotations

import math
from typing import AbstractSet

import torch

from ..errors import WeightgeoError
from ..linalg.pairwise import (BaseSpectrum, PairGeometry, _pair_geometry, _products, _tall_like, base_spectrum,
                               pair_products)
from ..linalg.spectra import stable_rank_from_values
from ..linalg.svd import _check_side, _small_side_rows
from ._inputs import check_pair, same_compute_dtype
from .localization import _check_loc_args, _localization
from .rotation import _angles_deg, _check_k
from .sparsity import _check_eta

__all__ = ["PAIR_METRICS", "ALL_METRICS", "matrix_pair_metrics", "batched_pair_metrics"]

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
    return batched_pair_metrics(b[None], f[None], metrics=frozenset(wanted), k=k, side=side, rank=rank,
                                alpha=alpha, eta=eta)[0]


def batched_pair_metrics(
    w0: torch.Tensor,
    w1: torch.Tensor,
    *,
    metrics: AbstractSet[str],
    k: int,
    side: str,
    rank: int,
    alpha: float,
    eta: float,
    base: BaseSpectrum | None = None,
) -> list[dict[str, float]]:
    """:func:`matrix_pair_metrics` of a batch of same-shape pairs [B, out, in], one dict per pair.

    The engine's kernel for a shape group: one batched base decomposition, one row-block pass for the
    products, one batched eigenproblem. Inputs are trusted (finite, same compute dtype, options checked).
    Results equal the per-matrix ones: the ill-conditioned fallbacks are decided per member, and where one
    member's effective k differs from the batch's (a rank-deficient matrix) the group is done per matrix.
    ``base``: :func:`~weightgeo.linalg.pairwise.base_spectrum` of ``w0`` when the caller already has it
    (several fine-tunes of one base decompose it once).
    """
    B = w0.shape[0]
    rot, nss, loc = "principal_overlap" in metrics, "spectral_drift" in metrics, "update_localization" in metrics
    srank = "stable_rank" in metrics
    out: list[dict[str, float]] = [{} for _ in range(B)]
    if base is None and (rot or nss or loc):
        base = base_spectrum(w0)
    if rot or nss or srank:
        sides = (side,) if rot else ()
        if base is None:  # the stable rank alone needs ΔᵀΔ and ‖Δ‖_F², not the base's decomposition
            (A0, _), (A1, _) = _small_side_rows(w0), _small_side_rows(w1)
            prod = _products(A0, A1, None, J=True, fro=True)
        else:
            A1 = _tall_like(base, w1, "W1")
            prod = pair_products(base, A1, sides=sides, stable_rank=srank)
        if rot or nss:
            g = _pair_geometry(base, A1, prod, k=k, sides=sides)  # type: ignore[arg-type]
            if B > 1 and _k_varies(g, k):
                return [batched_pair_metrics(w0[i:i + 1], w1[i:i + 1], metrics=metrics, k=k, side=side, rank=rank,
                                             alpha=alpha, eta=eta, base=base.select([i]))[0]  # type: ignore[union-attr]
                        for i in range(B)]
            for i, row in enumerate(out):
                if rot:
                    row.update(_rotation_stats(g, side, i))
                if nss:
                    row["spectral_drift"] = float(g.nss[i])
            del g
        if srank:
            s1 = torch.linalg.eigvalsh(prod.J.to(torch.float64))[..., -1].clamp_min(0).sqrt()  # type: ignore[union-attr]
            sr = stable_rank_from_values(s1[..., None], prod.fro_sq)
            for i, row in enumerate(out):
                row.update(stable_rank=float(sr[i]), delta_frobenius=float(prod.fro_sq[i].sqrt()))  # type: ignore[index]
        del prod
    if loc:
        r = min(rank, *w0.shape[-2:])
        for i, row in enumerate(out):
            res = _localization(w0[i], w1[i], base.V_c[i, :, :r], base.transposed,  # type: ignore[union-attr]
                                alpha=alpha, eta=eta)
            row.update(density=res.density, principal_mask_overlap=res.principal_overlap,
                       low_magnitude_overlap=res.low_magnitude_overlap)
    return out


def _k_varies(g: PairGeometry, k: int) -> bool:
    """True when some member alone would get a larger effective k than the batch's minimum."""
    n = g.sigma0.shape[-1]
    each = torch.minimum(torch.minimum(g.rank0, g.rank1), torch.tensor(min(k, n)))  # type: ignore[arg-type]
    return bool((each != g.k).any())


def _rotation_stats(g: PairGeometry, side: str, i: int) -> dict[str, float]:
    if g.k == 0:
        return dict(principal_overlap=math.nan, max_principal_angle=math.nan, mean_principal_angle=math.nan,
                    k_effective=0.0, spectral_gap=math.nan)
    deg = _angles_deg(g, side)[i]
    theta = torch.deg2rad(deg)
    return dict(
        principal_overlap=float((torch.cos(theta) ** 2).mean().clamp(0, 1)),
        max_principal_angle=float(deg.max()),
        mean_principal_angle=float(deg.mean()),
        k_effective=float(g.k),
        spectral_gap=float(g.gap[i]),
    )
