"""verl FSDP actor checkpoints (``global_step_N/actor/``): per-rank DTensor shards, reassembled one tensor at a time.

verl's FSDP (1 and 2) checkpoint manager writes ``model_world_size_{W}_rank_{R}.pt`` =
``torch.save(model.state_dict())`` on every rank, whose values are DTensors (fp32 by default), plus
``fsdp_config.json`` (``{"FSDP_version", "world_size"}``) and ``huggingface/`` (config and tokenizer; full HF
weights too when ``checkpoint.save_contents`` includes ``hf_model``). Each rank file is loaded with
``torch.load(mmap=True, weights_only=True)`` (DTensor is allow-listed once ``torch.distributed.tensor`` is
imported), which reads names, global shapes and placements but no tensor data. Everything is validated
before a tensor is read: every rank file present, one world size everywhere, one mesh and one placement per
tensor across ranks. A tensor is then the ``to_local()`` pieces of its ``Shard(d)`` placement concatenated
along ``d`` in mesh order (``Replicate`` mesh dims: the first replica), in the stored dtype (fp32 stays
fp32). ``Partial`` placements and tensor-parallel meshes are refused.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import WeightgeoError
from ._files import file_identity, read_config, read_json_object
from .base import Checkpoint, TensorInfo
from .format import Findings, FolderFiles, Format, Source
from .hf import has_weight_files, open_folder
from .mapped_files import MappedFiles
from .torch_bin import load_state_file

__all__ = ["FORMAT", "VerlFsdpCheckpoint", "is_verl_actor", "RANK_FILE"]

#: verl's per-rank model file name
RANK_FILE = re.compile(r"^model_world_size_(?P<w>\d+)_rank_(?P<r>\d+)\.pt$")
_RANK_GLOB = "model_world_size_*"
_FSDP_CONFIG = "fsdp_config.json"
_ACTOR = "actor"  # global_step_N/actor/
_HF_COPY = "huggingface"  # actor/huggingface/: config, tokenizer, and full weights with save_contents 'hf_model'
_TP_NAMES = ("tp", "tensor", "tensor_parallel", "ep", "expert", "cp", "pp")


def is_verl_actor(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` holds verl FSDP rank files (``model_world_size_W_rank_R.pt``) or ``fsdp_config.json``.

    >>> is_verl_actor(".")
    False
    """
    folder = Path(folder)
    return (folder / _FSDP_CONFIG).is_file() or any(RANK_FILE.match(p.name) for p in folder.glob(_RANK_GLOB))


@contextlib.contextmanager
def _quiet_mesh() -> Iterator[None]:
    # unpickling a DeviceMesh without process groups logs a torch.compile warning that does not apply here
    log = logging.getLogger("torch.distributed.device_mesh")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _load_rank(path: Path) -> dict[str, Any]:
    import torch.distributed.tensor  # noqa: F401 - allow-lists DTensor for weights_only loading

    with _quiet_mesh():
        return load_state_file(path)


@dataclass(frozen=True)
class _Layout:
    """How one tensor is reassembled: ``ranks`` hold its pieces in order, concatenated along ``dim``."""

    info: TensorInfo
    ranks: tuple[int, ...]
    dim: int | None  # None: one piece is the whole tensor (replicated or world size 1)
    sizes: tuple[int, ...]  # each piece's extent along dim


