"""The numerical policy, defined once: compute dtypes, the conditioning and numerical-rank rules, row blocks.

Every module that upcasts, cuts a matrix into row blocks, refines ill-conditioned values or counts a numerical
rank takes the rule from here (the hardware-dependent choices live in :mod:`weightgeo.linalg.hardware`).

* **Compute dtype.** bf16 / fp16 / fp32 inputs are analysed in float32, fp64 in float64 (:func:`compute_dtype`);
  so are float8 tensors that come without scales (their stored values, exact in float32; scaled FP8 weights are
  dequantised when read, docs/checkpoints.md); the small eigenproblems always run in float64 (docs/numerics.md).
* **Row blocks.** Wherever a whole-matrix temporary in a wider dtype would be made (float64 Grams, float32
  products of bf16 pairs, localization keys, elementwise passes), the rows are taken in blocks of at most
  :data:`ROW_BLOCK` entries (:func:`row_blocks`), so temporaries are bounded whatever the matrix size.
* **Column panels.** A symmetric product (a Gram ``XᵀX``, ``ΔᵀΔ``, ``VᵀSV``) is formed panel by panel of at
  most :data:`COL_PANEL` columns (:func:`col_panels`), only on and above the diagonal; the rest is its mirror
  image. For c panels that is (c + 1)/(2c) of the full product's multiplications, in the same precision.
* **Conditioning.** Below σ_min/σ₁ = :data:`REFINE_BELOW` the float64 Gram route's values are replaced by
  LAPACK's (:func:`~weightgeo.linalg.svd.decompose`), and the pair kernel falls back to them.
* **Numerical rank.** ``#{σᵢ > max(m, n)·eps·σ₁}`` with eps of the input's compute dtype (the NumPy
  ``matrix_rank`` convention, :func:`numerical_rank`); singular vectors beyond it are arbitrary, so subspace
  metrics cap ``k`` there.

>>> compute_dtype(torch.bfloat16), list(row_blocks(5, 1 << 21))
(torch.float32, [(0, 2), (2, 4), (4, 5)])
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..errors import WeightgeoError

__all__ = [
    "ROW_BLOCK",
    "COL_PANEL",
    "REFINE_BELOW",
    "LOW_PRECISION",
    "FLOAT8",
    "compute_dtype",
    "to_compute_dtype",
    "compute_eps",
    "numerical_rank",
    "rows_per_block",
    "row_blocks",
    "batch_row_blocks",
    "span_halves",
    "col_panels",
    "same_compute_dtype",
    "compared_format",
    "holds",
]

#: Entries of one row block (32 MiB in float64): the bound on every upcast temporary.
ROW_BLOCK = 1 << 22
#: Columns of one panel of a symmetric product (:func:`col_panels`): wide enough for full-speed GEMMs.
COL_PANEL = 256
#: σ_min/σ₁ below which values come from LAPACK float64 instead of the float64 Gram route.
REFINE_BELOW = 1e-6
#: float8 dtypes this torch has (values exact in float32 and in bf16)
FLOAT8 = tuple(
    getattr(torch, n)
    for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, n)
)
#: Stored dtypes analysed in float32.
LOW_PRECISION = (torch.bfloat16, torch.float16, torch.float32) + FLOAT8


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype linear algebra runs in for inputs of ``dtype``: bf16/fp16/float8 → fp32, fp32/fp64 unchanged.

    >>> compute_dtype(torch.float64), compute_dtype(torch.float8_e4m3fn)
    (torch.float64, torch.float32)

    Args:
        dtype: a floating-point torch dtype.

    Returns:
        ``torch.float32`` or ``torch.float64``. Raises :class:`WeightgeoError` for other dtypes.
    """
    if dtype in LOW_PRECISION:
        return torch.float32
    if dtype == torch.float64:
        return torch.float64
    raise WeightgeoError(
        f"dtype {dtype} is not a real floating-point dtype; weightgeo analyses bf16/fp16/fp32/fp64 and float8 "
        "weights (cast integer or complex tensors yourself, or skip them)"
    )


