"""torch.distributed.checkpoint folders (``.metadata`` + ``__<rank>_<n>.distcp``), read one tensor at a time.

This is what torchtitan (``step-N/``), Megatron/slime ``torch_dist`` (``iter_NNNNNNN/``) and accelerate's
FSDP ``SHARDED_STATE_DICT`` write. Listing comes from the metadata alone (global shape, dtype, stored
chunks; no process group): ``.metadata`` is unpickled with an allow-list (:mod:`.pickles`), Megatron's
classes are stubbed, and every chunk's file, offset and length are checked against the files before any
tensor is read. A tensor is read with ``torch.distributed.checkpoint.load({name: empty}, ...)`` in
single-process mode; a part of one (rows, one layer of a stacked tensor) with a load planner that asks only
for the stored chunks overlapping that part. Each stored chunk is one ``torch.save`` blob that DCP loads
whole, so memory is about the part read plus its largest overlapping chunk; when the chunks hold more than
was asked for, the last such read is kept (one at a time) so that a pass over a tensor's rows decodes each
chunk once.

Optimizer and training state, non-tensor entries and TransformerEngine ``_extra_state`` are not offered as
tensors; they are listed in :attr:`~weightgeo.checkpoint.Checkpoint.skipped` with the reason.

>>> import tempfile, warnings, torch, torch.distributed.checkpoint as dcp
>>> d = tempfile.mkdtemp()
>>> with warnings.catch_warnings():
...     warnings.simplefilter("ignore")
...     _ = dcp.save({"w": torch.arange(6.0).reshape(3, 2), "optimizer": {"step": 3}}, checkpoint_id=d, no_dist=True)
>>> ckpt = DcpCheckpoint(d)
>>> ckpt.names(), ckpt.get_rows("w", 1, 3).tolist(), ckpt.skipped
(['w'], [[2.0, 3.0], [4.0, 5.0]], [{'name': 'optimizer.step', 'reason': 'optimizer state'}])
"""

from __future__ import annotations

import inspect
import math
import os
import pickle
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import WeightgeoError
from ._files import CONFIG, file_identity, read_config, safe_shard_name
from .base import Checkpoint, TensorInfo
from .format import Findings, FolderFiles, Format, Source
from .megatron import is_megatron, megatron_folder_config, megatron_refusal, megatron_view
from .model_config import ArchConfig
from .pickles import STUB_PREFIXES, load_dcp_metadata
from .torchtitan import is_torchtitan, torchtitan_view

__all__ = ["FORMAT", "DcpCheckpoint", "is_dcp_folder", "skip_reason", "METADATA"]

#: what DCP renames into place once every rank's data is written: the folder's index and completion marker
METADATA = ".metadata"
_METADATA_TMP = METADATA + ".tmp"
_DATA_SUFFIX = ".distcp"  # __<rank>_<n>.distcp
_FIX = "the checkpoint was not written completely or was truncated by a copy; copy or save it again"
#: first name components of entries that are training state, not model weights (torchtitan, Megatron, DCP users)
_OPTIMIZER_ROOTS = frozenset({"optimizer", "optim", "optimizers", "optimizer_state", "optim_state"})
_STATE_ROOTS = frozenset(
    {
        "lr_scheduler",
        "lr_schedulers",
        "scheduler",
        "opt_param_scheduler",
        "dataloader",
        "data_loader",
        "train_state",
        "rng_state",
        "rng_tracker_states",
        "args",
        "checkpoint_version",
        "iteration",
        "num_floating_point_operations_so_far",
        "common_state",
        "extra_state",
        "content_metadata",
    }
)


