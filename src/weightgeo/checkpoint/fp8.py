"""FP8 weights with scales (DeepSeek-V3 and the *-FP8 releases; compressed-tensors FP8): read dequantised.

A block-scaled FP8 weight is stored as ``weight`` (``float8_e4m3fn``, [out, in]) plus ``weight_scale_inv``
(float32, [ceil(out/b0), ceil(in/b1)]); despite its name the scale multiplies: W = code · scale for every entry
of a b0 x b1 block, the block size coming from ``config.json``'s ``quantization_config.weight_block_size``
(default [128, 128]). compressed-tensors FP8 stores ``weight_scale`` per tensor ([1]) or per output channel
([out, 1]), which is the same rule with one block per tensor or per row. :class:`Fp8Checkpoint` offers each
such weight dequantised to float32 under its own name; the scale tensors are consumed (listed in
``skipped`` as folded into their weight) and :meth:`Fp8Checkpoint.fp8_weight` returns the stored codes and
scales, which the FP8 update rule compares (:func:`weightgeo.metrics.sparsity.fp8_unchanged_count`).

An FP8 tensor with no scales in a checkpoint whose config declares no FP8 quantisation is left as stored.
Other quantised formats (GPTQ, AWQ, bitsandbytes, ...: packed integers) are refused naming the format.

>>> import torch
>>> w = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.25, 4.0]])
>>> fp8_dequantize(w.to(torch.float8_e4m3fn), torch.tensor([[2.0, 10.0]]), (2, 2)).tolist()
[[2.0, -4.0, 30.0], [1.0, 0.5, 40.0]]
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import WeightgeoError
from .base import Checkpoint, Fp8Weight, TensorInfo
from .format import Format, Source, nothing_to_check

__all__ = [
    "FORMAT",
    "Fp8Weight",
    "Fp8Checkpoint",
    "fp8_dequantize",
    "expand_scales",
    "check_scales",
    "wrap_quantized",
    "DEFAULT_BLOCK",
    "FP8_DTYPES",
]

DEFAULT_BLOCK = (128, 128)
FP8_DTYPES = frozenset(
    getattr(torch, n)
    for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, n)
)
#: quant_method values of packed-integer formats, which weightgeo does not dequantise
_PACKED = {
    "gptq": "GPTQ",
    "awq": "AWQ",
    "bitsandbytes": "bitsandbytes",
    "aqlm": "AQLM",
    "hqq": "HQQ",
    "exl2": "EXL2",
    "quanto": "quanto",
    "eetq": "EETQ",
    "marlin": "Marlin",
    "gguf": "GGUF",
    "torchao": "torchao",
    "mxfp4": "MXFP4",
    "vptq": "VPTQ",
    "higgs": "HIGGS",
    "spqr": "SpQR",
}
_PACKED_NAMES = (".qweight", ".qzeros", ".g_idx", ".SCB", ".absmax", ".quant_map")


def check_scales(
    codes: torch.Tensor,
    scales: torch.Tensor,
    block: tuple[int, int],
    *,
    row_start: int = 0,
    rows: int | None = None,
    name: str = "",
) -> tuple[int, int]:
    """Check that ``codes`` are 2-D float8 and ``scales`` fit them in ``block`` s; return the block as two ints."""
    pre = f"{name}: " if name else ""
    if codes.dtype not in FP8_DTYPES or codes.ndim != 2:
        raise WeightgeoError(f"{pre}FP8 codes must be a 2-D float8 tensor, got {codes.dtype} {tuple(codes.shape)}")
    b0, b1 = (int(b) for b in block)
    if b0 <= 0 or b1 <= 0:
        raise WeightgeoError(f"{pre}block size {tuple(block)} must be two positive integers")
    total = codes.shape[0] + row_start if rows is None else rows
    want = (math.ceil(total / b0), math.ceil(codes.shape[1] / b1))
    if scales.ndim != 2 or tuple(scales.shape) != want or not scales.dtype.is_floating_point:
        raise WeightgeoError(
            f"{pre}FP8 scales have shape {tuple(scales.shape)} ({scales.dtype}) but a [{total}, "
            f"{codes.shape[1]}] weight in {b0}x{b1} blocks needs float scales of shape {want}; check "
            f"quantization_config.weight_block_size"
        )
    return b0, b1


def expand_scales(scales: torch.Tensor, block: tuple[int, int], row_start: int, rows: int, cols: int) -> torch.Tensor:
    """The scale of every entry of rows ``row_start .. row_start + rows`` (``cols`` columns): [rows, cols].

    >>> expand_scales(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), (2, 2), 1, 2, 3).tolist()
    [[1.0, 1.0, 2.0], [3.0, 3.0, 4.0]]
    """
    b0, b1 = block
    first, last = row_start // b0, (row_start + rows - 1) // b0 + 1 if rows else row_start // b0
    s = scales[first:last].repeat_interleave(b0, dim=0)
    off = row_start - first * b0
    return s[off : off + rows].repeat_interleave(b1, dim=1)[:, :cols]


def fp8_dequantize(
    codes: torch.Tensor,
    scales: torch.Tensor,
    block: tuple[int, int] = DEFAULT_BLOCK,
    *,
    dtype: torch.dtype = torch.float32,
    row_start: int = 0,
    rows: int | None = None,
) -> torch.Tensor:
    """``codes · scale`` per ``block`` (b0 rows x b1 columns; edge blocks may be partial) in ``dtype``.

    Args:
        codes: [n, in] float8 codes: rows ``row_start .. row_start + n`` of the weight.
        scales: the whole weight's scales, [ceil(rows/b0), ceil(in/b1)] (``weight_scale_inv``).
        block: (b0, b1), default (128, 128).
        rows: the whole weight's row count (default ``row_start + n``).

    Returns:
        [n, in] tensor in ``dtype`` (float32 by default; float64 gives the exact products).
    """
    b = check_scales(codes, scales, block, row_start=row_start, rows=rows)
    s = expand_scales(scales.to(dtype), b, row_start, codes.shape[0], codes.shape[1])
    return codes.to(dtype) * s


def _block_size(config: Mapping[str, Any], source: str) -> tuple[int, int]:
    q = config.get("quantization_config") if isinstance(config, Mapping) else None
    size = q.get("weight_block_size") if isinstance(q, Mapping) else None
    if size is None:
        return DEFAULT_BLOCK
    if (
        not isinstance(size, (list, tuple))
        or len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
    ):
        raise WeightgeoError(
            f"{source}: quantization_config.weight_block_size must be two positive integers, found "
            f"{size!r}; fix config.json"
        )
    return int(size[0]), int(size[1])


def _packed_format(config: Mapping[str, Any], infos: Mapping[str, TensorInfo]) -> tuple[str, str | None] | None:
    """``(format, an example packed tensor or None)`` of a packed-integer quantised checkpoint, else ``None``."""
    q = config.get("quantization_config") if isinstance(config, Mapping) else None
    method = str(q.get("quant_method", "")).lower() if isinstance(q, Mapping) else ""
    fmt = _PACKED.get(method)
    if (
        method == "compressed-tensors"
        and isinstance(q, Mapping)
        and q.get("format") not in (None, "float-quantized", "naive-quantized")
    ):
        fmt = f"compressed-tensors ({q.get('format')})"
    packed = next((n for n in infos if n.endswith(_PACKED_NAMES)), None)
    if fmt is None and packed is not None:
        fmt = "GPTQ/AWQ-style packed integers"
    return None if fmt is None else (fmt, packed)


def check_quantization(config: Mapping[str, Any], infos: Mapping[str, TensorInfo], source: str) -> None:
    """Refuse packed-integer quantised checkpoints (GPTQ, AWQ, ...), naming the format and the fix."""
    found = _packed_format(config, infos)
    if found is not None:
        fmt, packed = found
        what = f" (e.g. tensor {packed!r}, {str(infos[packed].dtype).replace('torch.', '')})" if packed else ""
        raise WeightgeoError(
            f"{source}: is quantised with {fmt}{what}: packed integer weights are not read (only "
            f"floating weights and scaled FP8); compare the unquantised model, or dequantise it first "
            f"(e.g. transformers' dequantize / merge back to bf16)"
        )


class Fp8Checkpoint(Checkpoint):
    """``inner`` with its scaled FP8 weights read dequantised (float32); everything else as stored.

    Args:
        inner: the stored checkpoint (safetensors, DCP, ...).
        block: the block size; default from ``inner.config``'s ``quantization_config.weight_block_size``,
            else (128, 128).
    """

    def __init__(self, inner: Checkpoint, *, block: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.source = inner.source
        self.config = dict(inner.config)
        self.skipped = list(inner.skipped)
        self.block: tuple[int, int] = (
            (int(block[0]), int(block[1])) if block is not None else _block_size(inner.config, inner.source)
        )
        self._fp8: dict[str, tuple[str, tuple[int, int]]] = {}  # weight -> (scale tensor, its block)
        consumed: dict[str, str] = {}
        declared = _declares_fp8(inner.config)
        for name in inner.names():
            info = inner.info(name)
            if info.dtype not in FP8_DTYPES:
                continue
            found = self._scale_of(name, info, required=declared)
            if found is None:  # a bare FP8 tensor (no scales, no FP8 quantization_config): its values as stored
                continue
            scale, blk = found
            self._fp8[name] = (scale, blk)
            consumed[scale] = name
        for name in inner.names():
            if name in consumed:
                self.skipped.append(
                    {
                        "name": name,
                        "reason": f"FP8 scales of {consumed[name]!r}, folded into its "
                        f"dequantised values (stored codes: fp8_weight())",
                    }
                )
            elif name.endswith(".input_scale") and name[: -len("input_scale")] + "weight" in self._fp8:
                self.skipped.append({"name": name, "reason": "FP8 activation scale (not a weight)"})
        self._hidden = set(consumed) | {s["name"] for s in self.skipped if s not in inner.skipped}

    def _scale_of(self, name: str, info: TensorInfo, *, required: bool) -> tuple[str, tuple[int, int]] | None:
        where = f"{self.source}: FP8 tensor {name!r} {info.shape}"
        block_name, chan_name = (
            name + "_scale_inv",
            (name[: -len("weight")] + "weight_scale" if name.endswith("weight") else name + "_scale"),
        )
        if block_name not in self.inner and chan_name not in self.inner and not required:
            return None
        if len(info.shape) != 2:
            raise WeightgeoError(f"{where}: only 2-D FP8 weights are dequantised")
        out, cols = info.shape
        if block_name in self.inner:
            s = self.inner.info(block_name).shape
            want = (math.ceil(out / self.block[0]), math.ceil(cols / self.block[1]))
            if tuple(s) != want:
                raise WeightgeoError(
                    f"{self.source}: {block_name!r} has shape {tuple(s)} but {name!r} {info.shape} in "
                    f"{self.block[0]}x{self.block[1]} blocks needs {want}; fix "
                    f"quantization_config.weight_block_size in config.json"
                )
            return block_name, self.block
        if chan_name in self.inner:
            s = tuple(self.inner.info(chan_name).shape)
            if s in ((), (1,), (1, 1)):
                return chan_name, (out, cols)
            if s in ((out,), (out, 1)):
                return chan_name, (1, cols)
            raise WeightgeoError(
                f"{self.source}: {chan_name!r} has shape {s}; per-tensor ([1]) and per-channel "
                f"([{out}, 1]) FP8 scales are read, group-wise ones are not"
            )
        raise WeightgeoError(
            f"{where}: no scales found ({block_name!r} or {chan_name!r}); an FP8 weight without its "
            f"scales cannot be read, the checkpoint is incomplete"
        )

    def _infos(self) -> dict[str, TensorInfo]:
        out = {}
        for n, i in self.inner.infos.items():
            if n in self._hidden:
                continue
            out[n] = TensorInfo(n, i.shape, torch.float32) if n in self._fp8 else i
        return out

    def fp8_weight(self, name: str, start: int | None = None, stop: int | None = None) -> Fp8Weight | None:
        """The stored codes of FP8 weight ``name`` (rows ``start:stop`` when given, reading only those) and its
        scales as [ceil(out/b0), ceil(in/b1)]; ``None`` for other tensors."""
        self.info(name)
        if name not in self._fp8:
            return None
        scale, blk = self._fp8[name]
        out, cols = self.inner.info(name).shape
        s = self.inner.get(scale).reshape(math.ceil(out / blk[0]), math.ceil(cols / blk[1]))
        if start is None and stop is None:
            return Fp8Weight(self.inner.get(name), s, blk, 0, out)
        lo, hi, _ = slice(start, stop).indices(out)
        return Fp8Weight(self.inner.get_rows(name, lo, max(lo, hi)), s, blk, lo, out)

    def fp8_block(self, name: str) -> tuple[int, int] | None:
        self.info(name)
        return self._fp8[name][1] if name in self._fp8 else None

    def _get(self, name: str) -> torch.Tensor:
        if name not in self._fp8:
            return self.inner.get(name)
        w = self.fp8_weight(name)
        assert w is not None
        return fp8_dequantize(w.codes, w.scales, w.block)

    def _get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        if name not in self._fp8:
            return self.inner.get_rows(name, start, stop)
        w = self.fp8_weight(name, start, stop)
        assert w is not None
        return fp8_dequantize(w.codes, w.scales, w.block, row_start=w.row_start, rows=w.rows)

    def identity(self, name: str) -> dict[str, Any] | None:
        """For an FP8 weight, the identities of its stored codes and of its scales plus the block size (both
        determine the dequantised values); for any other tensor the inner checkpoint's identity."""
        self.info(name)
        if name not in self._fp8:
            return self.inner.identity(name)
        scale, blk = self._fp8[name]
        codes, scales = self.inner.identity(name), self.inner.identity(scale)
        if codes is None or scales is None:
            return None
        return {"format": "fp8", "codes": codes, "scales": scales, "block": list(blk)}

    def in_out_layout(self, name: str) -> bool:
        return self.inner.in_out_layout(name)

    def close(self) -> None:
        self.inner.close()


