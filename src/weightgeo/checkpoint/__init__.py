"""Every checkpoint format behind one lazy interface: ``open_checkpoint(source) -> Checkpoint``.

Sources: local folders and files (safetensors, sharded or not; ``pytorch_model.bin``), hub ids, PEFT LoRA
adapters (with ``base=``), state_dicts and ``nn.Module``s, and what RL / distillation frameworks write:
torch.distributed.checkpoint folders (torchtitan, Megatron/slime ``torch_dist``, mapped to HF names), verl
FSDP rank shards, DeepSpeed ZeRO; scaled FP8 weights are read dequantised. Names, shapes and dtypes come
from headers; tensors are read one at a time. :func:`align` pairs two checkpoints' tensors by canonical name.

>>> import torch
>>> ckpt = open_checkpoint({"model.layers.0.self_attn.q_proj.weight": torch.zeros(4, 4)})
>>> [(canonical_name(n), module_type(n), layer_index(n)) for n in ckpt.names()]
[('layers.0.self_attn.q_proj.weight', 'q_proj', 0)]
"""

from __future__ import annotations

from .align import Alignment, Pair, align
from .base import Checkpoint, FactoredDelta, Fp8Weight, TensorInfo
from .completeness import CheckpointStatus, RunScan, checkpoint_status, scan_run
from .dcp import DcpCheckpoint
from .deepspeed import DeepSpeedCheckpoint
from .fp8 import Fp8Checkpoint, fp8_dequantize
from .hub import resolve_hub
from .lora import LoraAdapter, MergedAdapterCheckpoint
from .names import canonical_name, compile_filter, layer_index, module_type
from .resolve import open_checkpoint
from .safetensors import SafetensorsCheckpoint
from .state_dict import StateDictCheckpoint
from .torch_bin import TorchBinCheckpoint
from .verl import VerlFsdpCheckpoint
from .view import MappedCheckpoint, Piece

__all__ = [
    "Checkpoint",
    "TensorInfo",
    "FactoredDelta",
    "open_checkpoint",
    "align",
    "Alignment",
    "Pair",
    "canonical_name",
    "module_type",
    "layer_index",
    "compile_filter",
    "LoraAdapter",
    "MergedAdapterCheckpoint",
    "SafetensorsCheckpoint",
    "TorchBinCheckpoint",
    "StateDictCheckpoint",
    "resolve_hub",
    "DcpCheckpoint",
    "VerlFsdpCheckpoint",
    "DeepSpeedCheckpoint",
    "MappedCheckpoint",
    "Piece",
    "Fp8Checkpoint",
    "Fp8Weight",
    "fp8_dequantize",
    "CheckpointStatus",
    "RunScan",
    "checkpoint_status",
    "scan_run",
]
