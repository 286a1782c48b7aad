"""Legacy ``pytorch_model.bin`` checkpoints, loaded with ``weights_only=True`` one shard at a time.

Pickles that need code execution are refused. Shards are memory-mapped when the file allows it and at
most one shard is open at a time; :meth:`TorchBinCheckpoint.get` returns a copy, so nothing returned keeps
a shard alive.

>>> import tempfile, torch
>>> from pathlib import Path
>>> d = Path(tempfile.mkdtemp())
>>> torch.save({"w": torch.ones(2, 3)}, d / "pytorch_model.bin")
>>> TorchBinCheckpoint([d / "pytorch_model.bin"]).get("w").shape
torch.Size([2, 3])
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import WeightgeoError
from ._files import file_identity, file_list, read_index
from .base import Checkpoint, TensorInfo

__all__ = ["TorchBinCheckpoint", "load_state_file", "SUFFIXES", "zip_problem"]

#: file suffixes of ``torch.save`` files (HF ``pytorch_model.bin``, verl and DeepSpeed ``.pt``, Trainer ``.pth``)
SUFFIXES = (".bin", ".pt", ".pth")
_ZIP_MAGIC = b"PK\x03\x04"
_NESTED_KEYS = ("state_dict", "model", "module", "model_state_dict")


def load_state_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """``torch.load`` one file safely (``weights_only=True``, mmap when possible) into a flat tensor dict.

    A plain ``{name: tensor}`` dict is expected; a dict nesting one under ``state_dict``/``model``/``module``
    is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightgeoError(f"{path}: no such file; pass an existing .bin/.pt checkpoint")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightgeoError(
            f"{path}: refused: weights_only loading failed, the pickle needs code execution or is corrupt "
            f"({first[:200]}); convert the checkpoint to safetensors (or re-save a plain state_dict)"
        ) from None
    except (
        RuntimeError,
        EOFError,
        OSError,
        ValueError,
        zipfile.BadZipFile,
        AttributeError,
        KeyError,
        TypeError,
        IndexError,
        UnicodeDecodeError,
        MemoryError,
        OverflowError,
    ) as e:
        raise WeightgeoError(
            f"{path}: cannot read this torch checkpoint ({type(e).__name__}: {str(e)[:200]}); "
            f"re-download or re-save the file"
        ) from None
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for k in _NESTED_KEYS:
            inner = obj.get(k)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise WeightgeoError(
            f"{path}: holds a {type(obj).__name__}, not a state_dict of tensors; save model.state_dict() instead"
        )
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightgeoError(
            f"{path}: entries {bad[:5]} are not named tensors (a training checkpoint?); save "
            f"model.state_dict() or convert to safetensors"
        )
    return dict(obj)


def zip_problem(path: Path, size: int) -> str | None:
    """Why a ``torch.save`` zip file is cut short or corrupt, or ``None``, from its zip directory alone (torch
    writes it last). Legacy (pre-zip) pickles cannot be checked cheaply: ``None``.

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "w.pt"
    >>> torch.save({"w": torch.ones(64)}, p)
    >>> zip_problem(p, p.stat().st_size) is None, zip_problem(p, 10) is None
    (True, False)
    """
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        return f"cannot read ({e})"
    if magic != _ZIP_MAGIC:
        return None if size > 0 else "empty file"
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        return (
            f"truncated or corrupt torch zip file ({size} bytes; {e}); torch writes the zip directory last, "
            f"so the save did not finish"
        )
    end = max((i.header_offset + len(i.FileHeader()) + i.compress_size for i in infos), default=0)
    if end > size:
        return f"truncated torch zip file: records end at byte {end} but the file has {size} bytes"
    return None


class TorchBinCheckpoint(Checkpoint):
    """``pytorch_model.bin`` files (or shards) behind the lazy :class:`Checkpoint` interface.

    Shapes are learnt by loading each shard once (mmap, no data copied); tensors are then read shard by
    shard, keeping at most one shard loaded.

    Args:
        files: the ``.bin``/``.pt`` files.
        weight_map: the index's ``{tensor name: shard file name}``; each listed tensor must be in its shard.
        source: description shown in messages.
        config: the parsed ``config.json``.
    """

    def __init__(
        self,
        files: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
        *,
        weight_map: Mapping[str, str] | None = None,
        source: str | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        paths, default_source = file_list(files, "TorchBinCheckpoint")
        self.files = paths
        self.source = source or default_source
        self.config = dict(config or {})
        self._weight_map = dict(weight_map) if weight_map is not None else None
        self._owner: dict[str, int] | None = None
        self._open: tuple[int, dict[str, torch.Tensor]] | None = None
        self._file_ids: dict[Path, dict[str, Any]] = {}  # identity() of each file, taken once
        for p in paths:
            if not p.is_file():
                raise WeightgeoError(f"{p}: no such file; pass existing .bin/.pt files")
        _ = self.infos  # validate every shard now (mmap: no tensor data is copied), not mid-analysis

    @classmethod
    def from_index(
        cls, index_path: str | os.PathLike[str], *, source: str | None = None, config: Mapping[str, Any] | None = None
    ) -> TorchBinCheckpoint:
        """Open a sharded checkpoint from its ``pytorch_model.bin.index.json`` (validated first)."""
        index_path = Path(index_path)
        weight_map, _meta, shards = read_index(index_path)
        return cls(list(shards.values()), weight_map=weight_map, source=source or str(index_path.parent), config=config)

    def _shard(self, i: int) -> dict[str, torch.Tensor]:
        if self._open is None or self._open[0] != i:
            self._open = None  # drop the previous shard before loading the next
            self._open = (i, load_state_file(self.files[i]))
        return self._open[1]

    def _infos(self) -> dict[str, TensorInfo]:
        infos: dict[str, TensorInfo] = {}
        owner: dict[str, int] = {}
        for i, p in enumerate(self.files):
            sd = self._shard(i)
            for name, t in sd.items():
                if name in owner:
                    raise WeightgeoError(
                        f"tensor {name!r} is stored twice, in {self.files[owner[name]]} and {p}; "
                        f"remove one copy or fix the shard index"
                    )
                owner[name] = i
                infos[name] = TensorInfo(name, tuple(t.shape), t.dtype)
        if self._weight_map is not None:
            names = [p.name for p in self.files]
            for name, shard in self._weight_map.items():
                if name not in owner or names[owner[name]] != shard:
                    raise WeightgeoError(
                        f"{self.source}: the index lists tensor {name!r} in {shard!r} but that "
                        f"shard does not hold it; re-download the shards or fix the index"
                    )
        self._owner = owner
        return infos

    def identity(self, name: str) -> dict[str, Any]:
        """The holding file's identity (resolved path, size, ``mtime_ns``, inode, ``ctime_ns``) plus the tensor's name, dtype and
        shape: a pickle has no per-tensor header, so any rewrite of the file invalidates all its tensors."""
        info = self.info(name)
        assert self._owner is not None
        path = self.files[self._owner[name]]
        if path not in self._file_ids:
            self._file_ids[path] = file_identity(path)
        return {
            "format": "torch",
            "file": self._file_ids[path],
            "tensor": name,
            "dtype": str(info.dtype),
            "shape": list(info.shape),
        }

    def _get(self, name: str) -> torch.Tensor:
        _ = self.infos
        assert self._owner is not None
        return self._shard(self._owner[name])[name].detach().clone()

    def _get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        _ = self.infos
        assert self._owner is not None
        return self._shard(self._owner[name])[name][start:stop].detach().clone()

    def close(self) -> None:
        self._open = None
