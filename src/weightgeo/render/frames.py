"""pandas views of a report: the rows with typed columns, and the summary as a second frame.

>>> from weightgeo.report import Report
>>> r = Report(rows=[{"name": "layers.0.q.weight", "shape": (4, 2), "numel": 8, "layer": 0, "update_sparsity": 0.5},
...                  {"name": "norm.weight", "shape": (4,), "numel": 4, "layer": None, "update_sparsity": 1.0}],
...            summary={"update_sparsity": 2 / 3, "by_module": {"q": {"update_sparsity": 0.5}}}, meta={})
>>> df = r.to_pandas()
>>> list(df.columns), str(df["layer"].dtype), df["cols"].isna().tolist()
(['name', 'rows', 'cols', 'numel', 'layer', 'update_sparsity'], 'Int64', [False, True])
>>> r.to_pandas(summary=True).index.tolist()
['model', 'q']
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .cells import measured

__all__ = ["rows_frame", "summary_frame"]

_INTEGER = ("layer", "rows", "cols", "numel", "step", "expert")


def _pandas():
    try:
        import pandas as pd
    except ImportError as e:
        raise ImportError("Report.to_pandas needs pandas: pip install 'weightgeo[pandas]'") from e
    return pd


def _int_or_none(v: Any) -> int | None:
    return int(v) if measured(v) and not (isinstance(v, float) and math.isinf(v)) else None


def rows_frame(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]):  # -> pandas.DataFrame
    """The rows with ``shape`` split into nullable-integer ``rows`` / ``cols`` and ``layer`` (and ``step``,
    ``expert``) as nullable integers; None in a metric becomes NaN."""
    pd = _pandas()
    cols: list[str] = []
    for c in columns:
        cols += ["rows", "cols"] if c == "shape" else [c]
    data = []
    for r in rows:
        d = {k: v for k, v in r.items() if k != "shape"}
        shape = r.get("shape")
        if isinstance(shape, (tuple, list)) and shape:
            d["rows"] = shape[-2] if len(shape) >= 2 else shape[0]
            d["cols"] = shape[-1] if len(shape) >= 2 else None
        data.append(d)
    df = pd.DataFrame(data, columns=cols)
    for c in _INTEGER:
        if c in df.columns:
            df[c] = pd.array([_int_or_none(v) for v in df[c]], dtype="Int64")
    return df


def summary_frame(report: Any):  # -> pandas.DataFrame
    """The summary as a frame: ``"model"`` then each module (comparisons), or one row per step (trajectories);
    one column per number."""
    pd = _pandas()
    s = report.summary or {}

    def flat(d: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if not isinstance(v, (dict, list))}

    if "by_step" in s:
        by_step = s["by_step"]
        steps = sorted(by_step, key=float)
        df = pd.DataFrame([flat(by_step[t]) for t in steps], index=pd.Index([int(t) for t in steps], name="step"))
        return df
    groups = {"model": flat(s), **{g: flat(v) for g, v in (s.get("by_module") or {}).items()}}
    return pd.DataFrame(list(groups.values()), index=pd.Index(list(groups), name="group"))
