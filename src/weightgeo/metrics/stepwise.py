"""Sparsity step by step: one tensor of a stream against the base and the previous checkpoint, and the size of
the sparse patch that carries a step's changed entries (the kernels of ``weightgeo.sparsity_curve`` and of the
Tracker's sparsity logs).

An entry is *changed* between two versions of a tensor when the bf16 update rule says so (:mod:`.sparsity`:
both rounded to bf16, ``|ŵ1 − ŵ0| > η·max(|ŵ0|, |ŵ1|)``; for η < 2⁻⁹ the bf16 values differ, +0 and −0 equal);
where both versions are stored as scaled FP8, the FP8 rule on the stored codes and scales decides
(:func:`~weightgeo.metrics.sparsity.fp8_unchanged_count`).

**The sparse patch** (our encoding; docs/trajectories.md). A step's patch carries, per tensor, the entries
changed since the previous checkpoint, in whichever of three encodings is smallest for that tensor:

* ``"index"``: per changed entry its position, an unsigned integer of :func:`index_bytes` = 4 bytes (8 for a
  tensor of more than 2³² entries), and its new value;
* ``"bitmask"``: one bit per entry of the tensor (⌈n/8⌉ bytes), and the new values of the changed entries;
* ``"dense"``: the whole tensor's new values (no positions), when it changed almost everywhere;

values as the new checkpoint stores them: its element size (2 bytes for bf16, 4 for float32; an FP8 weight's
1-byte codes, plus its whole scale tensor when any scale changed bits). A tensor with no changed entry (and no
changed scale) costs nothing. Names, shapes and headers are not counted. So, with ``c`` changed entries of ``n``
and ``v`` bytes per value,

    patch_bytes = min(index_bytes(n) · c + c · v,  ⌈n/8⌉ + c · v,  n · v)  (+ scale bytes),   0 when c = 0,

never more than the tensor sent whole.

>>> patch_bytes(10, 1000, 2), patch_encoding(10, 1000, 2)      # 40 B of indices < 125 B of bitmask
(60, 'index')
>>> patch_bytes(500, 1000, 2), patch_encoding(500, 1000, 2)    # 125 B of bitmask < 2000 B of indices
(1125, 'bitmask')
>>> patch_bytes(990, 1000, 2), patch_encoding(990, 1000, 2)    # 2000 B whole < 125 + 1980 B
(2000, 'dense')
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from ..checkpoint import Fp8Weight
from ..errors import WeightgeoError
from ..linalg.policy import row_blocks
from ..validation import check_finite
from .sparsity import FAST_ETA, as_bf16, changed_bf16_cpu, fp8_unchanged_count, unchanged_mask

__all__ = [
    "index_bytes",
    "patch_bytes",
    "patch_encoding",
    "checked_bf16",
    "changed_count",
    "finite_bf16_cpu",
    "bf16_bits",
    "changed_against",
    "fp8_changed",
    "scale_bytes",
    "BACKENDS",
    "pack_bits",
    "unpack_bits",
    "HeldVersion",
    "hold",
    "restore",
]

#: the largest tensor whose positions fit an unsigned 32-bit index
_INDEX32 = 2**32
_EXPONENT = 0x7F80  # bf16's exponent bits
#: entries from which changed_against counts in two threads (below, a thread hand-off costs more than it saves)
_SPLIT = 1 << 20
#: entries per block of changed_against (measured: 2**18 beat 2**16 and 2**20 on a 4864×896 bf16 matrix;
#: a current version, two references and the booleans, 1.75 MB, stay within the CPU cache)
_BLOCK = 1 << 18
_NEG_ZERO = -32768  # bf16 -0.0 read as int16
#: how changed_count counts: ``"numpy"`` (int16 bits of CPU bf16 tensors, η < 2⁻⁹) or ``"torch"`` (any device)
BACKENDS = ("numpy", "torch")


def index_bytes(numel: int) -> int:
    """Bytes of one position in the index encoding: 4 (unsigned 32-bit), 8 beyond 2³² entries.

    >>> index_bytes(4096 * 4096), index_bytes(2**33)
    (4, 8)
    """
    return 4 if numel <= _INDEX32 else 8


def patch_encoding(changed: int, numel: int, value_bytes: int) -> str | None:
    """The smallest encoding of a tensor's patch: ``"index"``, ``"bitmask"`` or ``"dense"`` (ties go in that
    order), ``None`` when nothing changed.

    >>> patch_encoding(0, 10, 2), patch_encoding(1, 64, 2), patch_encoding(3, 64, 2), patch_encoding(64, 64, 2)
    (None, 'index', 'bitmask', 'dense')
    """
    if changed < 0 or changed > numel:
        raise WeightgeoError(f"patch_encoding: {changed} changed entries of a tensor of {numel}")
    if changed == 0:
        return None
    sizes = _sizes(changed, numel, value_bytes)
    return min(sizes, key=lambda k: sizes[k])  # the first of equal sizes: dicts keep their order


def _sizes(changed: int, numel: int, value_bytes: int) -> dict[str, int]:
    values = changed * int(value_bytes)
    return {
        "index": index_bytes(numel) * changed + values,
        "bitmask": math.ceil(numel / 8) + values,
        "dense": numel * int(value_bytes),
    }


def patch_bytes(changed: int, numel: int, value_bytes: int, *, scales: int = 0) -> int:
    """Bytes of one tensor's sparse patch (module docstring): the smallest of the three encodings.

    >>> patch_bytes(0, 4096, 2), patch_bytes(1, 4096, 2), patch_bytes(2000, 4096, 2), patch_bytes(4096, 4096, 2)
    (0, 6, 4512, 8192)

    Args:
        changed: entries changed in the interval, in [0, numel].
        numel: entries of the tensor.
        value_bytes: bytes of one stored value of the new checkpoint (its element size; 1 for FP8 codes).
        scales: bytes of an FP8 weight's scale tensor when any scale changed (sent whole), else 0.

    Returns:
        bytes ≥ 0; 0 when nothing changed.
    """
    enc = patch_encoding(changed, numel, value_bytes)
    return (0 if enc is None else _sizes(changed, numel, value_bytes)[enc]) + int(scales)


def scale_bytes(w: Fp8Weight) -> int:
    """Bytes of an FP8 weight's scale tensor (what a patch carries when any of its scales changed)."""
    return w.scales.numel() * w.scales.element_size()


