"""How weightgeo averages over tensors, once: undefined (NaN) values are left out, never propagated.

>>> nanmean([1.0, float("nan"), 3.0]), nanmean([1.0, 0.0], weights=[3, 1]), nanmean([])
(2.0, 0.75, nan)
"""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = ["nanmean"]


def nanmean(values: Iterable[float], weights: Iterable[float] | None = None) -> float:
    """The mean of the non-NaN ``values`` (weighted by ``weights`` when given, pairwise), NaN when there are none.

    Sums are exact (``math.fsum``), so the result does not depend on the order of the values.
    """
    vals = [float(v) for v in values]
    if weights is None:
        finite = [v for v in vals if not math.isnan(v)]
        return math.fsum(finite) / len(finite) if finite else math.nan
    pairs = [(v, float(w)) for v, w in zip(vals, weights) if not math.isnan(v)]
    total = math.fsum(w for _, w in pairs)
    return math.fsum(v * w for v, w in pairs) / total if total else math.nan
