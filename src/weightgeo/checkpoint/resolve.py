"""One resolver for every input: what is this source, and which lazy :class:`Checkpoint` reads it?

>>> import torch
>>> ckpt = open_checkpoint({"w": torch.ones(2, 2)})
>>> ckpt.source, ckpt.names()
('state_dict', ['w'])
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import WeightgeoError
from ._files import read_config, read_index
from .base import Checkpoint
from .fp8 import wrap_quantized
from .hub import is_hub_id, resolve_hub
from .lora import LoraAdapter, MergedAdapterCheckpoint
from .model_config import read_model_config
from .native import open_native_dir
from .safetensors import SafetensorsCheckpoint
from .state_dict import StateDictCheckpoint
from .torch_bin import TorchBinCheckpoint

__all__ = ["open_checkpoint", "StateDictCheckpoint"]

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_BIN_SUFFIXES = (".bin", ".pt", ".pth")


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
    if isinstance(source, torch.nn.Module):
        # transformers' Conv1D (GPT-2 style) stores W as [in, out]; known from the class, whatever the config
        conv1d = [
            f"{name}.weight" if name else "weight"
            for name, mod in source.named_modules()
            if type(mod).__name__ == "Conv1D"
        ]
        ckpt: Checkpoint = StateDictCheckpoint(
            source.state_dict(), source=type(source).__name__, config=_module_config(source), in_out_names=conv1d
        )
    elif isinstance(source, Mapping):
        ckpt = StateDictCheckpoint(source, source="state_dict")
    elif isinstance(source, (str, os.PathLike)):
        ckpt = _open_path(source, base=base, revision=revision, config=explicit)
    else:
        raise WeightgeoError(
            f"cannot open a {type(source).__name__} as a checkpoint; pass a path, a hub id, a "
            f"state_dict, an nn.Module or a Checkpoint"
        )
    if explicit:
        ckpt.config = {**ckpt.config, **explicit}
    return wrap_quantized(ckpt)


def _module_config(module: torch.nn.Module) -> dict[str, Any]:
    cfg = getattr(module, "config", None)
    if cfg is None:
        return {}
    if isinstance(cfg, Mapping):
        return dict(cfg)
    to_dict = getattr(cfg, "to_dict", None)
    return dict(to_dict()) if callable(to_dict) else {}


def _open_path(
    source: str | os.PathLike[str], *, base: Any, revision: str | None, config: dict[str, Any] | None
) -> Checkpoint:
    text = os.fspath(source)
    path = Path(text).expanduser()
    if not path.exists():
        if isinstance(source, str) and is_hub_id(text):
            repo, _, rev = text.partition("@")
            if rev and revision and rev != revision:
                raise WeightgeoError(
                    f"{text!r}: revision {rev!r} in the id conflicts with revision={revision!r}; give one"
                )
            folder = resolve_hub(repo, revision=rev or revision)
            return _open_dir(folder, base=base, source=text, config=config)
        raise WeightgeoError(
            f"no such file or directory: {text}; pass a local checkpoint dir, a .safetensors file or a hub id"
        )
    if path.is_dir():
        return _open_dir(path, base=base, source=str(path), config=config)
    return _open_file(path, base=base)


def _open_file(path: Path, *, base: Any) -> Checkpoint:
    name = path.name
    config = read_config(path.parent)
    if name == "adapter_config.json":
        return _open_adapter(path.parent, base=base)
    if name.endswith(".index.json"):
        _, _, shards = read_index(path)
        if all(s.endswith(".safetensors") for s in shards):
            return SafetensorsCheckpoint.from_index(path, config=config)
        return TorchBinCheckpoint.from_index(path, config=config)
    if name.endswith(".safetensors"):
        return SafetensorsCheckpoint([path], config=config)
    if name.endswith(_BIN_SUFFIXES):
        return TorchBinCheckpoint([path], config=config)
    raise WeightgeoError(
        f"{path}: unknown checkpoint file type; pass a .safetensors, .bin/.pt or *.index.json file or the model folder"
    )


def _open_dir(folder: Path, *, base: Any, source: str, config: dict[str, Any] | None = None) -> Checkpoint:
    has = {n for n in _WEIGHT_FILES if (folder / n).is_file()}
    adapter = (folder / "adapter_config.json").is_file()
    if adapter and (base is not None or not has):
        return _open_adapter(folder, base=base)
    own = read_config(folder)
    if "model.safetensors" in has:
        return SafetensorsCheckpoint([folder / "model.safetensors"], source=source, config=own)
    if "model.safetensors.index.json" in has:
        return SafetensorsCheckpoint.from_index(folder / "model.safetensors.index.json", source=source, config=own)
    if "pytorch_model.bin" in has:
        return TorchBinCheckpoint([folder / "pytorch_model.bin"], source=source, config=own)
    if "pytorch_model.bin.index.json" in has:
        return TorchBinCheckpoint.from_index(folder / "pytorch_model.bin.index.json", source=source, config=own)
    others = sorted(folder.glob("*.safetensors"))
    if others:  # non-standard names (consolidated.safetensors, ...): all of them, one checkpoint
        return SafetensorsCheckpoint(others, source=source, config=own)
    native = open_native_dir(
        folder,
        source=source,
        config=config,
        base_config=_base_config(base),
        open_hf=lambda d: _open_dir(d, base=None, source=str(d)),
    )
    if native is not None:
        return native
    content = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    steps = sorted((c for c in content if _STEP_DIR.match(c)), key=_step_of)
    latest = next((m for m in _LATEST if (folder / m).is_file()), None)
    if steps:
        mark = f" ({latest}: {(folder / latest).read_text(errors='replace').strip()[:40]!r})" if latest else ""
        hint = (
            f"; it is a training run folder holding checkpoints {steps[:3] + (['...'] if len(steps) > 3 else [])}"
            f"{mark}: open one of them, e.g. {folder / steps[-1].rstrip('/')}"
        )
    else:
        hint = (
            "; pass a folder with model.safetensors (or shards + index) or pytorch_model.bin, or a training "
            "framework's checkpoint folder (docs/checkpoints.md)"
        )
    raise WeightgeoError(f"{folder}: no weights found (contents: {content[:20]}){hint}")


# checkpoint folders of a run: HF Trainer, verl / DeepSpeed, Megatron / slime, torchtitan
_STEP_DIR = re.compile(r"^(checkpoint-|global_step_?|iter_|step-)(\d+)/$")
_LATEST = ("latest_checkpointed_iteration.txt", "latest")


def _step_of(entry: str) -> int:
    m = _STEP_DIR.match(entry)
    return int(m[2]) if m else -1


def _base_config(base: Any) -> dict[str, Any]:
    """The paired base's config (architecture numbers for a native fine-tune), when it is at hand."""
    if isinstance(base, Checkpoint):
        return dict(base.config)
    if isinstance(base, (str, os.PathLike)) and Path(base).is_dir():
        return read_config(Path(base))
    return {}


def _open_adapter(folder: Path, *, base: Any) -> Checkpoint:
    if base is None:
        raise WeightgeoError(
            f"{folder}: is a LoRA adapter (adapter_config.json); pass the base model too: "
            f"open_checkpoint({str(folder)!r}, base=<base model path, hub id or Checkpoint>)"
        )
    adapter = LoraAdapter(folder)
    return MergedAdapterCheckpoint(open_checkpoint(base), adapter)
