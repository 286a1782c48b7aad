"""One resolver for every input: what is this source, and which lazy :class:`Checkpoint` reads it?

>>> import torch
>>> ckpt = open_checkpoint({"w": torch.ones(2, 2)})
>>> ckpt.source, ckpt.names()
('state_dict', ['w'])
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import WeightgeoError
from ._files import read_config, read_index
from .base import Checkpoint
from .hub import is_hub_id, resolve_hub
from .lora import LoraAdapter, MergedAdapterCheckpoint
from .safetensors import SafetensorsCheckpoint
from .state_dict import StateDictCheckpoint
from .torch_bin import TorchBinCheckpoint

__all__ = ["open_checkpoint", "StateDictCheckpoint"]

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_BIN_SUFFIXES = (".bin", ".pt", ".pth")


def open_checkpoint(source: Any, *, base: Any = None, revision: str | None = None) -> Checkpoint:
    """Open any checkpoint source as a lazy :class:`Checkpoint`.

    ``source`` is a :class:`Checkpoint` (returned as is), a ``{name: Tensor}`` mapping, an ``nn.Module``
    (its ``state_dict()``), or a path: a model folder (``model.safetensors`` [+ index], else
    ``pytorch_model.bin`` [+ index]; HF Trainer ``checkpoint-<step>`` folders too), a LoRA adapter folder
    (needs ``base=``), a ``.safetensors``/``.bin``/``.pt`` file or a ``*.index.json``. A string that is no
    existing path but looks like ``org/name[@revision]`` is fetched from the Hub (cache only when
    ``HF_HUB_OFFLINE=1``).

    Args:
        base: the base model (any source) for a LoRA adapter; ignored for full checkpoints.
        revision: hub revision (branch, tag, commit) for hub ids.

    Raises:
        WeightgeoError: unknown source, missing or corrupt files, an adapter without ``base``.
    """
    if isinstance(source, Checkpoint):
        return source
    if isinstance(source, torch.nn.Module):
        # transformers' Conv1D (GPT-2 style) stores W as [in, out]; known from the class, whatever the config
        conv1d = [f"{name}.weight" if name else "weight" for name, mod in source.named_modules()
                  if type(mod).__name__ == "Conv1D"]
        return StateDictCheckpoint(source.state_dict(), source=type(source).__name__,
                                   config=_module_config(source), in_out_names=conv1d)
    if isinstance(source, Mapping):
        return StateDictCheckpoint(source, source="state_dict")
    if isinstance(source, (str, os.PathLike)):
        return _open_path(source, base=base, revision=revision)
    raise WeightgeoError(f"cannot open a {type(source).__name__} as a checkpoint; pass a path, a hub id, a "
                         f"state_dict, an nn.Module or a Checkpoint")


def _module_config(module: torch.nn.Module) -> dict[str, Any]:
    cfg = getattr(module, "config", None)
    if cfg is None:
        return {}
    if isinstance(cfg, Mapping):
        return dict(cfg)
    to_dict = getattr(cfg, "to_dict", None)
    return dict(to_dict()) if callable(to_dict) else {}


def _open_path(source: str | os.PathLike[str], *, base: Any, revision: str | None) -> Checkpoint:
    text = os.fspath(source)
    path = Path(text).expanduser()
    if not path.exists():
        if isinstance(source, str) and is_hub_id(text):
            repo, _, rev = text.partition("@")
            if rev and revision and rev != revision:
                raise WeightgeoError(f"{text!r}: revision {rev!r} in the id conflicts with revision={revision!r}; "
                                     f"give one")
            folder = resolve_hub(repo, revision=rev or revision)
            return _open_dir(folder, base=base, source=text)
        raise WeightgeoError(f"no such file or directory: {text}; pass a local checkpoint dir, a .safetensors file "
                             f"or a hub id")
    if path.is_dir():
        return _open_dir(path, base=base, source=str(path))
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
    raise WeightgeoError(f"{path}: unknown checkpoint file type; pass a .safetensors, .bin/.pt or *.index.json file "
                         f"or the model folder")


def _open_dir(folder: Path, *, base: Any, source: str) -> Checkpoint:
    has = {n for n in _WEIGHT_FILES if (folder / n).is_file()}
    adapter = (folder / "adapter_config.json").is_file()
    if adapter and (base is not None or not has):
        return _open_adapter(folder, base=base)
    config = read_config(folder)
    if "model.safetensors" in has:
        return SafetensorsCheckpoint([folder / "model.safetensors"], source=source, config=config)
    if "model.safetensors.index.json" in has:
        return SafetensorsCheckpoint.from_index(folder / "model.safetensors.index.json", source=source, config=config)
    if "pytorch_model.bin" in has:
        return TorchBinCheckpoint([folder / "pytorch_model.bin"], source=source, config=config)
    if "pytorch_model.bin.index.json" in has:
        return TorchBinCheckpoint.from_index(folder / "pytorch_model.bin.index.json", source=source, config=config)
    others = sorted(folder.glob("*.safetensors"))
    if others:  # non-standard names (consolidated.safetensors, ...): all of them, one checkpoint
        return SafetensorsCheckpoint(others, source=source, config=config)
    content = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    steps = [c for c in content if c.startswith("checkpoint-")]
    hint = (f"; it holds Trainer checkpoints {steps[:5]}: open one of them" if steps
            else "; pass a folder with model.safetensors (or shards + index) or pytorch_model.bin")
    raise WeightgeoError(f"{folder}: no weights found (contents: {content[:20]}){hint}")


def _open_adapter(folder: Path, *, base: Any) -> Checkpoint:
    if base is None:
        raise WeightgeoError(f"{folder}: is a LoRA adapter (adapter_config.json); pass the base model too: "
                             f"open_checkpoint({str(folder)!r}, base=<base model path, hub id or Checkpoint>)")
    adapter = LoraAdapter(folder)
    return MergedAdapterCheckpoint(open_checkpoint(base), adapter)
