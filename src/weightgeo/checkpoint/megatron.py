"""Megatron-core / slime ``torch_dist`` checkpoints (``iter_NNNNNNN/``) under Hugging Face names.

The folder is a torch.distributed.checkpoint (:mod:`.dcp`) plus ``metadata.json`` and, before core 0.19,
``common.pt``. Megatron's names and fused layouts map to HF Llama/Qwen names as follows (``i`` = layer,
``j`` = expert; a Megatron name without ``.{i}.`` is stacked over layers on a leading axis, and
``experts.experts.`` over experts on the next one):

==============================================================  =====================================================
Megatron                                                        Hugging Face
==============================================================  =====================================================
``embedding.word_embeddings.weight`` [padded V, H]              ``model.embed_tokens.weight``, first ``vocab_size`` rows
``output_layer.weight``                                         ``lm_head.weight``, first ``vocab_size`` rows
``decoder.final_layernorm.weight``                              ``model.norm.weight``
``decoder.layers.self_attention.linear_qkv.weight``             ``self_attn.{q,k,v}_proj.weight``: rows interleaved per
                                                                query group, ``(g, [heads/g q | 1 k | 1 v], head_dim)``
``...linear_qkv.bias``                                          ``self_attn.{q,k,v}_proj.bias`` (same interleave)
``...linear_qkv.layer_norm_weight`` (fused by TransformerEngine) ``input_layernorm.weight``
``...self_attention.linear_proj.weight``                        ``self_attn.o_proj.weight``
``...self_attention.{q,k}_layernorm.weight``                    ``self_attn.{q,k}_norm.weight``
``decoder.layers.mlp.linear_fc1.weight`` ``[gate; up]``         ``mlp.gate_proj.weight``, ``mlp.up_proj.weight``
``...mlp.linear_fc1.layer_norm_weight`` / ``pre_mlp_layernorm``  ``post_attention_layernorm.weight``
``...mlp.linear_fc2.weight``                                    ``mlp.down_proj.weight``
``...mlp.router.weight``                                        ``mlp.gate.weight``
``...mlp.experts.experts.linear_fc{1,2}.weight`` [L, E, ...]    ``mlp.experts.{j}.{gate,up,down}_proj.weight``
``...mlp.shared_experts.linear_fc{1,2}.weight``                 ``mlp.shared_expert(s).{gate,up,down}_proj.weight``
==============================================================  =====================================================

Megatron's default rotary layout is HF's, so q and k rows need no permutation. Stored tensors that match no
rule are offered under their own names. Every HF tensor is read from its own box of the stored tensor (one
layer, one expert, one half), never the whole stacked tensor.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from einops import rearrange

from ..errors import WeightgeoError
from ._files import read_json_object
from .base import Checkpoint, TensorInfo
from .model_config import ArchConfig, megatron_args_config
from .pickles import load_torch_file
from .view import MappedCheckpoint, Piece

__all__ = ["megatron_view", "is_megatron", "megatron_refusal", "megatron_folder_config"]

_METADATA_JSON = "metadata.json"  # Megatron's own, beside DCP's .metadata: which sharded backend wrote the folder
_COMMON = "common.pt"  # before core 0.19: the pickled args
_LEGACY_GLOB = "mp_rank_*/model_optim_rng.pt"  # --ckpt-format torch

_TOP = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "output_layer.weight": "lm_head.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "decoder.final_layernorm.bias": "model.norm.bias",
}
_VOCAB = ("embedding.word_embeddings.weight", "output_layer.weight")
_PLAIN = {  # per-layer one-to-one renames
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.linear_proj.bias": "self_attn.o_proj.bias",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "input_layernorm.weight": "input_layernorm.weight",
    "input_layernorm.bias": "input_layernorm.bias",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "post_attention_layernorm.bias",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "pre_mlp_layernorm.bias": "post_attention_layernorm.bias",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
    "mlp.linear_fc2.bias": "mlp.down_proj.bias",
    "mlp.router.weight": "mlp.gate.weight",
    "mlp.router.expert_bias": "mlp.gate.e_score_correction_bias",
    "mlp.shared_experts.linear_fc2.weight": "{shared}.down_proj.weight",
    "mlp.shared_experts.gate_weight": "mlp.shared_expert_gate.weight",
}
_GATED = {"mlp.linear_fc1.weight": "mlp", "mlp.shared_experts.linear_fc1.weight": "{shared}"}
_LAYER = re.compile(r"^decoder\.layers\.(?:(?P<i>\d+)\.)?(?P<rest>.+)$")
_EXPERT = re.compile(
    r"^mlp\.experts\.(?:(?P<stacked>experts\.)(?P<a>linear_fc[12])\.weight"
    r"|(?P<b>linear_fc[12])\.weight(?P<j>\d+))$"
)


def is_megatron(names: Iterable[str]) -> bool:
    """Whether stored names follow Megatron-core's scheme.

    >>> is_megatron(["decoder.layers.self_attention.linear_qkv.weight"]), is_megatron(["model.norm.weight"])
    (True, False)
    """
    return any(n.startswith(("decoder.layers.", "embedding.word_embeddings.")) for n in names)


def megatron_refusal(folder: Path, *, dcp: bool) -> str | None:
    """Why the Megatron folder ``folder`` is not read, naming the fix, or ``None``: a sharded backend other than
    ``torch_dist`` (``metadata.json``'s ``sharded_backend``), or (when it is no DCP folder, ``dcp=False``) the legacy
    ``--ckpt-format torch`` layout.

    >>> megatron_refusal(Path("."), dcp=False) is None
    True
    """
    meta = folder / _METADATA_JSON
    if meta.is_file():
        backend = read_json_object(meta, what=f"Megatron {_METADATA_JSON}").get("sharded_backend")
        if backend not in (None, "torch_dist"):
            return (
                f"{meta}: sharded_backend {backend!r} is not supported, only 'torch_dist' (a "
                f"torch.distributed.checkpoint); re-save with --ckpt-format torch_dist or convert it "
                f"with Megatron's checkpoint converter"
            )
    if not dcp and any(folder.glob(_LEGACY_GLOB)):
        return (
            f"{folder}: is a legacy Megatron --ckpt-format torch checkpoint ({_LEGACY_GLOB}), which is not read; "
            f"save with --ckpt-format torch_dist (slime's default) or convert to Hugging Face weights"
        )
    return None


def megatron_folder_config(folder: Path) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """Architecture numbers from ``common.pt``'s Megatron ``args`` (no Megatron needed), and what could not be read."""
    common = folder / _COMMON
    if not common.is_file():
        return {}, []
    try:
        state = load_torch_file(common, allowed=[argparse.Namespace], mmap=False)
    except WeightgeoError as e:
        return {}, [{"name": _COMMON, "reason": f"not read, its Megatron args are unused ({e})"}]
    args = state.get("args") if isinstance(state, dict) else None
    return (megatron_args_config(args) if args is not None else {}), []


def _vocab_rows(inner: Checkpoint, arch: ArchConfig) -> int | None:
    present = [n for n in _VOCAB if n in inner]
    if not present:
        return None
    rows = {n: inner.info(n).shape[0] for n in present}
    if len(set(rows.values())) > 1:
        raise WeightgeoError(
            f"{inner.source}: the embedding and output layer have different padded vocabularies "
            f"({rows}); the checkpoint is inconsistent"
        )
    stored = next(iter(rows.values()))
    vocab = arch.require("vocab_size", why=f"to drop the padding rows of the stored {stored}-row vocabulary")
    padded = arch.get("padded_vocab_size")
    if vocab > stored or (isinstance(padded, int) and padded != stored):
        raise WeightgeoError(
            f"{inner.source}: the stored vocabulary has {stored} rows but the config says "
            f"vocab_size={vocab}"
            + (f", padded_vocab_size={padded}" if isinstance(padded, int) else "")
            + "; the config belongs to another model, pass the right config="
        )
    return vocab


def _qkv(part: str, groups: int, per_group: int, head_dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    sel = {"q": slice(0, per_group), "k": slice(per_group, per_group + 1), "v": slice(per_group + 1, per_group + 2)}[
        part
    ]

    def pick(t: torch.Tensor) -> torch.Tensor:
        grouped = rearrange(t, "(g r d) ... -> g r d ...", g=groups, r=per_group + 2, d=head_dim)
        return rearrange(grouped[:, sel], "g r d ... -> (g r d) ...")

    return pick


class _Builder:
    def __init__(self, inner: Checkpoint, arch: ArchConfig) -> None:
        self.inner, self.arch = inner, arch
        self.pieces: list[Piece] = []
        self.passthrough: list[str] = []
        self.layers: dict[int, str] = {}  # stacked depth -> a tensor that has it
        shared = "mlp.shared_expert" if arch.model_type() == "qwen2_moe" else "mlp.shared_experts"
        self.shared = shared

    def add(
        self,
        hf: str,
        stored: str,
        shape: tuple[int, ...],
        box: tuple[tuple[int, ...], tuple[int, ...]],
        squeeze: int,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        note: str = "",
        recipe: Any = None,
    ) -> None:
        dtype = self.inner.info(stored).dtype
        self.pieces.append(
            Piece(TensorInfo(hf, shape, dtype), stored, box[0], box[1], squeeze, transform, note, recipe)
        )

    def build(self) -> None:
        vocab = _vocab_rows(self.inner, self.arch)
        for name in self.inner.names():
            info = self.inner.info(name)
            if name in _TOP:
                if name in _VOCAB:
                    assert vocab is not None  # a vocabulary tensor is present, so _vocab_rows gave its rows
                    self.add(_TOP[name], name, (vocab, *info.shape[1:]), ((0,), (vocab,)), 0, note="unpadded rows")
                else:
                    self.add(_TOP[name], name, info.shape, ((), ()), 0)
                continue
            m = _LAYER.match(name)
            if m is None or not self._layer_tensor(name, info, m["i"], m["rest"]):
                self.passthrough.append(name)
        want = self.arch.get("num_hidden_layers")
        for depth, name in self.layers.items():
            if isinstance(want, int) and depth != want:
                raise WeightgeoError(
                    f"{self.inner.source}: {name!r} stacks {depth} layers but the config says "
                    f"num_hidden_layers={want}; pass the config of this model"
                )

    def _layer_tensor(self, name: str, info: TensorInfo, index: str | None, rest: str) -> bool:
        shape = info.shape
        layers: list[tuple[int, tuple[int, ...], tuple[int, ...], int]]  # (layer, box start, box stop, squeeze)
        if index is None:  # stacked over layers on dim 0
            if not shape:
                return False
            self.layers.setdefault(shape[0], name)
            layers = [(i, (i,), (i + 1,), 1) for i in range(shape[0])]
            inner_shape = shape[1:]
        else:
            layers = [(int(index), (), (), 0)]
            inner_shape = shape
        e = _EXPERT.match(rest)
        for i, start, stop, k in layers:
            pre = f"model.layers.{i}."
            if e is not None:
                if not self._experts(name, pre, e, inner_shape, start, stop, k):
                    return False
            elif rest in _PLAIN:
                self.add(pre + _PLAIN[rest].format(shared=self.shared), name, inner_shape, (start, stop), k)
            elif rest in _GATED:
                self._gated(name, pre + _GATED[rest].format(shared=self.shared), inner_shape, start, stop, k)
            elif rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
                self._qkv(name, pre, rest.rsplit(".", 1)[1], inner_shape, start, stop, k)
            else:
                return False
        return True

    def _gated(
        self, name: str, prefix: str, shape: tuple[int, ...], start: tuple[int, ...], stop: tuple[int, ...], k: int
    ) -> None:
        rows = shape[0]
        key = (
            "shared_expert_intermediate_size"
            if "shared_expert" in prefix
            else "moe_intermediate_size"
            if ".experts." in prefix
            else "intermediate_size"
        )
        size = self.arch.get(key)
        if isinstance(size, int) and rows == size:
            raise WeightgeoError(
                f"{self.inner.source}: {name!r} has {rows} rows = intermediate_size: a non-gated "
                f"MLP, which has no Llama/Qwen HF counterpart; only gated (SwiGLU [gate; up]) MLPs are "
                f"mapped"
            )
        if rows % 2 or (isinstance(size, int) and rows != 2 * size):
            raise WeightgeoError(
                f"{self.inner.source}: {name!r} has {rows} rows; a fused [gate; up] needs "
                f"2 x intermediate_size"
                + (f" = {2 * size}" if isinstance(size, int) else "")
                + "; pass the config of this model"
            )
        half = rows // 2
        for j, proj in enumerate(("gate_proj", "up_proj")):
            self.add(
                f"{prefix}.{proj}.weight",
                name,
                (half, *shape[1:]),
                (start + (j * half,), stop + ((j + 1) * half,)),
                k,
                note=f"{'first' if j == 0 else 'second'} half of linear_fc1 ([gate; up])",
            )

    def _qkv(
        self,
        name: str,
        pre: str,
        kind: str,
        shape: tuple[int, ...],
        start: tuple[int, ...],
        stop: tuple[int, ...],
        k: int,
    ) -> None:
        heads, groups, hd = self.arch.heads(), self.arch.kv_heads(), self.arch.head_dim()
        why = f"{name!r} has {shape[0]} rows"
        if heads % groups or shape[0] != groups * (heads // groups + 2) * hd:
            raise WeightgeoError(
                f"{self.inner.source}: {why}, but num_attention_heads={heads}, num_key_value_heads="
                f"{groups}, head_dim={hd} give (heads + 2 x kv_heads) x head_dim = "
                f"{(heads + 2 * groups) * hd}; pass the config of this model"
            )
        per = heads // groups
        for part, rows in (("q", heads * hd), ("k", groups * hd), ("v", groups * hd)):
            self.add(
                f"{pre}self_attn.{part}_proj.{kind}",
                name,
                (rows, *shape[1:]),
                (start, stop),
                k,
                _qkv(part, groups, per, hd),
                note=f"{part} rows of the fused QKV, interleaved per query group",
                recipe={"qkv": part, "groups": groups, "per_group": per, "head_dim": hd},
            )

    def _experts(
        self,
        name: str,
        pre: str,
        m: re.Match,
        shape: tuple[int, ...],
        start: tuple[int, ...],
        stop: tuple[int, ...],
        k: int,
    ) -> bool:
        fc = m["a"] or m["b"]
        if m["stacked"]:
            if not shape:
                return False
            experts = [(j, start + (j,), stop + (j + 1,), k + 1) for j in range(shape[0])]
            shape = shape[1:]
        else:
            experts = [(int(m["j"]), start, stop, k)]
        for j, s, e, kk in experts:
            prefix = f"{pre}mlp.experts.{j}"
            if fc == "linear_fc1":
                self._gated(name, prefix, shape, s, e, kk)
            else:
                self.add(f"{prefix}.down_proj.weight", name, shape, (s, e), kk)
        return True


def megatron_view(inner: Checkpoint, arch: ArchConfig, *, source: str | None = None) -> MappedCheckpoint:
    """``inner`` (a Megatron-core state dict) as HF-named tensors; see the module docstring for the mapping."""
    b = _Builder(inner, arch)
    b.build()
    config = arch.merged()
    return MappedCheckpoint(inner, b.pieces, scheme="Megatron", source=source, config=config, passthrough=b.passthrough)
