"""DeepSpeed ZeRO checkpoints (``global_stepN/``, as OpenRLHF and DeepSpeed-based trainers write them).

* ZeRO-0/1/2: ``mp_rank_00_model_states.pt`` holds the whole model's 16-bit weights under ``"module"``. It
  is loaded with ``weights_only=True`` and mmap, DeepSpeed's own pickled classes stubbed (:mod:`.pickles`),
  so DeepSpeed need not be installed; tensors are then read one at a time.
* ZeRO-3: parameters are partitioned across ``zero_pp_rank_{r}_mp_rank_00_model_states.pt`` and the fp32
  masters live in the optimizer shards; they are reassembled by DeepSpeed's own
  ``deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(..., lazy_mode=True)`` (DeepSpeed
  >= 0.16), which maps the shards and gathers one parameter at a time. This needs the optional extra
  ``pip install 'weightgeo[deepspeed]'``; DeepSpeed's loader unpickles its files with ``weights_only=False``,
  so open only checkpoints you trust.

Model-parallel saves (``mp_rank_01_*``) are refused. Names are the module's own (HF names under
OpenRLHF's ``model.`` wrapper, which :func:`~weightgeo.checkpoint.canonical_name` strips).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import WeightgeoError
from ._files import file_identity, read_config
from .base import Checkpoint, TensorInfo
from .format import Findings, FolderFiles, Format, Source
from .mapped_files import MappedFiles
from .pickles import load_torch_file
from .runs import DEEPSPEED_LATEST, step_of

__all__ = ["FORMAT", "DeepSpeedCheckpoint", "is_deepspeed_folder", "EXTRA"]

#: the pip extra that installs DeepSpeed for ZeRO-3 checkpoints
EXTRA = "pip install 'weightgeo[deepspeed]'"
_ZERO12 = "mp_rank_00_model_states.pt"
_ZERO3 = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_00_model_states\.pt$")
_ZERO3_GLOB = "zero_pp_rank_*"
_MODEL_PARALLEL_GLOB = "*mp_rank_*_model_states.pt"
_MP_RANK_0 = "mp_rank_00"  # the only model-parallel rank read
_FILES = ("_model_states.pt", "_optim_states.pt")  # what a tensor's values are reassembled from (identity)
_TAG_NAMINGS = ("global_stepN", "global_step_N")  # DeepSpeed tags as trainers name them (runs.STEP_NAMINGS)


def is_deepspeed_folder(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` is a DeepSpeed ``global_stepN`` folder (``*mp_rank_00_model_states.pt``).

    >>> is_deepspeed_folder(".")
    False
    """
    folder = Path(folder)
    return (folder / _ZERO12).is_file() or any(_ZERO3.match(p.name) for p in folder.glob(_ZERO3_GLOB))


