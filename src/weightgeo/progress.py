"""The progress bars of the passes: one kind, moving in fractions of an item.

A pass's unit of work (a tensor of ``compare``, a matrix of the stream pass) can take minutes; a bar that moves only
when one is done sits at 0/N through a small model's single shape group or a large model's embedding. The passes
therefore advance it by fractions (each row chunk, each matrix read and checked, each kernel done, each step read),
and the bar shows them (``3.5/12 tensors``) and every update (``mininterval=0``: updates come per tensor, chunk or
step at most).

>>> fraction_bar(False, desc="weightgeo compare", total=3, unit="tensors") is None
True
"""

from __future__ import annotations

from typing import Any

__all__ = ["fraction_bar"]


def fraction_bar(enabled: bool, *, desc: str, total: int, unit: str) -> Any:
    """A tqdm bar over ``total`` items named ``unit`` (plural) that shows fractional progress, or ``None`` when not
    ``enabled`` (callers then pass no ``progress``)."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(
        desc=desc,
        total=total,
        leave=False,
        dynamic_ncols=True,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.0f} " + unit + " [{elapsed}<{remaining}]",
        mininterval=0,
    )
