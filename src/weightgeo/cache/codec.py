"""Exact round trips for what a cache entry holds: rows as tagged JSON, dataclasses as (row, tensors).

Rows come back equal to what was stored, types included: tuples stay tuples (``shape``), integer-keyed
dicts keep their integer keys, NaN / ±inf and ``-0.0`` survive, floats round-trip bit for bit (``repr``).

>>> row = {"name": "w", "shape": (4, 4), "overlap": float("nan"), "by_step": {10: 0.5}}
>>> back = decode_row(encode_row(row))
>>> back["shape"], back["by_step"], back["overlap"] != back["overlap"]
((4, 4), {10: 0.5}, True)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any, TypeVar

import torch

from ..errors import WeightgeoError

__all__ = ["encode_row", "decode_row", "pack", "unpack"]

T = TypeVar("T")
_TUPLE, _DICT = "__tuple__", "__dict__"


def encode_row(obj: Any) -> str:
    """JSON text of a row (nested dicts, lists, tuples, numbers, strings, ``None``), decodable exactly."""
    return json.dumps(_tag(obj, "row"), separators=(",", ":"), ensure_ascii=False, allow_nan=True)


def decode_row(text: str) -> Any:
    """The row :func:`encode_row` wrote."""
    return _untag(json.loads(text))


def pack(obj: Any, *, exclude: tuple[str, ...] = ()) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Split a dataclass into its tensor fields and the rest: ``(row, tensors)`` for :meth:`ResultCache.put`.

    >>> from weightgeo.linalg.svd import decompose
    >>> dec = decompose(torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]]), vectors=True)
    >>> row, tensors = pack(dec)
    >>> sorted(tensors), row["shape"], row["small_side"]
    (['S', 'gram_eigenvalues', 'vectors'], (3, 2), 'right')
    >>> torch.equal(unpack(type(dec), row, tensors).vectors, dec.vectors)
    True

    Args:
        obj: a dataclass instance whose non-tensor fields are JSON-able (:func:`encode_row`).
        exclude: fields not to store (derivable ones, or views of inputs); give them back to :func:`unpack`.
    """
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise WeightgeoError(f"pack: expected a dataclass instance, got {type(obj).__name__}")
    row: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for f in dataclasses.fields(obj):
        if f.name in exclude:
            continue
        value = getattr(obj, f.name)
        if isinstance(value, torch.Tensor):
            tensors[f.name] = value
        else:
            row[f.name] = value
    return row, tensors


def unpack(cls: type[T], row: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], **given: Any) -> T:
    """Rebuild the dataclass :func:`pack` split; ``given`` supplies the excluded fields."""
    return cls(**{**row, **tensors, **given})


def _tag(obj: Any, where: str) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {_TUPLE: [_tag(v, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_tag(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj) and _TUPLE not in obj and _DICT not in obj:
            return {k: _tag(v, f"{where}.{k}") for k, v in obj.items()}
        return {_DICT: [[_tag(k, f"{where} key"), _tag(v, f"{where}.{k}")] for k, v in obj.items()]}
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0 and not isinstance(obj, torch.Tensor):
        return _tag(obj.item(), where)  # NumPy scalars
    raise WeightgeoError(
        f"cache row: {where} is a {type(obj).__name__}; rows hold numbers, strings, None, lists, "
        f"tuples and dicts (tensors go in the entry's tensors)"
    )


def _untag(obj: Any) -> Any:
    if isinstance(obj, list):
        return [_untag(v) for v in obj]
    if isinstance(obj, dict):
        if len(obj) == 1 and _TUPLE in obj:
            return tuple(_untag(v) for v in obj[_TUPLE])
        if len(obj) == 1 and _DICT in obj:
            return {_hashable(_untag(k)): _untag(v) for k, v in obj[_DICT]}
        return {k: _untag(v) for k, v in obj.items()}
    return obj


def _hashable(k: Any) -> Any:
    return tuple(_hashable(v) for v in k) if isinstance(k, (list, tuple)) else k