class VerlFsdpCheckpoint(Checkpoint):
    """A verl FSDP actor folder (``fsdp_config.json`` + ``model_world_size_W_rank_R.pt``) read lazily.

    Args:
        folder: the ``actor`` folder.
        source: description shown in messages (default: the folder).
        config: the model's parsed ``config.json`` (default: ``huggingface/config.json`` when present).

    Raises:
        WeightgeoError: a missing rank file, world sizes that disagree, a ``Partial`` or unknown placement, a
            tensor-parallel mesh, ranks that disagree on a tensor's shape, mesh or placement.
    """

    def __init__(
        self, folder: str | os.PathLike[str], *, source: str | None = None, config: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__()
        self.folder = Path(folder)
        self.source = source or str(self.folder)
        self.config = dict(config) if config is not None else read_config(self.folder / _HF_COPY)
        self.world_size, paths = self._rank_files()
        self._files = MappedFiles(paths, _load_rank)
        self._file_ids: dict[int, dict[str, Any]] = {}  # identity() of each rank file, taken once
        self._layouts = self._plan()
        self._files.release()  # planning mapped every file; reads map them again as needed

    def _rank_files(self) -> tuple[int, list[Path]]:
        found: dict[int, dict[int, Path]] = {}
        for p in self.folder.iterdir():
            m = RANK_FILE.match(p.name)
            if m:
                found.setdefault(int(m["w"]), {})[int(m["r"])] = p
        cfg_path = self.folder / _FSDP_CONFIG
        declared = None
        if cfg_path.is_file():
            declared = read_json_object(cfg_path, what=_FSDP_CONFIG).get("world_size")
            if declared is not None and (isinstance(declared, bool) or not isinstance(declared, int) or declared < 1):
                raise WeightgeoError(
                    f"{cfg_path}: world_size must be a positive integer, found {declared!r}; the file is corrupt"
                )
        if not found:
            raise WeightgeoError(
                f"{self.folder}: no model_world_size_<W>_rank_<R>.pt files (folder holds "
                f"{sorted(p.name for p in self.folder.iterdir())[:12]}); the actor was saved without "
                f"'model' in checkpoint.save_contents, open its huggingface/ folder if it holds weights"
            )
        if len(found) > 1:
            raise WeightgeoError(
                f"{self.folder}: rank files of several world sizes {sorted(found)} are mixed in one "
                f"folder; keep the files of one save"
            )
        world, ranks = next(iter(found.items()))
        if declared is not None and declared != world:
            raise WeightgeoError(
                f"{cfg_path}: world_size {declared} but the rank files say world size {world} "
                f"(model_world_size_{world}_rank_*.pt); the folder mixes two saves, re-copy it"
            )
        missing = [f"model_world_size_{world}_rank_{r}.pt" for r in range(world) if r not in ranks]
        extra = sorted(r for r in ranks if r >= world)
        if missing or extra:
            raise WeightgeoError(
                f"{self.folder}: world size {world} needs rank files 0..{world - 1}; "
                + (f"missing {missing[:8]}" if missing else f"unexpected ranks {extra[:8]}")
                + "; copy every rank's file of this save"
            )
        return world, [ranks[r] for r in range(world)]

    def _plan(self) -> dict[str, _Layout]:
        states = [self._files.state(r) for r in range(self.world_size)]
        names = list(states[0])
        for r, sd in enumerate(states[1:], start=1):
            if set(sd) != set(names):
                diff = sorted(set(sd) ^ set(names))
                raise WeightgeoError(
                    f"{self._files.paths[r]}: holds other tensors than rank 0 (e.g. {diff[:4]}); the "
                    f"rank files come from different saves"
                )
        return {name: self._layout(name, [sd[name] for sd in states]) for name in names}

    def _layout(self, name: str, values: list[Any]) -> _Layout:
        from torch.distributed.tensor import DTensor

        where = f"{self.source}: tensor {name!r}"
        if not all(isinstance(v, DTensor) for v in values):
            if self.world_size == 1 and isinstance(values[0], torch.Tensor):
                t = values[0]
                return _Layout(TensorInfo(name, tuple(t.shape), t.dtype), (0,), None, ())
            raise WeightgeoError(
                f"{where}: the rank files hold plain tensors, not DTensors, so how they were sharded "
                f"is not recorded; save with FSDP2 (or FSDP1 with a device mesh), as verl does"
            )
        v0 = values[0]
        mesh = v0.device_mesh.mesh
        dims = tuple(v0.device_mesh.mesh_dim_names or ())
        placements = tuple(v0.placements)
        shape, dtype = tuple(v0.shape), v0.dtype
        for r, v in enumerate(values):
            if (
                tuple(v.shape) != shape
                or tuple(v.placements) != placements
                or v.dtype != dtype
                or not torch.equal(v.device_mesh.mesh, mesh)
            ):
                raise WeightgeoError(
                    f"{where}: rank {r} has shape {tuple(v.shape)}, {v.dtype}, placements "
                    f"{tuple(v.placements)} but rank 0 has {shape}, {dtype}, {placements} (or another "
                    f"mesh); the rank files come from different saves"
                )
        if mesh.numel() != self.world_size:
            raise WeightgeoError(
                f"{where}: its device mesh has {mesh.numel()} ranks but the folder holds "
                f"{self.world_size} rank files; copy every rank's file of this save"
            )
        tp = [d for d in dims if d.lower() in _TP_NAMES]
        if tp:
            raise WeightgeoError(
                f"{where}: device mesh {dims} has a tensor/expert/context/pipeline-parallel dimension "
                f"{tp}, which is not reassembled (only FSDP and HSDP meshes are); merge the checkpoint "
                f"with verl's model_merger and open the Hugging Face output"
            )
        shard_dims: list[tuple[int, int]] = []  # (mesh dim, tensor dim)
        for m, p in enumerate(placements):
            kind = type(p).__name__
            if kind == "Replicate":
                continue
            if kind == "Shard":
                shard_dims.append((m, int(p.dim)))
                continue
            if kind == "Partial":
                raise WeightgeoError(
                    f"{where}: placement {p} on mesh dim {m}: a Partial tensor holds per-rank partial "
                    f"sums, not pieces of the weight; save the state dict after reduction "
                    f"(full_tensor()) or merge with verl's model_merger"
                )
            raise WeightgeoError(
                f"{where}: unknown placement {p!r} ({kind}) on mesh dim {m}; only Shard(d) and "
                f"Replicate are reassembled (a _StridedShard means FSDP over tensor parallelism, which "
                f"is not supported)"
            )
        if len(shard_dims) > 1:
            raise WeightgeoError(
                f"{where}: sharded on several mesh dims {placements} (tensor parallelism inside FSDP); "
                f"only one sharded mesh dim is reassembled"
            )
        info = TensorInfo(name, shape, dtype)

        def rank_at(coord: tuple[int, ...]) -> int:
            return int(mesh[coord])

        base = [0] * mesh.dim()
        if not shard_dims:
            return _Layout(info, (rank_at(tuple(base)),), None, ())
        m, d = shard_dims[0]
        if not 0 <= d < len(shape):
            raise WeightgeoError(f"{where}: placement Shard({d}) but the tensor has {len(shape)} dims; corrupt file")
        ranks = []
        for c in range(mesh.shape[m]):
            base[m] = c
            ranks.append(rank_at(tuple(base)))
        sizes = tuple(int(values[r].to_local().shape[d]) for r in ranks)
        local_other = [tuple(values[r].to_local().shape) for r in ranks]
        if sum(sizes) != shape[d] or any(s[:d] + s[d + 1 :] != shape[:d] + shape[d + 1 :] for s in local_other):
            raise WeightgeoError(
                f"{where}: the local shards {local_other} along dim {d} do not make up its global "
                f"shape {shape}; the rank files are inconsistent, re-copy them"
            )
        return _Layout(info, tuple(ranks), d, sizes)

    # --- Checkpoint -------------------------------------------------------------------------------
    def _infos(self) -> dict[str, TensorInfo]:
        return {n: lay.info for n, lay in self._layouts.items()}

    def placements(self, name: str) -> _Layout:
        """How tensor ``name`` is reassembled (rank order, concatenation dim, piece sizes)."""
        self.info(name)
        return self._layouts[name]

    def identity(self, name: str) -> dict[str, Any]:
        """The identities (resolved path, size, ``mtime_ns``, inode, ``ctime_ns``) of the rank files holding the tensor's pieces, in
        the order they are concatenated, plus its name, dtype, global shape and how it is reassembled (the
        concatenation dim and piece sizes): rewriting any of those files changes it."""
        lay = self.placements(name)
        return {
            "format": "verl_fsdp",
            "world_size": self.world_size,
            "tensor": name,
            "dtype": str(lay.info.dtype),
            "shape": list(lay.info.shape),
            "dim": lay.dim,
            "sizes": list(lay.sizes),
            "files": [self._file_id(r) for r in lay.ranks],
        }

    def _file_id(self, rank: int) -> dict[str, Any]:
        if rank not in self._file_ids:
            self._file_ids[rank] = file_identity(self._files.paths[rank])
        return self._file_ids[rank]

    def _piece(self, rank: int, name: str) -> torch.Tensor:
        v = self._files.state(rank)[name]
        return v.to_local() if hasattr(v, "to_local") else v

    def _get(self, name: str) -> torch.Tensor:
        lay = self._layouts[name]
        if lay.dim is None:
            out = self._piece(lay.ranks[0], name).clone()
        else:
            out = torch.cat([self._piece(r, name) for r in lay.ranks], dim=lay.dim)
        self._files.touched(lay.info.nbytes)
        return out

    def _get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        lay = self._layouts[name]
        if lay.dim != 0:
            out = self._get(name)[start:stop].clone()
            return out
        lo, hi, _ = slice(start, stop).indices(lay.info.shape[0])
        parts, at = [], 0
        for r, n in zip(lay.ranks, lay.sizes):
            a, b = max(lo, at), min(hi, at + n)
            if a < b:
                parts.append(self._piece(r, name)[a - at : b - at])
            at += n
        out = torch.cat(parts, dim=0) if parts else self._piece(lay.ranks[0], name)[:0].clone()
        self._files.touched(out.nbytes)
        return out

    def close(self) -> None:
        self._files.release()


# --- the format ---------------------------------------------------------------------------------------------
def _actor(folder: Path) -> Path | None:
    """The actor folder verl wrote into ``folder`` (``global_step_N/actor/``, or ``actor/`` itself), else ``None``:
    it holds rank files, or a ``huggingface/`` copy with full weights."""
    actor = folder / _ACTOR
    if actor.is_dir() and (is_verl_actor(actor) or has_weight_files(actor / _HF_COPY, safetensors_only=True)):
        return actor
    if is_verl_actor(folder) or (folder.name == _ACTOR and has_weight_files(folder / _HF_COPY, safetensors_only=True)):
        return folder
    return None


def _recognise(source: Source) -> bool:
    return source.folder is not None and _actor(source.folder) is not None


def _open(source: Source) -> Checkpoint:
    assert source.folder is not None
    folder = _actor(source.folder)
    assert folder is not None  # recognised
    text = source.text if folder == source.folder else str(folder)
    hf_dir = folder / _HF_COPY
    if not is_verl_actor(folder):
        return open_folder(hf_dir, source=str(hf_dir))
    shards = VerlFsdpCheckpoint(folder, source=text, config=source.config)
    if not has_weight_files(hf_dir, safetensors_only=True):
        return shards
    hf = open_folder(hf_dir, source=str(hf_dir))
    # the HF copy (checkpoint.save_contents 'hf_model') is cheaper to read; it is used unless it is less precise
    if _itemsize(hf) >= _itemsize(shards):
        shards.close()
        return hf
    hf.close()
    return shards


def _itemsize(ck: Checkpoint) -> int:
    return max(
        (i.dtype.itemsize for i in ck.infos.values() if i.dtype.is_floating_point and len(i.shape) == 2), default=0
    )


def _complete(folder: FolderFiles, found: Findings) -> None:
    """Every rank's ``model_world_size_W_rank_R.pt`` is there (the files themselves are torch zips: :mod:`.hf`)."""
    by_dir: dict[tuple[Path, int], set[int]] = {}
    for p in folder.sizes:
        m = RANK_FILE.match(p.name)
        if m:
            by_dir.setdefault((p.parent, int(m["w"])), set()).add(int(m["r"]))
    for (parent, world), ranks in sorted(by_dir.items(), key=lambda kv: str(kv[0])):
        found.saw("verl")
        missing = sorted(set(range(world)) - ranks)
        if missing:
            found.add(
                "missing_files",
                f"{parent}: model_world_size_{world}_rank_R.pt missing for ranks {missing[:8]} of {world}",
            )


FORMAT = Format(
    "verl",
    "verl FSDP actor: global_step_N[/actor] with model_world_size_W_rank_R.pt / fsdp_config.json, or its "
    "huggingface/ copy",
    recognise=_recognise,
    open=_open,
    complete=_complete,
)