def checked_bf16(w: torch.Tensor, what: str) -> torch.Tensor:
    """``w`` rounded to bf16 as the rule does (no copy for bf16), after checking it is finite there (fp32 values
    beyond the bf16 range round to ±inf); NaN/Inf raise a WeightgeoError naming ``what``."""
    b = as_bf16(w)
    if b.device.type != "cpu" or not finite_bf16_cpu(b):
        check_finite(b, what)
    return b


def changed_count(a: torch.Tensor, b: torch.Tensor, eta: float, *, backend: str | None = None) -> int:
    """Entries changed between two bf16 tensors of one shape (checked finite: :func:`checked_bf16`) under the
    bf16 rule with tolerance ``eta``.

    >>> changed_count(torch.tensor([1.0, 0.0, 2.0]).bfloat16(), torch.tensor([1.0, -0.0, 2.5]).bfloat16(), 1e-3)
    1

    Args:
        a, b: bf16 tensors, same shape, on one device.
        eta: the rule's relative tolerance (η < 2⁻⁹: the bf16 values differ).
        backend: ``"numpy"`` (int16 bits on the CPU, η < 2⁻⁹ only) or ``"torch"`` (any device: what CUDA runs);
            default: numpy where it applies, else torch. Both give the same count.
    """
    if a.shape != b.shape:
        raise WeightgeoError(f"changed_count: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
    if backend is None:
        backend = "numpy" if a.device.type == b.device.type == "cpu" and eta < FAST_ETA else "torch"
    if backend == "numpy":
        if eta >= FAST_ETA or a.device.type != "cpu" or b.device.type != "cpu":
            raise WeightgeoError("changed_count: the numpy backend counts CPU tensors with eta < 2**-9 only")
        return changed_bf16_cpu(a, b)
    if backend != "torch":
        raise WeightgeoError(f"changed_count: backend={backend!r}; choose from {', '.join(BACKENDS)}")
    if eta < FAST_ETA:
        return int(torch.count_nonzero(a != b))  # IEEE: +0 == -0
    return a.numel() - int(torch.count_nonzero(unchanged_mask(a, b, eta, check=False)))


def finite_bf16_cpu(b: torch.Tensor) -> bool:
    """Whether a CPU bf16 tensor is free of NaN/Inf, from two max-reductions of its bits (NumPy's fastest
    kernels): as int16, +NaN/+Inf are the patterns ≥ 0x7F80; as uint16, −NaN/−Inf are those ≥ 0xFF80.

    >>> finite_bf16_cpu(torch.tensor([1.0, -2.0]).bfloat16()), finite_bf16_cpu(torch.tensor([-float("inf")]).bfloat16())
    (True, False)
    """
    return bf16_bits(b)[0]


def bf16_bits(b: torch.Tensor) -> tuple[bool, bool]:
    """``(finite, has −0)`` of a CPU bf16 tensor from three reductions of its bits (−0 is int16's smallest
    pattern).

    >>> bf16_bits(torch.tensor([1.0, -0.0]).bfloat16())
    (True, True)
    """
    x = b.contiguous().view(torch.int16).numpy().ravel()
    if x.size == 0:
        return True, False
    finite = int(x.max()) < _EXPONENT and int(x.view(np.uint16).max()) < 0xFF80
    return finite, int(x.min()) == _NEG_ZERO


def changed_against(
    cur: torch.Tensor,
    refs: Sequence[torch.Tensor],
    *,
    check: Sequence[bool],
    negative_zero: Sequence[bool | None] | None = None,
) -> tuple[list[int], list[tuple[bool, bool] | None]]:
    """One blocked pass over CPU bf16 tensors: the entries of ``cur`` whose bf16 value differs from each of
    ``refs`` (+0 and −0 equal: the rule at η < 2⁻⁹), and :func:`bf16_bits` (finite, has −0) of each tensor whose
    ``check`` flag is set (``cur`` first, then ``refs``). ``negative_zero``: per tensor (same order) whether it is
    known to hold a −0 (``None``: unknown); a tensor known to hold none needs no −0 test block by block.

    Blocks of :data:`_BLOCK` entries keep ``cur`` and its references in the CPU's cache while they are compared
    and reduced, so each is read from memory once (separate passes read ``cur`` once per reference and once per
    reduction); large tensors are split in two halves, the second counted by a worker thread.

    >>> a, b = torch.tensor([1.0, 0.0, 3.0]).bfloat16(), torch.tensor([1.0, -0.0, 4.0]).bfloat16()
    >>> changed_against(b, [a, b], check=[True, False, False])
    ([1, 0], [(True, True), None, None])
    """
    y = cur.contiguous().view(torch.int16).numpy().ravel()
    xs = [r.contiguous().view(torch.int16).numpy().ravel() for r in refs]
    if any(x.shape != y.shape for x in xs):
        raise WeightgeoError(f"changed_against: shapes {[tuple(r.shape) for r in refs]} and {tuple(cur.shape)} differ")
    known = list(negative_zero) if negative_zero is not None else [None] * (1 + len(xs))
    n = y.size
    if n >= _SPLIT and (os.cpu_count() or 1) > 1:
        h = n // 2
        later = _pool().submit(_blocks, y[h:], [x[h:] for x in xs], check, known)
        first = _blocks(y[:h], [x[:h] for x in xs], check, known)
        second = later.result()
        counts = [a + b for a, b in zip(first[0], second[0])]
        bits = [None if p is None or q is None else (p[0] and q[0], p[1] or q[1]) for p, q in zip(first[1], second[1])]
        return counts, bits
    return _blocks(y, xs, check, known)


def _blocks(
    y: np.ndarray, xs: Sequence[np.ndarray], check: Sequence[bool], known: Sequence[bool | None]
) -> tuple[list[int], list[tuple[bool, bool] | None]]:
    """:func:`changed_against` over one contiguous range, block by block."""
    counts = [0] * len(xs)
    tensors = [y, *xs]
    hi = [-32768] * len(tensors)  # int16 max, uint16 max, int16 min of each checked tensor
    uhi = [0] * len(tensors)
    lo = [32767] * len(tensors)
    # a block's minimum tells whether it holds a −0 (int16's smallest pattern): needed of a tensor being checked,
    # and of one that may hold a −0 (for the ±0 pairs among the differences)
    minimum = [want or known[t] is not False for t, want in enumerate(check)]
    ne = np.empty(min(_BLOCK, max(y.size, 1)), dtype=np.bool_)
    for s in range(0, y.size, _BLOCK):
        blocks = [t[s : s + _BLOCK] for t in tensors]
        mins = [int(b.min()) if need and b.size else 0 for b, need in zip(blocks, minimum)]
        for t, want in enumerate(check):
            if want:
                hi[t] = max(hi[t], int(blocks[t].max()))
                uhi[t] = max(uhi[t], int(blocks[t].view(np.uint16).max()))
                lo[t] = min(lo[t], mins[t])
        yb = blocks[0]
        m = ne[: yb.size]
        for j in range(len(xs)):
            xb = blocks[j + 1]
            k = int(np.count_nonzero(np.not_equal(xb, yb, out=m)))
            if k and (mins[0] == _NEG_ZERO or mins[j + 1] == _NEG_ZERO):  # +0 against −0: unchanged
                k -= int(np.count_nonzero(m & (((xb | yb) & 0x7FFF) == 0)))
            counts[j] += k
    bits: list[tuple[bool, bool] | None] = [
        (hi[t] < _EXPONENT and uhi[t] < 0xFF80, lo[t] == _NEG_ZERO) if want else None for t, want in enumerate(check)
    ]
    return counts, bits


_POOL: list[ThreadPoolExecutor] = []


def _pool() -> ThreadPoolExecutor:
    """One worker thread for the second half of large comparisons (made on first use, kept)."""
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="weightgeo-count"))
    return _POOL[0]


