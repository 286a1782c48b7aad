"""Cache keys: the sha256 of the canonical JSON of everything that determines a result.

>>> a = result_key("pair_row", inputs=[{"file": "x", "tensor": "w"}], metrics=["b", "a"], options={"k": 4},
...                policy="p1", version="0.1.0")
>>> b = result_key("pair_row", inputs=[{"tensor": "w", "file": "x"}], metrics=["a", "b"], options={"k": 4},
...                policy="p1", version="0.1.0")
>>> a.digest == b.digest, len(a.digest)
(True, 64)
>>> result_key("pair_row", inputs=[{"file": "x", "tensor": "w"}], metrics=["a", "b"], options={"k": 8},
...            policy="p1", version="0.1.0").digest == a.digest
False
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import WeightgeoError
from .fingerprint import code_fingerprint

__all__ = ["CacheKey", "KEY_FORMAT", "NOT_IN_KEY", "not_in_key", "in_key", "canonical_json", "result_key"]

#: bumped when the key recipe changes: every old key then misses (3: the code fingerprint joined the key)
KEY_FORMAT = 3

#: the metadata entry of a dataclass field that cannot change a result: the field is left out of every key, and
#: the entry's value says why (an option object is keyed as a whole, so only a field marked so stays out)
NOT_IN_KEY = "weightgeo_not_in_key"


def not_in_key(why: str) -> dict[str, str]:
    """Field metadata for a dataclass field that cannot change a result (left out of cache keys), with the reason.

    >>> from dataclasses import dataclass, field
    >>> @dataclass(frozen=True)
    ... class Opts:
    ...     k: int = 16
    ...     progress: bool = field(default=False, metadata=not_in_key("a progress bar on stderr"))
    >>> canonical_json(Opts(progress=True))
    '{"k":16}'
    """
    if not why:
        raise WeightgeoError("not_in_key: say why the field cannot change a result")
    return {NOT_IN_KEY: why}


def in_key(field: dataclasses.Field[Any]) -> bool:
    """Whether a dataclass field enters cache keys (every field does unless marked :func:`not_in_key`)."""
    return NOT_IN_KEY not in field.metadata


@dataclass(frozen=True)
class CacheKey:
    """One cache entry's key: ``digest`` (sha256 hex of ``text``), the entry ``kind`` and the canonical JSON
    ``text`` it was hashed from (stored in the entry and compared on every read, so a digest collision or a
    copied-in file can never be served)."""

    digest: str
    kind: str
    text: str


def canonical_json(obj: Any) -> str:
    """The one JSON text of ``obj``: sorted keys, no spaces, dataclasses as their fields (every field but those
    marked :func:`not_in_key`), tuples and lists alike, sets sorted, dtypes / devices / paths / enums as text.

    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Opts:
    ...     k: int = 16
    ...     side: str = "right"
    >>> canonical_json(Opts()) == canonical_json({"side": "right", "k": 16})
    True
    >>> canonical_json({"dtype": torch.float32, "steps": (10, 20), "tol": float("inf")})
    '{"dtype":"torch.float32","steps":[10,20],"tol":Infinity}'

    Raises:
        WeightgeoError: a value that has no stable JSON form (a tensor, an arbitrary object, non-text keys).
    """
    return json.dumps(
        _canonical(obj, "options"), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True
    )


def result_key(
    kind: str,
    *,
    inputs: Sequence[Mapping[str, Any]],
    metrics: Iterable[str] = (),
    options: Any = None,
    policy: str,
    version: str,
    code: str | None = None,
) -> CacheKey:
    """The key of one result: ``kind``, the input identities (in order), the metric set (unordered), the
    options, the numerical-policy fingerprint, the weightgeo version and the code fingerprint, hashed with sha256.

    Args:
        kind: what the entry holds (``"pair_row"``, ``"base_decomposition"``, ``"update_spectrum"``, ...).
        inputs: one identity per input tensor, in role order (base first), e.g. ``Checkpoint.identity(name)``.
        metrics: the metric names the result holds; order does not matter.
        options: a JSON-able mapping or a dataclass (see :func:`canonical_json`).
        policy: the numerical-policy fingerprint (a non-empty string).
        version: the weightgeo version.
        code: the code fingerprint (default: :func:`~weightgeo.cache.fingerprint.code_fingerprint`, this
            process's computing modules), so that a result of other code is never served.
    """
    if not isinstance(kind, str) or not kind:
        raise WeightgeoError(f"cache key: kind must be a non-empty string, got {kind!r}")
    if not isinstance(policy, str) or not policy:
        raise WeightgeoError(f"cache key: policy must be a non-empty fingerprint string, got {policy!r}")
    if isinstance(inputs, (str, bytes, Mapping)) or not isinstance(inputs, Sequence) or not inputs:
        raise WeightgeoError(
            f"cache key: inputs must be a non-empty list of identities (one per input tensor), "
            f"got {type(inputs).__name__}"
        )
    names = [metrics] if isinstance(metrics, str) else list(metrics)
    if not all(isinstance(m, str) for m in names):
        raise WeightgeoError(f"cache key: metrics must be names (strings), got {names!r}")
    doc = {
        "key_format": KEY_FORMAT,
        "kind": kind,
        "weightgeo": str(version),
        "code": code_fingerprint() if code is None else str(code),
        "policy": policy,
        "metrics": sorted(set(names)),
        "options": _canonical(options, "options"),
        "inputs": [_canonical(i, f"inputs[{n}]") for n, i in enumerate(inputs)],
    }
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True)
    return CacheKey(hashlib.sha256(text.encode("utf-8")).hexdigest(), kind, text)


def _canonical(obj: Any, where: str) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, str)):  # floats: repr round-trips; NaN/inf as tokens
        return obj
    if isinstance(obj, enum.Enum):
        return _canonical(obj.value, where)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.name: _canonical(getattr(obj, f.name), f"{where}.{f.name}") for f in dataclasses.fields(obj) if in_key(f)
        }
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise WeightgeoError(
                    f"cache key: {where} has a non-text key {k!r} ({type(k).__name__}); use "
                    f"string keys so that the key is unambiguous"
                )
            out[k] = _canonical(v, f"{where}.{k}")
        return out
    if isinstance(obj, (list, tuple)):
        return [_canonical(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, (set, frozenset)):
        items = [_canonical(v, f"{where}{{}}") for v in obj]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True, allow_nan=True))
    if isinstance(obj, (torch.dtype, torch.device)):
        return str(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if (
        hasattr(obj, "item")
        and hasattr(obj, "dtype")
        and getattr(obj, "ndim", 1) == 0
        and not isinstance(obj, torch.Tensor)
    ):  # NumPy scalars
        return _canonical(obj.item(), where)
    raise WeightgeoError(
        f"cache key: {where} is a {type(obj).__name__}, which has no stable JSON form; pass "
        f"numbers, strings, lists, string-keyed mappings or dataclasses of them"
    )