def _load_module(path: Path) -> dict[str, torch.Tensor]:
    state = load_torch_file(path, prefixes=("deepspeed",))
    module = state.get("module") if isinstance(state, dict) else None
    if not isinstance(module, Mapping) or not module:
        raise WeightgeoError(
            f"{path}: has no 'module' state dict of weights (keys: "
            f"{sorted(state)[:8] if isinstance(state, dict) else type(state).__name__}); a ZeRO-3 save "
            f"keeps them partitioned, or the file is not a DeepSpeed model-states file"
        )
    bad = [k for k, v in module.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightgeoError(f"{path}: 'module' entries {bad[:4]} are not named tensors; the file is corrupt")
    return dict(module)


class DeepSpeedCheckpoint(Checkpoint):
    """A DeepSpeed ``global_stepN`` folder (ZeRO-0/1/2 or ZeRO-3) behind the lazy :class:`Checkpoint` interface.

    Args:
        folder: the ``global_stepN`` folder (its parent is the run folder holding ``latest``).
        source: description shown in messages.
        config: the model's parsed ``config.json``, when known.

    Raises:
        WeightgeoError: a model-parallel save, missing rank files, a ZeRO-3 save without DeepSpeed installed
            (the message names the extra), or files DeepSpeed cannot reassemble.
    """

    def __init__(
        self, folder: str | os.PathLike[str], *, source: str | None = None, config: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__()
        self.folder = Path(folder)
        self.source = source or str(self.folder)
        self.config = dict(config or {})
        others = sorted(p.name for p in self.folder.glob(_MODEL_PARALLEL_GLOB) if _MP_RANK_0 not in p.name)
        if others:
            raise WeightgeoError(
                f"{self.folder}: model-parallel DeepSpeed save ({others[:3]}); only mp_rank_00 (no "
                f"tensor parallelism) is read, convert with DeepSpeed's zero_to_fp32.py or save HF weights"
            )
        self._lazy: dict[str, Any] | None = None
        self._files: MappedFiles | None = None
        self._file_ids: list[dict[str, Any]] | None = None  # identity() of the files read, taken once
        if (self.folder / _ZERO12).is_file():
            self.zero_stage = "0-2"
            self._files = MappedFiles([self.folder / _ZERO12], _load_module)
            self._info = {n: TensorInfo(n, tuple(t.shape), t.dtype) for n, t in self._files.state(0).items()}
            self._files.release()
        else:
            self.zero_stage = "3"
            self._lazy = self._zero3()
            self._info = {}
            for n, t in self._lazy.items():
                dtype = getattr(t, "dtype", torch.float32)
                self._info[n] = TensorInfo(n, tuple(int(d) for d in t.shape), dtype)

    def _zero3(self) -> dict[str, Any]:
        ranks = sorted(int(m[1]) for p in self.folder.glob(_ZERO3_GLOB) if (m := _ZERO3.match(p.name)))
        missing = [r for r in range(max(ranks) + 1) if r not in ranks] if ranks else [0]
        if missing:
            raise WeightgeoError(
                f"{self.folder}: ZeRO-3 rank files zero_pp_rank_{missing[:4]}_mp_rank_00_model_states.pt "
                f"are missing; copy every rank's files of this save"
            )
        try:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        except ImportError:
            raise WeightgeoError(
                f"{self.folder}: is a DeepSpeed ZeRO-3 checkpoint (parameters partitioned across "
                f"{len(ranks)} ranks), whose reassembly needs DeepSpeed: {EXTRA}; or save HF weights "
                f"from the run (OpenRLHF --ckpt.save_hf)"
            ) from None
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints its progress to stdout
                state = get_fp32_state_dict_from_zero_checkpoint(
                    str(self.folder.parent), tag=self.folder.name, lazy_mode=True
                )
        except TypeError as e:
            if "lazy_mode" not in str(e):
                raise
            raise WeightgeoError(
                f"{self.folder}: the installed DeepSpeed has no lazy_mode in zero_to_fp32 (it came in "
                f"0.16); upgrade: {EXTRA}"
            ) from None
        except (ValueError, FileNotFoundError, KeyError, RuntimeError, OSError, EOFError) as e:
            raise WeightgeoError(
                f"{self.folder}: DeepSpeed cannot reassemble this ZeRO-3 checkpoint "
                f"({type(e).__name__}: {str(e)[:300]}); copy every rank's model and optimizer "
                f"files of this save"
            ) from None
        return dict(state)

    def _infos(self) -> dict[str, TensorInfo]:
        return dict(self._info)

    def identity(self, name: str) -> dict[str, Any]:
        """The identities (resolved path, size, ``mtime_ns``, inode, ``ctime_ns``) of the files the tensor is read from, plus its name,
        dtype and shape: ZeRO-0/1/2 ``mp_rank_00_model_states.pt``; ZeRO-3 every rank's model-states and
        optimizer-states file (its fp32 masters are reassembled from all of them)."""
        info = self.info(name)
        if self._file_ids is None:
            if self._files is not None:
                paths = list(self._files.paths)
            else:
                paths = sorted(p for p in self.folder.iterdir() if p.name.endswith(_FILES))
            self._file_ids = [file_identity(p) for p in paths]
        return {
            "format": "deepspeed",
            "zero_stage": self.zero_stage,
            "tensor": name,
            "dtype": str(info.dtype),
            "shape": list(info.shape),
            "files": self._file_ids,
        }

    def _get(self, name: str) -> torch.Tensor:
        if self._files is not None:
            t = self._files.state(0)[name].clone()
            self._files.touched(t.nbytes)
            return t
        assert self._lazy is not None
        t = self._lazy[name]
        return t.contiguous() if not isinstance(t, torch.Tensor) else t.clone()

    def _get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        if self._files is None:
            return self._get(name)[start:stop]
        t = self._files.state(0)[name][start:stop].clone()
        self._files.touched(t.nbytes)
        return t

    def close(self) -> None:
        if self._files is not None:
            self._files.release()


# --- the format ---------------------------------------------------------------------------------------------
def _recognise(source: Source) -> bool:
    return source.folder is not None and is_deepspeed_folder(source.folder)


def _open(source: Source) -> Checkpoint:
    assert source.folder is not None
    return DeepSpeedCheckpoint(
        source.folder, source=source.text, config={**source.base_config(), **read_config(source.folder)}
    )


def _complete(folder: FolderFiles, found: Findings) -> None:
    """DeepSpeed under the HF Trainer (``checkpoint-N/global_stepN/`` and ``checkpoint-N/latest``): ``latest``,
    which DeepSpeed writes after the tag folder, names it. (``latest`` at the run root: completeness.py.)"""
    if not folder.path.is_dir():
        return
    inner = [p for p in folder.path.iterdir() if p.is_dir() and step_of(p.name)[1] in _TAG_NAMINGS]
    if not inner:
        return
    found.saw("deepspeed")
    latest = folder.path / DEEPSPEED_LATEST
    if not latest.is_file():
        found.add(
            "no_marker",
            f"{folder.path}: DeepSpeed folder(s) {[p.name for p in inner]} but no "
            f"'{DEEPSPEED_LATEST}' file, which DeepSpeed writes after them",
        )
        return
    tag = latest.read_text(encoding="utf-8", errors="replace").strip()
    if not tag or os.path.basename(tag) != tag or not (folder.path / tag).is_dir():
        found.add("no_marker", f"{latest} names {tag!r}, which is not a folder here")
    else:
        found.mark(DEEPSPEED_LATEST)


FORMAT = Format(
    "deepspeed",
    "DeepSpeed ZeRO global_stepN: mp_rank_00_model_states.pt (ZeRO-0/1/2) or zero_pp_rank_*_mp_rank_00 (ZeRO-3)",
    recognise=_recognise,
    open=_open,
    complete=_complete,
)
