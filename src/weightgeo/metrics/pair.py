"""The per-matrix kernel the engine calls for 2-D pairs: one base decomposition, one ΔW, shared.

W0 is decomposed once (:func:`weightgeo.linalg.pairwise.base_spectrum`: the policy's float64 Gram
``eigh``); that serves the principal angles, NSS (both from the pair's eigenproblem in W0's eigenbasis,
:mod:`weightgeo.linalg.pairwise`) and the localization's rank-r reconstruction. The small-side products of
ΔW = W+ − W0 (``A0ᵀΔ``, ``ΔᵀΔ``, ‖Δ‖_F²) come from one pass over row blocks and serve the pair geometry and
the stable rank; no whole-matrix float32 copy of W0, W+ or ΔW is made. Everything runs on a batch of
same-shape pairs (:func:`batched_pair_metrics`, the engine's shape groups), each member with its own
effective k. Accuracy: docs/numerics.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet

import torch

from ..defaults import ALPHA, ETA, PAIR_K, RANK, SIDE
from ..errors import WeightgeoError
from ..linalg.pairwise import (
    BaseSpectrum,
    PairEigen,
    PairSpectrum,
    Products,
    base_spectrum,
    effective_k,
    pair_angles,
    pair_eigen,
    pair_products,
    pair_spectrum,
    products,
    spectral_gap,
    tall_like,
)
from ..linalg.policy import same_compute_dtype
from ..linalg.spectra import stable_rank_from_values
from ..linalg.svd import tall_orientation
from ..validation import check_eta, check_k, check_pair, check_rank_alpha, check_side
from .catalog import ALL_METRICS, PAIR_METRICS
from .localization import localize

__all__ = ["PAIR_METRICS", "ALL_METRICS", "matrix_pair_metrics", "batched_pair_metrics", "PairRow"]

#: the metric values of one matrix: numbers, and the angle vector ``principal_angles`` when asked for
PairRow = dict[str, float | list[float]]


def matrix_pair_metrics(
    w0: torch.Tensor,
    w1: torch.Tensor,
    *,
    metrics: AbstractSet[str],
    k: int = PAIR_K,
    side: str = SIDE,
    rank: int = RANK,
    alpha: float = ALPHA,
    eta: float = ETA,
    angles: bool = False,
) -> PairRow:
    """All requested SVD-family metrics of one [out, in] pair, sharing the decompositions.

    >>> W0 = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    >>> out = matrix_pair_metrics(W0, W0, metrics=frozenset({"principal_overlap", "spectral_drift"}), k=2)
    >>> out["principal_overlap"], out["spectral_drift"], out["k_effective"], out["spectral_gap"]
    (1.0, 0.0, 2.0, 2.0)

    Args:
        w0: W0 [out, in], floating (bf16/fp16/fp32/fp64), finite.
        w1: W+ [out, in].
        metrics: subset of :data:`PAIR_METRICS` ("update_sparsity" is accepted and ignored: the engine
            computes it in row chunks with ``sparsity.unchanged_count``).
        k, side: principal-angle options (§1.2); rank, alpha, eta: localization options (§1.4).
        angles: also return the angle vector as ``principal_angles`` (a list of degrees, ascending, length
            ``k_effective``) with the "principal_overlap" family.

    Returns:
        ``{name: float}``. "principal_overlap" → ``principal_overlap`` (mean cos², [0, 1]),
        ``max_principal_angle`` and ``mean_principal_angle`` (degrees), ``k_effective``, ``spectral_gap``
        (σ_k/σ_{k+1} of W0, inf when k = min(out, in)); "spectral_drift" → ``spectral_drift`` (NSS);
        "update_localization" → ``density``, ``principal_mask_overlap``, ``low_magnitude_overlap``;
        "stable_rank" → ``stable_rank`` and ``delta_frobenius`` of ΔW = W+ − W0 (fp32; fp64 for fp64).
        A zero W0 or W+ gives NaN angle statistics with ``k_effective`` 0 (and an empty angle vector).
    """
    wanted = set(metrics)
    unknown = wanted - set(ALL_METRICS)
    if unknown:
        raise WeightgeoError(f"unknown metric(s) {sorted(unknown)}; known: {list(ALL_METRICS)}")
    k = check_k(k)
    check_side(side)
    rank, alpha = check_rank_alpha(rank, alpha)
    eta = check_eta(eta)
    b, f = same_compute_dtype(*check_pair(w0, w1, matrix=True, what="matrix_pair_metrics"))
    return batched_pair_metrics(
        b[None], f[None], metrics=frozenset(wanted), k=k, side=side, rank=rank, alpha=alpha, eta=eta, angles=angles
    )[0]


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
    angles: bool = False,
    update_rows: Sequence[Callable[[int, int], torch.Tensor] | None] | None = None,
) -> list[PairRow]:
    """:func:`matrix_pair_metrics` of a batch of same-shape pairs [B, out, in], one dict per pair.

    The engine's kernel for a shape group: one batched base decomposition, one row-block pass for the
    products, one batched eigenproblem. Inputs are trusted (finite, same compute dtype, options checked).
    Results equal the per-matrix ones: the ill-conditioned fallbacks are decided per member, and each
    member gets its own effective k (members that share one are done together; nothing is recomputed).
    ``base``: :func:`~weightgeo.linalg.pairwise.base_spectrum` of ``w0`` when the caller already has it
    (several fine-tunes of one base decompose it once). ``update_rows``: per member, ``None`` (the bf16 rule on
    the values) or a function giving the update mask of rows ``s:e`` (the FP8 rule on stored codes), used by
    the localization's update mask.
    """
    rot, drift, loc = "principal_overlap" in metrics, "spectral_drift" in metrics, "update_localization" in metrics
    srank = "stable_rank" in metrics
    out: list[PairRow] = [{} for _ in range(w0.shape[0])]
    if base is None and (rot or drift or loc):
        base = base_spectrum(w0)
    if rot or drift or srank:
        sides = (side,) if rot else ()
        if base is None:  # the stable rank alone needs ΔᵀΔ and ‖Δ‖_F², not the base's decomposition
            A1 = None
            prod = products(tall_orientation(w0)[0], tall_orientation(w1)[0], J=True, fro=True)
        else:
            A1 = tall_like(base, w1, "W1")
            prod = pair_products(base, A1, sides=sides, stable_rank=srank)
        if rot or drift:
            assert base is not None and A1 is not None
            eig = pair_eigen(base, prod, vectors=bool(sides))
            spec = pair_spectrum(base, A1, eig)
            if rot:
                _rotation_rows(out, base, prod, eig, spec, k=k, side=side, angles=angles)
            if drift:
                for i, row in enumerate(out):
                    row["spectral_drift"] = float(spec.spectral_drift[i])
            del eig, spec
        if srank:
            _stable_rank_rows(out, prod)
        del prod
    if loc:
        assert base is not None
        r = min(rank, *w0.shape[-2:])
        for i, row in enumerate(out):
            res = localize(
                w0[i],
                w1[i],
                base.V_c[i, :, :r],
                base.transposed,
                alpha=alpha,
                eta=eta,
                update_rows=None if update_rows is None else update_rows[i],
            )
            row.update(
                density=res.density,
                principal_mask_overlap=res.principal_mask_overlap,
                low_magnitude_overlap=res.low_magnitude_overlap,
            )
    return out


def _rotation_rows(
    out: list[PairRow],
    base: BaseSpectrum,
    prod: Products,
    eig: PairEigen,
    spec: PairSpectrum,
    *,
    k: int,
    side: str,
    angles: bool,
) -> None:
    """The angle statistics of every member at its own effective k (members sharing a k in one call)."""
    each = effective_k(k, base, spec)
    values = sorted({int(v) for v in each.tolist()})
    for kv in values:
        members = [i for i, v in enumerate(each.tolist()) if v == kv]
        if kv == 0:
            for i in members:
                out[i].update(
                    principal_overlap=math.nan,
                    max_principal_angle=math.nan,
                    mean_principal_angle=math.nan,
                    k_effective=0.0,
                    spectral_gap=math.nan,
                )
                if angles:
                    out[i]["principal_angles"] = []
            continue
        index = None if len(values) == 1 else torch.tensor(members)
        right, left = pair_angles(base, prod, eig, spec, kv, (side,), index=index)
        deg = right if side == "right" else left
        sigma0 = base.sigma if index is None else base.sigma[index.to(base.sigma.device)]
        gap = spectral_gap(sigma0, kv)
        assert deg is not None
        for j, i in enumerate(members):
            theta = torch.deg2rad(deg[j])
            out[i].update(
                principal_overlap=float((torch.cos(theta) ** 2).mean().clamp(0, 1)),
                max_principal_angle=float(deg[j].max()),
                mean_principal_angle=float(deg[j].mean()),
                k_effective=float(kv),
                spectral_gap=float(gap[j]),
            )
            if angles:
                out[i]["principal_angles"] = [float(a) for a in deg[j].tolist()]


def _stable_rank_rows(out: list[PairRow], prod: Products) -> None:
    """``stable_rank`` and ``delta_frobenius`` of every member's ΔW from ``J = ΔᵀΔ`` and ‖Δ‖_F²."""
    J, fro_sq = prod.J, prod.fro_sq
    assert J is not None and fro_sq is not None  # the products were asked for with the stable rank
    s1 = torch.linalg.eigvalsh(J.to(torch.float64))[..., -1].clamp_min(0).sqrt()
    sr = stable_rank_from_values(s1[..., None], fro_sq)
    for i, row in enumerate(out):
        row.update(stable_rank=float(sr[i]), delta_frobenius=float(fro_sq[i].sqrt()))
