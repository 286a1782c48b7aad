"""The Report of one (base, fine-tune) comparison: its rows in plan order, the summary and the provenance."""

from __future__ import annotations

from typing import Any

import torch

from .._version import __version__
from ..linalg.hardware import hardware
from ..options import PairOptions
from ..report import Report, summarize_rows
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
    return Report(rows=rows, summary=summarize_rows(rows), meta=meta)