def fp8_changed(a: Fp8Weight, b: Fp8Weight, eta: float, *, name: str = "") -> tuple[int, bool]:
    """Entries changed between two stored FP8 versions of a weight under the FP8 rule, in the policy's row blocks
    (the exact comparison expands to float64), and whether any scale changed bits (the patch then carries them).

    >>> c = torch.tensor([[1.0, 2.0], [3.0, 0.0]]).to(torch.float8_e4m3fn)
    >>> fp8_changed(Fp8Weight(c, torch.ones(1, 1), (2, 2)), Fp8Weight(c, torch.full((1, 1), 2.0), (2, 2)), 1e-3)
    (3, True)
    """
    if a.codes.shape != b.codes.shape:
        raise WeightgeoError(
            f"{name or 'fp8_changed'}: FP8 codes {tuple(a.codes.shape)} and {tuple(b.codes.shape)} differ in shape"
        )
    rows, cols = a.codes.shape
    total = rows * cols
    unchanged = 0
    for s, e in row_blocks(rows, cols):
        unchanged += fp8_unchanged_count(
            a.codes[s:e],
            a.scales,
            b.codes[s:e],
            b.scales,
            a.block,
            block1=b.block,
            eta=eta,
            row_start=a.row_start + s,
            rows=a.rows if a.rows is not None else a.row_start + rows,
            name=f"{name} rows {a.row_start + s}:{a.row_start + e}" if name else "",
        )
    moved = a.block != b.block or a.scales.shape != b.scales.shape or not torch.equal(_bits(a.scales), _bits(b.scales))
    return total - unchanged, bool(moved)