def to_compute_dtype(x: torch.Tensor) -> torch.Tensor:
    """``x`` upcast for linear algebra: bf16/fp16 → fp32; fp32 and fp64 are returned as they are.

    >>> to_compute_dtype(torch.ones(2, dtype=torch.bfloat16)).dtype
    torch.float32
    """
    return x.to(compute_dtype(x.dtype))


def compute_eps(dtype: torch.dtype) -> float:
    """Machine epsilon of the compute dtype of ``dtype`` (the numerical-rank rule's eps).

    >>> compute_eps(torch.bfloat16) == torch.finfo(torch.float32).eps
    True
    """
    return torch.finfo(compute_dtype(dtype)).eps


def numerical_rank(S: torch.Tensor, shape: tuple[int, int], *, eps: float) -> torch.Tensor:
    """Number of singular values above ``max(m, n)·eps·σ₁`` (NumPy ``matrix_rank`` convention).

    >>> int(numerical_rank(torch.tensor([2.0, 1.0, 1e-12]), (3, 3), eps=torch.finfo(torch.float32).eps))
    2

    Args:
        S: [..., p] singular values, descending.
        shape: the matrix shape ``(m, n)``.
        eps: machine epsilon of the input's compute dtype (:func:`compute_eps`).

    Returns:
        [...] int64 tensor, 0 for a zero matrix.
    """
    if S.shape[-1] == 0:
        return torch.zeros(S.shape[:-1], dtype=torch.int64, device=S.device)
    return (S > max(shape) * eps * S[..., :1]).sum(-1)


