"""Which training framework wrote this folder, and which lazy :class:`Checkpoint` reads it.

Recognised (in this order), for one checkpoint folder:

* verl ``global_step_N/`` (its ``actor/``) and ``actor/`` itself: ``model_world_size_W_rank_R.pt`` /
  ``fsdp_config.json`` (:mod:`.verl`); ``actor/huggingface/`` is read instead when it holds full weights in
  at least the shards' precision;
* DeepSpeed ``global_stepN/``: ``*mp_rank_00_model_states.pt`` (:mod:`.deepspeed`);
* torch.distributed.checkpoint folders (``.metadata``, :mod:`.dcp`): Megatron-core / slime ``iter_NNNNNNN``
  (names mapped by :mod:`.megatron`), torchtitan ``step-N`` (:mod:`.torchtitan`), or HF-named state dicts
  (accelerate FSDP ``pytorch_model_fsdp_0``), read as they are.

A run folder (``latest_checkpointed_iteration.txt``, ``latest``) is not one checkpoint; the resolver says
which folders it holds.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._files import read_config
from .base import Checkpoint
from .dcp import DcpCheckpoint, is_dcp_folder
from .deepspeed import DeepSpeedCheckpoint, is_deepspeed_folder
from .megatron import check_megatron_folder, is_megatron, megatron_folder_config, megatron_view
from .model_config import ArchConfig
from .torchtitan import is_torchtitan, torchtitan_view
from .verl import VerlFsdpCheckpoint, is_verl_actor

__all__ = ["open_native_dir"]

_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def open_native_dir(
    folder: Path,
    *,
    source: str,
    config: dict[str, Any] | None,
    base_config: dict[str, Any],
    open_hf: Callable[[Path], Checkpoint],
) -> Checkpoint | None:
    """The checkpoint in ``folder`` if a training framework wrote it, else ``None``.

    ``config`` is the explicit ``config=``, ``base_config`` the paired base's; ``open_hf`` opens an HF folder.
    """
    actor = folder / "actor"
    if actor.is_dir() and (is_verl_actor(actor) or _has_hf_weights(actor / "huggingface")):
        return open_native_dir(actor, source=str(actor), config=config, base_config=base_config, open_hf=open_hf)
    if is_verl_actor(folder) or (folder.name == "actor" and _has_hf_weights(folder / "huggingface")):
        return _verl(folder, source=source, config=config, open_hf=open_hf)
    if is_deepspeed_folder(folder):
        return DeepSpeedCheckpoint(folder, source=source, config={**base_config, **read_config(folder)})
    check_megatron_folder(folder)
    if is_dcp_folder(folder):
        return _dcp(folder, source=source, config=config, base_config=base_config)
    return None


def _has_hf_weights(folder: Path) -> bool:
    return any((folder / n).is_file() for n in _HF_WEIGHTS)


def _verl(
    folder: Path, *, source: str, config: dict[str, Any] | None, open_hf: Callable[[Path], Checkpoint]
) -> Checkpoint:
    hf_dir = folder / "huggingface"
    if not is_verl_actor(folder):
        return open_hf(hf_dir)
    shards = VerlFsdpCheckpoint(folder, source=source, config=config)
    if not _has_hf_weights(hf_dir):
        return shards
    hf = open_hf(hf_dir)
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


def _dcp(folder: Path, *, source: str, config: dict[str, Any] | None, base_config: dict[str, Any]) -> Checkpoint:
    inner = DcpCheckpoint(folder, source=source, config=read_config(folder))
    names = inner.names()
    if is_megatron(names):
        args, unread = megatron_folder_config(folder)
        inner.skipped.extend(unread)
        arch = ArchConfig.of(
            config,
            inner.config,
            base_config,
            args,
            source=source,
            names=("config=", "config.json", "base", "common.pt args"),
        )
        return megatron_view(inner, arch, source=source)
    if is_torchtitan(names):
        arch = ArchConfig.of(config, inner.config, base_config, source=source, names=("config=", "config.json", "base"))
        return torchtitan_view(inner, arch, source=source)
    inner.config = {**base_config, **inner.config}
    return inner
