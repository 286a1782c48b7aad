"""Decompositions by the numerical policy (:mod:`weightgeo.linalg.policy`): which method, in which precision.

Method (measured against float64 NumPy/SciPy in ``docs/metrics.md``, "Numerical method"):

* bf16 / fp16 / fp32 inputs ("low precision"): the singular values and the singular vectors of the
  *smaller* side come from a symmetric eigendecomposition of the float64 Gram matrix (``AᵀA`` when
  ``m ≥ n``, else ``AAᵀ``). Forming the Gram matrix is one float64 GEMM; ``eigh`` of a
  ``min(m, n)``-square matrix is 2–4× faster than ``torch.linalg.svd`` of ``A`` in float32, and it is
  accurate to about ``1e-16·σ₁²/σᵢ``: far below the float32 storage noise of the inputs (which is
  why plain float32 SVD inflates spectral drift, paper-notes §1.3). Singular values below
  ``sqrt(eps64)·σ₁ ≈ 1.5e-8·σ₁`` are not resolved by the Gram route, so when any σ falls below
  ``1e-6·σ₁`` (exactly low-rank matrices) the values are recomputed by LAPACK ``svdvals`` in float64
  (vectors are kept: the metrics use them only above the numerical rank).
* fp64 inputs: LAPACK SVD in float64 (``torch.linalg.svd``): exact to float64.
* Anything else is asked for explicitly with ``dtype=`` (``exact_svd(A, dtype=torch.float32)``).

Numerical rank, compute dtypes, the refinement threshold and row blocks are the policy's
(:mod:`weightgeo.linalg.policy`); they are re-exported here for the callers that import them from this module.

One implementation: :func:`gram_eigh` ("decompose a matrix through the Gram of its small side") is the
only Gram-eigendecomposition in weightgeo. :func:`decompose` (single-matrix values and vectors) and
:func:`weightgeo.linalg.pairwise.base_spectrum` (the base of every pair metric) both call it with a float64
Gram; :func:`exact_spectral_norm` calls it with a Gram in the compute dtype, because σ₁ of a float32-rounded Gram
is accurate to first order (measured ≤ 5e-9 relative, docs/numerics.md). Float64 Grams are accumulated in
row blocks, so a 151936×896 embedding never gets a whole float64 copy.

Everything is batched over leading dimensions and never touches the global RNG.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import WeightgeoError
from ..validation import check_matrix, check_side
from .eigen import eigh, eigvalsh
from .hardware import eigh_lapack, eigvalsh_lapack, over_halves
from .policy import (
    REFINE_BELOW,
    batch_row_blocks,
    col_panels,
    compute_dtype,
    compute_eps,
    numerical_rank,
    to_compute_dtype,
)

__all__ = [
    "to_compute_dtype",
    "compute_dtype",
    "tall_orientation",
    "exact_svd",
    "singular_values",
    "top_singular_vectors",
    "numerical_rank",
    "Decomposition",
    "decompose",
    "gram",
    "add_gram",
    "mirror_upper",
    "congruence",
    "gram_eigh",
    "symmetric_eigenvalues",
    "exact_spectral_norm",
    "frobenius_sq",
]

Side = Literal["right", "left"]


def exact_svd(A: torch.Tensor, *, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin LAPACK SVD ``A = U diag(S) Vh`` in ``dtype`` (default: the compute dtype), batched.

    >>> U, S, Vh = exact_svd(torch.diag(torch.tensor([3.0, 1.0])))
    >>> S
    tensor([3., 1.])

    Args:
        A: [..., m, n] floating tensor.
        dtype: the dtype to run LAPACK in; default :func:`compute_dtype` of ``A``.

    Returns:
        ``U`` [..., m, p], ``S`` [..., p] descending, ``Vh`` [..., p, n] with ``p = min(m, n)``.
    """
    A = check_matrix(A, "A", batched=True, allow_empty=True)
    return torch.linalg.svd(A.to(_svd_dtype(dtype, "exact_svd") or compute_dtype(A.dtype)), full_matrices=False)


