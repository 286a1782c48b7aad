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
from typing import Any

import torch

from ..defaults import ALPHA, ETA, PAIR_K, RANK, SIDE
from ..errors import WeightgeoError
from ..linalg.hardware import Lanes, batch_lanes, over_lanes, row_lanes
from ..linalg.pairwise import (
    BaseSpectrum,
    PairEigen,
    PairSpectrum,
    Products,
    base_spectrum,
    effective_k,
    pair_angles,
    pair_eigen,
    pair_spectrum,
    products,
    side_products,
    spectral_gap,
)
from ..linalg.policy import same_compute_dtype
from ..linalg.spectra import stable_rank_from_values
from ..linalg.svd import symmetric_eigenvalues
from ..validation import check_eta, check_pair, check_rank_alpha, check_side, check_size, resolve_size
from .catalog import ALL_METRICS, PAIR_METRICS
from .localization import localize

__all__ = ["PAIR_METRICS", "ALL_METRICS", "SUBSPACE_KEYS", "matrix_pair_metrics", "batched_pair_metrics", "PairRow"]

#: the metric values of one matrix: numbers (``None`` where not measurable), the angle vector
#: ``principal_angles`` when asked for, and ``not_measurable`` ({metric: reason}) where some metric is not
PairRow = dict[str, Any]

#: the row keys of the principal_overlap family that say nothing when k reaches the smaller side
SUBSPACE_KEYS = ("principal_overlap", "max_principal_angle", "mean_principal_angle", "spectral_gap")


