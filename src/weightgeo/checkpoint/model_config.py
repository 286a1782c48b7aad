"""The model's architecture numbers (heads, KV heads, head dim, layers, vocabulary) for native name schemes.

Native checkpoints (Megatron, torchtitan) store fused or permuted tensors whose Hugging Face counterparts
depend on these numbers. They come, in this order, from an explicit ``config=`` (an HF ``config.json`` path,
a model folder, a dict or a transformers config), the checkpoint's own HF config (verl's
``huggingface/config.json``), the paired base checkpoint's config, and finally the framework's own record
(Megatron's ``common.pt`` arguments). A number none of them gives is a :class:`~weightgeo.WeightgeoError`
that says to pass ``config=``.

>>> arch = ArchConfig.of({"num_attention_heads": 8, "hidden_size": 64}, source="demo")
>>> arch.heads(), arch.kv_heads(), arch.head_dim()
(8, 8, 8)
>>> ArchConfig.of({}, source="runs/iter_0000010").require("vocab_size", why="to trim the padded vocabulary")
Traceback (most recent call last):
...
weightgeo.errors.WeightgeoError: runs/iter_0000010: needs the model's vocab_size (to trim the padded vocabulary); pass config= ...
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import WeightgeoError
from ._files import CONFIG, read_json_object

__all__ = ["ArchConfig", "read_model_config", "megatron_args_config", "MEGATRON_ARG_NAMES"]

#: Megatron argument names -> HF config keys (``common.pt`` ``args``)
MEGATRON_ARG_NAMES = {
    "num_attention_heads": "num_attention_heads",
    "kv_channels": "head_dim",
    "num_layers": "num_hidden_layers",
    "hidden_size": "hidden_size",
    "ffn_hidden_size": "intermediate_size",
    "vocab_size": "vocab_size",
    "num_experts": "num_experts",
    "moe_ffn_hidden_size": "moe_intermediate_size",
    "untie_embeddings_and_output_weights": None,
    "num_query_groups": None,
    "group_query_attention": None,
    "padded_vocab_size": "padded_vocab_size",
}


def read_model_config(config: Any, *, what: str = "config") -> dict[str, Any]:
    """``config`` as a dict: a path to ``config.json`` or to a folder holding one, a mapping, or an object
    with ``to_dict()`` (a transformers config)."""
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    if isinstance(config, (str, os.PathLike)):
        p = Path(config).expanduser()
        if p.is_dir():
            p = p / CONFIG
        if not p.is_file():
            raise WeightgeoError(
                f"{what}={str(config)!r}: no such config.json; pass the HF model's config.json, the "
                f"folder holding it, or a dict"
            )
        return read_json_object(p, what=CONFIG)
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        return dict(to_dict())
    raise WeightgeoError(
        f"{what} must be a config.json path, a model folder, a dict or a transformers config, got "
        f"{type(config).__name__}"
    )


def megatron_args_config(args: Any) -> dict[str, Any]:
    """HF-style numbers from Megatron's pickled ``args`` (a Namespace or its stub)."""
    a = dict(getattr(args, "__dict__", {}) or {})
    out: dict[str, Any] = {}
    for key, hf in MEGATRON_ARG_NAMES.items():
        if hf is not None and isinstance(a.get(key), int) and not isinstance(a.get(key), bool):
            out[hf] = a[key]
    if isinstance(a.get("num_attention_heads"), int):
        groups = a.get("num_query_groups") if a.get("group_query_attention") else None
        out["num_key_value_heads"] = groups if isinstance(groups, int) else a["num_attention_heads"]
    if isinstance(a.get("untie_embeddings_and_output_weights"), bool):
        out["tie_word_embeddings"] = not a["untie_embeddings_and_output_weights"]
    return out


@dataclass(frozen=True)
class ArchConfig:
    """Architecture numbers looked up in several configs, first match wins (see the module docstring)."""

    source: str
    layers: tuple[tuple[str, Mapping[str, Any]], ...]  # (where from, config dict), highest priority first

    @classmethod
    def of(cls, *configs: Mapping[str, Any] | None, source: str, names: tuple[str, ...] = ()) -> ArchConfig:
        named = tuple((names[i] if i < len(names) else f"config {i}", dict(c)) for i, c in enumerate(configs) if c)
        return cls(source, named)

    def merged(self) -> dict[str, Any]:
        """All keys, the highest-priority value of each (what the checkpoint's ``config`` becomes)."""
        out: dict[str, Any] = {}
        for _, cfg in reversed(self.layers):
            out.update(cfg)
        return out

    def get(self, key: str) -> Any:
        for _, cfg in self.layers:
            for c in (cfg, cfg.get("text_config") if isinstance(cfg.get("text_config"), Mapping) else None):
                if c is not None and c.get(key) is not None:
                    return c[key]
        return None

    def require(self, key: str, *, why: str) -> int:
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            seen = f" (found {value!r})" if value is not None else ""
            raise WeightgeoError(
                f"{self.source}: needs the model's {key} ({why}){seen}; pass config= (the HF model's config.json path, "
                f"its folder or a dict) to open_checkpoint, e.g. weightgeo.open_checkpoint({self.source!r}, "
                f"config='path/to/hf_model') (as the fine-tune in compare(hf_base, this), the HF base supplies them)"
            )
        return value

    def heads(self) -> int:
        return self.require("num_attention_heads", why="to split attention weights into heads")

    def kv_heads(self) -> int:
        kv = self.get("num_key_value_heads")
        return self.heads() if kv is None else self.require("num_key_value_heads", why="to split K and V")

    def head_dim(self) -> int:
        if self.get("head_dim") is not None:
            return self.require("head_dim", why="to split attention weights into heads")
        hidden = self.require("hidden_size", why="head_dim = hidden_size / num_attention_heads")
        heads = self.heads()
        if hidden % heads:
            raise WeightgeoError(
                f"{self.source}: hidden_size {hidden} is not a multiple of num_attention_heads "
                f"{heads}; pass config= with head_dim"
            )
        return hidden // heads

    def model_type(self) -> str | None:
        mt = self.get("model_type")
        return mt if isinstance(mt, str) else None