def is_dcp_folder(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` is a torch.distributed.checkpoint folder (it holds ``.metadata``).

    >>> is_dcp_folder(".")
    False
    """
    return (Path(folder) / METADATA).is_file()


def skip_reason(name: str, is_tensor: bool) -> str | None:
    """Why a DCP entry is not a model weight (``None`` when it is one).

    >>> skip_reason("optimizer.state.layers.0.attention.wq.weight.exp_avg", True)
    'optimizer state'
    >>> skip_reason("decoder.layers.self_attention.linear_qkv._extra_state", False)
    'TransformerEngine _extra_state (FP8 scaling metadata, not a weight)'
    >>> skip_reason("tok_embeddings.weight", True) is None
    True
    """
    root = name.split(".", 1)[0]
    if root in _OPTIMIZER_ROOTS:
        return "optimizer state"
    if root in _STATE_ROOTS:
        return f"training state ({root})"
    if "_extra_state" in name:
        return "TransformerEngine _extra_state (FP8 scaling metadata, not a weight)"
    if not is_tensor:
        return "non-tensor entry (a pickled object)"
    return None


@dataclass(frozen=True)
class _Chunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


def _overlaps(c: _Chunk, start: Sequence[int], stop: Sequence[int]) -> bool:
    return all(o < e and s < o + n for o, n, s, e in zip(c.offsets, c.sizes, start, stop))


class DcpCheckpoint(Checkpoint):
    """A torch.distributed.checkpoint folder behind the lazy :class:`Checkpoint` interface.

    Args:
        folder: the folder holding ``.metadata`` and the ``.distcp`` files.
        source: description shown in messages (default: the folder).
        config: the model's parsed ``config.json``, when known (``{}`` otherwise).
        stub_prefixes: packages whose pickled classes in ``.metadata`` become inert placeholders
            (default: Megatron's).

    Raises:
        WeightgeoError: a missing or corrupt ``.metadata``, a chunk whose file is missing or too short, chunks
            outside their tensor's shape or not covering it.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        *,
        source: str | None = None,
        config: Mapping[str, Any] | None = None,
        stub_prefixes: tuple[str, ...] = STUB_PREFIXES,
    ) -> None:
        super().__init__()
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.folder = Path(folder)
        self.source = source or str(self.folder)
        self.config = dict(config or {})
        self.metadata = load_dcp_metadata(self.folder / METADATA, prefixes=stub_prefixes)
        self._tensors: dict[str, Any] = {}
        self._chunks: dict[str, list[_Chunk]] = {}
        for name, md in self.metadata.state_dict_metadata.items():
            is_tensor = isinstance(md, TensorStorageMetadata)
            why = skip_reason(name, is_tensor)
            if why is not None:
                self.skipped.append({"name": name, "reason": why})
                continue
            self._tensors[name] = md
        self._validate()
        self._reader: Any = None
        self._slab: tuple[str, tuple[int, ...], tuple[int, ...], torch.Tensor] | None = None
        self._file_ids: dict[str, dict[str, Any]] = {}  # identity() of each file, taken once

    # --- validation, from the metadata and file sizes alone ---------------------------------------
    def _validate(self) -> None:
        from torch.distributed.checkpoint.metadata import MetadataIndex

        meta_path = self.folder / METADATA
        self._check_files(meta_path)
        storage = self.metadata.storage_data
        for name, md in self._tensors.items():
            shape = tuple(int(d) for d in md.size)
            dtype = getattr(getattr(md, "properties", None), "dtype", None)
            if not isinstance(dtype, torch.dtype):
                raise WeightgeoError(
                    f"{meta_path}: tensor {name!r} has no dtype in the metadata (found {dtype!r}); "
                    f"the .metadata is corrupt, {_FIX}"
                )
            chunks = [_Chunk(tuple(int(o) for o in c.offsets), tuple(int(s) for s in c.sizes)) for c in md.chunks]
            if not chunks and math.prod(shape) > 0:
                raise WeightgeoError(f"{meta_path}: tensor {name!r} {shape} has no stored chunks; {_FIX}")
            covered = 0
            for i, c in enumerate(chunks):
                if (
                    len(c.offsets) != len(shape)
                    or len(c.sizes) != len(shape)
                    or any(o < 0 or n < 0 or o + n > d for o, n, d in zip(c.offsets, c.sizes, shape))
                ):
                    raise WeightgeoError(
                        f"{meta_path}: chunk {i} of tensor {name!r} (offsets {c.offsets}, sizes "
                        f"{c.sizes}) lies outside its global shape {shape}; the .metadata is "
                        f"corrupt, {_FIX}"
                    )
                covered += math.prod(c.sizes)
                if storage.get(MetadataIndex(name, c.offsets)) is None:
                    raise WeightgeoError(
                        f"{meta_path}: chunk {i} of tensor {name!r} (offsets {c.offsets}) has no "
                        f"storage entry; the .metadata is corrupt, {_FIX}"
                    )
            if covered != math.prod(shape):
                raise WeightgeoError(
                    f"{meta_path}: the stored chunks of tensor {name!r} {shape} hold {covered} entries, "
                    f"not {math.prod(shape)}; the .metadata is corrupt, {_FIX}"
                )
            self._chunks[name] = chunks

    def _check_files(self, meta_path: Path) -> dict[str, int]:
        """Every stored item (weights and training state alike) lies inside an existing file."""
        sizes: dict[str, int] = {}
        for index, info in self.metadata.storage_data.items():
            rel = safe_shard_name(meta_path, getattr(info, "relative_path", None))
            if rel not in sizes:
                path = self.folder / rel
                if not path.is_file():
                    present = sorted(p.name for p in self.folder.iterdir())
                    raise WeightgeoError(
                        f"{path}: missing: the metadata stores {getattr(index, 'fqn', index)!r} there "
                        f"(folder holds {present[:12]}); {_FIX}"
                    )
                sizes[rel] = path.stat().st_size
            off, length = int(info.offset), int(info.length)
            if off < 0 or length <= 0 or off + length > sizes[rel]:
                raise WeightgeoError(
                    f"{self.folder / rel}: truncated: {getattr(index, 'fqn', index)!r} is stored at "
                    f"bytes {off}..{off + length} but the file has {sizes[rel]} bytes; {_FIX}"
                )
        return sizes

    # --- Checkpoint -------------------------------------------------------------------------------
    def _infos(self) -> dict[str, TensorInfo]:
        return {
            n: TensorInfo(n, tuple(int(d) for d in md.size), md.properties.dtype) for n, md in self._tensors.items()
        }

    def _get(self, name: str) -> torch.Tensor:
        self._drop_slab(keep=name)
        info = self.info(name)
        if self._slab is not None and self._slab[1] == (0,) * len(info.shape) and self._slab[2] == info.shape:
            return self._slab[3].clone()
        out = torch.empty(info.shape, dtype=info.dtype)
        self._load(name, out, None)
        return out

    def _get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        n = self.info(name).shape[0]
        lo, hi, _ = slice(start, stop).indices(n)
        return self.get_region(name, (lo,), (max(lo, hi),))

    def stored_chunks(self, name: str) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """The ``(offsets, sizes)`` of each stored chunk of tensor ``name`` (one per saving rank and shard)."""
        self.info(name)
        return [(c.offsets, c.sizes) for c in self._chunks[name]]

    def identity(self, name: str) -> dict[str, Any]:
        """The tensor's metadata entry (dtype, shape, every stored chunk's offsets and sizes) and, per chunk, the
        holding file's identity (resolved path, size, ``mtime_ns``, inode, ``ctime_ns``, taken once per file) and byte range: any
        rewrite of a ``.distcp`` file holding one of its chunks changes it.

        >>> import tempfile, warnings, torch, torch.distributed.checkpoint as dcp
        >>> d = tempfile.mkdtemp()
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     _ = dcp.save({"w": torch.ones(2, 2)}, checkpoint_id=d, no_dist=True)
        >>> ident = DcpCheckpoint(d).identity("w")
        >>> ident["format"], ident["shape"], len(ident["chunks"])
        ('dcp', [2, 2], 1)
        """
        from torch.distributed.checkpoint.metadata import MetadataIndex

        info = self.info(name)
        chunks = []
        for c in self._chunks[name]:
            item = self.metadata.storage_data[MetadataIndex(name, c.offsets)]
            rel = str(item.relative_path)
            if rel not in self._file_ids:
                self._file_ids[rel] = file_identity(self.folder / rel)
            chunks.append(
                {
                    "offsets": list(c.offsets),
                    "sizes": list(c.sizes),
                    "file": self._file_ids[rel],
                    "byte_range": [int(item.offset), int(item.offset) + int(item.length)],
                }
            )
        return {"format": "dcp", "tensor": name, "dtype": str(info.dtype), "shape": list(info.shape), "chunks": chunks}

    def get_region(self, name: str, start: Sequence[int], stop: Sequence[int]) -> torch.Tensor:
        """The box ``[start, stop)`` of tensor ``name`` (over its leading dims; the others whole), reading only
        the stored chunks it overlaps.

        >>> import tempfile, warnings, torch, torch.distributed.checkpoint as dcp
        >>> d = tempfile.mkdtemp()
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     _ = dcp.save({"stacked": torch.arange(24.0).reshape(2, 3, 4)}, checkpoint_id=d, no_dist=True)
        >>> DcpCheckpoint(d).get_region("stacked", (1, 1), (2, 3)).shape
        torch.Size([1, 2, 4])
        """
        shape = self.info(name).shape
        if len(start) != len(stop) or len(start) > len(shape):
            raise WeightgeoError(
                f"{self.source}: tensor {name!r} {shape}: region start {tuple(start)} / stop "
                f"{tuple(stop)} must give the same number of leading dims (at most {len(shape)})"
            )
        begin = tuple(int(s) for s in start) + (0,) * (len(shape) - len(start))
        end = tuple(int(e) for e in stop) + shape[len(stop) :]
        if any(not 0 <= b <= e <= d for b, e, d in zip(begin, end, shape)):
            raise WeightgeoError(f"{self.source}: tensor {name!r} {shape}: region {begin}..{end} lies outside it")
        self._drop_slab(keep=name)
        if math.prod(e - b for b, e in zip(begin, end)) == 0:
            return torch.empty(tuple(e - b for b, e in zip(begin, end)), dtype=self.info(name).dtype)
        slab = self._slab
        if slab is None or not all(s0 <= b and e <= s1 for b, e, s0, s1 in zip(begin, end, slab[1], slab[2])):
            hit = [c for c in self._chunks[name] if _overlaps(c, begin, end)]
            lo = tuple(min(c.offsets[d] for c in hit) for d in range(len(shape)))
            hi = tuple(max(c.offsets[d] + c.sizes[d] for c in hit) for d in range(len(shape)))
            if (lo, hi) == (begin, end):  # the chunks hold exactly what was asked for: nothing to keep
                return self._read_box(name, begin, end)
            self._slab = None
            self._slab = slab = (name, lo, hi, self._read_box(name, lo, hi))
        index = tuple(slice(b - s0, e - s0) for b, e, s0 in zip(begin, end, slab[1]))
        return slab[3][index].clone()

    def close(self) -> None:
        self._slab = None
        self._reader = None

    # --- reading through torch.distributed.checkpoint ----------------------------------------------
    def _drop_slab(self, *, keep: str) -> None:
        if self._slab is not None and self._slab[0] != keep:
            self._slab = None

    def _read_box(self, name: str, begin: tuple[int, ...], end: tuple[int, ...]) -> torch.Tensor:
        info = self.info(name)
        out = torch.empty(tuple(e - b for b, e in zip(begin, end)), dtype=info.dtype)
        self._load(name, out, None if (begin, end) == ((0,) * len(end), info.shape) else begin)
        return out

    def _load(self, name: str, out: torch.Tensor, offsets: tuple[int, ...] | None) -> None:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        kwargs: dict[str, Any] = {}
        if "no_dist" in inspect.signature(dcp.load).parameters:
            kwargs["no_dist"] = True  # never coordinate with other ranks: each reads its own tensors
        elif dist.is_available() and dist.is_initialized():  # pragma: no cover - torch < 2.7 under torchrun
            raise WeightgeoError(
                f"{self.source}: reading a DCP checkpoint inside a torch.distributed job needs "
                f"torch >= 2.7 (dcp.load(no_dist=True)); upgrade torch or run single-process"
            )
        planner = _DefaultPlanner() if offsets is None else _BoxPlanner(name, offsets, out)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process"
                dcp.load({name: out}, storage_reader=self._storage_reader(), planner=planner, **kwargs)
        except CheckpointException as e:
            raise WeightgeoError(
                f"{self.source}: tensor {name!r} cannot be read ({_first_failure(e)}); a stored "
                f"chunk is corrupt, {_FIX}"
            ) from None
        except (
            RuntimeError,
            pickle.UnpicklingError,
            EOFError,
            OSError,
            ValueError,
            zipfile.BadZipFile,
            AssertionError,
            KeyError,
        ) as e:
            raise WeightgeoError(
                f"{self.source}: tensor {name!r} cannot be read ({type(e).__name__}: "
                f"{str(e)[:200]}); a stored chunk is corrupt, {_FIX}"
            ) from None

    def _storage_reader(self) -> Any:
        if self._reader is None:
            self._reader = _reader_class()(self.folder, self.metadata)
        return self._reader


def _first_failure(e: BaseException) -> str:
    failures = getattr(e, "failures", None) or {}
    for failure in failures.values():
        exc = failure[0] if isinstance(failure, tuple) else failure
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    return str(e)[:200]


_CLASSES: dict[str, type] = {}


def _reader_class() -> type:
    """A ``FileSystemReader`` that returns the already validated metadata instead of unpickling it again."""
    if "reader" not in _CLASSES:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import StorageMeta

        class _Reader(FileSystemReader):
            def __init__(self, folder: Path, metadata: Any) -> None:
                super().__init__(folder)
                if getattr(metadata, "storage_meta", None) is None:
                    metadata.storage_meta = StorageMeta()
                if getattr(metadata, "planner_data", None) is None:
                    metadata.planner_data = {}
                self._metadata = metadata

            def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
                self._metadata.storage_meta.load_id = self.load_id
                return self._metadata

        _CLASSES["reader"] = _Reader
    return _CLASSES["reader"]


def _DefaultPlanner() -> Any:
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    return DefaultLoadPlanner()


def _BoxPlanner(name: str, offsets: tuple[int, ...], out: torch.Tensor) -> Any:
    """A load planner for one box of one tensor: read items for the stored chunks overlapping it only."""
    if "box" not in _CLASSES:
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        class _Box(DefaultLoadPlanner):
            def __init__(self, name: str, offsets: tuple[int, ...], out: torch.Tensor) -> None:
                super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
                self._name, self._offsets, self._out = name, offsets, out

            def create_local_plan(self) -> Any:
                assert self.metadata is not None  # set by set_up_planner before any plan is made
                md = self.metadata.state_dict_metadata[self._name]
                assert isinstance(md, TensorStorageMetadata)  # only tensors are offered (skip_reason)
                box = ChunkStorageMetadata(offsets=torch.Size(self._offsets), sizes=self._out.size())
                return LoadPlan(create_read_items_for_chunk_list(self._name, md, [box]))

            def lookup_tensor(self, index: Any) -> torch.Tensor:
                return self._out  # read items' dest_offsets are relative to the box

        _CLASSES["box"] = _Box
    return _CLASSES["box"](name, offsets, out)


# --- the format ---------------------------------------------------------------------------------------------
def _recognise(source: Source) -> bool:
    folder = source.folder
    return folder is not None and (is_dcp_folder(folder) or megatron_refusal(folder, dcp=False) is not None)


def _open(source: Source) -> Checkpoint:
    """The DCP folder as HF-named tensors when Megatron's or torchtitan's names are recognised, else as stored."""
    folder = source.folder
    assert folder is not None
    refusal = megatron_refusal(folder, dcp=is_dcp_folder(folder))
    if refusal is not None:
        raise WeightgeoError(refusal)
    text, base_config = source.text, source.base_config()
    inner = DcpCheckpoint(folder, source=text, config=read_config(folder))
    names = inner.names()
    if is_megatron(names):
        args, unread = megatron_folder_config(folder)
        inner.skipped.extend(unread)
        arch = ArchConfig.of(
            source.config,
            inner.config,
            base_config,
            args,
            source=text,
            names=("config=", CONFIG, "base", "common.pt args"),
        )
        return megatron_view(inner, arch, source=text)
    if is_torchtitan(names):
        arch = ArchConfig.of(source.config, inner.config, base_config, source=text, names=("config=", CONFIG, "base"))
        return torchtitan_view(inner, arch, source=text)
    inner.config = {**base_config, **inner.config}
    return inner


def _complete(folder: FolderFiles, found: Findings) -> None:
    """``.metadata`` is there (DCP renames it into place after every rank's data is written) and every data file it
    names is as long as the byte ranges it records."""
    sizes = folder.sizes
    names = set(sizes)
    if any(p.suffix == _DATA_SUFFIX for p in names):
        found.weights = True
    if not any(p.name in (METADATA, _METADATA_TMP) or p.suffix == _DATA_SUFFIX for p in names):
        return
    found.saw("dcp")
    if any(p.name == METADATA for p in names):
        found.weights = True  # the data files it names are checked below
    for d in sorted({p.parent for p in names if p.suffix == _DATA_SUFFIX or p.name.startswith(METADATA)}):
        meta = d / METADATA
        if meta not in names:
            pending = f" ({_METADATA_TMP} present: being written)" if (d / _METADATA_TMP) in names else ""
            found.add("no_marker", f"{d}: DCP data files but no {METADATA}, which DCP writes last{pending}")
            continue
        try:
            ranges = _data_ranges(meta)
        except Exception as e:
            found.add("bad_file", f"{meta}: unreadable DCP metadata ({type(e).__name__}: {str(e)[:120]})")
            continue
        found.mark(METADATA)
        need: dict[str, int] = {}
        for rel, end in ranges:
            need[rel] = max(need.get(rel, 0), end)
        for rel, end in sorted(need.items()):
            if os.path.basename(rel) != rel or rel in ("", ".", ".."):
                found.add("bad_file", f"{meta}: data file {rel!r} is not a plain file name")
                continue
            p = d / rel
            if p not in sizes:
                found.add("missing_files", f"{meta}: names data file {rel} that does not exist")
            elif sizes[p] < end:
                found.add("bad_file", f"{p}: truncated: {sizes[p]} bytes, but {METADATA} records data up to byte {end}")


def _data_ranges(meta: Path) -> list[tuple[str, int]]:
    """``(relative data file, end byte)`` of every stored item recorded in a DCP ``.metadata`` (read with the
    checkpoint layer's restricted unpickler: nothing is imported or run beyond DCP's own metadata classes)."""
    storage = load_dcp_metadata(meta).storage_data
    return [(info.relative_path, int(info.offset) + int(info.length)) for info in storage.values()]


FORMAT = Format(
    "dcp",
    "torch.distributed.checkpoint (.metadata + __R_0.distcp): Megatron/slime iter_N and torchtitan step-N names "
    "mapped to HF names, others as stored; other Megatron layouts refused",
    recognise=_recognise,
    open=_open,
    complete=_complete,
)
