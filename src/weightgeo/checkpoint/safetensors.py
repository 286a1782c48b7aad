"""Lazy safetensors reading: our own header validation, one tensor (or a row range) per read, no mmap.

Each read copies exactly the tensor's bytes (or the requested rows' bytes) from the file into a fresh
buffer with ``readinto``; nothing is memory-mapped, so resident memory tracks the tensor being read, not
the checkpoint. Headers are parsed and validated by :func:`read_header` before any data is read.

>>> import tempfile, torch
>>> from pathlib import Path
>>> from safetensors.torch import save_file
>>> d = Path(tempfile.mkdtemp())
>>> save_file({"w": torch.arange(6.0).reshape(3, 2).bfloat16()}, str(d / "model.safetensors"))
>>> ckpt = SafetensorsCheckpoint([d / "model.safetensors"])
>>> ckpt.info("w")
TensorInfo(name='w', shape=(3, 2), dtype=torch.bfloat16)
>>> ckpt.get_rows("w", 1, 3).float().tolist()
[[2.0, 3.0], [4.0, 5.0]]
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import WeightgeoError
from ..jsonfile import loads
from ._files import file_identity, file_list, read_index
from .base import Checkpoint, TensorInfo

__all__ = ["SafetensorsCheckpoint", "read_header", "SAFETENSORS_DTYPES", "SUFFIX"]

#: the file suffix of safetensors files
SUFFIX = ".safetensors"
_FIX = "re-download or re-save the file"
#: safetensors dtype codes that torch can hold, mapped to torch dtypes
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "C64": torch.complex64,
}
for _code, _attr in (
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("F8_E8M0", "float8_e8m0fnu"),
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
):
    if hasattr(torch, _attr):
        SAFETENSORS_DTYPES[_code] = getattr(torch, _attr)
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own bound on the JSON header


@dataclass(frozen=True)
class _Entry:
    path: Path
    start: int  # absolute byte offset in the file
    stop: int
    info: TensorInfo


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, _Entry], dict[str, str]]:
    """Parse and validate one safetensors header: ({name: entry}, ``__metadata__``). Reads no tensor data.

    Checks the 8-byte little-endian length, UTF-8 JSON object, dtype codes, shapes, and that every
    tensor's ``data_offsets`` lie inside the data section, match shape x itemsize, and do not overlap.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise WeightgeoError(
                    f"{path}: truncated safetensors file ({size} bytes, the 8-byte header length is missing); {_FIX}"
                )
            n = int.from_bytes(head, "little")
            if n > size - 8 or n > _MAX_HEADER:
                raise WeightgeoError(
                    f"{path}: safetensors header length {n} exceeds the file ({size} bytes) or the "
                    f"{_MAX_HEADER}-byte limit: truncated or not a safetensors file; {_FIX}"
                )
            raw = f.read(n)
    except FileNotFoundError:
        raise WeightgeoError(f"{path}: no such file; pass an existing .safetensors file") from None
    except IsADirectoryError:
        raise WeightgeoError(
            f"{path}: is a directory, not a .safetensors file; pass the file or use open_checkpoint(folder)"
        ) from None
    except OSError as e:
        raise WeightgeoError(f"{path}: cannot read ({e})") from None
    if len(raw) != n:
        raise WeightgeoError(f"{path}: truncated safetensors header ({len(raw)} of {n} bytes); {_FIX}")
    header = loads(raw, source=str(path), what="safetensors header", fix=_FIX)
    if not isinstance(header, dict):
        raise WeightgeoError(
            f"{path}: corrupt safetensors header, expected a JSON object, found {type(header).__name__}; {_FIX}"
        )
    data_start = 8 + n
    data_len = size - data_start
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise WeightgeoError(
            f"{path}: safetensors __metadata__ must map strings to strings, found {meta!r:.200}; {_FIX}"
        )
    entries: dict[str, _Entry] = {}
    spans: list[tuple[int, int, str]] = []
    for name, raw_entry in header.items():
        entries[name] = _parse_entry(path, name, raw_entry, data_start, data_len)
        spans.append((entries[name].start, entries[name].stop, name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise WeightgeoError(
                f"{path}: tensors {n0!r} (bytes {b0 - data_start}..{e0 - data_start}) and {n1!r} "
                f"(bytes {b1 - data_start}..{e1 - data_start}) overlap in the data section; {_FIX}"
            )
    return entries, dict(meta)


def _parse_entry(path: Path, name: str, e: Any, data_start: int, data_len: int) -> _Entry:
    where = f"{path}: tensor {name!r}"
    if not name:
        raise WeightgeoError(f"{path}: a tensor has an empty name; {_FIX}")
    if not isinstance(e, dict):
        raise WeightgeoError(f"{where}: header entry must be an object, found {type(e).__name__}; {_FIX}")
    code = e.get("dtype")
    if not isinstance(code, str) or code not in SAFETENSORS_DTYPES:
        raise WeightgeoError(
            f"{where}: unknown or unsupported dtype {code!r} (supported: "
            f"{', '.join(SAFETENSORS_DTYPES)}); convert the tensor to one of these and re-save"
        )
    dtype = SAFETENSORS_DTYPES[code]
    shape = e.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise WeightgeoError(f"{where}: shape must be a list of non-negative integers, found {shape!r:.100}; {_FIX}")
    offs = e.get("data_offsets")
    if (
        not isinstance(offs, list)
        or len(offs) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
    ):
        raise WeightgeoError(f"{where}: data_offsets must be [begin, end] integers, found {offs!r:.100}; {_FIX}")
    begin, end = offs
    info = TensorInfo(name, tuple(shape), dtype)
    if not 0 <= begin <= end <= data_len:
        raise WeightgeoError(
            f"{where}: data_offsets [{begin}, {end}] lie outside the data section "
            f"(0..{data_len} bytes): truncated or corrupt file; {_FIX}"
        )
    if end - begin != info.nbytes:
        raise WeightgeoError(
            f"{where}: data_offsets [{begin}, {end}] hold {end - begin} bytes but shape "
            f"{tuple(shape)} x {code} needs {info.nbytes}; {_FIX}"
        )
    return _Entry(path, data_start + begin, data_start + end, info)


def _read_bytes(path: Path, start: int, nbytes: int, name: str) -> torch.Tensor:
    # torch.empty, not bytearray: a bytearray is zero-filled first, which cost as much as the read itself.
    buf = torch.empty(nbytes, dtype=torch.uint8)
    view = buf.numpy().data.cast("B")
    got = 0
    try:
        with open(path, "rb", buffering=0) as f:
            f.seek(start + got)
            while got < nbytes:
                k = f.readinto(view[got:])
                if not k:
                    break
                got += k
    except OSError as e:
        raise WeightgeoError(f"{path}: cannot read tensor {name!r} ({e})") from None
    finally:
        view.release()
    if got != nbytes:
        raise WeightgeoError(
            f"{path}: tensor {name!r} is truncated ({got} of {nbytes} bytes at offset {start}); "
            f"the file changed or is incomplete; {_FIX}"
        )
    return buf


def _to_tensor(buf: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if buf.numel() == 0:
        return torch.empty(shape, dtype=dtype)
    return buf.view(dtype).reshape(shape)


class SafetensorsCheckpoint(Checkpoint):
    """One or more ``.safetensors`` files read lazily, one tensor (or row range) at a time, without mmap.

    Args:
        files: the shard files (one for an unsharded checkpoint).
        weight_map: the index's ``{tensor name: shard file name}``; each listed tensor must be in the header
            of that shard. Tensors present in a shard but not listed are kept.
        source: description shown in messages (default: the file or folder).
        config: the parsed ``config.json`` (default ``{}``).

    Use :meth:`from_index` for an HF ``model.safetensors.index.json``.
    """

    pure_io = True

    def __init__(
        self,
        files: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
        *,
        weight_map: Mapping[str, str] | None = None,
        source: str | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        paths, default_source = file_list(files, "SafetensorsCheckpoint")
        self.files = paths
        self.source = source or default_source
        self.config = dict(config or {})
        self.metadata: dict[str, str] = {}
        self._entries: dict[str, _Entry] = {}
        self._file_ids: dict[Path, dict[str, Any]] = {}  # identity() of each file, taken once
        for p in paths:
            entries, meta = read_header(p)
            self.metadata.update(meta)
            for name, ent in entries.items():
                if name in self._entries:
                    raise WeightgeoError(
                        f"tensor {name!r} is stored twice, in {self._entries[name].path} and {p}; "
                        f"remove one copy or fix the shard index"
                    )
                self._entries[name] = ent
        if weight_map is not None:
            by_name = {p.name: p for p in paths}
            for name, shard in weight_map.items():
                held = self._entries.get(name)
                if shard not in by_name:
                    raise WeightgeoError(
                        f"{self.source}: weight_map puts tensor {name!r} in {shard!r}, which is not "
                        f"among the shard files {sorted(by_name)}; fix the index"
                    )
                if held is None or held.path.name != shard:
                    raise WeightgeoError(
                        f"{by_name[shard]}: the index lists tensor {name!r} in this shard but its header does not "
                        f"hold it{'' if held is None else f' (found in {held.path.name})'}; re-download the "
                        f"shards or fix the index"
                    )

    @classmethod
    def from_index(
        cls, index_path: str | os.PathLike[str], *, source: str | None = None, config: Mapping[str, Any] | None = None
    ) -> SafetensorsCheckpoint:
        """Open a sharded checkpoint from its ``model.safetensors.index.json`` (validated first)."""
        index_path = Path(index_path)
        weight_map, _meta, shards = read_index(index_path)
        return cls(list(shards.values()), weight_map=weight_map, source=source or str(index_path.parent), config=config)

    def _infos(self) -> dict[str, TensorInfo]:
        return {n: e.info for n, e in self._entries.items()}

    def identity(self, name: str) -> dict[str, Any]:
        """The shard's identity (resolved path, size, ``mtime_ns``, inode, ``ctime_ns``, taken once per shard) and the tensor's
        header entry (dtype, shape, byte range)."""
        e = self._entries[self.info(name).name]
        if e.path not in self._file_ids:
            self._file_ids[e.path] = file_identity(e.path)
        return {
            "format": "safetensors",
            "file": self._file_ids[e.path],
            "tensor": name,
            "dtype": str(e.info.dtype),
            "shape": list(e.info.shape),
            "byte_range": [e.start, e.stop],
        }

    def _get(self, name: str) -> torch.Tensor:
        e = self._entries[name]
        buf = _read_bytes(e.path, e.start, e.stop - e.start, name)
        return _to_tensor(buf, e.info.dtype, e.info.shape)

    def _get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        e = self._entries[name]
        shape = e.info.shape
        lo, hi, _ = slice(start, stop).indices(shape[0])
        hi = max(lo, hi)
        row = e.info.nbytes // shape[0] if shape[0] else 0
        buf = _read_bytes(e.path, e.start + lo * row, (hi - lo) * row, name)
        return _to_tensor(buf, e.info.dtype, (hi - lo, *shape[1:]))
