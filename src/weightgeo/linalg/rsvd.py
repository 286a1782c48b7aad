"""Batched randomized SVD: the one low-rank core every spectral metric goes through.

Halko, Martinsson & Tropp (2011, arXiv:0909.4061), Algorithm 4.4 (subspace iteration) followed by
Algorithm 5.1 (direct SVD of the projection), re-orthonormalising after every product with A and
with Aᵀ by CholeskyQR2 (Fukaya et al. 2014): a Gram matrix by GEMM, ``torch.linalg.cholesky_ex`` and
``torch.linalg.solve_triangular``. Batch entries whose Cholesky fails (rank-deficient sketch, e.g.
an exactly low-rank merged-LoRA delta) are re-done by Householder QR, only those entries.

>>> import torch
>>> A = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
>>> U, S, Vh = randomized_svd(A, 4, seed=0)
>>> tuple(U.shape), tuple(S.shape), tuple(Vh.shape)
((64, 4), (4,), (4, 48))

Conventions (the contract with the rest of the library):

* ``A`` has shape ``(*, m, n)``; every leading index is an independent matrix.
* Results are float64 when ``A`` is float64, float32 otherwise (bf16/fp16 weights are promoted).
* Reproducible: an int ``seed`` (default 0) or a ``torch.Generator`` on ``A``'s device draws one
  Gaussian test matrix Ω of shape ``(l, min(m, n))`` that is **shared by every batch entry**. Entry
  ``i`` of a batched call therefore equals a call on ``A[i]`` alone with the same seed (up to GEMM
  rounding), and chunking a stack differently changes nothing. The global RNG is never touched.
* Cost: ``2·n_iter + 2`` passes over ``A`` (products with ``A`` and ``Aᵀ``), each ``2·m·n·l``
  flops, with ``l = k + oversample``; everything else is ``O((m + n)·l²)``.
* Low-precision passes (``pass_dtype=torch.bfloat16``): the products with ``A`` run in bf16 (fp32
  accumulation inside the GEMM, bf16 output) while Gram matrices, Cholesky, Q and the small SVD stay
  in float32. Their noise floor is about ``2⁻⁸·σ₁``: singular values below ~``1e-2·σ₁`` come out
  near that floor instead of their true value. Fine for the top subspace, stable rank and
  angles of gapped blocks; wrong for rank thresholds below ``1e-2``.
* Pass dtype by default (``pass_dtype=None``): the hardware-aware policy,
  :func:`weightgeo.linalg.hardware.pass_dtype`. Stacks stored in bf16 of at least 2¹⁹ entries per
  matrix get bf16 passes on hardware that multiplies bf16 natively (CUDA sm_80+, CPUs with AMX or
  AVX512-BF16), fp32 passes elsewhere (AVX2-only CPUs, where bf16 GEMMs are emulated and slower); fp32 and
  fp64 stacks (and fp16 ones) get passes in their compute dtype. ``RSVDResult.pass_dtype`` says what ran; pass
  ``pass_dtype=torch.float32`` for fp32 passes everywhere.
* Exact fallback: when ``2·(k + oversample) ≥ min(m, n)`` the randomized method is neither faster
  nor as accurate; ``torch.linalg.svd`` (float32/float64) truncated to k is returned instead
  (``method == "exact"``).
* Not differentiable (runs under ``torch.no_grad``); NaN/inf in ``A`` propagate to the results.

Performance notes (measured on 2-core x86 CPUs, see BENCHMARKS.md; the passes are ≥ 85 % of the
time, so everything is arranged around the GEMM layout):

* Only two product forms are used, both fast for MKL and oneDNN on a row-major ``A``:
  ``A @ Xᵀ`` (X rows (l, n)) and ``X @ A`` (X rows (l, m), row-major); ``torch.svd_lowrank``'s
  ``Aᴴ @ Q`` form measured 1.7–2.6× slower with fp32 MKL on 2 threads. Bases are kept as rows
  (l × N) throughout; CholeskyQR solves the right-sided triangular system on the column-major
  view (several times faster than the left-sided one); the final small SVD is of the tall N×l
  orientation.
* The fp32 GEMMs stay in torch (MKL) on CPU: numpy/OpenBLAS sgemm was slower than MKL on the
  Intel (AMX) machine measured, and alternating torch's OpenMP pool with OpenBLAS's spinning
  threads stalled each switch by milliseconds on 2 cores.
* A column-major ``A`` (a transposed view) is decomposed as its transpose, without a copy.
* Tall or wide, Ω is drawn on the short side and the small SVD is taken on the short side.
* bf16 passes use oneDNN (AVX512-BF16/AMX on CPU, tensor cores on GPU): 2–4× faster than fp32.
* A cast copy of a stack (bf16 weights with fp32 passes, fp32 weights with bf16 passes) is made on
  CPU in ≤ 32 MiB chunks into one reused buffer: fresh pages cost more than the copy itself.
* One code path for CPU and CUDA; one host sync per orthonormalisation (Cholesky ``info``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..errors import WeightgeoError
from ..validation import check_int, check_matrix
from .hardware import pass_dtype as policy_pass_dtype
from .policy import compute_dtype

__all__ = [
    "RSVDResult",
    "randomized_svd",
    "randomized_svd_with_info",
    "default_oversample",
    "spectral_norm",
    "low_rank_reconstruction",
    "ACCURATE_N_ITER",
    "FAST_N_ITER",
    "GAP_REPRODUCIBLE",
]

#: Below this spectral gap σ_k/σ_{k+1} the top-k subspace is not reproducible (angles between two
#: runs, or two methods, can be anywhere in [0°, 90°]).
GAP_REPRODUCIBLE = 1.05

#: Power iterations of the "accurate" preset (with the default p = k oversampling): σ errors at or
#: below scikit-learn's n_iter='auto' (7 iterations, p = 10) on power-law and low-rank + noise spectra.
ACCURATE_N_ITER = 5
#: Power iterations of the "fast" preset (the default).
FAST_N_ITER = 2

_DEFAULT_SEED = 0
_PASS_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


@dataclass(frozen=True)
class RSVDResult:
    """Top-k SVD ``A ≈ U @ diag(S) @ Vh`` plus what is needed to judge it.

    Attributes:
        U: ``(*, m, k)`` orthonormal columns (left singular vectors).
        S: ``(*, k)`` singular values, descending, non-negative.
        Vh: ``(*, k, n)`` orthonormal rows (right singular vectors, transposed).
        gap: ``(*,)`` estimated spectral gap ``σ_k / σ_{k+1}`` from the ``k``-th and ``(k+1)``-th
            Ritz values (exact values when ``method == "exact"``); ``inf`` when ``σ_{k+1} = 0``
            (also for ``k == min(m, n)``), ``1.0`` when both are 0, ``nan`` when there is no
            ``(k+1)``-th Ritz value (``oversample == 0``). Ritz values underestimate σ (the
            ``(k+1)``-th more than the k-th), so this is an estimate; with bf16 passes σ_{k+1}
            cannot read below the ~2⁻⁸·σ₁ noise floor, which caps the gap. **When
            gap < 1.05 the top-k subspace is not reproducible**: principal angles of it (against
            another run, method or checkpoint) mean nothing; compare gap-separated blocks only.
        method: ``"randomized"`` or ``"exact"`` (exact SVD when ``k + oversample ≥ min(m, n) / 2``).
        n_iter: power (subspace) iterations used; 0 for the exact method.
        oversample: extra columns ``l - k`` used; 0 for the exact method.
        pass_dtype: the dtype the products with ``A`` ran in (the compute dtype for the exact method).
    """

    U: Tensor
    S: Tensor
    Vh: Tensor
    gap: Tensor
    method: str
    n_iter: int
    oversample: int
    pass_dtype: torch.dtype = torch.float32

    @property
    def reproducible(self) -> Tensor:
        """``(*,)`` bool: ``gap >= 1.05``, i.e. the top-k subspace is well defined."""
        return self.gap >= GAP_REPRODUCIBLE

    def __iter__(self):  # allows ``U, S, Vh = result`` like the plain function
        return iter((self.U, self.S, self.Vh))


def default_oversample(k: int) -> int:
    """Default oversampling ``p`` so that ``l = k + p = max(k + 10, min(2k, k + 64))``.

    ``p = k`` (capped at 64, at least 10) is the cheapest accuracy gain on slowly decaying spectra
    (4–7× lower σ error than ``p = 10`` at 0.9–1.6× the time; svd-baselines §5, §8).

    >>> default_oversample(4), default_oversample(16), default_oversample(64), default_oversample(200)
    (10, 16, 64, 64)
    """
    return max(k + 10, min(2 * k, k + 64)) - k


def randomized_svd(
    A: Tensor,
    k: int,
    *,
    n_iter: int = 2,
    oversample: int | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    pass_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``k`` singular triplets of ``A`` (batched), by seeded randomized subspace iteration.

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> A = torch.randn(100, 8, generator=g) @ torch.randn(8, 60, generator=g)  # rank 8
    >>> U, S, Vh = randomized_svd(A, 8, seed=1)
    >>> bool(torch.allclose(U * S @ Vh, A, atol=1e-3))
    True

    Args:
        A: ``(*, m, n)`` float tensor (bf16/fp16/fp32/fp64), any device. Not modified.
        k: number of singular triplets, ``1 ≤ k ≤ min(m, n)``.
        n_iter: power iterations ``q`` (each costs two passes over ``A``). 2 is "fast";
            4 or more is "accurate" on slowly decaying spectra.
        oversample: extra sketch columns ``p``; default :func:`default_oversample` (``p = k``,
            between 10 and 64). ``l = k + p``. If ``l ≥ min(m, n) / 2`` the exact SVD is used.
        seed: int seed for the Gaussian test matrix (default 0 when no ``generator`` is given).
        generator: a ``torch.Generator`` on ``A``'s device instead of ``seed`` (advanced by one draw).
        pass_dtype: dtype of the big products with ``A``: ``None`` (the hardware-aware policy: bf16 for
            large bf16 stacks on hardware with native bf16 GEMMs, else float32; float64 for float64
            input; see the module docstring), ``torch.float32``, ``torch.bfloat16`` (2–4× faster on CPUs
            with AVX512-BF16/AMX and on GPUs; noise floor ≈ 2⁻⁸·σ₁) or ``torch.float16``.

    Returns:
        ``U (*, m, k)``, ``S (*, k)`` descending, ``Vh (*, k, n)``; float64 for float64 input,
        float32 otherwise, on ``A``'s device.

    Accuracy: with ``q`` iterations the error in σ_j behaves like ``(σ_{l+1}/σ_j)^(4q+2)``
    (HMT §10): tiny on gapped or fast-decaying spectra, a few % on flat ones
    (power law σ_i = i^-0.5 at k=16, q=2: about 1e-2 relative error in σ_k). See
    :func:`randomized_svd_with_info` for the gap that says whether the subspace is meaningful.
    """
    r = randomized_svd_with_info(
        A, k, n_iter=n_iter, oversample=oversample, seed=seed, generator=generator, pass_dtype=pass_dtype
    )
    return r.U, r.S, r.Vh


