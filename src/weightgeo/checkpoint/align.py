"""Pair the tensors of two checkpoints by canonical name.

>>> import torch
>>> from weightgeo.checkpoint import open_checkpoint
>>> base = open_checkpoint({"model.embed_tokens.weight": torch.zeros(4, 2), "model.norm.weight": torch.ones(2)})
>>> ft = open_checkpoint({"embed_tokens.weight": torch.zeros(4, 2), "norm.weight": torch.ones(2),
...                       "lm_head.weight": torch.zeros(4, 2)})
>>> a = align(base, ft)
>>> [p.key for p in a.pairs], a.only_base, a.only_ft, a.tied
(['embed_tokens.weight', 'norm.weight'], [], [], ['lm_head.weight'])
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import WeightgeoError
from .base import Checkpoint
from .names import INPUT_EMBEDDINGS, canonical_name, module_type

__all__ = ["align", "Alignment", "Pair", "canonical_map", "natural_key"]

_LM_HEAD = "lm_head.weight"


@dataclass(frozen=True)
class Pair:
    """One tensor present in both checkpoints: canonical ``key`` and each side's stored name."""

    key: str
    base_name: str
    ft_name: str


@dataclass(frozen=True)
class Alignment:
    """The result of :func:`align`: matched pairs, tensors on one side only, and tied ``lm_head``."""

    pairs: list[Pair]
    only_base: list[str] = field(default_factory=list)
    only_ft: list[str] = field(default_factory=list)
    #: canonical names that one side stores as a tie to another tensor (``lm_head.weight`` = the embedding)
    tied: list[str] = field(default_factory=list)


def natural_key(key: str) -> list[object]:
    """The sort key of natural order (``layers.2`` before ``layers.10``)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def canonical_map(ckpt: Checkpoint, side: str = "") -> dict[str, str]:
    """``{canonical name: stored name}`` of a checkpoint's tensors; two stored names of one canonical name raise
    (``side``: how messages call the checkpoint, e.g. ``"base"``)."""
    out: dict[str, str] = {}
    for name in ckpt.names():
        key = canonical_name(name)
        if key in out:
            raise WeightgeoError(
                f"{side + ' ' if side else ''}checkpoint {ckpt.source}: tensors {out[key]!r} and {name!r} both normalise to {key!r}; "
                f"the names are ambiguous, rename or drop one (e.g. open a filtered state_dict)"
            )
        out[key] = name
    return out


def _ties_lm_head(ckpt: Checkpoint, keys: dict[str, str]) -> bool:
    """Whether a checkpoint without lm_head.weight ties it to its embedding."""
    has_embedding = any(k.endswith(".weight") and module_type(k) in INPUT_EMBEDDINGS for k in keys)
    tie = ckpt.config.get("tie_word_embeddings") if isinstance(ckpt.config, dict) else None
    if tie is None:
        return has_embedding
    return bool(tie) and has_embedding


def align(base: Checkpoint, ft: Checkpoint) -> Alignment:
    """Match tensors of ``base`` and ``ft`` by :func:`canonical_name` (names only; shapes are not compared).

    A missing ``lm_head.weight`` on a side whose config ties word embeddings (``tie_word_embeddings``,
    default true when an embedding is present) is listed in ``tied`` instead of ``only_base``/``only_ft``:
    it is the embedding, analysed once. Pairs are in natural order (``layers.2`` before ``layers.10``).

    Raises:
        WeightgeoError: two tensors of one checkpoint share a canonical name.
    """
    kb = canonical_map(base, "base")
    kf = canonical_map(ft, "fine-tuned")
    pairs = [Pair(k, kb[k], kf[k]) for k in sorted(kb.keys() & kf.keys(), key=natural_key)]
    only_base = sorted(kb.keys() - kf.keys(), key=natural_key)
    only_ft = sorted(kf.keys() - kb.keys(), key=natural_key)
    tied: list[str] = []
    missing_b, missing_f = _LM_HEAD not in kb, _LM_HEAD not in kf
    if missing_b or missing_f:
        tie_b = missing_b and _ties_lm_head(base, kb)
        tie_f = missing_f and _ties_lm_head(ft, kf)
        if tie_b or tie_f:
            tied.append(_LM_HEAD)
            only_base = [k for k in only_base if k != _LM_HEAD]
            only_ft = [k for k in only_ft if k != _LM_HEAD]
    return Alignment(pairs=pairs, only_base=[kb[k] for k in only_base], only_ft=[kf[k] for k in only_ft], tied=tied)
