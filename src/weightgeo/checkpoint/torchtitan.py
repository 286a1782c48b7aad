"""torchtitan checkpoints (DCP ``step-N/``) under Hugging Face names.

==================================================  ==================================================
torchtitan                                          Hugging Face
==================================================  ==================================================
``tok_embeddings.weight``                           ``model.embed_tokens.weight``
``layers.{i}.attention.wq|wk|wv|wo.weight``         ``model.layers.{i}.self_attn.q|k|v|o_proj.weight``
``layers.{i}.attention.q_norm|k_norm.weight``       ``model.layers.{i}.self_attn.q_norm|k_norm.weight``
``layers.{i}.feed_forward.w1|w3|w2.weight``         ``model.layers.{i}.mlp.gate|up|down_proj.weight``
``layers.{i}.attention_norm|ffn_norm.weight``       ``model.layers.{i}.input_layernorm|post_attention_layernorm.weight``
``layers.{i}.moe.experts.w1|w3|w2`` [E, out, in]    ``model.layers.{i}.mlp.experts.{j}.gate|up|down_proj.weight``
``layers.{i}.moe.router.gate.weight``               ``model.layers.{i}.mlp.gate.weight``
``layers.{i}.moe.shared_experts.w1|w3|w2.weight``   ``model.layers.{i}.mlp.shared_expert(s).gate|up|down_proj.weight``
``norm.weight``, ``output.weight``                  ``model.norm.weight``, ``lm_head.weight``
==================================================  ==================================================

The rotary layout differs by model. torchtitan's Llama 3/4 apply RoPE to adjacent pairs of each head's
dims (Meta's complex-number layout), HF's to the two halves, so ``wq``/``wk`` rows are permuted per head
(``(h, d/2, 2) -> (h, 2, d/2)``), exactly as torchtitan's own ``Llama3StateDictAdapter.to_hf`` does; this
needs ``num_attention_heads`` and ``num_key_value_heads``. torchtitan's Qwen3 uses the rotate-half layout
(its adapter maps q/k as stored), so nothing is permuted. Which one applies is read from the config's
``model_type``; an unknown one is an error rather than a guess. Other stored tensors keep their names.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch
from einops import rearrange

from ..errors import WeightgeoError
from .base import Checkpoint, TensorInfo
from .model_config import ArchConfig
from .view import MappedCheckpoint, Piece

__all__ = ["torchtitan_view", "is_torchtitan", "INTERLEAVED_ROPE", "HALF_ROPE"]

#: model types whose torchtitan implementation uses the interleaved (complex) rotary layout: q/k permuted
INTERLEAVED_ROPE = frozenset({"llama", "llama4", "llama4_text"})
#: model types whose torchtitan implementation uses HF's rotate-half layout: q/k as stored
HALF_ROPE = frozenset({"qwen3", "qwen3_moe", "qwen2", "qwen2_moe"})

_TOP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = re.compile(r"^layers\.(?P<i>\d+)\.(?P<rest>.+)$")
_PLAIN = {
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.qkv_linear.wv.weight": "self_attn.v_proj.weight",
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "moe.router.gate.weight": "mlp.gate.weight",
    "moe.shared_experts.w1.weight": "{shared}.gate_proj.weight",
    "moe.shared_experts.w3.weight": "{shared}.up_proj.weight",
    "moe.shared_experts.w2.weight": "{shared}.down_proj.weight",
}
_ROTARY = {
    "attention.wq.weight": ("q_proj", "heads"),
    "attention.wk.weight": ("k_proj", "kv_heads"),
    "attention.qkv_linear.wq.weight": ("q_proj", "heads"),
    "attention.qkv_linear.wk.weight": ("k_proj", "kv_heads"),
}
_EXPERTS = {"moe.experts.w1": "gate_proj", "moe.experts.w3": "up_proj", "moe.experts.w2": "down_proj"}


def is_torchtitan(names: Iterable[str]) -> bool:
    """Whether stored names follow torchtitan's scheme.

    >>> is_torchtitan(["tok_embeddings.weight", "layers.0.attention.wq.weight"]), is_torchtitan(["model.norm.weight"])
    (True, False)
    """
    return any(
        n == "tok_embeddings.weight" or re.match(r"^layers\.\d+\.(attention|feed_forward|moe)\.", n) for n in names
    )


def _to_half_layout(heads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def permute(t: torch.Tensor) -> torch.Tensor:
        return rearrange(t, "(h d two) c -> (h two d) c", h=heads, two=2)

    return permute


def torchtitan_view(inner: Checkpoint, arch: ArchConfig, *, source: str | None = None) -> MappedCheckpoint:
    """``inner`` (a torchtitan model state dict) as HF-named tensors; see the module docstring."""
    mt = arch.model_type()
    if mt in INTERLEAVED_ROPE:
        permute = True
    elif mt in HALF_ROPE:
        permute = False
    else:
        known = ", ".join(sorted(INTERLEAVED_ROPE | HALF_ROPE))
        raise WeightgeoError(
            f"{source or inner.source}: torchtitan's rotary layout (whether wq/wk rows must be permuted to HF's) "
            f"depends on the model, and model_type {mt!r} is not one weightgeo knows ({known}); pass config= with "
            f"the HF config of this model (its model_type), e.g. open_checkpoint(path, config='path/to/hf_model')"
        )
    shared = "mlp.shared_expert" if mt == "qwen2_moe" else "mlp.shared_experts"
    pieces: list[Piece] = []
    passthrough: list[str] = []
    for name in inner.names():
        info = inner.info(name)
        if name in _TOP:
            pieces.append(Piece(TensorInfo(_TOP[name], info.shape, info.dtype), name))
            continue
        m = _LAYER.match(name)
        rest = m["rest"] if m else ""
        pre = f"model.layers.{m['i']}." if m else ""
        if rest in _PLAIN:
            pieces.append(Piece(TensorInfo(pre + _PLAIN[rest].format(shared=shared), info.shape, info.dtype), name))
        elif rest in _ROTARY:
            proj, which = _ROTARY[rest]
            transform, recipe = None, None
            if permute:
                heads = arch.heads() if which == "heads" else arch.kv_heads()
                if not info.shape or info.shape[0] % (2 * heads):
                    raise WeightgeoError(
                        f"{inner.source}: {name!r} has {info.shape[0] if info.shape else 0} rows, not "
                        f"a multiple of 2 x {which.replace('_', ' ')} ({heads}); pass the config of "
                        f"this model"
                    )
                transform, recipe = _to_half_layout(heads), {"rotary_to_half": heads}
            pieces.append(
                Piece(
                    TensorInfo(pre + f"self_attn.{proj}.weight", info.shape, info.dtype),
                    name,
                    transform=transform,
                    note="rows permuted to HF's rotary layout" if permute else "",
                    recipe=recipe,
                )
            )
        elif rest in _EXPERTS and len(info.shape) == 3:
            for j in range(info.shape[0]):
                pieces.append(
                    Piece(
                        TensorInfo(pre + f"mlp.experts.{j}.{_EXPERTS[rest]}.weight", info.shape[1:], info.dtype),
                        name,
                        (j,),
                        (j + 1,),
                        1,
                    )
                )
        else:
            passthrough.append(name)
    return MappedCheckpoint(
        inner, pieces, scheme="torchtitan", source=source, config=arch.merged(), passthrough=passthrough
    )