def _declares_fp8(config: Mapping[str, Any]) -> bool:
    q = config.get("quantization_config") if isinstance(config, Mapping) else None
    return isinstance(q, Mapping) and str(q.get("quant_method", "")).lower() in ("fp8", "compressed-tensors")


def wrap_quantized(ckpt: Checkpoint) -> Checkpoint:
    """``ckpt`` itself, or an :class:`Fp8Checkpoint` over it when it stores FP8 weights with scales (or its config
    declares FP8 quantisation); packed-integer formats raise (see :func:`check_quantization`)."""
    source = Source(ckpt, ckpt.source)
    opened = _open(source) if _recognise(source) else ckpt
    assert isinstance(opened, Checkpoint)
    return opened


def _scaled_fp8(ckpt: Checkpoint) -> bool:
    fp8 = [n for n in ckpt.names() if ckpt.info(n).dtype in FP8_DTYPES]
    return bool(fp8) and (
        _declares_fp8(ckpt.config)
        or any(
            n + "_scale_inv" in ckpt or n + "_scale" in ckpt or n[: -len("weight")] + "weight_scale" in ckpt
            for n in fp8
        )
    )


def _recognise(source: Source) -> bool:
    """An opened checkpoint that stores FP8 weights with scales (or declares FP8 quantisation), or one quantised
    with a packed-integer format (refused when opened)."""
    ck = source.checkpoint
    return ck is not None and (_packed_format(ck.config, ck.infos) is not None or _scaled_fp8(ck))


def _open(source: Source) -> Checkpoint:
    ck = source.checkpoint
    assert ck is not None  # recognised
    check_quantization(ck.config, ck.infos, ck.source)
    return Fp8Checkpoint(ck)


FORMAT = Format(
    "fp8",
    "wraps any checkpoint with float8 weights and their scales (weight_scale_inv / weight_scale): read dequantised; "
    "packed-integer quantisation (GPTQ, AWQ, ...) refused",
    recognise=_recognise,
    open=_open,
    complete=nothing_to_check,
    wraps=True,
)
