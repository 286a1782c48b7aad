"""Pair geometry of a base W0 and a fine-tuned W1 = W0 + ΔW in W0's eigenbasis (paper-notes §1.2–§1.3).

Method ("base-relative Gram", docs/numerics.md):

Orient every matrix tall (``A = W`` if ``m ≥ n`` else ``Wᵀ``; ``n = p = min(m, n)`` is the small side).

1. Base, once per W0 (:class:`BaseSpectrum`, reusable across fine-tunes and checkpoints): the policy's
   :func:`~weightgeo.linalg.svd.decompose`, i.e. ``G0 = A0ᵀA0`` formed in float64 (row blocks upcast
   one at a time) and ``G0 = V Λ0 Vᵀ`` by ``eigh`` in float64.
2. Pair: ``D = A1ᵀA1 − A0ᵀA0 = ½[(A0+A1)ᵀΔ + Δᵀ(A0+A1)]`` from ``Δ = A1 − A0`` (exact for bf16 pairs),
   summed over row blocks in the compute dtype, so it is accurate relative to ``‖Δ‖``, not to ``‖A‖``; then
   ``F = VᵀDV`` (two n×n GEMMs, float32) and ``M1 = Λ0 + F`` in float64. ``M1`` is W1's Gram in W0's
   eigenbasis: ``M1 = Q diag(μ) Qᵀ`` in float64 gives σ(W1) = √μ and W1's small-side singular
   vectors ``V Q``; every μ is computed, but only the top-k columns of Q, the ones the angles read
   (:func:`~weightgeo.linalg.eigen.top_eigh`).
3. NSS from ``σ1ᵢ − σ0ᵢ = (μᵢ − λ0ᵢ)/(√μᵢ + √λ0ᵢ)`` (no subtraction of rounded singular values).
4. Small-side angles: W0's top-k subspace is ``span(e_1..e_k)`` in this basis, so the sines are the
   singular values of the off-diagonal block ``Q[k:, :k]`` (no arccos, no product of two bases).
5. Big-side angles (left of a tall matrix, right of a wide one): with ``C = VᵀA0ᵀΔV``,
   ``U0ᵀU1_k = (Σ0 + Σ0⁻¹C) Q_k Σ1_k⁻¹`` and ``(I − U0U0ᵀ)U1_k = (I − U0U0ᵀ)ΔVQ_kΣ1_k⁻¹``; the sines² are
   the eigenvalues (float64) of ``X_{k:}ᵀX_{k:} + Σ1_k⁻¹Q_kᵀ H Q_kΣ1_k⁻¹`` with
   ``H = VᵀΔᵀΔV − CᵀΛ0⁻¹C`` (zero for a square full-rank W0, then skipped).

Why not float32 eigen/SVD solvers: their error is ``eps32·‖G‖`` (or ``eps32·‖W‖``) in absolute terms,
which swamps the tail shifts of near-identical pairs (NSS off by up to 3×, angles at k=512 of 896 off
by up to 170× the tolerance, docs/numerics.md); the base-relative float64 small problem is exact to
float64 while all O(m·n²) work stays in the inputs' precision.

Error bound (measured, docs/numerics.md): angles within ``1e-4·(2 % + 0.005°)`` of float64 NumPy,
NSS within 5e-6 relative, on all Qwen2.5-0.5B-shaped cases incl. σ_k/σ_{k+1} = 1.001. What limits
it is the float32 rounding of ``D`` and ``F`` (relative ``~√m·eps32`` of ``‖D‖`` and ``‖F‖``),
i.e. the same order as perturbing the inputs by one float32 ulp, which the float64 problem itself
amplifies to ≤ 4 % of the tolerance (the problem's own conditioning).

Fallback: float64 inputs run every step in float64 (then it is the float64 Gram method). Singular
directions beyond the numerical rank (``max(m, n)·eps·σ₁``, eps of the input's compute dtype) are
arbitrary, so ``k`` is capped there, as in :mod:`weightgeo.metrics.rotation`.

Memory: W0 and W1 stay in their stored dtype; the products ``(A0+A1)ᵀΔ``, ``A0ᵀΔ``, ``ΔᵀΔ`` and ‖Δ‖_F² are
summed over the policy's row blocks (:func:`~weightgeo.linalg.policy.batch_row_blocks`, upcast one at a time,
:func:`products`), so no whole-matrix float32 copy of W0, W1 or ΔW is made (a 151936×896 embedding pair peaks
at its bf16 inputs plus O(block)).

Steps (each a function with a typed result): :func:`products` (row-block pass) → :func:`pair_eigen` (W1's Gram
in W0's eigenbasis) → :func:`pair_spectrum` (σ(W1), its numerical rank, NSS, per-member fallback) →
:func:`pair_angles` (at one effective k, for all members or a subset). :func:`pair_geometry` chains them;
the engine's batched kernel calls them directly so that every member of a batch gets its own effective k.

Everything is batched over leading dimensions, device-agnostic, torch only.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from ..defaults import PAIR_K, SIDE
from ..errors import WeightgeoError
from ..validation import check_matrix, check_sides, check_size, resolve_size
from .eigen import top_eigh
from .hardware import batch_lanes, eigh_lapack, over_halves, over_lanes, tridiagonal_route
from .policy import REFINE_BELOW, batch_row_blocks, compute_dtype, compute_eps, numerical_rank
from .spectra import spectral_drift_from_values
from .svd import Decomposition, add_gram, congruence, decompose, mirror_upper, symmetric_eigenvalues

__all__ = [
    "BaseSpectrum",
    "PairGeometry",
    "Products",
    "PairEigen",
    "PairSpectrum",
    "base_spectrum",
    "restore_base_spectrum",
    "pair_geometry",
    "products",
    "pair_products",
    "side_products",
    "pair_eigen",
    "pair_spectrum",
    "effective_k",
    "pair_angles",
    "tall_like",
]


@dataclass(frozen=True)
class Products:
    """Small-side products of one pair, summed over row blocks of the tall orientation (compute dtype).

    ``P = (A0+A1)ᵀΔ``, ``C0 = A0ᵀΔ``, ``J = ΔᵀΔ`` ([..., n, n], each ``None`` unless asked for) and
    ``fro_sq = ‖Δ‖_F²`` ([...] float64).
    """

    P: torch.Tensor | None
    C0: torch.Tensor | None
    J: torch.Tensor | None
    fro_sq: torch.Tensor | None

    def D(self) -> torch.Tensor:
        """``A1ᵀA1 − A0ᵀA0``, symmetric, from whichever products were formed."""
        if self.P is not None:
            return 0.5 * (self.P + self.P.mT)
        assert self.C0 is not None and self.J is not None
        return self.C0 + self.C0.mT + self.J


def products(
    A0: torch.Tensor, A1: torch.Tensor, *, P: bool = False, C0: bool = False, J: bool = False, fro: bool = False
) -> Products:
    """One pass over row blocks of the tall ``A0``/``A1`` ([..., m, n], m ≥ n), upcasting one block at a time.

    Blocks hold at most the policy's ``ROW_BLOCK`` entries, so a 151936×896 embedding never gets a whole
    float32 copy of either side or of ΔW (the bf16 inputs are the only whole-matrix arrays). Every matrix is cut
    into the same row blocks whatever the batch size (:func:`~weightgeo.linalg.policy.batch_row_blocks`), so a
    member of a batch gets exactly the sums it gets alone; the blocks are summed in the policy's two halves
    (:func:`~weightgeo.linalg.policy.span_halves`), side by side where two lanes are free (a shape group of one
    member: :func:`~weightgeo.linalg.hardware.over_lanes`), with the same bits either way.

    >>> products(torch.eye(2), 2 * torch.eye(2), J=True, fro=True).fro_sq
    tensor(2., dtype=torch.float64)
    """
    cd = compute_dtype(A0.dtype)
    m, n = A0.shape[-2:]
    lead = A0.shape[:-2]
    X0, X1 = (X.reshape(math.prod(lead), m, n) for X in (A0, A1))  # views for [m, n] and [B, m, n]
    parts: dict[str, list[torch.Tensor]] = {}
    for b0, b1, spans in batch_row_blocks(X0.shape[0], m, n) if X0.shape[0] else [(0, 0, [(0, m)])]:
        sums = functools.partial(_span_sums, X0[b0:b1], X1[b0:b1], cd, (P, C0, J, fro))
        # the two halves of the rows side by side where two lanes are free (a shape group of one member)
        acc, *rest = over_halves(sums, spans, X0.device)
        for other in rest:
            for key, value in other.items():
                acc[key].add_(value)
        if "J" in acc:
            mirror_upper(acc["J"])
        for key, value in acc.items():
            parts.setdefault(key, []).append(value)
    out = {key: (v[0] if len(v) == 1 else torch.cat(v)).reshape((*lead, *v[0].shape[1:])) for key, v in parts.items()}
    return Products(out.get("P"), out.get("C0"), out.get("J"), out.get("fro"))


def _span_sums(
    X0: torch.Tensor,
    X1: torch.Tensor,
    cd: torch.dtype,
    which: tuple[bool, bool, bool, bool],
    spans: list[tuple[int, int]],
) -> dict[str, torch.Tensor]:
    """The products of :func:`products` (``which``: P, C0, J, fro) of ``X0``/``X1`` [B, m, n] over the row ``spans``,
    summed in order (``J`` on the panels on and above the diagonal only)."""
    P, C0, J, fro = which
    acc: dict[str, torch.Tensor] = {}
    n = X0.shape[-1]

    def add(key: str, value: torch.Tensor) -> None:
        acc[key] = value if key not in acc else acc[key].add_(value)

    for s, e in spans:
        a0 = X0[:, s:e].to(cd)
        d = X1[:, s:e].to(cd) - a0
        if P:
            add("P", (a0 + a0 + d).mT @ d)
        if C0:
            add("C0", a0.mT @ d)
        if J:  # symmetric: the panels on and above the diagonal only
            add_gram(acc.setdefault("J", d.new_zeros(X0.shape[0], n, n)), d)
        if fro:
            add("fro", torch.linalg.vector_norm(d, dim=(-2, -1), dtype=torch.float64).square())
    return acc


@dataclass(frozen=True)
class BaseSpectrum:
    """Reusable decomposition of the base W0 (build with :func:`base_spectrum`), shared by every pair metric.

    ``A`` is the base oriented tall ([..., m, n] with m ≥ n; a view of ``Wᵀ`` when ``transposed``), in
    the input's dtype (bf16 stays bf16: the kernels upcast row blocks, never the whole matrix).
    ``decomposition`` is :func:`weightgeo.linalg.svd.decompose` of W0 (float64 Gram ``eigh``; values refined by
    LAPACK when W0 is ill-conditioned), so ``decomposition.vectors`` are W0's small-side singular vectors,
    which also give the localization's rank-r reconstruction. ``V_c`` is that basis in the compute dtype (for
    the GEMMs).
    """

    A: torch.Tensor
    transposed: bool
    decomposition: Decomposition
    V_c: torch.Tensor

    @property
    def lam(self) -> torch.Tensor:
        """Eigenvalues σ0² of the small-side Gram that ``V_c`` diagonalises (float64, descending)."""
        lam = self.decomposition.gram_eigenvalues
        assert lam is not None  # a base is decomposed through its Gram, which keeps them
        return lam

    @property
    def eps(self) -> float:
        """Machine epsilon of the input's compute dtype (numerical-rank rule)."""
        return self.decomposition.eps

    @property
    def shape(self) -> tuple[int, int]:
        """The original (untransposed) matrix shape ``(m, n)``."""
        return self.decomposition.shape

    @property
    def sigma(self) -> torch.Tensor:
        """Singular values of W0 by the policy, float64, descending, [..., min(m, n)]."""
        return self.decomposition.S

    def rank(self) -> torch.Tensor:
        """Numerical rank ``#{σᵢ > max(m, n)·eps·σ₁}`` per matrix ([...] int64)."""
        return self.decomposition.rank()

    def select(self, index: torch.Tensor | Sequence[int] | slice) -> BaseSpectrum:
        """The members ``index`` of a batched base ([B, ...] -> [len(index), ...]), without recomputing (a ``slice``
        gives views, no copies)."""
        d = self.decomposition
        if isinstance(index, slice):

            def part(t: torch.Tensor) -> torch.Tensor:
                return t[index]

        else:
            idx = torch.as_tensor(index, dtype=torch.long, device=self.A.device)

            def part(t: torch.Tensor) -> torch.Tensor:
                return t[idx.to(t.device)]

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else part(t)

        dec = replace(
            d,
            S=part(d.S),
            vectors=pick(d.vectors),
            gram_eigenvalues=pick(d.gram_eigenvalues),
            refined_mask=pick(d.refined_mask),
        )
        return BaseSpectrum(part(self.A), self.transposed, dec, part(self.V_c))


