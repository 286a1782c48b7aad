"""One cell of a table: a number shown as a reader expects it, and what is not a number shown as not measured.

A value that is ``None`` or NaN was not measured (a 1-D tensor has no principal angles; an update too small to
see has no overlap; a subspace metric whose k is not below the matrix's smaller side says nothing): it is never
shown as 0. :func:`reason` finds why, from the row (a ``not_measurable`` mapping, a ``<key>_reason`` field or a
``reason`` field) or from the report's ``meta["partial"]`` list, so that every "n/m" carries its reason.

>>> fmt(0.80537), fmt(6.5e-05), fmt(None), fmt(float("nan")), fmt(float("inf")), fmt((896, 128))
('0.8054', '6.500e-05', 'n/m', 'n/m', '∞', '896x128')
>>> measured(0.0), measured(None), measured(float("nan")), measured("x")
(True, False, False, False)
>>> reason({"name": "w", "principal_overlap": None, "not_measurable": {"principal_overlap": "k ≥ 128"}},
...        "principal_overlap")
'k ≥ 128'
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["NOT_MEASURED", "fmt", "measured", "number", "reason", "unmeasured", "partial_reasons", "is_numeric_text"]

#: what a cell shows for a value that was not measured
NOT_MEASURED = "n/m"


def measured(v: Any) -> bool:
    """Whether ``v`` is a measured number (finite or infinite; not None, NaN, bool or text)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not (isinstance(v, float) and math.isnan(v))


def number(v: Any) -> float | None:
    """``v`` as a float when measured, else None (for colour scales and charts)."""
    return float(v) if measured(v) else None


def fmt(v: Any, *, digits: int = 4) -> str:
    """A short text form of a cell: 4 decimals in [1e-3, 1e5), else scientific; tuples as ``AxB``; vectors
    by their length; None/NaN as :data:`NOT_MEASURED`."""
    if v is None:
        return NOT_MEASURED
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return NOT_MEASURED
        if math.isinf(v):
            return "∞" if v > 0 else "-∞"
        if v == 0 or 1e-3 <= abs(v) < 1e5:
            return f"{v:.{digits}f}"
        return f"{v:.{max(digits - 1, 1)}e}"
    if isinstance(v, tuple):
        return "x".join(str(d) for d in v)
    if isinstance(v, list):  # a vector (principal_angles): its length in a table, the values in JSON/CSV
        return f"[{len(v)} values]"
    if isinstance(v, Mapping):  # not_measurable: which metrics (the summary says why)
        return f"{len(v)} metric{'s' if len(v) != 1 else ''}"
    return str(v)


def is_numeric_text(text: str) -> bool:
    """Whether a formatted cell is a number (right-aligned in text tables)."""
    if text in (NOT_MEASURED, "∞", "-∞"):
        return True
    try:
        float(text)
        return True
    except ValueError:
        return False


def partial_reasons(meta: Mapping[str, Any]) -> dict[str, str]:
    """name -> reason of the tensors whose SVD metrics were not computed (``meta["partial"]``)."""
    out: dict[str, str] = {}
    for p in meta.get("partial", []) or []:
        if isinstance(p, Mapping) and "name" in p:
            out[str(p["name"])] = str(p.get("reason", "not computed"))
    return out


def unmeasured(row: Mapping[str, Any]) -> dict[str, str]:
    """The row's ``not_measurable`` map (metric -> reason), ``{}`` when every metric was measured.

    >>> unmeasured({"principal_overlap": None, "not_measurable": {"principal_overlap": "k ≥ 128"}})
    {'principal_overlap': 'k ≥ 128'}
    """
    nm = row.get("not_measurable")
    return dict(nm) if isinstance(nm, Mapping) else {}


def reason(row: Mapping[str, Any], key: str, partial: Mapping[str, str] | None = None) -> str:
    """Why ``row[key]`` is not a measured number ('' when it is)."""
    v = row.get(key)
    if measured(v):
        return ""
    nm = row.get("not_measurable")
    if isinstance(nm, Mapping) and nm.get(key):
        return str(nm[key])
    if isinstance(nm, str) and nm:
        return nm
    if isinstance(nm, Sequence) and not isinstance(nm, str) and key in nm and row.get("reason"):
        return str(row["reason"])
    for field in (f"{key}_reason", "reason"):
        if row.get(field):
            return str(row[field])
    if partial and str(row.get("name")) in partial:
        return partial[str(row.get("name"))]
    if key not in row:
        return "not computed for this tensor"
    return "undefined (NaN): e.g. no visible update, or a zero singular value"
