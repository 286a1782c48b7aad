"""The one way weightgeo reads JSON: bounded in size and nesting, every failure a WeightgeoError naming the file.

Every JSON weightgeo reads comes from someone else's disk (``config.json``, shard indexes,
``adapter_config.json``, ``trainer_state.json``, report files, the headers of cache entries and Tracker files),
so a hostile or broken one must give an answer, not a traceback: the standard parser recurses and raises
``RecursionError`` on deeply nested input (``[[[[...]]]]``), and code that walks the result recurses too.
:func:`loads` refuses nesting deeper than :data:`MAX_DEPTH` and texts longer than :data:`MAX_BYTES`, and
:func:`read_json` adds the file's own errors (missing, unreadable, not UTF-8).

>>> loads('{"a": [1, 2]}', source="x.json")
{'a': [1, 2]}
>>> loads("[" * 100 + "]" * 100, source="config.json")
Traceback (most recent call last):
...
weightgeo.errors.WeightgeoError: config.json: JSON nested deeper than 64 levels; ...
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import WeightgeoError

__all__ = ["loads", "read_json", "read_json_object", "MAX_DEPTH", "MAX_BYTES", "JSON_FIX"]

#: the deepest nesting accepted: real configs, indexes, trainer states and reports stay under 10 levels
MAX_DEPTH = 64
#: the longest JSON text accepted (a trainer_state.json of a long run is a few MB; a config a few KB)
MAX_BYTES = 256 << 20
#: the fix a message gives when a file is damaged and nothing more specific applies
JSON_FIX = "re-download or re-save the file"


def loads(data: str | bytes, *, source: str, what: str = "JSON", fix: str = JSON_FIX) -> Any:
    """Parse ``data`` (the content of ``source``) as JSON, or raise a WeightgeoError naming ``source``.

    Args:
        data: the text, or its UTF-8 bytes.
        source: the file (or place) it came from, named in every message.
        what: what the text is (``"config.json"``, ``"cache entry header"``), named in messages.
        fix: what the user should do about a bad one.

    Raises:
        WeightgeoError: not UTF-8, not JSON, longer than :data:`MAX_BYTES` or nested deeper than
            :data:`MAX_DEPTH`.
    """
    if len(data) > MAX_BYTES:
        raise WeightgeoError(
            f"{source}: {what} is {len(data) / 2**20:.0f} MiB, beyond the {MAX_BYTES >> 20} MiB any JSON weightgeo "
            f"reads may hold; {fix}"
        )
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
        obj = json.loads(text)
    except RecursionError:
        raise WeightgeoError(f"{source}: JSON nested deeper than {MAX_DEPTH} levels; {fix}") from None
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise WeightgeoError(f"{source}: {what} is not valid UTF-8 JSON ({str(e)[:200]}); {fix}") from None
    if _opening_brackets(text) > MAX_DEPTH and _depth(obj) > MAX_DEPTH:
        raise WeightgeoError(f"{source}: JSON nested deeper than {MAX_DEPTH} levels; {fix}")
    return obj


def read_json(path: str | os.PathLike[str], *, what: str = "JSON file", fix: str = JSON_FIX) -> Any:
    """The JSON content of the file ``path`` (see :func:`loads`), or a WeightgeoError naming the file."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_BYTES:
            raise WeightgeoError(
                f"{p}: {what} is {size / 2**20:.0f} MiB, beyond the {MAX_BYTES >> 20} MiB any JSON weightgeo reads "
                f"may hold; {fix}"
            )
        data = p.read_bytes()
    except FileNotFoundError:
        raise WeightgeoError(f"{p}: no such file; pass an existing {what}") from None
    except IsADirectoryError:
        raise WeightgeoError(f"{p}: is a folder, not a {what}; {fix}") from None
    except OSError as e:
        raise WeightgeoError(f"{p}: cannot read {what} ({e.strerror or e}); check its permissions") from None
    return loads(data, source=str(p), what=what, fix=fix)


def read_json_object(path: str | os.PathLike[str], *, what: str = "JSON file", fix: str = JSON_FIX) -> dict[str, Any]:
    """:func:`read_json` of a file that must hold a JSON object."""
    obj = read_json(path, what=what, fix=fix)
    if not isinstance(obj, dict):
        raise WeightgeoError(f"{path}: {what} must hold a JSON object, found a JSON {type(obj).__name__}; {fix}")
    return obj


def _opening_brackets(text: str | bytes) -> int:
    """An upper bound of the nesting depth, cheap to take (most texts need no walk)."""
    if isinstance(text, (bytes, bytearray)):
        return text.count(b"[") + text.count(b"{")
    return text.count("[") + text.count("{")


def _depth(obj: Any) -> int:
    """The nesting depth of a parsed value, without recursion (the point is not to overflow the stack)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, dict):
            children: Any = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_DEPTH:
            return deepest
        stack.extend((c, level + 1) for c in children if isinstance(c, (dict, list)))
    return deepest
