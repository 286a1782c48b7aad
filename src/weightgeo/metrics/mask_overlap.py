"""Subnetwork overlap: how much two fine-tunes of one base update the same entries (``update_mask_overlap``).

Each fine-tune's update mask M = {entries changed from the base under the bf16 rule} (:mod:`.sparsity`). For two
masks A and B of one tensor of n entries, with a = |A|, b = |B| and x = |A ∩ B|:

* ``mask_jaccard`` = x / (a + b − x), the Jaccard index (NaN when neither updated anything);
* ``mask_overlap`` = x / min(a, b), the overlap coefficient (1 when one mask holds the other; NaN when either is
  empty);
* ``random_mask_jaccard`` and ``random_mask_overlap``: their expected values if A and B were drawn independently
  and uniformly among the masks of the same sizes a and b (x then follows the hypergeometric law: E[x] = ab/n,
  so E[overlap] = max(a, b)/n exactly; E[Jaccard] is the exact sum over that law, :func:`expected_jaccard`).

Mukherjee et al. (arXiv 2505.11711, "RL finetunes small subnetworks") compare two runs' updated sets I1, I2 with
the one-sided overlaps |I1 ∩ I2|/|I1| and |I1 ∩ I2|/|I2| against a random baseline, the other run's density.
Where ours differs: masks come from the bf16 rule with η (theirs: bf16 values that differ, i.e. η = 0); we
report the symmetric Jaccard index and the overlap coefficient (= the larger one-sided overlap) with the counts
a, b, x (from which both one-sided ones follow), per tensor and for the model; and the random baseline is the
exact expectation for masks of the same sizes per tensor (the one-sided overlap's is their density, b/n).

For the model, the masks of all tensors are pooled (x, a, b summed: each tensor weighs by its entries); the
baselines then sum the per-tensor expectations (random masks of each tensor's own densities): E[x] exactly, the
Jaccard index as E[x] / (a + b − E[x]) (its relative error is of the order 1/(a + b), negligible for a model).

>>> a = torch.tensor([True, True, False, False]); b = torch.tensor([True, False, True, False])
>>> m = mask_overlap(a, b)
>>> m.mask_jaccard, m.mask_overlap, m.random_mask_overlap
(0.3333333333333333, 0.5, 0.5)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import WeightgeoError

__all__ = [
    "MaskOverlap",
    "mask_overlap",
    "overlap_counts",
    "pairwise_counts",
    "overlap_from_counts",
    "pooled_overlap",
    "expected_jaccard",
]


@dataclass(frozen=True)
class MaskOverlap:
    """Two update masks of one tensor (or of a model, pooled) compared.

    Attributes:
        numel: n, the entries compared.
        updated_a, updated_b: a = |A| and b = |B|, the entries each fine-tune updated.
        updated_both: x = |A ∩ B|.
        mask_jaccard: x / (a + b − x), in [0, 1]; NaN when a = b = 0.
        mask_overlap: x / min(a, b), in [0, 1]; NaN when a or b is 0.
        random_mask_jaccard, random_mask_overlap: their expected values for independent uniformly random masks of
            sizes a and b (module docstring).
    """

    numel: int
    updated_a: int
    updated_b: int
    updated_both: int
    mask_jaccard: float
    mask_overlap: float
    random_mask_jaccard: float
    random_mask_overlap: float

    def as_row(self) -> dict[str, float | int]:
        """The fields as a report row's keys."""
        return {
            "updated_a": self.updated_a,
            "updated_b": self.updated_b,
            "updated_both": self.updated_both,
            "mask_jaccard": self.mask_jaccard,
            "mask_overlap": self.mask_overlap,
            "random_mask_jaccard": self.random_mask_jaccard,
            "random_mask_overlap": self.random_mask_overlap,
        }