def _svd_dtype(dtype: torch.dtype | None, fn: str) -> torch.dtype | None:
    """``dtype`` when LAPACK and cuSOLVER can factorise in it (float32, float64), else a clear error."""
    if dtype is not None and dtype not in (torch.float32, torch.float64):
        raise WeightgeoError(
            f"{fn}: dtype={dtype} cannot be factorised (LAPACK and cuSOLVER have no bf16/fp16 "
            "SVD); pass dtype=torch.float32 or torch.float64, or None for the policy"
        )
    return dtype


@dataclass(frozen=True)
class Decomposition:
    """Singular values of ``A`` plus the singular vectors of its smaller side, as the policy computed them.

    ``S`` is [..., p] descending (p = min(m, n)); ``vectors`` is [..., p, p] and holds the right
    singular vectors (columns) when ``small_side == "right"`` (m ≥ n), else the left ones. ``eps`` is
    the machine epsilon of the input's compute dtype (used for the numerical rank). ``vectors`` is
    ``None`` when only values were asked for. ``gram_eigenvalues`` are the eigenvalues (float64,
    descending) that ``vectors`` diagonalise the small-side Gram with: ``S²`` before any refinement
    (``S`` may come from LAPACK ``svdvals`` instead, see :func:`decompose`). ``refined_mask`` ([...] bool, or
    ``None`` when nothing was refined) marks the matrices of a batch whose values were refined.
    """

    S: torch.Tensor
    vectors: torch.Tensor | None
    small_side: Side
    shape: tuple[int, int]
    eps: float
    gram_eigenvalues: torch.Tensor | None = None
    refined_mask: torch.Tensor | None = None

    def rank(self) -> torch.Tensor:
        """Numerical rank ``#{σᵢ > max(m, n)·eps·σ₁}`` per matrix ([...] int64)."""
        return numerical_rank(self.S, self.shape, eps=self.eps)

    def vectors_for(self, A: torch.Tensor, k: int, side: Side) -> torch.Tensor:
        """Top-``k`` singular vectors on ``side`` ([..., n, k] right, [..., m, k] left), float64.

        The big side is mapped through ``A`` (``v = Aᵀu/σ`` or ``u = Av/σ``): accurate for
        σ above the numerical rank threshold, arbitrary (but finite) beyond it.
        """
        if self.vectors is None:
            raise WeightgeoError("this Decomposition holds singular values only; call decompose(A, vectors=True)")
        Q = self.vectors[..., :k]
        if side == self.small_side:
            return Q
        A = A.to(Q.dtype)
        s = self.S[..., :k].clamp_min(torch.finfo(Q.dtype).tiny).unsqueeze(-2)
        return (A.mT @ Q if side == "right" else A @ Q) / s


def tall_orientation(A: torch.Tensor) -> tuple[torch.Tensor, Side]:
    """``A`` oriented tall (a view): ``(A, "right")`` if m ≥ n (small side right), else ``(Aᵀ, "left")``.

    >>> tall_orientation(torch.zeros(2, 5))[0].shape, tall_orientation(torch.zeros(2, 5))[1]
    (torch.Size([5, 2]), 'left')
    """
    return (A, "right") if A.shape[-2] >= A.shape[-1] else (A.mT, "left")


