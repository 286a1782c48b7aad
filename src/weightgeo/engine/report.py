"""The Report of one (base, fine-tune) comparison: its rows in plan order, the summary and the provenance."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .._version import __version__
from ..linalg.hardware import hardware
from ..linalg.policy import compared_format
from ..options import PairOptions
from ..report import Report, summarize_rows
from ..validation import spell
from .plan import Plan

__all__ = ["comparison_report"]


def comparison_report(
    plan: Plan,
    indexed_rows: list[tuple[int, dict[str, Any]]],
    options: PairOptions,
    *,
    world_size: int,
    processes: list[dict[str, Any]],
    seconds: float,
    **extra: Any,
) -> Report:
    """The Report of one comparison from its ``(job index, row)`` pairs (any order, from every rank)."""
    rows = [row for _, row in sorted(indexed_rows, key=lambda p: p[0])]
    meta = {
        "weightgeo_version": __version__,
        "kind": "compare",
        "base": plan.base_source,
        "ft": plan.ft_source,
        "metrics": list(options.metrics),
        "params": options.params(),
        "device": str(options.device),
        "hardware": hardware(options.device).as_dict(),
        "world_size": world_size,
        "processes": processes,
        "torch_version": torch.__version__,
        "seconds": round(seconds, 3),
        # tensors in both but not analysed, then each source's entries that are not weights (tagged by side)
        "skipped": plan.skipped + plan.source_skipped(),
        "partial": plan.partial,
        "filtered_out": plan.filtered_out,  # tensors the include/exclude filter left out
        "unmatched": {"only_base": plan.alignment.only_base, "only_ft": plan.alignment.only_ft},
        "tied": plan.alignment.tied,
        **extra,
    }
    if options.vectors:
        meta["vectors"] = list(options.vectors)
    mixed = mixed_formats(rows)
    if mixed:
        meta["mixed_formats"] = mixed
        warn_mixed(mixed)
    return Report(rows=rows, summary=summarize_rows(rows), meta=meta)


def mixed_formats(rows: list[dict[str, Any]]) -> dict[str, int]:
    """How many rows compared a tensor stored in two float formats, by formats and the rule used
    (:func:`~weightgeo.linalg.policy.compared_format`; the rows' ``compared_in``)."""
    out: dict[str, int] = {}
    for r in rows:
        if "compared_in" not in r:
            continue
        a, b, c = r["stored_dtype"], r["ft_stored_dtype"], r["compared_in"]
        rule = compared_format(getattr(torch, a), getattr(torch, b))
        rounded = rule is not None and rule[1]
        holder, held = (b, a) if c == b else (a, b)
        text = f"{a} vs {b}: " + (
            f"both rounded to {c}" if rounded else f"compared as stored ({holder} holds every {held} value)"
        )
        out[text] = out.get(text, 0) + 1
    return out


def warn_mixed(mixed: dict[str, int]) -> None:
    """One warning per report: how many tensors are stored in two formats, and the rule each was compared by."""
    n = sum(mixed.values())
    warnings.warn(
        f"{n} tensor{'s are' if n != 1 else ' is'} stored in different float formats in the base and the fine-tune ("
        + "; ".join(f"{k}: {v}" for k, v in mixed.items())
        + "); where both are rounded to one format, differences of rounding show as updates; rows say which rule "
        f"(compared_in); {spell('dtype')} chooses the format instead (docs/metrics.md)",
        RuntimeWarning,
        stacklevel=4,
    )