def randomized_svd_with_info(
    A: Tensor,
    k: int,
    *,
    n_iter: int = 2,
    oversample: int | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    pass_dtype: torch.dtype | None = None,
) -> RSVDResult:
    """:func:`randomized_svd` returning an :class:`RSVDResult` with the spectral gap and method.

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> A = torch.randn(200, 4, generator=g) @ torch.randn(4, 120, generator=g)  # rank 4 ...
    >>> A += 1e-3 * torch.randn(200, 120, generator=g)  # ... plus noise
    >>> r = randomized_svd_with_info(A, 4, seed=0)
    >>> r.method, r.n_iter, r.oversample, tuple(r.gap.shape)
    ('randomized', 2, 10, ())
    >>> bool(r.reproducible), bool(r.gap > 100)  # σ_4/σ_5: signal over noise
    (True, True)
    >>> bool(randomized_svd_with_info(torch.randn(200, 120, generator=g), 4).reproducible)  # flat
    False
    """
    A, k, p, n_iter, pass_dtype = _validate(A, k, n_iter, oversample, seed, generator, pass_dtype)
    if pass_dtype is None:
        m, n = A.shape[-2:]
        pass_dtype = policy_pass_dtype(A.dtype, A.device, (m, n))
    with torch.no_grad():
        return _rsvd(A, k, p, n_iter, seed, generator, pass_dtype)