def overlap_counts(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """|A|, |B| and |A ∩ B| of boolean masks over their last dimension, batched over the others (int64).

    >>> overlap_counts(torch.tensor([[True, True, False]]), torch.tensor([[True, False, False]]))
    (tensor([2]), tensor([1]), tensor([1]))
    """
    if a.dtype != torch.bool or b.dtype != torch.bool or a.shape != b.shape:
        raise WeightgeoError(
            f"overlap_counts: two boolean masks of one shape, got {a.dtype} {tuple(a.shape)} and "
            f"{b.dtype} {tuple(b.shape)}"
        )
    return a.sum(-1), b.sum(-1), (a & b).sum(-1)


def pairwise_counts(masks: torch.Tensor) -> torch.Tensor:
    """C[i, j] = |M_i ∩ M_j| for masks [F, ...] (C[i, i] = |M_i|), int64 [F, F]: one batched AND per row.

    >>> pairwise_counts(torch.tensor([[True, True, False], [True, False, True]])).tolist()
    [[2, 1], [1, 2]]
    """
    if masks.dtype != torch.bool or masks.dim() < 1:
        raise WeightgeoError(f"pairwise_counts: a boolean [F, ...] stack of masks, got {masks.dtype}")
    flat = masks.reshape(masks.shape[0], -1)
    f = flat.shape[0]
    out = torch.zeros(f, f, dtype=torch.int64)
    for i in range(f):
        row = (flat[i] & flat[i:]).sum(-1).cpu()
        out[i, i:] = row
        out[i:, i] = row
    return out


def expected_jaccard(n: int, a: int, b: int) -> float:
    """E[x / (a + b − x)] for x = |A ∩ B| of independent uniformly random subsets A, B of sizes a, b of n items.

    x is hypergeometric; the sum runs over its support, or over 40 standard deviations around its mode where
    that is narrower (the rest weighs below 1e-300), with the weights built from ratios of consecutive
    probabilities (no factorials of n: exact to float64 rounding at any n).

    >>> round(expected_jaccard(4, 2, 2), 6)  # x = 0, 1, 2 with probabilities 1/6, 4/6, 1/6
    0.388889
    >>> math.isnan(expected_jaccard(10, 0, 0)), expected_jaccard(10, 10, 3)
    (True, 0.3)
    """
    n, a, b = int(n), int(a), int(b)
    if not (0 <= a <= n and 0 <= b <= n):
        raise WeightgeoError(f"expected_jaccard: sizes a={a}, b={b} must lie in [0, n={n}]")
    if a == 0 and b == 0:
        return math.nan
    lo, hi = max(0, a + b - n), min(a, b)
    if lo == hi:
        return lo / (a + b - lo)
    mode = min(hi, max(lo, (a + 1) * (b + 1) // (n + 2)))
    sd = math.sqrt(a * b * (n - a) * (n - b) / (n * n * max(n - 1, 1)))
    width = int(40 * sd) + 50
    first, last = max(lo, mode - width), min(hi, mode + width)
    x = np.arange(first, last, dtype=np.float64)  # log p(x+1)/p(x) for x in [first, last)
    step = np.log((a - x) * (b - x)) - np.log((x + 1) * (n - a - b + x + 1))
    logp = np.concatenate([[0.0], np.cumsum(step)])  # log p(x) - log p(first), x = first..last
    w = np.exp(logp - logp.max())
    xs = np.arange(first, last + 1, dtype=np.float64)
    return float(np.sum(w * xs / (a + b - xs)) / np.sum(w))


def overlap_from_counts(n: int, a: int, b: int, x: int) -> MaskOverlap:
    """The :class:`MaskOverlap` of two masks of ``n`` entries with ``a``, ``b`` entries and ``x`` in common.

    >>> overlap_from_counts(8, 4, 2, 2).mask_overlap, overlap_from_counts(8, 4, 2, 2).random_mask_overlap
    (1.0, 0.5)
    """
    n, a, b, x = int(n), int(a), int(b), int(x)
    if not (0 <= x <= min(a, b) and max(a, b) <= n and a + b - x <= n):
        raise WeightgeoError(f"overlap_from_counts: inconsistent counts n={n}, a={a}, b={b}, x={x}")
    return _overlap(n, a, b, x, expected_jaccard(n, a, b), max(a, b) / n if min(a, b) else math.nan)


def _overlap(n: int, a: int, b: int, x: int, random_jaccard: float, random_overlap: float) -> MaskOverlap:
    union = a + b - x
    return MaskOverlap(
        numel=n,
        updated_a=a,
        updated_b=b,
        updated_both=x,
        mask_jaccard=x / union if union else math.nan,
        mask_overlap=x / min(a, b) if min(a, b) else math.nan,
        random_mask_jaccard=random_jaccard,
        random_mask_overlap=random_overlap,
    )


def mask_overlap(mask_a: torch.Tensor, mask_b: torch.Tensor) -> MaskOverlap:
    """Compare two update masks (True = updated) of one tensor: :class:`MaskOverlap` (module docstring).

    >>> mask_overlap(torch.tensor([True, False]), torch.tensor([True, False])).mask_jaccard
    1.0
    """
    a, b, x = overlap_counts(mask_a.reshape(-1), mask_b.reshape(-1))
    return overlap_from_counts(mask_a.numel(), int(a), int(b), int(x))


def pooled_overlap(parts: Iterable[MaskOverlap] | Sequence[MaskOverlap]) -> MaskOverlap:
    """The model figure: the masks of several tensors pooled (counts summed; module docstring for the baselines).

    >>> p = pooled_overlap([overlap_from_counts(4, 2, 2, 2), overlap_from_counts(4, 2, 2, 0)])
    >>> p.mask_jaccard, p.random_mask_overlap
    (0.3333333333333333, 0.5)
    """
    parts = list(parts)
    if not parts:
        raise WeightgeoError("pooled_overlap: no tensors to pool")
    n = sum(p.numel for p in parts)
    a = sum(p.updated_a for p in parts)
    b = sum(p.updated_b for p in parts)
    x = sum(p.updated_both for p in parts)
    ex = math.fsum(p.updated_a * p.updated_b / p.numel for p in parts if p.numel)  # E[x], exact
    e_union = a + b - ex
    return _overlap(n, a, b, x, ex / e_union if e_union > 0 else math.nan, ex / min(a, b) if min(a, b) else math.nan)