def matrix_pair_metrics(
    w0: torch.Tensor,
    w1: torch.Tensor,
    *,
    metrics: AbstractSet[str],
    k: int | float = PAIR_K,
    side: str = SIDE,
    rank: int | float = RANK,
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
        k, side: principal-angle options (§1.2); rank, alpha, eta: localization options (§1.4). ``k`` and ``rank``
            are counts, or fractions in (0, 1) of the matrix's smaller side (``k=0.125``: an eighth of it).
        angles: also return the angle vector as ``principal_angles`` (a list of degrees, ascending, length
            ``k_effective``) with the "principal_overlap" family.

    Returns:
        ``{name: float}``. "principal_overlap" → ``principal_overlap`` (mean cos², [0, 1]),
        ``max_principal_angle`` and ``mean_principal_angle`` (degrees), ``k_effective``, ``spectral_gap``
        (σ_k/σ_{k+1} of W0, inf when k = min(out, in)); "spectral_drift" → ``spectral_drift`` (NSS);
        "update_localization" → ``density``, ``principal_mask_overlap``, ``low_magnitude_overlap``;
        "stable_rank" → ``stable_rank`` and ``delta_frobenius`` of ΔW = W+ − W0 (fp32; fp64 for fp64).
        A zero W0 or W+ gives NaN angle statistics with ``k_effective`` 0 (and an empty angle vector).
        Where k reaches the smaller side min(out, in), the top-k subspace is the whole space: the angle
        statistics and the gap are ``None`` (not measurable, not 0° / 1.0 / inf), as is
        ``principal_mask_overlap`` where the rank does (the reconstruction is W0 itself); ``not_measurable``
        then maps each such key to the reason.
    """
    wanted = set(metrics)
    unknown = wanted - set(ALL_METRICS)
    if unknown:
        raise WeightgeoError(f"unknown metric(s) {sorted(unknown)}; known: {list(ALL_METRICS)}")
    k = check_size(k)
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
    k: int | float,
    side: str,
    rank: int | float,
    alpha: float,
    eta: float,
    base: BaseSpectrum | Callable[[], BaseSpectrum | None] | None = None,
    angles: bool = False,
    update_rows: Sequence[Callable[[int, int], torch.Tensor] | None] | None = None,
    base_ready: Callable[[], object] | None = None,
) -> list[PairRow]:
    """:func:`matrix_pair_metrics` of a batch of same-shape pairs [B, out, in], one dict per pair.

    The engine's kernel for a shape group: one batched base decomposition, one row-block pass for the
    products, one batched eigenproblem. Inputs are trusted (finite, same compute dtype, options checked).
    Results equal the per-matrix ones: the ill-conditioned fallbacks are decided per member, and each
    member gets its own effective k (members that share one are done together; nothing is recomputed).
    ``base``: :func:`~weightgeo.linalg.pairwise.base_spectrum` of ``w0`` when the caller already has it
    (several fine-tunes of one base decompose it once), or a function that makes it (called once, in the second
    lane, beside the products: the engine's shared, possibly cached, base). ``update_rows``: per member, ``None`` (the bf16 rule on
    the values) or a function giving the update mask of rows ``s:e`` (the FP8 rule on stored codes), used by
    the localization's update mask. ``base_ready``: called once the base's decomposition is done and the
    localization started (the engine then starts the next group's base in the second lane, beside this pair's
    eigenproblem).
    """
    rot, drift, loc = "principal_overlap" in metrics, "spectral_drift" in metrics, "update_localization" in metrics
    srank = "stable_rank" in metrics
    count = w0.shape[0]
    if batch_lanes(count, w0.device) > 1:
        # Two lanes and several members: each lane takes half of the members through every step (the base first,
        # itself in halves), instead of the chain of steps of every member split across the lanes, where one lane
        # waits for the other's results (0.5B pair: 9 s of 69 s). One member keeps the chain.
        whole: BaseSpectrum | None = None
        if rot or drift or loc:
            whole = base() if callable(base) else base
            whole = whole if whole is not None else base_spectrum(w0)
        if base_ready is not None:
            base_ready()

        def half(s: int, e: int) -> list[PairRow]:
            return batched_pair_metrics(
                w0[s:e],
                w1[s:e],
                metrics=metrics,
                k=k,
                side=side,
                rank=rank,
                alpha=alpha,
                eta=eta,
                base=None if whole is None else whole.select(slice(s, e)),
                angles=angles,
                update_rows=None if update_rows is None else update_rows[s:e],
            )

        return [row for part in over_lanes(half, count, w0.device) for row in part]
    out: list[PairRow] = [{} for _ in range(count)]
    m, n = w0.shape[-2:]
    p = min(m, n)
    k_abs, r_abs = resolve_size(k, p), resolve_size(rank, p)
    transposed = m < n
    A0, A1 = (w0.mT, w1.mT) if transposed else (w0, w1)  # tall, as the base orients them
    # Two lanes (linalg.hardware.Lanes): the base's decomposition (and then the next group's) in the second; the
    # fine-tune's products, the pair eigenproblem and the angles in the first; the stable rank's eigenvalue and the
    # localization in whichever lane gets to them first.
    with Lanes(w0.device) as lanes:
        make = base if callable(base) else (lambda: base_spectrum(w0)) if base is None else None
        # A member of several row blocks (a vocabulary matrix, alone in its shape group) has a better split than the
        # chain: each of its row passes (the products, then the base's Gram) runs on both lanes, one half of the
        # rows each (policy.span_halves); the chain left the second lane idle ~200 of ~400 s on an 8B lm_head.
        rows_split = row_lanes(A0.shape[-2], A0.shape[-1], w0.device) > 1
        needs_base = make is not None and (rot or drift or loc)
        base_job = lanes.submit(make) if make is not None and needs_base and not rows_split else None
        prod, rank_job = None, None
        sides = (side,) if rot else ()
        if rot or drift:
            prod = side_products(A0, A1, transposed=transposed, sides=sides, stable_rank=srank)
        elif srank:  # the stable rank alone needs ΔᵀΔ and ‖Δ‖_F², not the base's decomposition
            prod = products(A0, A1, J=True, fro=True)
        if base_job is not None:
            base = base_job.result() or base_spectrum(w0)
        elif needs_base:  # the rows' halves: the base after the products, in this lane, its Gram on both
            assert make is not None
            base = make() or base_spectrum(w0)
        elif callable(base):  # no metric here needs the base
            base = None
        # The next group's base goes to the second lane first (it is what the first lane will wait for next); the
        # stable rank's eigvalsh and the localization queue behind it, and the first lane takes back whichever has
        # not started when it gets to them. Queued before the hook, they kept the 8B layer's first lane waiting
        # 73 of 189 s for bases.
        if base_ready is not None:
            base_ready()
        if srank:
            assert prod is not None
            rank_job = lanes.submit(_stable_ranks, prod)
        loc_job = None
        if loc:
            assert isinstance(base, BaseSpectrum)
            loc_job = lanes.submit(_localization_rows, w0, w1, base, rank=r_abs, alpha=alpha, eta=eta, rows=update_rows)
        if rot or drift:
            assert isinstance(base, BaseSpectrum) and prod is not None
            eig = pair_eigen(base, prod, vectors=bool(sides) and k_abs < p, k=k_abs)
            spec = pair_spectrum(base, A1, eig)
            if rot and k_abs >= p:
                _whole_space_rows(out, effective_k(k_abs, base, spec), k=k_abs, shape=(m, n), angles=angles)
            elif rot:
                _rotation_rows(out, base, prod, eig, spec, k=k_abs, side=side, angles=angles)
            if drift:
                for i, row in enumerate(out):
                    row["spectral_drift"] = float(spec.spectral_drift[i])
            del eig, spec
        del prod
        if rank_job is not None:
            ranks = lanes.take(rank_job)
            for row, extra in zip(out, ranks):
                row.update(extra)
        if loc_job is not None:
            found = lanes.take(loc_job)
            for row, res in zip(out, found):
                row.update(
                    density=res.density,
                    principal_mask_overlap=res.principal_mask_overlap,
                    low_magnitude_overlap=res.low_magnitude_overlap,
                )
                if r_abs >= p:
                    row["principal_mask_overlap"] = None
                    row.setdefault("not_measurable", {})["principal_mask_overlap"] = (
                        f"rank {r_abs} ≥ {p}, the smaller side of {m}x{n}: the rank-r reconstruction is W0 itself, "
                        f"so the principal mask is the top of |W0|, the complement of the low-magnitude mask"
                    )
    return out


def _localization_rows(
    w0: torch.Tensor,
    w1: torch.Tensor,
    base: BaseSpectrum,
    *,
    rank: int,
    alpha: float,
    eta: float,
    rows: Sequence[Callable[[int, int], torch.Tensor] | None] | None,
) -> list:
    """The localization of every member (its own lane: it needs only the base's vectors and the inputs)."""
    r = min(rank, *w0.shape[-2:])
    return [
        localize(
            w0[i],
            w1[i],
            base.V_c[i, :, :r],
            base.transposed,
            alpha=alpha,
            eta=eta,
            update_rows=None if rows is None else rows[i],
        )
        for i in range(w0.shape[0])
    ]


def _whole_space_rows(out: list[PairRow], each: torch.Tensor, *, k: int, shape: tuple[int, int], angles: bool) -> None:
    """The rotation keys of members whose top-k subspace is the whole space (k ≥ min(out, in)): not measurable."""
    p = min(shape)
    why = (
        f"k {k} ≥ {p}, the smaller side of {shape[0]}x{shape[1]}: the top-k subspace holds every singular direction "
        f"(there is no σ_k+1), so it is no principal subspace (on the smaller side the angles are 0° whatever the "
        f"update)"
    )
    keys = SUBSPACE_KEYS + (("principal_angles",) if angles else ())
    for i, row in enumerate(out):
        row.update(dict.fromkeys(keys), k_effective=float(each[i]))
        row.setdefault("not_measurable", {}).update(dict.fromkeys(keys, why))


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


def _stable_ranks(prod: Products) -> list[dict[str, float]]:
    """``stable_rank`` and ``delta_frobenius`` of every member's ΔW from ``J = ΔᵀΔ`` and ‖Δ‖_F² (the second
    lane's job: it returns the rows' values instead of writing them)."""
    J, fro_sq = prod.J, prod.fro_sq
    assert J is not None and fro_sq is not None  # the products were asked for with the stable rank
    s1 = symmetric_eigenvalues(J.to(torch.float64))[..., -1].clamp_min(0).sqrt()
    sr = stable_rank_from_values(s1[..., None], fro_sq)
    fro = fro_sq.sqrt()
    return [{"stable_rank": float(sr[i]), "delta_frobenius": float(fro[i])} for i in range(sr.shape[0])]
