"""The numerical policy: one place decides the precision and the method of every decomposition.

Policy (measured against float64 NumPy/SciPy in ``docs/metrics.md``, "Numerical method"):

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

Numerical rank: ``#{σᵢ > max(m, n)·eps(d)·σ₁}`` where ``d`` is the compute dtype of the *input*
(float32 for bf16/fp16/fp32, float64 for fp64), the NumPy ``matrix_rank`` convention. Singular
vectors beyond it are arbitrary, so subspace metrics cap ``k`` there.

Everything is batched over leading dimensions and never touches the global RNG.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import WeightgeoError

__all__ = [
    "to_compute_dtype",
    "compute_dtype",
    "exact_svd",
    "singular_values",
    "top_singular_vectors",
    "numerical_rank",
    "Decomposition",
    "decompose",
]

Side = Literal["right", "left"]
_LOW_PRECISION = (torch.bfloat16, torch.float16, torch.float32)
_REFINE_BELOW = 1e-6  # σ_min/σ₁ below which the Gram route's values are replaced by LAPACK float64


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype linear algebra runs in for inputs of ``dtype``: bf16/fp16 → fp32, fp32/fp64 unchanged.

    >>> compute_dtype(torch.bfloat16)
    torch.float32

    Args:
        dtype: a floating-point torch dtype.

    Returns:
        ``torch.float32`` or ``torch.float64``. Raises :class:`WeightgeoError` for non-floating dtypes.
    """
    if dtype in _LOW_PRECISION:
        return torch.float32
    if dtype == torch.float64:
        return torch.float64
    raise WeightgeoError(
        f"dtype {dtype} is not a real floating-point dtype; weightgeo analyses bf16/fp16/fp32/fp64 "
        "weights (cast integer or complex tensors yourself, or skip them)"
    )


def to_compute_dtype(x: torch.Tensor) -> torch.Tensor:
    """``x`` upcast for linear algebra: bf16/fp16 → fp32; fp32 and fp64 are returned as they are.

    >>> to_compute_dtype(torch.ones(2, dtype=torch.bfloat16)).dtype
    torch.float32

    Args:
        x: any floating tensor.

    Returns:
        ``x`` in :func:`compute_dtype` ``(x.dtype)`` (the same object when no cast is needed).
    """
    return x.to(compute_dtype(x.dtype))


def _check_matrix(A: torch.Tensor, what: str = "A") -> None:
    if not isinstance(A, torch.Tensor):
        raise WeightgeoError(f"{what}: expected a torch.Tensor, got {type(A).__name__}")
    if A.ndim < 2:
        raise WeightgeoError(
            f"{what}: SVD needs a matrix (or a batch of matrices), got shape {tuple(A.shape)}; "
            "reshape to [out, in] first"
        )
    compute_dtype(A.dtype)


def exact_svd(
    A: torch.Tensor, *, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
    _check_matrix(A)
    return torch.linalg.svd(A.to(dtype or compute_dtype(A.dtype)), full_matrices=False)


@dataclass(frozen=True)
class Decomposition:
    """Singular values of ``A`` plus the singular vectors of its smaller side, as the policy computed them.

    ``S`` is [..., p] descending (p = min(m, n)); ``vectors`` is [..., p, p] and holds the right
    singular vectors (columns) when ``small_side == "right"`` (m ≥ n), else the left ones. ``eps`` is
    the machine epsilon of the input's compute dtype (used for the numerical rank). ``vectors`` is
    ``None`` when only values were asked for.
    """

    S: torch.Tensor
    vectors: torch.Tensor | None
    small_side: Side
    shape: tuple[int, int]
    eps: float

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


def numerical_rank(S: torch.Tensor, shape: tuple[int, int], *, eps: float) -> torch.Tensor:
    """Number of singular values above ``max(m, n)·eps·σ₁`` (NumPy ``matrix_rank`` convention).

    >>> int(numerical_rank(torch.tensor([2.0, 1.0, 1e-12]), (3, 3), eps=torch.finfo(torch.float32).eps))
    2

    Args:
        S: [..., p] singular values, descending.
        shape: the matrix shape ``(m, n)``.
        eps: machine epsilon of the input's compute dtype.

    Returns:
        [...] int64 tensor, 0 for a zero matrix.
    """
    if S.shape[-1] == 0:
        return torch.zeros(S.shape[:-1], dtype=torch.int64, device=S.device)
    tol = max(shape) * eps * S[..., :1]
    return (S > tol).sum(-1)


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
    _check_matrix(A)
    m, n = A.shape[-2], A.shape[-1]
    eps = torch.finfo(compute_dtype(A.dtype)).eps
    small: Side = "right" if m >= n else "left"
    if dtype is not None or A.dtype == torch.float64:
        d = dtype or torch.float64
        if not vectors:
            return Decomposition(torch.linalg.svdvals(A.to(d)).double(), None, small, (m, n), eps)
        U, S, Vh = torch.linalg.svd(A.to(d), full_matrices=False)
        Q = Vh.mT if small == "right" else U
        return Decomposition(S.double(), Q.double(), small, (m, n), eps)
    A64 = A.to(torch.float64)
    G = A64.mT @ A64 if small == "right" else A64 @ A64.mT
    if vectors:
        w, Q = torch.linalg.eigh(G)
        Q = Q.flip(-1)
    else:
        w, Q = torch.linalg.eigvalsh(G), None
    S = w.flip(-1).clamp_min(0).sqrt()
    if refine and S.shape[-1] > 1 and bool((S[..., -1] < _REFINE_BELOW * S[..., 0]).any()):
        # Ill-conditioned (e.g. exactly low-rank): the Gram route's absolute error eps64·σ₁²/σᵢ grows
        # for tiny σᵢ (and σ < 1.5e-8·σ₁ is unresolved). Take the values from LAPACK float64 instead;
        # the top vectors (σ above the numerical rank) are unaffected.
        S = torch.linalg.svdvals(A64)
    return Decomposition(S, Q, small, (m, n), eps)


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
    _check_side(side)
    k = min(int(k), *A.shape[-2:])
    return decompose(A, vectors=True, dtype=dtype).vectors_for(A, k, side)


def _check_side(side: str) -> None:
    if side not in ("right", "left"):
        raise WeightgeoError(f"side must be 'right' (V, input side) or 'left' (U, output side), got {side!r}")