def spectral_norm(
    A: Tensor,
    *,
    n_iter: int = 4,
    block: int = 8,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Largest singular value ``σ₁`` of each matrix in ``A`` (batched), by block subspace iteration.

    >>> import torch
    >>> A = torch.diag(torch.tensor([3.0, 2.0, 1.0])).repeat(2, 1, 1)
    >>> spectral_norm(A)
    tensor([3., 3.])

    Args:
        A: ``(*, m, n)`` float tensor.
        n_iter: power iterations (each two passes over ``A``); the total is ``2·n_iter + 2`` passes.
        block: sketch width ``l``; the Ritz value of a block converges like
            ``(σ_{l+1}/σ₁)^(4q+2)`` instead of ``(σ₂/σ₁)^(4q+2)`` for a single vector.
        seed, generator: as in :func:`randomized_svd`.

    Returns:
        ``(*,)`` float32 (float64 for float64 input). A Ritz value: never larger than the true
        ``σ₁`` (up to rounding). Measured relative error at the defaults (896×896 … 4864×896):
        ≤ 3e-7 (the float32 floor) for power-law spectra σᵢ ∝ i^-0.5 or faster decay, well inside
        the 1e-4 contract; but **5–6 % low** on Gaussian-noise (Marchenko–Pastur) matrices, whose
        top singular values are not separated (4 % with ``block=16``, 2–3 % with ``n_iter=6``):
        use ``torch.linalg.matrix_norm(A, ord=2)`` when σ₁ of a noise-like matrix must be exact.
        Small matrices (``min(m, n) ≤ 2·block``) use the exact ``svdvals``.
    """
    block = check_int(block, "block", minimum=1, what="sketch width")
    A_, _, p, n_iter, _ = _validate(A, 1, n_iter, None, seed, generator, None, name="spectral_norm")
    p = block - 1
    with torch.no_grad():
        if 2 * block >= min(A_.shape[-2:]) or A_.numel() == 0:
            return torch.linalg.svdvals(A_.to(compute_dtype(A_.dtype)))[..., 0]
        return _rsvd(A_, 1, p, n_iter, seed, generator, None).S[..., 0]


def low_rank_reconstruction(
    A: Tensor,
    rank: int,
    *,
    accurate: bool = True,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    pass_dtype: torch.dtype | None = None,
) -> Tensor:
    """Best rank-``rank`` approximation ``U diag(S) Vh`` of each matrix in ``A``, shape ``(*, m, n)``.

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> A = torch.randn(50, 3, generator=g) @ torch.randn(3, 40, generator=g)
    >>> bool(torch.allclose(low_rank_reconstruction(A, 3), A, atol=1e-4))
    True

    Args:
        A: ``(*, m, n)`` float tensor.
        rank: target rank, ``1 ≤ rank ≤ min(m, n)``.
        accurate: ``True`` runs :data:`ACCURATE_N_ITER` (5) power iterations, ``False`` the "fast"
            2, both with the default oversampling ``p = rank`` (10 ≤ p ≤ 64). Measured excess of
            ``‖A − A_r‖_F`` over the Eckart–Young optimum (896×896 … 4864×896, r = 8 and 32):
            power law σᵢ = i^-0.5: ≤ 3e-5 relative (accurate), ≤ 1e-3 (fast); σᵢ = 1/i: ≤ 2e-7 /
            ≤ 1e-4; Gaussian noise (no decay): ≤ 3e-3 / ≤ 7e-3. Exactly low-rank inputs are
            reproduced to rounding by both.
        seed, generator, pass_dtype: as in :func:`randomized_svd`.

    Returns:
        ``(*, m, n)`` float32 (float64 for float64 input).
    """
    n_iter = ACCURATE_N_ITER if accurate else FAST_N_ITER
    U, S, Vh = randomized_svd(A, rank, n_iter=n_iter, seed=seed, generator=generator, pass_dtype=pass_dtype)
    return (U * S.unsqueeze(-2)) @ Vh


# ----------------------------------------------------------------------------------------------
# validation


def _validate(A, k, n_iter, oversample, seed, generator, pass_dtype, name="randomized_svd"):
    if not isinstance(A, (Tensor, np.ndarray)):
        try:
            A = torch.as_tensor(A)
        except Exception as e:  # pragma: no cover - message path
            raise WeightgeoError(f"{name}: A must be a tensor or array, got {type(A).__name__}") from e
    A = check_matrix(A, f"{name}: A", batched=True, allow_empty=True)
    m, n = A.shape[-2:]
    k = check_int(k, "k", minimum=1, what="number of singular triplets")
    if k > min(m, n):
        raise WeightgeoError(
            f"{name}: k={k} > min(m, n)={min(m, n)} for A of shape {tuple(A.shape)}; "
            f"ask for k <= {min(m, n)} (or use the exact torch.linalg.svd)"
        )
    n_iter = check_int(n_iter, "n_iter", minimum=0, what="power iterations")
    oversample = default_oversample(k) if oversample is None else check_int(oversample, "oversample", minimum=0)
    if seed is not None and generator is not None:
        raise WeightgeoError(f"{name}: pass seed or generator, not both (got seed={seed!r} and a generator)")
    if seed is not None:
        seed = check_int(seed, "seed", minimum=-(2**63))
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise WeightgeoError(f"{name}: generator must be a torch.Generator, got {type(generator).__name__}")
        gd, ad = generator.device, A.device
        if gd.type != ad.type or (gd.type != "cpu" and (gd.index or 0) != (ad.index or 0)):
            raise WeightgeoError(
                f"{name}: generator is on {generator.device} but A is on {A.device}; "
                f"create it with torch.Generator(device=A.device)"
            )
    if pass_dtype is not None and pass_dtype not in _PASS_DTYPES:
        raise WeightgeoError(
            f"{name}: pass_dtype must be None, torch.bfloat16, torch.float16, torch.float32 or "
            f"torch.float64, got {pass_dtype!r}"
        )
    return A, k, oversample, n_iter, pass_dtype


# ----------------------------------------------------------------------------------------------
# core


def _rsvd(A, k, p, n_iter, seed, generator, pass_dtype) -> RSVDResult:
    cdt = compute_dtype(A.dtype)
    m, n = A.shape[-2:]
    batch = A.shape[:-2]
    l = k + p
    if A.numel() == 0:  # empty batch: shapes only
        e = A.new_empty
        return RSVDResult(
            e(*batch, m, k, dtype=cdt),
            e(*batch, k, dtype=cdt),
            e(*batch, k, n, dtype=cdt),
            e(batch, dtype=cdt),
            "randomized",
            n_iter,
            p,
            cdt,
        )
    if 2 * l >= min(m, n):
        return _exact(A, k, cdt)

    # The GEMMs are fastest on a row-major A (A @ X and Xᵀ @ A forms). A column-major A (a
    # transposed view, e.g. W.mT) is decomposed as its transpose instead of being copied.
    transposed = not _row_major(A) and _row_major(A.mT)
    if transposed:
        A = A.mT
        m, n = n, m
    pdt = cdt if pass_dtype is None or pass_dtype == cdt else pass_dtype

    # One Gaussian Ω (l × short side), shared by every batch entry.
    gen = generator
    if gen is None:
        gen = torch.Generator(device=A.device)
        gen.manual_seed(_DEFAULT_SEED if seed is None else seed)
    omega = torch.randn(l, min(m, n), generator=gen, device=A.device, dtype=cdt)

    U, S, Vh, gap = _chunked(A, omega, k, n_iter, pdt, cdt)
    if transposed:
        U, Vh = Vh.mT, U.mT
    return RSVDResult(U.contiguous(), S, Vh.contiguous(), gap, "randomized", n_iter, p, pdt)


#: On CPU a stack that must be cast to the pass dtype (a bf16 stack with fp32 passes) is cast in one batch when the
#: copy fits this many bytes, else in chunks of at most :data:`_CPU_CAST_CHUNK_BYTES` into one reused buffer (fresh
#: memory costs a page fault per 4 KiB, about 3x the copy itself). A stack that needs no cast runs as one batch:
#: chunking it (1-matrix chunks of 8×4864×896) measured 1.6x the time of one batch. Results do not depend on the
#: chunking: Ω is shared by the batch entries.
_CPU_CAST_BATCH_BYTES = 256 << 20
_CPU_CAST_CHUNK_BYTES = 32 << 20


def _chunked(A, omega, k, n_iter, pdt, cdt):
    m, n = A.shape[-2:]
    batch = A.shape[:-2]
    cast = A.dtype != pdt or not _row_major(A)
    count = A[..., 0, 0].numel()
    per = count
    size = torch.empty((), dtype=pdt).element_size()
    if A.device.type == "cpu" and cast and count * m * n * size > _CPU_CAST_BATCH_BYTES:
        per = max(1, _CPU_CAST_CHUNK_BYTES // (m * n * size))
    if per >= count:
        Ap = A.to(pdt, memory_format=torch.contiguous_format) if cast else A
        return _core(Ap, omega, k, n_iter, pdt, cdt)
    Af = A.reshape(count, m, n)
    buf = torch.empty(per, m, n, dtype=pdt, device=A.device)
    parts = []
    for i in range(0, count, per):
        j = min(count, i + per)
        chunk = buf[: j - i]
        chunk.copy_(Af[i:j])
        parts.append(_core(chunk, omega, k, n_iter, pdt, cdt))
    U, S, Vh, gap = (torch.cat(x) for x in zip(*parts))
    return U.reshape(*batch, m, k), S.reshape(*batch, k), Vh.reshape(*batch, k, n), gap.reshape(batch)


def _core(Ap, omega, k, n_iter, pdt, cdt):
    """HMT subspace iteration on a row-major A (*, m, n) in the pass dtype; Ω (l, min(m, n))."""
    m, n = Ap.shape[-2:]
    # The basis is always kept as rows: (*, l, N), orthonormal rows. Products:
    #   right:  Y  = A @ basisᵀ   (m×n · n×l -> m×l), then rows = Yᵀ
    #   left:   Zᵀ = basis @ A     (l×m · m×n -> l×n)
    # Ω lives on the short side: the first product maps it to the long side.
    right = m >= n  # tall: start with A·Ωᵀ; wide: start with Ω·A
    basis = omega
    n_products = 2 * n_iter + 2
    for step in range(n_products):
        if right:
            rows = _right(Ap, basis, pdt, cdt)  # (*, l, m), a transposed view of (*, m, l)
        else:
            rows = _left(Ap, basis, pdt, cdt)  # (*, l, n)
        if step == n_products - 1:
            break
        # The next product needs only a well-conditioned basis of the same span; the last (whose projection is
        # the small SVD's input) needs orthonormal rows: CholeskyQR once in between, CholeskyQR2 at the end.
        basis = _orth_rows(rows, passes=2 if step == n_products - 2 else 1)
        right = not right

    # Last product was a "left" one on tall A (rows = Qᵀ A with basis Q over m) or a "right" one
    # on wide A (rows = (A P)ᵀ with basis P over n). Small SVD on the short side, taken of the
    # tall (N×l) orientation: several times faster than of the wide l×N one.
    if not right:  # tall: A ≈ Qᵀ·B, B = rows (l×n); Bᵀ = V S Wᵀ
        V, S, Wt = torch.linalg.svd(rows.mT, full_matrices=False)
        U = basis.mT @ Wt.mT[..., :k]
        Vh = V[..., :k].mT
    else:  # wide: A ≈ Y·P, Y = rows.mT (m×l), P = basis (l×n)
        U, S, Vhy = torch.linalg.svd(rows.mT, full_matrices=False)
        U = U[..., :k]
        Vh = Vhy[..., :k, :] @ basis
    return U, S[..., :k].contiguous(), Vh, _gap(S, k)


def _row_major(X: Tensor) -> bool:
    """True when the last dim is contiguous and rows are packed (BLAS-friendly, no copy needed)."""
    rows, cols = X.shape[-2:]
    s_row, s_col = X.stride()[-2:]
    return (s_col == 1 or cols <= 1) and (s_row >= max(cols, 1) or rows <= 1)


def _right(Ap: Tensor, basis: Tensor, pdt: torch.dtype, cdt: torch.dtype) -> Tensor:
    """(A @ basisᵀ)ᵀ as a (*, l, m) view; basis (l, n) or (*, l, n)."""
    X = basis if basis.dtype == pdt else basis.to(pdt)
    Y = torch.matmul(Ap, X.mT)
    if Y.dtype != cdt:
        Y = Y.to(cdt)
    return Y.mT


def _left(Ap: Tensor, basis: Tensor, pdt: torch.dtype, cdt: torch.dtype) -> Tensor:
    """basis @ A, (*, l, n); basis (l, m) or (*, l, m), row-major (fastest left operand)."""
    X = basis if basis.dtype == pdt else basis.to(pdt)
    if not _row_major(X):
        X = X.contiguous()
    Z = torch.matmul(X, Ap)
    if Z.dtype != cdt:
        Z = Z.to(cdt)
    return Z


def _orth_rows(W: Tensor, passes: int = 2) -> Tensor:
    """Orthonormalise the rows of W (*, l, N), l ≤ N, by CholeskyQR2; Householder where it fails.

    Returns a row-major (*, l, N) tensor whose rows span the row space of W. A third CholeskyQR
    pass runs when the first one lost too much orthogonality (κ(W) near u^-1/2); batch entries
    whose Cholesky failed (rank-deficient W) or produced non-finite values are recomputed by
    Householder QR, one sync per call. ``passes=1`` (a basis between two products, which needs a span and a
    condition number near 1, not orthonormality to rounding): one CholeskyQR pass, whose rows are orthonormal
    to about ``u·κ(W)²``; the second pass runs only where κ(W), estimated from the Cholesky factor's diagonal,
    exceeds 100 (orthogonality worse than ~1e-3 in float32), or where the first failed.
    """
    U1, info1 = torch.linalg.cholesky_ex(W @ W.mT, upper=True)
    W1 = _solve_rows(U1, W)
    if passes == 1:
        d = U1.diagonal(dim1=-2, dim2=-1).abs()
        kappa = d.amax(-1) / d.amin(-1)
        worst_fail, worst_kappa = torch.stack([info1.amax().to(kappa.dtype), kappa.amax()]).tolist()  # one sync
        if worst_fail == 0 and worst_kappa <= 100:  # NaN compares False: falls through
            return W1
    G2 = W1 @ W1.mT
    U2, info2 = torch.linalg.cholesky_ex(G2, upper=True)
    W2 = _solve_rows(U2, W1)
    # ‖G2 - I‖ measures how far the first pass was from orthonormal; the second pass squares it.
    G2.diagonal(dim1=-2, dim2=-1).sub_(1)
    dev = G2.abs().amax(dim=(-2, -1))
    fail = info1.bitwise_or(info2)
    worst_fail, worst_dev = torch.stack([fail.amax().to(dev.dtype), dev.amax()]).tolist()  # one sync
    if worst_fail == 0 and worst_dev <= 0.1:  # the common case (NaN compares False: falls through)
        return W2
    bad = (fail != 0) | dev.isnan()
    again = ~bad & (dev > 0.1)
    if bool(again.any()):
        U3, info3 = torch.linalg.cholesky_ex(W2 @ W2.mT, upper=True)
        W3 = _solve_rows(U3, W2)
        ok3 = info3 == 0
        W2 = torch.where(ok3[..., None, None], W3, W2)
        bad = bad | (~ok3 & again)
    if bool(bad.any()):
        W2 = _householder_rows(W, W2, bad)
    return W2


def _solve_rows(R: Tensor, W: Tensor) -> Tensor:
    """R⁻ᵀ W for upper-triangular R (*, l, l), as a row-major (*, l, N) tensor.

    The l × l inverse is solved for (tiny), then applied by one GEMM: a triangular solve against the
    long (*, l, N) operand measured 3-4x slower on CPU (layout copies, TRSM) and was a fifth of a k = 16
    call. The inverse's extra rounding (κ(R)·u, as for the solve) is what CholeskyQR2's second pass removes.
    """
    eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
    Rinv = torch.linalg.solve_triangular(R, eye, upper=True)
    return Rinv.mT @ W


def _householder_rows(W: Tensor, out: Tensor, bad: Tensor) -> Tensor:
    """Replace the entries of ``out`` flagged in ``bad`` by Householder QR of the same rows of W."""
    if W.ndim == 2:
        return torch.linalg.qr(W.mT).Q.mT.contiguous()
    out = out.clone() if out._base is not None else out
    Wf = W.reshape(-1, *W.shape[-2:])
    of = out.reshape(-1, *out.shape[-2:])
    idx = bad.reshape(-1).nonzero().squeeze(-1)
    of[idx] = torch.linalg.qr(Wf[idx].mT).Q.mT
    return of.reshape(out.shape)


def _gap(S: Tensor, k: int) -> Tensor:
    if S.shape[-1] <= k:
        return torch.full(S.shape[:-1], float("nan"), dtype=S.dtype, device=S.device)
    a, b = S[..., k - 1], S[..., k]
    g = a / b
    return torch.where((a == 0) & (b == 0), torch.ones_like(g), g)


def _exact(A: Tensor, k: int, cdt: torch.dtype) -> RSVDResult:
    Ac = A.to(cdt) if A.dtype != cdt else A
    if Ac.shape[-2] < Ac.shape[-1]:  # LAPACK is several times faster on the tall orientation
        V, S, Uh = torch.linalg.svd(Ac.mT, full_matrices=False)
        U, Vh = Uh.mT, V.mT
    else:
        U, S, Vh = torch.linalg.svd(Ac, full_matrices=False)
    gap = _gap(S, k) if S.shape[-1] > k else torch.full(S.shape[:-1], float("inf"), dtype=S.dtype, device=S.device)
    return RSVDResult(
        U[..., :k].contiguous(), S[..., :k].contiguous(), Vh[..., :k, :].contiguous(), gap, "exact", 0, 0, cdt
    )