def base_spectrum(W0: torch.Tensor) -> BaseSpectrum:
    """Decompose the base once (:func:`weightgeo.linalg.svd.decompose`: float64 Gram, ``eigh`` in float64).

    >>> b = base_spectrum(torch.diag(torch.tensor([3.0, 1.0])))
    >>> b.sigma
    tensor([3., 1.], dtype=torch.float64)

    Args:
        W0: [..., m, n] base weight (bf16/fp16/fp32/fp64, any device).

    Returns:
        a :class:`BaseSpectrum` to pass as ``base=`` to :func:`pair_geometry` for every fine-tune of W0.
    """
    A = check_matrix(W0, "W0", batched=True)
    if A.ndim == 3 and batch_lanes(A.shape[0], A.device) > 1:  # the members' halves side by side, one per lane
        return _joined(A, over_lanes(lambda s, e: _base_spectrum(A[s:e]), A.shape[0], A.device))
    return _base_spectrum(A)


def _base_spectrum(A: torch.Tensor) -> BaseSpectrum:
    dec = decompose(A, vectors=True)
    transposed = A.shape[-2] < A.shape[-1]
    if transposed:
        A = A.mT
    # V_c row-major, as restore_base_spectrum rebuilds it: eigh returns column-major vectors, and a GEMM's
    # rounding depends on its operands' layout, so a cached base must have the layout of a fresh one
    assert dec.vectors is not None  # asked for with vectors=True
    V_c = dec.vectors.to(compute_dtype(A.dtype)).contiguous()
    return BaseSpectrum(A, transposed, dec, V_c)