def rows_per_block(row_len: int, *, elements: int | None = None) -> int:
    """Rows in one block when a row holds ``row_len`` entries (at least one row); ``elements`` defaults to
    :data:`ROW_BLOCK`, read when called (tests shrink it to exercise the blocked loops)."""
    return max(1, (ROW_BLOCK if elements is None else elements) // max(1, row_len))


def row_blocks(rows: int, row_len: int, *, elements: int | None = None) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive row blocks of at most ``elements`` entries covering ``rows`` rows.

    ``row_len`` counts every entry one row of the block touches (for a batch [B, m, n] cut along m, ``B·n``).

    >>> list(row_blocks(3, 4, elements=8))
    [(0, 2), (2, 3)]
    """
    step = rows_per_block(row_len, elements=elements)
    for s in range(0, rows, step):
        yield s, min(rows, s + step)


def batch_row_blocks(
    batch: int, rows: int, row_len: int, *, elements: int | None = None
) -> Iterator[tuple[int, int, list[tuple[int, int]]]]:
    """Blocks of a batch [B, rows, row_len] whose sums do not depend on the batch size: ``(b0, b1, spans)``.

    Every matrix is cut into the same row spans (:func:`row_blocks` of *one* matrix), and the members are taken
    ``b1 − b0`` at a time so that one span of all of them holds at most ``elements`` entries. A reduction over
    the spans therefore adds the same partial sums in the same order for a member whatever batch it is in: a
    batched call equals a call on each member alone, bit for bit where the kernels are batch-invariant (CPU),
    which is what lets a cached or resumed result equal an uninterrupted run's. ``elements`` defaults to
    :data:`ROW_BLOCK`, read at call time.

    >>> list(batch_row_blocks(3, 4, 2, elements=4))
    [(0, 1, [(0, 2), (2, 4)]), (1, 2, [(0, 2), (2, 4)]), (2, 3, [(0, 2), (2, 4)])]
    >>> list(batch_row_blocks(4, 2, 2, elements=8))
    [(0, 2, [(0, 2)]), (2, 4, [(0, 2)])]
    """
    elements = ROW_BLOCK if elements is None else elements
    spans = list(row_blocks(rows, row_len, elements=elements)) or [(0, rows)]
    widest = max(e - s for s, e in spans) * max(1, row_len)
    per = max(1, elements // max(1, widest))
    for b0 in range(0, batch, per):
        yield b0, min(batch, b0 + per), spans


def span_halves(spans: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """The row spans of one matrix in the two halves a reduction over them sums separately, first half then second
    (one half for a single span): ``(Σ first half) + (Σ second half)``, each half in order.

    That order is the policy's whatever runs it, so the two halves can run side by side in two lanes
    (:func:`weightgeo.linalg.hardware.over_lanes`: a 151936×4096 vocabulary matrix, a shape group of one member,
    keeps both cores busy) and give the same bits as one thread summing both.

    >>> span_halves([(0, 2), (2, 4), (4, 5)])
    [[(0, 2), (2, 4)], [(4, 5)]]
    >>> span_halves([(0, 3)])
    [[(0, 3)]]
    """
    if len(spans) < 2:
        return [list(spans)]
    h = (len(spans) + 1) // 2
    return [list(spans[:h]), list(spans[h:])]


def col_panels(n: int, *, width: int | None = None) -> list[tuple[int, int]]:
    """``(start, stop)`` of the column panels of a symmetric n×n product (at most ``width`` columns each, default
    :data:`COL_PANEL` read at call time; one panel when n is not wider than two).

    >>> col_panels(5, width=2)
    [(0, 2), (2, 4), (4, 5)]
    """
    w = COL_PANEL if width is None else width
    if n <= 2 * w:
        return [(0, n)]
    return [(s, min(n, s + w)) for s in range(0, n, w)]


def same_compute_dtype(b: torch.Tensor, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(b, f)`` unchanged when their compute dtypes agree (bf16/fp16/fp32 → fp32); else both as float64.

    The pair kernels work in one compute dtype; a mixed fp64/≤fp32 pair is analysed in float64 so the
    fp64 side keeps its precision.

    >>> [t.dtype for t in same_compute_dtype(torch.ones(1), torch.ones(1, dtype=torch.float64))]
    [torch.float64, torch.float64]
    """
    if compute_dtype(b.dtype) == compute_dtype(f.dtype):
        return b, f
    return b.to(torch.float64), f.to(torch.float64)


def holds(big: torch.dtype, small: torch.dtype) -> bool:
    """Whether float format ``big`` represents every value of ``small`` exactly (finer or equal significand, at
    least its range, down to its smallest subnormal).

    >>> holds(torch.float32, torch.bfloat16), holds(torch.bfloat16, torch.float16), holds(torch.float16, torch.bfloat16)
    (True, False, False)
    """
    a, b = torch.finfo(big), torch.finfo(small)
    return a.eps <= b.eps and a.max >= b.max and a.tiny * a.eps <= b.tiny * b.eps


def compared_format(base: torch.dtype, ft: torch.dtype) -> tuple[torch.dtype, bool] | None:
    """The rule for a tensor stored in two float formats: ``None`` when they are one; else ``(format, rounded)``.

    Where one format holds every value of the other (:func:`holds`: bf16 and fp16 in fp32, fp32 in fp64, FP8 in
    bf16) the stored values are compared, which is comparing in the finer format with nothing rounded
    (``rounded`` False). Where neither does (fp16 and bf16: fp16 has the finer significand, bf16 the wider range),
    no comparison of the stored values is exact in both, so both are rounded to the format with the coarser
    significand (``rounded`` True): bf16, whose range holds fp16's. A user's ``dtype=`` overrides the rule.

    >>> compared_format(torch.float16, torch.bfloat16), compared_format(torch.bfloat16, torch.float32)
    ((torch.bfloat16, True), (torch.float32, False))
    """
    if base == ft or not (base.is_floating_point and ft.is_floating_point):
        return None
    if holds(base, ft):
        return base, False
    if holds(ft, base):
        return ft, False
    fb, ff = torch.finfo(base), torch.finfo(ft)
    coarser = base if (fb.eps, fb.max) > (ff.eps, ff.max) else ft
    return coarser, True