def gram(A: torch.Tensor, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Gram matrix of the smaller side, ``AᵀA`` (m ≥ n) or ``AAᵀ`` (m < n), formed in ``dtype``.

    >>> gram(torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 1.0]]))
    tensor([[10., 14.],
            [14., 21.]], dtype=torch.float64)

    Args:
        A: [..., m, n] floating tensor.
        dtype: the GEMM's dtype. When it is wider than ``A``'s, rows of the tall orientation are upcast in
            blocks of at most 2²² entries and accumulated, so no whole-matrix copy in ``dtype`` is made. Only the
            column panels on and above the diagonal are multiplied (the policy's ``col_panels``), the rest mirrored.
            The row blocks are summed in the policy's two halves (``span_halves``), side by side in two lanes where
            both are free (``over_lanes``); the bits do not depend on that.

    Returns:
        [..., p, p] exactly symmetric, p = min(m, n), in ``dtype``.
    """
    X, _ = tall_orientation(A)
    m, n = X.shape[-2:]
    Xf = X.reshape(math.prod(X.shape[:-2]), m, n)
    if Xf.shape[0] == 0:
        return X.new_zeros((*X.shape[:-2], n, n), dtype=dtype)
    parts: list[torch.Tensor] = []
    for b0, b1, spans in batch_row_blocks(Xf.shape[0], m, n):  # the same row blocks for every batch size
        # the two halves of the rows side by side where two lanes are free (a shape group of one member)
        G, *rest = over_halves(functools.partial(_span_gram, Xf[b0:b1], dtype), spans, Xf.device)
        for other in rest:
            G.add_(other)
        parts.append(mirror_upper(G))
    return (parts[0] if len(parts) == 1 else torch.cat(parts)).reshape(*X.shape[:-2], n, n)


def _span_gram(X: torch.Tensor, dtype: torch.dtype, spans: list[tuple[int, int]]) -> torch.Tensor:
    """The Gram of ``X`` [B, m, n] over its row ``spans``, summed in order, in ``dtype`` (panels on and above the
    diagonal)."""
    G = X.new_zeros((X.shape[0], X.shape[-1], X.shape[-1]), dtype=dtype)
    for s, e in spans:
        Y = X[:, s:e]
        add_gram(G, Y if Y.dtype == dtype else Y.to(dtype))
    return G


def add_gram(G: torch.Tensor, Y: torch.Tensor, X: torch.Tensor | None = None) -> torch.Tensor:
    """``G += XᵀY`` (``X`` defaults to ``Y``: ``G += YᵀY``) on the column panels on and above the diagonal, for a
    product known to be symmetric (``X``, ``Y`` [B, rows, n], ``G`` [B, n, n]); what lies below those panels is left
    for :func:`mirror_upper`. Returns ``G``.

    >>> mirror_upper(add_gram(torch.zeros(1, 2, 2), torch.tensor([[[1.0, 2.0]]])))
    tensor([[[1., 2.],
             [2., 4.]]])
    """
    X = Y if X is None else X
    for s, e in col_panels(Y.shape[-1]):
        G[:, s:e, s:].baddbmm_(X[:, :, s:e].mT, Y[:, :, s:])
    return G


def mirror_upper(G: torch.Tensor) -> torch.Tensor:
    """Make ``G`` [..., n, n] exactly symmetric from its column panels on and above the diagonal (in place: what
    lies below the diagonal is overwritten by the transpose of what lies above it). Returns ``G``."""
    for s, e in col_panels(G.shape[-1]):
        blk = G[..., s:e, s:e]
        blk.copy_(blk.triu() + blk.triu(1).mT)
        G[..., e:, s:e].copy_(G[..., s:e, e:].mT)
    return G


def congruence(V: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """``VᵀSV`` ([..., n, n], exactly symmetric) of a symmetric ``S`` [..., p, p] and ``V`` [..., p, n], in their
    dtype: ``SV`` whole, then ``Vᵀ(SV)`` on the panels on and above the diagonal (:func:`add_gram`), mirrored.

    >>> congruence(torch.eye(2), torch.tensor([[2.0, 1.0], [1.0, 3.0]]))
    tensor([[2., 1.],
            [1., 3.]])
    """
    p, n = V.shape[-2:]
    lead = torch.broadcast_shapes(V.shape[:-2], S.shape[:-2])
    T = (S @ V).reshape(-1, p, n)
    Vb = V.expand(*lead, p, n).reshape(-1, p, n)
    F = mirror_upper(add_gram(T.new_zeros(T.shape[0], n, n), T, Vb))
    return F.reshape(*lead, n, n)


def gram_eigh(
    A: torch.Tensor, *, vectors: bool = True, gram_dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor | None, Side]:
    """The one Gram-eigendecomposition: ``gram(A, dtype=gram_dtype)``, then ``eigh`` in float64.

    >>> lam, V, side = gram_eigh(torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    >>> lam, side
    (tensor([9., 1.], dtype=torch.float64), 'right')

    Args:
        A: [..., m, n] floating tensor.
        vectors: also return the eigenvectors (the small side's singular vectors).
        gram_dtype: dtype of the Gram GEMM (float64: σ accurate to ~1e-16·σ₁²/σᵢ; float32: the Gram carries
            ~eps32·σ₁² absolute, harmless where only σ₁ or the top of the spectrum matters).

    Returns:
        ``(lam, Q, small_side)``: eigenvalues σ² [..., p] float64 descending (may be slightly negative for
        rank-deficient A), eigenvectors [..., p, p] float64 (columns, same order) or ``None``, and which
        side of A they belong to.
    """
    _, side = tall_orientation(A)
    G = gram(A, dtype=gram_dtype).to(torch.float64)
    if vectors:
        w, Q = eigh(G, lapack=eigh_lapack(G.device))
        return w.flip(-1), Q.flip(-1), side
    return symmetric_eigenvalues(G).flip(-1), None, side


def symmetric_eigenvalues(M: torch.Tensor) -> torch.Tensor:
    """Every eigenvalue (ascending) of the symmetric ``M`` [..., n, n], by the LAPACK the policy picks for its device
    and size (:func:`~weightgeo.linalg.hardware.eigvalsh_lapack`); the values-only eigenproblems of the pair metrics
    (the stable rank's σ₁, the angles' small problems, the NSS fallback) all go through it.

    >>> symmetric_eigenvalues(torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64))
    tensor([1., 3.], dtype=torch.float64)
    """
    return eigvalsh(M, lapack=eigvalsh_lapack(M.shape[-1], M.device))


def decompose(
    A: torch.Tensor, *, vectors: bool = True, dtype: torch.dtype | None = None, refine: bool = True
) -> Decomposition:
    """Decompose ``A`` by the policy: float64 Gram ``eigh`` for ≤fp32 inputs, float64 SVD for fp64.

    >>> d = decompose(torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    >>> d.S, d.small_side
    (tensor([3., 1.], dtype=torch.float64), 'right')

    Args:
        A: [..., m, n] floating tensor (bf16/fp16/fp32/fp64).
        vectors: also return the smaller side's singular vectors.
        dtype: force LAPACK SVD in this dtype instead of the policy (for experiments and tests).
        refine: when some σ < 1e-6·σ₁ (condition number above 1e6, e.g. exactly low-rank), recompute
            the values with LAPACK float64 ``svdvals`` so that every σ is float64-accurate. Pass
            ``False`` when only σ₁ matters (stable rank).

    Returns:
        a :class:`Decomposition` with float64 ``S`` (descending) and, if asked, float64 vectors.
    """
    A = check_matrix(A, "A", batched=True, allow_empty=True)
    m, n = A.shape[-2], A.shape[-1]
    eps = compute_eps(A.dtype)
    small: Side = "right" if m >= n else "left"
    if _svd_dtype(dtype, "decompose") is not None or A.dtype == torch.float64:
        d = dtype or torch.float64
        if not vectors:
            S = torch.linalg.svdvals(A.to(d)).double()
            return Decomposition(S, None, small, (m, n), eps, S * S)
        U, S, Vh = torch.linalg.svd(A.to(d), full_matrices=False)
        Q = Vh.mT if small == "right" else U
        S = S.double()
        return Decomposition(S, Q.double(), small, (m, n), eps, S * S)
    lam, Q, _ = gram_eigh(A, vectors=vectors)
    S = lam.clamp_min(0).sqrt()
    mask = None
    if refine and S.shape[-1] > 1:
        mask = S[..., -1] < REFINE_BELOW * S[..., 0]
        if bool(mask.any()):
            # Ill-conditioned (e.g. exactly low-rank): the Gram route's absolute error eps64·σ₁²/σᵢ grows
            # for tiny σᵢ (and σ < 1.5e-8·σ₁ is unresolved). Take those matrices' values from LAPACK float64
            # instead (only theirs: a batch member is decomposed as it would be alone); the top vectors
            # (σ above the numerical rank) are unaffected.
            flat, which = S.reshape(-1, S.shape[-1]).clone(), mask.reshape(-1)
            flat[which] = torch.linalg.svdvals(A.reshape(-1, m, n)[which].to(torch.float64))
            S = flat.reshape(S.shape)
        else:
            mask = None
    return Decomposition(S, Q, small, (m, n), eps, lam, mask)


def exact_spectral_norm(A: torch.Tensor) -> torch.Tensor:
    """Exact ``σ₁`` of each matrix: float64 ``eigvalsh`` of the small-side Gram formed in the compute dtype.

    >>> exact_spectral_norm(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))
    tensor(4., dtype=torch.float64)

    Args:
        A: [..., m, n] floating tensor.

    Returns:
        [...] float64. The Gram's float32 rounding moves σ₁ only at first order through ``v₁ᵀ δG v₁``:
        measured ≤ 5e-9 relative on Gaussian, bf16-difference, low-rank and power-law matrices of
        896×896 … 4864×896 (docs/numerics.md); fp64 inputs run in float64. (The randomized
        ``linalg.rsvd.spectral_norm`` is 5–6 % low on noise-like matrices, so it is not used here.)
    """
    A = check_matrix(A, "A", batched=True, allow_empty=True)
    lam, _, _ = gram_eigh(A, vectors=False, gram_dtype=compute_dtype(A.dtype))
    return lam[..., 0].clamp_min(0).sqrt()


def frobenius_sq(A: torch.Tensor) -> torch.Tensor:
    """``‖A‖_F²`` per matrix, accumulated in float64 over row blocks (no whole float64 copy).

    >>> frobenius_sq(torch.tensor([[3.0, 4.0]]))
    tensor(25., dtype=torch.float64)
    """
    m, n = A.shape[-2:]
    Af = A.reshape(math.prod(A.shape[:-2]), m, n)
    if Af.shape[0] == 0 or m == 0:
        return A.to(torch.float64).square().sum((-2, -1))
    parts: list[torch.Tensor] = []
    for b0, b1, spans in batch_row_blocks(Af.shape[0], m, n):  # the same row blocks for every batch size
        total = torch.zeros(b1 - b0, dtype=torch.float64, device=A.device)
        for s, e in spans:
            total = total + Af[b0:b1, s:e].to(torch.float64).square().sum((-2, -1))
        parts.append(total)
    return (parts[0] if len(parts) == 1 else torch.cat(parts)).reshape(A.shape[:-2])


def singular_values(A: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """All singular values of ``A`` by the policy, descending, float64.

    >>> singular_values(torch.tensor([[0.0, 2.0], [1.0, 0.0]]))
    tensor([2., 1.], dtype=torch.float64)

    Args:
        A: [..., m, n] floating tensor.
        dtype: force LAPACK ``svdvals`` in this dtype instead of the policy.

    Returns:
        [..., min(m, n)] float64, descending; accurate to about ``1e-16·σ₁²/σᵢ`` for ≤fp32 inputs.
    """
    return decompose(A, vectors=False, dtype=dtype).S


def top_singular_vectors(
    A: torch.Tensor, k: int, *, side: Side = "right", dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Orthonormal basis of the top-``k`` singular subspace of ``A`` on ``side`` (float64).

    >>> top_singular_vectors(torch.diag(torch.tensor([1.0, 5.0])), 1, side="right").abs()
    tensor([[0.],
            [1.]], dtype=torch.float64)

    Args:
        A: [..., m, n] ([out, in]) floating tensor.
        k: number of vectors, capped at ``min(m, n)``; vectors beyond the numerical rank are arbitrary.
        side: ``"right"`` (V, input side, [..., n, k]) or ``"left"`` (U, output side, [..., m, k]).
        dtype: force LAPACK SVD in this dtype instead of the policy.

    Returns:
        [..., n, k] or [..., m, k] float64 with orthonormal columns, ordered by singular value.
    """
    check_side(side)
    k = min(int(k), *A.shape[-2:])
    return decompose(A, vectors=True, dtype=dtype).vectors_for(A, k, side)
