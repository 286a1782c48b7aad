"""One resolver for every input: the first format of the registry (:mod:`.registry`) that recognises a source
opens it as a lazy :class:`Checkpoint`.

>>> import torch
>>> ckpt = open_checkpoint({"w": torch.ones(2, 2)})
>>> ckpt.source, ckpt.names()
('state_dict', ['w'])
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import WeightgeoError
from . import registry
from .base import Checkpoint
from .format import Source
from .model_config import read_model_config
from .runs import TRACKERS, run_folder_message, step_folders
from .state_dict import StateDictCheckpoint

__all__ = ["open_checkpoint", "StateDictCheckpoint"]

#: a located source that locates again, more than this many times, is a loop between formats
_MAX_HOPS = 8


def open_checkpoint(source: Any, *, base: Any = None, revision: str | None = None, config: Any = None) -> Checkpoint:
    """Open any checkpoint source as a lazy :class:`Checkpoint`.

    ``source`` is a :class:`Checkpoint` (returned as is), a ``{name: Tensor}`` mapping, an ``nn.Module``
    (its ``state_dict()``), or a path: a model folder (``model.safetensors`` [+ index], else
    ``pytorch_model.bin`` [+ index]; HF Trainer ``checkpoint-<step>`` folders too), a LoRA adapter folder
    (needs ``base=``), a ``.safetensors``/``.bin``/``.pt`` file or a ``*.index.json``, or a training
    framework's own checkpoint folder: torch.distributed.checkpoint (torchtitan ``step-N``, Megatron/slime
    ``iter_NNNNNNN``, mapped to HF names), verl ``global_step_N[/actor]`` (FSDP rank shards), DeepSpeed
    ``global_stepN`` (docs/checkpoints.md). A string that is no existing path but looks like
    ``org/name[@revision]`` is fetched from the Hub (cache only when ``HF_HUB_OFFLINE=1``). Scaled FP8 weights
    are read dequantised (:class:`~weightgeo.checkpoint.fp8.Fp8Checkpoint`).

    Args:
        base: the base model (any source) for a LoRA adapter; for a native checkpoint, its config supplies
            the architecture numbers the name mapping needs when ``config`` does not.
        revision: hub revision (branch, tag, commit) for hub ids.
        config: the model's HF config (a ``config.json`` path, its folder, a dict or a transformers config):
            the architecture numbers (heads, KV heads, head dim, layers, vocabulary size) that native name
            schemes need; for other sources it is merged over the checkpoint's own ``config``.

    Raises:
        WeightgeoError: unknown source, missing or corrupt files, an adapter without ``base``, a native
            checkpoint whose mapping needs a number no config gives (the message says to pass ``config=``).
    """
    if isinstance(source, Checkpoint):
        return source
    explicit = read_model_config(config) if config is not None else None
    ckpt = _open(_source(source, base=base, revision=revision, config=explicit))
    if explicit:
        ckpt.config = {**ckpt.config, **explicit}
    return _wrap(ckpt)


def _source(source: Any, *, base: Any, revision: str | None, config: dict[str, Any] | None) -> Source:
    """``source`` as the formats see it: an existing path as a :class:`Path`; anything else as given."""
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        path = Path(text).expanduser()
        if path.exists():
            return Source(path, str(path), base, revision, config)
        if path.is_symlink():  # a link to nothing, or a loop: say so, not "no such file"
            try:
                path.resolve(strict=True)
                why = "which cannot be followed"
            except (OSError, RuntimeError) as e:
                why = (
                    "which is a loop"
                    if "loop" in str(e).lower() or getattr(e, "errno", 0) == 40
                    else "which is missing"
                )
            raise WeightgeoError(
                f"{path} is a symbolic link to {os.readlink(path)}, {why}; fix the link or pass the checkpoint itself"
            )
        return Source(source, text, base, revision, config)
    return Source(source, type(source).__name__, base, revision, config)


def _open(source: Source) -> Checkpoint:
    """Open ``source`` with the first format that recognises it, following what a format locates (a hub id's
    snapshot folder) to the format that opens that."""
    for _ in range(_MAX_HOPS):
        fmt = registry.recognise(source)
        if fmt is None:
            raise _unrecognised(source)
        if fmt.needs_base and source.base is not None:
            source = replace(source, base=open_checkpoint(source.base))  # the base is any source: opened here
        opened = fmt.open(source)
        if isinstance(opened, Checkpoint):
            return opened
        source = opened
    raise WeightgeoError(f"{source.text}: formats located each other {_MAX_HOPS} times without opening it")


def _wrap(ckpt: Checkpoint) -> Checkpoint:
    """``ckpt`` inside every wrapping format that recognises it (FP8 dequantisation), in registry order."""
    for fmt in registry.FORMATS:
        source = Source(ckpt, ckpt.source)
        if fmt.wraps and fmt.recognise(source):
            opened = fmt.open(source)
            if not isinstance(opened, Checkpoint):  # a wrapper wraps: it never locates
                raise TypeError(f"format {fmt.name!r} wraps a checkpoint but returned {type(opened).__name__}")
            ckpt = opened
    return ckpt


def _unrecognised(source: Source) -> WeightgeoError:
    """What no format recognised, in words, and what to pass instead."""
    if source.folder is not None:
        return WeightgeoError(_no_weights(source.folder))
    if source.file is not None:
        return WeightgeoError(
            f"{source.file}: unknown checkpoint file type; pass a .safetensors, .bin/.pt or *.index.json file or "
            f"the model folder"
        )
    if isinstance(source.value, (str, os.PathLike)):
        return WeightgeoError(
            f"no such file or directory: {source.text}; pass a local checkpoint dir, a .safetensors file or a hub id"
        )
    return WeightgeoError(
        f"cannot open a {type(source.value).__name__} as a checkpoint; pass a path, a hub id, a "
        f"state_dict, an nn.Module or a Checkpoint"
    )


def _no_weights(folder: Path) -> str:
    content = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    steps = step_folders(folder)
    if steps:
        latest = next((m for m in TRACKERS if (folder / m).is_file()), None)
        mark = f" ({latest}: {(folder / latest).read_text(errors='replace').strip()[:40]!r})" if latest else ""
        found = f"{folder}: no weights found (contents: {content[:20]}); "
        return found + run_folder_message(folder, steps, holds=f"no weights at its top{mark}")
    hint = (
        "; pass a folder with model.safetensors (or shards + index) or pytorch_model.bin, or a training "
        "framework's checkpoint folder (docs/checkpoints.md)"
    )
    return f"{folder}: no weights found (contents: {content[:20]}){hint}"