def _bits(scales: torch.Tensor) -> torch.Tensor:
    return scales.contiguous().view(torch.int32) if scales.dtype == torch.float32 else scales


# --- a version held as a patch of a reference (the Tracker's previous step) ------------------------------------
_BIT = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as bits, 8 to a byte (little-endian within a byte), on its device: [⌈n/8⌉] uint8.

    >>> pack_bits(torch.tensor([True, False, True] + [False] * 6)).tolist()
    [5, 0]
    """
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8).to(torch.uint8) * _BIT.to(flat.device)).sum(1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` booleans of :func:`pack_bits`'s bytes.

    >>> unpack_bits(torch.tensor([5, 0], dtype=torch.uint8), 3).tolist()
    [True, False, True]
    """
    return ((bits[:, None] & _BIT.to(bits.device)) != 0).reshape(-1)[:n]


@dataclass(frozen=True)
class HeldVersion:
    """The bf16 values of a tensor held as a patch of a reference: the bits of the entries that differ from it
    (``mask``, :func:`pack_bits`) and their values, or the whole tensor (``mask`` None) when that is smaller.
    Exact: :func:`restore` gives the values back bit for bit (n/8 + 2·c bytes, at most 2·n)."""

    values: torch.Tensor
    mask: torch.Tensor | None
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + (0 if self.mask is None else self.mask.numel())


def hold(reference: torch.Tensor, current: torch.Tensor, *, device: torch.device | None = None) -> HeldVersion:
    """``current`` (bf16) held against ``reference`` (bf16, same shape): the entries whose bits differ, or whole.

    >>> ref = torch.zeros(16, dtype=torch.bfloat16); cur = ref.clone(); cur[3] = 1
    >>> h = hold(ref, cur); h.nbytes, torch.equal(restore(ref, h), cur)
    (4, True)
    """
    if reference.shape != current.shape or reference.dtype != torch.bfloat16 or current.dtype != torch.bfloat16:
        raise WeightgeoError(
            f"hold: two bf16 tensors of one shape, got {reference.dtype} {tuple(reference.shape)} and "
            f"{current.dtype} {tuple(current.shape)}"
        )
    dev = current.device if device is None else device
    differ = reference.view(torch.int16) != current.view(torch.int16)
    n, c = current.numel(), int(torch.count_nonzero(differ))
    if math.ceil(n / 8) + 2 * c >= 2 * n:
        return HeldVersion(current.detach().to(dev, copy=True), None, tuple(current.shape))
    return HeldVersion(current[differ].to(dev), pack_bits(differ).to(dev), tuple(current.shape))


def restore(reference: torch.Tensor, held: HeldVersion) -> torch.Tensor:
    """The bf16 values :func:`hold` kept, on ``reference``'s device."""
    if held.mask is None:
        return held.values.to(reference.device)
    out = reference.clone()
    where = unpack_bits(held.mask.to(reference.device), reference.numel()).view(reference.shape)
    out[where] = held.values.to(reference.device)
    return out