def _joined(A: torch.Tensor, parts: Sequence[BaseSpectrum]) -> BaseSpectrum:
    """One base of the stack ``A`` [B, m, n] from the bases of consecutive parts of it (their members in order)."""
    if len(parts) == 1:
        return parts[0]
    ds = [p.decomposition for p in parts]

    def cat(ts: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
        return None if any(t is None for t in ts) else torch.cat(ts)  # type: ignore[arg-type]

    masks = [
        d.refined_mask
        if d.refined_mask is not None
        else torch.zeros(d.S.shape[:-1], dtype=torch.bool, device=d.S.device)
        for d in ds
    ]
    dec = replace(
        ds[0],
        S=torch.cat([d.S for d in ds]),
        vectors=cat([d.vectors for d in ds]),
        gram_eigenvalues=cat([d.gram_eigenvalues for d in ds]),
        refined_mask=None if all(d.refined_mask is None for d in ds) else torch.cat(masks),
    )
    transposed = parts[0].transposed
    return BaseSpectrum(A.mT if transposed else A, transposed, dec, torch.cat([p.V_c for p in parts]))


def restore_base_spectrum(
    W0: torch.Tensor, *, S: torch.Tensor, lam: torch.Tensor, V_c: torch.Tensor, refined_mask: torch.Tensor | None = None
) -> BaseSpectrum:
    """A :class:`BaseSpectrum` of ``W0`` from the parts a result cache keeps (no decomposition is computed).

    ``S`` ([..., p] float64, the policy's values), ``lam`` (the Gram eigenvalues ``V_c`` diagonalises), ``V_c``
    ([..., p, p], the small-side basis in the compute dtype) and ``refined_mask`` ([...] bool or ``None``) are
    what every pair kernel reads; the float64 basis (``decomposition.vectors``) is not kept (``None``): the
    kernels use ``V_c``, which :func:`base_spectrum` derives from it.

    >>> W0 = torch.diag(torch.tensor([3.0, 1.0]))
    >>> b = base_spectrum(W0)
    >>> restore_base_spectrum(W0, S=b.sigma, lam=b.lam, V_c=b.V_c).sigma
    tensor([3., 1.], dtype=torch.float64)
    """
    A = check_matrix(W0, "W0", batched=True)
    m, n = A.shape[-2:]
    transposed = m < n
    dec = Decomposition(S, None, "left" if transposed else "right", (m, n), compute_eps(A.dtype), lam, refined_mask)
    return BaseSpectrum(A.mT if transposed else A, transposed, dec, V_c.contiguous())


@dataclass(frozen=True)
class PairGeometry:
    """Result of :func:`pair_geometry` (all float64 tensors, batched like the inputs).

    ``angles_right`` / ``angles_left``: [..., k] principal angles in degrees, ascending, between the
    top-``k`` singular subspaces of W0 and W1 (``None`` for a side not asked for). ``spectral_drift``: [...]
    ``‖σ(W1) − σ(W0)‖₂ / ‖σ(W0)‖₂`` (the paper's NSS; ``nss`` is its deprecated alias until 0.3). ``sigma0`` / ``sigma1``: [..., min(m, n)] descending.
    ``gap``: [...] ``σ_k(W0)/σ_{k+1}(W0)`` (``inf`` when k = min(m, n)); angles are reproducible only
    where it is clearly above 1. ``k``: the effective subspace dimension. ``rank0`` / ``rank1``: [...]
    numerical ranks of W0 and W1. ``fallback``: True when W0 or W1 was too ill-conditioned for the
    base-relative values and NSS came from the policy's per-matrix values instead (module docstring).
    """

    angles_right: torch.Tensor | None
    angles_left: torch.Tensor | None
    spectral_drift: torch.Tensor
    sigma0: torch.Tensor
    sigma1: torch.Tensor
    gap: torch.Tensor
    k: int
    rank0: torch.Tensor
    rank1: torch.Tensor
    fallback: bool = False

    @property
    def nss(self) -> torch.Tensor:
        """Deprecated alias of :attr:`spectral_drift` (one name for the quantity everywhere); removed in 0.3."""
        warnings.warn(
            "PairGeometry.nss is deprecated: use spectral_drift (the name of the metric and of the report rows); "
            "the alias goes in weightgeo 0.3",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.spectral_drift

    def overlap(self, side: str = SIDE) -> torch.Tensor:
        """Mean cos² of the angles on ``side`` ([...], in [0, 1]; 1 = same subspace)."""
        a = self.angles(side)
        return torch.cos(torch.deg2rad(a)).pow(2).mean(-1)

    def angles(self, side: str) -> torch.Tensor:
        """The angle vectors of ``side`` (degrees, ascending, [..., k]); an error if that side was not asked for."""
        a = self.angles_right if side == "right" else self.angles_left
        if a is None:
            raise WeightgeoError(f"pair_geometry was not asked for side {side!r}; pass sides=(..., {side!r})")
        return a


def pair_geometry(
    W0: torch.Tensor | None,
    W1: torch.Tensor,
    *,
    k: int | float = PAIR_K,
    sides: Sequence[str] = ("right",),
    base: BaseSpectrum | None = None,
) -> PairGeometry:
    """Principal angles between top-k singular subspaces and NSS of a near-identical pair, float64-accurate.

    >>> W0 = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    >>> g = pair_geometry(W0, W0, k=2)
    >>> g.angles_right, g.spectral_drift
    (tensor([0., 0.], dtype=torch.float64), tensor(0., dtype=torch.float64))

    Args:
        W0: [..., m, n] base weight; may be ``None`` when ``base`` is given (then ``base.A`` is used).
        W1: [..., m, n] fine-tuned weight (same shape). bf16/fp16 are upcast to float32, exactly.
        k: subspace dimension: a count, or a fraction in (0, 1) of min(m, n) (default 0.125, the paper's 512 of
            4096); capped at min(m, n) and at both numerical ranks (the minimum over the batch), reported as
            ``PairGeometry.k``.
        sides: any of "right" (V, input side) and "left" (U, output side); empty for NSS only (then
            the pair's eigenproblem is values-only).
        base: a :func:`base_spectrum` of W0, to reuse across several W1 (saves ~40 % per pair).

    Returns:
        a :class:`PairGeometry`. Method and measured error bound: module docstring and docs/numerics.md.
    """
    sides = check_sides(sides)
    size = check_size(k)
    if base is None:
        if W0 is None:
            raise WeightgeoError("pair_geometry: give W0 or base=base_spectrum(W0)")
        base = base_spectrum(W0)
    A1 = tall_like(base, check_matrix(W1, "W1", batched=True), "W1")
    prod = pair_products(base, A1, sides=sides)
    k_asked = resolve_size(size, min(base.shape))
    eig = pair_eigen(base, prod, vectors=bool(sides), k=k_asked)
    spec = pair_spectrum(base, A1, eig)
    k_eff = int(effective_k(k_asked, base, spec).min())
    right, left = pair_angles(base, prod, eig, spec, k_eff, sides)
    gap = spectral_gap(base.sigma, k_eff)
    return PairGeometry(
        right, left, spec.spectral_drift, base.sigma, spec.sigma1, gap, k_eff, base.rank(), spec.rank1, spec.fallback
    )


def tall_like(base: BaseSpectrum, W: torch.Tensor, what: str) -> torch.Tensor:
    """``W`` [..., out, in] oriented like ``base.A`` (a view), after checking its shape."""
    A = W.mT if base.transposed else W
    if A.shape != base.A.shape:
        shp = tuple(A.mT.shape if base.transposed else A.shape)
        raise WeightgeoError(f"pair_geometry: {what} has shape {shp}, the base has {base.shape}; they must match")
    return A


def _wants(base: BaseSpectrum, sides: tuple[str, ...]) -> tuple[bool, bool, bool]:
    """(small side asked, big side asked, big side needs the out-of-range complement term H)."""
    want_small = ("right" in sides and not base.transposed) or ("left" in sides and base.transposed)
    want_big = ("left" in sides and not base.transposed) or ("right" in sides and base.transposed)
    m, n = base.A.shape[-2:]
    complement = want_big and (m > n or bool((base.rank() < n).any()))
    return want_small, want_big, complement


def pair_products(
    base: BaseSpectrum, A1: torch.Tensor, *, sides: tuple[str, ...], stable_rank: bool = False
) -> Products:
    """The products the pair geometry of ``sides`` needs (plus ΔᵀΔ and ‖Δ‖_F² for the stable rank), in one
    row-block pass. ``A1`` is oriented like ``base.A``."""
    return side_products(base.A, A1, transposed=base.transposed, sides=sides, stable_rank=stable_rank)


def side_products(
    A0: torch.Tensor, A1: torch.Tensor, *, transposed: bool, sides: tuple[str, ...], stable_rank: bool = False
) -> Products:
    """:func:`pair_products` from the tall ``A0``, ``A1`` alone (``transposed``: they are views of ``Wᵀ``), so that
    it can run before or beside the base's decomposition: it needs none of it."""
    want_big = ("left" in sides and not transposed) or ("right" in sides and transposed)
    if want_big:
        # The big side needs C0 (and J for its complement term); D = C0 + C0ᵀ + J then needs no P.
        return products(A0, A1, C0=True, J=True, fro=stable_rank)
    # J is the Gram of ΔW: its top eigenvalue is σ₁(ΔW)² for the stable rank.
    return products(A0, A1, P=True, J=stable_rank, fro=stable_rank)


@dataclass(frozen=True)
class PairEigen:
    """W1's small-side Gram in W0's eigenbasis: ``M1 = Λ0 + F`` with ``F = VᵀDV`` (float64, symmetric),
    all its eigenvalues ``mu`` ([..., n], descending) and the eigenvectors of the top ones ``Q`` ([..., n, k]: as
    many as the angles were asked for; ``None`` when only values were asked for)."""

    F: torch.Tensor
    mu: torch.Tensor
    Q: torch.Tensor | None


def pair_eigen(base: BaseSpectrum, prod: Products, *, vectors: bool, k: int | None = None) -> PairEigen:
    """Rotate ``D = A1ᵀA1 − A0ᵀA0`` into W0's eigenbasis and solve W1's eigenproblem there (float64).

    ``vectors``: also the eigenvectors of the top ``k`` (every one when ``k`` is ``None``), the only ones the angles
    at ``k`` or below read (:func:`~weightgeo.linalg.eigen.top_eigh`: on a CPU it leaves the others uncomputed)."""
    D = prod.D()
    F = congruence(base.V_c, D).to(torch.float64)
    del D
    F = 0.5 * (F + F.mT)
    M1 = torch.diag_embed(base.lam) + F
    # top_eigh solves for −M1, which gives μ descending without reordering the basis: where M1 is (nearly)
    # diagonal, Q is (nearly) e_1..e_k even inside clusters of equal σ0, so W0 = W1 gives zero angles.
    if vectors:
        n = M1.shape[-1]
        dev = M1.device
        mu, Q = top_eigh(
            M1, n if k is None else min(int(k), n), lapack=eigh_lapack(dev), tridiagonal=tridiagonal_route(dev)
        )
        return PairEigen(F, mu, Q)
    return PairEigen(F, -symmetric_eigenvalues(-M1), None)


@dataclass(frozen=True)
class PairSpectrum:
    """σ(W1) ([..., p] float64, descending), its numerical rank and the spectral drift (NSS, [...]), per member;
    ``fallback``:
    whether some member took its values from the policy instead of the base-relative eigenproblem."""

    sigma1: torch.Tensor
    rank1: torch.Tensor
    spectral_drift: torch.Tensor
    fallback: bool


def pair_spectrum(base: BaseSpectrum, A1: torch.Tensor, eig: PairEigen) -> PairSpectrum:
    """NSS from ``σ1ᵢ − σ0ᵢ = (μᵢ − λ0ᵢ)/(√μᵢ + √λ0ᵢ)``, and the policy's values where that is not accurate.

    When the base-relative values cannot be trusted, W1's values come from the policy instead
    (:func:`~weightgeo.linalg.svd.decompose`) and NSS from the difference of the two policy spectra, decided per
    member of a batch (:func:`_untrusted`), so that each gets exactly what it would get alone.
    """
    lam, mu = base.lam, eig.mu
    s0, s1 = lam.clamp_min(0).sqrt(), mu.clamp_min(0).sqrt()
    den = s0 + s1
    ok_den = den > 0
    safe_den = torch.where(ok_den, den, torch.ones_like(den))
    ds = torch.where(ok_den, (mu - lam) / safe_den, torch.zeros_like(den))
    num = torch.linalg.vector_norm(ds, dim=-1)
    inv_den = torch.where(ok_den, 1.0 / safe_den, torch.zeros_like(den))
    need = _untrusted(base, eig, s1, num, inv_den)
    m, n = base.A.shape[-2:]
    sigma1, rank1 = s1, numerical_rank(s1, (m, n), eps=base.eps)
    nrm = torch.linalg.vector_norm(s0, dim=-1)
    drift = torch.where(
        nrm > 0,
        num / torch.where(nrm > 0, nrm, torch.ones_like(nrm)),
        torch.where(num > 0, torch.full_like(num, math.inf), torch.zeros_like(num)),
    )
    fallback = bool(need.any())
    if fallback:
        p = s1.shape[-1]
        which = need.reshape(-1)
        flat = A1.reshape(-1, *A1.shape[-2:])
        # every member: W1 itself (indexing with a mask copies it: 1.2 GB for a 151936×4096 vocabulary matrix)
        d1 = decompose(flat if bool(which.all()) else flat[which], vectors=False)
        sigma1, rank1, drift = sigma1.clone(), rank1.clone(), drift.clone()
        sigma1.reshape(-1, p)[which] = d1.S
        rank1.reshape(-1)[which] = d1.rank()
        drift.reshape(-1)[which] = spectral_drift_from_values(base.sigma.reshape(-1, p)[which], d1.S)
    return PairSpectrum(sigma1, rank1, drift, fallback)


def _untrusted(
    base: BaseSpectrum, eig: PairEigen, s1: torch.Tensor, num: torch.Tensor, inv_den: torch.Tensor
) -> torch.Tensor:
    """[...] bool: members whose base-relative values are not certified. Three triggers:

    1. W0 is ill-conditioned (the policy refined its values: σ_min < REFINE_BELOW·σ₁);
    2. W1's smallest eigenvalue is not resolved above the numerical-rank / conditioning threshold
       (μ is accurate only to about the rounding of F, relative to ‖D‖ in the compute dtype);
    3. the estimated rounding error of the NSS numerator, ~√(m/n)·eps·‖F‖_F·‖1/(σ0+σ1)‖ (random rounding,
       measured conservative by ~50×), exceeds 1e-3 of the numerator itself: pairs that are not near-identical
       but have (nearly) the same spectrum, e.g. two independent draws.
    """
    m, n = base.A.shape[-2:]
    mu = eig.mu
    fro_F = torch.linalg.matrix_norm(eig.F)
    err_mu = math.sqrt(m) * base.eps * fro_F + 64 * torch.finfo(torch.float64).eps * mu[..., 0].abs()
    floor = max(max(m, n) * base.eps, REFINE_BELOW) * s1[..., 0]
    err_num = math.sqrt(m / n) * base.eps * fro_F * torch.linalg.vector_norm(inv_den, dim=-1)
    need = (mu[..., -1] - err_mu <= floor * floor) | (err_num > 1e-3 * num)
    if base.decomposition.refined_mask is not None:
        need = need | base.decomposition.refined_mask
    return need


def effective_k(k: int, base: BaseSpectrum, spec: PairSpectrum) -> torch.Tensor:
    """Per member ([...] int64): ``min(k, n, rank(W0), rank(W1))``; directions beyond a rank are arbitrary."""
    n = base.A.shape[-1]
    # clamp_max, not a torch.tensor(k): that would be a CPU tensor beside CUDA ones.
    return torch.minimum(base.rank(), spec.rank1).clamp_max(min(int(k), n))


def spectral_gap(sigma0: torch.Tensor, k: int) -> torch.Tensor:
    """``σ_k/σ_{k+1}`` of W0 ([...] float64): ``inf`` when k = min(m, n), NaN-free ``σ₁·inf`` when k = 0."""
    if sigma0.shape[-1] > k:
        return sigma0[..., k - 1] / sigma0[..., k] if k > 0 else sigma0[..., 0] * math.inf
    return torch.full(sigma0.shape[:-1], math.inf, dtype=torch.float64, device=sigma0.device)


def pair_angles(
    base: BaseSpectrum,
    prod: Products,
    eig: PairEigen,
    spec: PairSpectrum,
    k: int,
    sides: tuple[str, ...],
    index: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(right, left)`` angles in degrees ([..., k], ascending; ``None`` for a side not asked for) at one
    effective ``k``, for every member or, with ``index``, for the members ``index`` of a batch [B, ...]."""
    if index is not None:
        base, prod, eig, spec = _members(base, prod, eig, spec, index)
    want_small, want_big, complement = _wants(base, sides)
    s0 = base.lam.clamp_min(0).sqrt()
    small = big = None
    if want_small:
        if k > 0 and eig.Q is None:
            raise WeightgeoError("pair_angles: the pair eigenproblem was solved without vectors; pass vectors=True")
        small = (
            torch.rad2deg(torch.arcsin(_sines_small(eig.Q, k).clamp(0, 1)))
            if k > 0 and eig.Q is not None
            else s0.new_zeros(*s0.shape[:-1], 0)
        )
    if want_big:
        rank0 = base.rank()
        in_rank = torch.arange(s0.shape[-1], device=s0.device) < rank0[..., None]
        big = (
            torch.rad2deg(
                _big_side_angles(s0, in_rank, eig.mu, eig.Q, base.V_c, prod.C0, prod.J if complement else None, k)
            )
            if k > 0
            else s0.new_zeros(*s0.shape[:-1], 0)
        )
    right, left = (big, small) if base.transposed else (small, big)
    return (right if "right" in sides else None), (left if "left" in sides else None)


def _members(base: BaseSpectrum, prod: Products, eig: PairEigen, spec: PairSpectrum, index: torch.Tensor):
    """The members ``index`` of every per-pair result (first dimension), for :func:`pair_angles`."""

    def take(t: torch.Tensor) -> torch.Tensor:
        return t[index.to(t.device)]

    def pick(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else take(t)

    return (
        base.select(index),
        Products(*(pick(t) for t in (prod.P, prod.C0, prod.J, prod.fro_sq))),
        PairEigen(take(eig.F), take(eig.mu), pick(eig.Q)),
        PairSpectrum(take(spec.sigma1), take(spec.rank1), take(spec.spectral_drift), spec.fallback),
    )


def _sines_small(Q: torch.Tensor, k: int) -> torch.Tensor:
    """Sines (ascending, length k) between span(e_1..e_k) and span(Q[:, :k]) for orthonormal columns Q [..., n, ≥k]
    (float64)."""
    n = Q.shape[-2]
    shape = Q.shape[:-2]
    if k >= n:
        return Q.new_zeros(*shape, k)
    # The sines are the singular values of the off-diagonal block B = Q[k:, :k]: their squares are the float64
    # eigenvalues of B's smaller Gram (‖B‖ ≤ 1, so each square carries ~1e-16 absolute and a sine s ~1e-16/s,
    # at most ~1e-8 rad), cheaper than an SVD of the (n−k)×k block.
    B = Q[..., k:, :k]
    G = B.mT @ B if k <= n - k else B @ B.mT
    s = symmetric_eigenvalues(G).clamp(0, 1).sqrt()  # ascending
    pad = Q.new_zeros(*shape, k - s.shape[-1])
    return torch.cat([pad, s], -1)  # min(k, n-k) sines; the other angles are exactly 0


def _big_side_angles(s0, in_rank, mu, Q, Vc, C0, J, k):
    """Angles (radians, ascending) between the top-k big-side singular subspaces (module docstring, step 5).

    ``s0`` are the Gram's σ0 (consistent with ``V``); ``in_rank`` marks W0's numerical range (from the
    policy's values), outside which U0 is undefined.
    """
    f64 = torch.float64
    inv_s0 = torch.where(in_rank, 1.0 / torch.where(in_rank & (s0 > 0), s0, torch.ones_like(s0)), torch.zeros_like(s0))
    Qk = Q[..., :, :k]
    inv_s1 = 1.0 / mu[..., :k].clamp_min(torch.finfo(f64).tiny).sqrt()
    # Everything through the n×k block V Q_k (W1's top-k small-side vectors), in float64, never an n×n product:
    # C Q_k with C = VᵀA0ᵀΔV is Vᵀ(C0 (V Q_k)) (O(n²k) instead of O(n³); V is the basis the products used).
    V = Vc.to(f64)
    P = V @ Qk
    CQ = V.mT @ (C0.to(f64) @ P)
    # Rows k: of X = U0ᵀU1_k = (Σ0 Q_k + Σ0⁻¹ C Q_k) Σ1_k⁻¹; rows outside W0's range are 0.
    X = (s0[..., k:, None] * Qk[..., k:, :] + inv_s0[..., k:, None] * CQ[..., k:, :]) * inv_s1[..., None, :]
    X = X * in_rank[..., k:, None]
    K = X.mT @ X
    if J is not None:
        # Q_kᵀHQ_k with H = VᵀΔᵀ(I − U0U0ᵀ)ΔV = VᵀΔᵀΔV − Cᵀ Λ0⁺ C (component of ΔV outside W0's range):
        # (VQ_k)ᵀ J (VQ_k) − (CQ_k)ᵀ Λ0⁺ (CQ_k).
        Hq = P.mT @ (J.to(f64) @ P) - CQ.mT @ (inv_s0[..., :, None] ** 2 * CQ)
        K = K + inv_s1[..., :, None] * Hq * inv_s1[..., None, :]
    K = 0.5 * (K + K.mT)
    sin2 = symmetric_eigenvalues(K).clamp(0, 1)  # ascending
    return torch.arcsin(sin2.sqrt())
