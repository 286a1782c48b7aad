"""Update localization: where the visible updates fall (paper §3.2, Fig. 3, App. C.3; PNT §4.2; LIFT).

Masks over the n entries of W0 [out, in]:

* principal mask M_princ: the ``floor(α·n)`` entries with the largest ``|·|`` of the rank-r SVD
  reconstruction of W0;
* low-magnitude mask M_low: the ``floor(α·n)`` entries with the smallest ``|W0|``;
* update mask M_upd: the bf16 rule of :func:`~weightgeo.metrics.sparsity.update_mask`.

``overlap(M⋆) = |M⋆ ∩ M_upd| / |M_upd|`` (random baseline α); ``density = |M_upd| / n``.

Our choices where the paper is silent: the count is ``floor(α·n)``; ties (bf16 weights tie a lot) are
broken by flat row-major index, lower index first, which is exactly what
``np.argsort(key, kind="stable")[:count]`` selects. Selection is an exact threshold plus a
running count over the tied entries (:class:`Selector`, a radix select on the float32 bits in the policy's
row blocks): O(n), no sort, no ``torch.quantile`` (which refuses more than 2²⁴ elements), and no
whole-matrix temporaries beyond the inputs. If nothing was updated, both overlaps are NaN.
"""

from __future__ import annotations

import math
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from ..defaults import ALPHA, ETA, RANK
from ..linalg.pairwise import base_spectrum
from ..linalg.policy import ROW_BLOCK, row_blocks
from ..validation import check_eta, check_pair, check_rank_alpha, resolve_size
from .sparsity import unchanged_mask

__all__ = ["Localization", "update_localization", "localize", "Selector", "Bracket"]


@dataclass(frozen=True)
class Localization:
    """Result of :func:`update_localization`.

    Attributes:
        density: |M_upd| / n in [0, 1].
        principal_mask_overlap: |M_princ ∩ M_upd| / |M_upd| in [0, 1] (NaN if nothing was updated; ``None``,
            not measurable, where the rank reaches min(out, in): the rank-r reconstruction is then W0 itself and
            M_princ the complement of M_low); the report rows' key of the same name. (``principal_overlap``: its
            deprecated alias, removed in 0.3.)
        low_magnitude_overlap: |M_low ∩ M_upd| / |M_upd| in [0, 1] (NaN if nothing was updated).
        alpha: mask fraction α used; each mask has floor(α·n) entries.
        rank: rank r of the reconstruction actually used (capped at min(out, in)).
        n_updated: |M_upd|.
        numel: n.
    """

    density: float
    principal_mask_overlap: float | None
    low_magnitude_overlap: float
    alpha: float
    rank: int
    n_updated: int
    numel: int

    @property
    def principal_overlap(self) -> float | None:
        """Deprecated alias of :attr:`principal_mask_overlap` (a mask overlap, not the subspace
        ``principal_overlap``); removed in 0.3."""
        warnings.warn(
            "Localization.principal_overlap is deprecated: use principal_mask_overlap (the name the "
            "report rows use); the alias goes in weightgeo 0.3",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.principal_mask_overlap


_CACHE_BELOW = 1 << 24  # matrices up to this many entries keep their reconstruction blocks between passes


class Selector:
    """Exact selection of ``count`` entries of a non-negative float array seen in flat-order blocks.

    The ``count`` largest (or smallest), ties at the threshold to the lowest flat indices, which is exactly
    ``np.argsort(±key, kind="stable")[:count]``. Non-negative floats order like their integer bit patterns,
    so the threshold is found by a radix select, 16 bits per histogram pass (2 passes for float32, 4 for
    float64), each pass counting only the entries that share the prefix found so far; then :meth:`mark`
    selects block by block. Memory is O(block), with no sort and no ``kthvalue`` (which needs the whole
    array and measured 10x slower than a histogram pass).
    """

    def __init__(self, n: int, count: int, *, largest: bool, dtype: torch.dtype = torch.float32):
        self.largest = largest
        self.count = min(max(count, 0), n)
        self.trivial = self.count in (0, n)
        self.int_dtype = torch.int32 if dtype == torch.float32 else torch.int64
        self.width = 32 if dtype == torch.float32 else 64
        self.passes = 0 if self.trivial else self.width // 16
        self.stage = 0
        self.hist: torch.Tensor | None = None
        self.prefix = 0
        self.beyond = 0  # entries strictly beyond the prefix found so far (above it if largest, below if not)
        self.threshold = 0.0
        self.ties_left = 0

    def observe(self, x: torch.Tensor) -> None:
        """Feed one block (flat, ≥ 0, the constructor's dtype) to the current histogram pass."""
        if self.stage >= self.passes:
            return
        bits = x.view(self.int_dtype)
        shift = self.width - 16 * (self.stage + 1)
        if self.stage:
            bits = bits[(bits >> (shift + 16)) == self.prefix]
        key = (bits >> shift) & 0xFFFF
        counts = torch.bincount(key, minlength=1 << 16)
        self.hist = counts if self.hist is None else self.hist.add_(counts)

    def end_pass(self) -> None:
        """Close a histogram pass: extend the threshold's prefix by the 16 bits where the count-th entry lies."""
        if self.stage >= self.passes:
            return
        assert self.hist is not None
        hist = self.hist.flip(0) if self.largest else self.hist
        cum = hist.cumsum(0)
        need = self.count - self.beyond
        i = int(torch.searchsorted(cum, torch.tensor([need], dtype=cum.dtype, device=cum.device)))
        self.beyond += int(cum[i - 1]) if i > 0 else 0
        self.prefix = (self.prefix << 16) | ((0xFFFF - i) if self.largest else i)
        self.hist = None
        self.stage += 1
        if self.stage == self.passes:
            # The prefix is the bit pattern of a non-negative float: read it back on the host.
            self.threshold = struct.unpack(
                "<f" if self.width == 32 else "<d", struct.pack("<I" if self.width == 32 else "<Q", self.prefix)
            )[0]
            self.ties_left = self.count - self.beyond

    def mark(self, x: torch.Tensor) -> torch.Tensor:
        """Final pass: the selected entries of the next block (flat bool); blocks must come in flat order."""
        if self.trivial:
            return torch.full(x.shape, self.count > 0, dtype=torch.bool, device=x.device)
        t = self.threshold
        mask = x > t if self.largest else x < t
        if self.ties_left:
            ties = torch.nonzero(x == t).reshape(-1)[: self.ties_left]
            mask[ties] = True
            self.ties_left -= ties.numel()
        return mask


#: entries of the sample that brackets each threshold (at least; a 256th of the matrix for large ones)
_SAMPLE = 1 << 16
#: entries a bracket may hold (at least; an eighth of the matrix for large ones) before the radix select takes over
_BRACKET_CAP = 1 << 20


class Bracket:
    """One-pass exact selection of ``count`` entries of a non-negative array seen in flat-order blocks, when the
    threshold lies in a bracket ``[lo, hi]`` read off a sample: entries beyond the bracket are counted, those
    inside it are kept (value, flat position, update flag), and the threshold is found among them at the end.

    The same entries as ``np.argsort(±key, kind="stable")[:count]`` (ties to the lowest flat indices), whatever
    the sample: :meth:`selected` checks that the bracket held the threshold and returns ``None`` when it did not
    (or when more than ``cap`` entries fell inside), and the caller then takes the radix select (:class:`Selector`).
    CPU blocks are compared and counted as NumPy views (``host=False``: with torch ops, as on CUDA).

    >>> br = Bracket(torch.tensor([0.0, 1.0, 2.0, 3.0]), 4, 2, largest=True)
    >>> br.feed(torch.tensor([3.0, 0.0, 2.0, 1.0]), torch.tensor([True, True, False, True]))
    >>> br.selected()  # the two largest are 3.0 (updated) and 2.0 (not)
    1
    """

    def __init__(
        self, sample: torch.Tensor, n: int, count: int, *, largest: bool, cap: int | None = None, host: bool = True
    ):
        self.n, self.count, self.largest, self.host = n, min(max(count, 0), n), largest, host
        self.cap = max(_BRACKET_CAP, n // 8) if cap is None else cap
        self.beyond = self.beyond_upd = self.seen = 0  # entries strictly beyond the bracket (selected for sure)
        self.inside: list[tuple[torch.Tensor, torch.Tensor]] = []  # values and update flags, in flat order
        self.kept = 0
        self.failed = False
        srt = sample.reshape(-1).sort().values
        s = srt.numel()
        p = (1 - self.count / n if largest else self.count / n) if n else 0.0  # the threshold's quantile
        d = 6 * math.sqrt(max(p * (1 - p), 0.0) / max(s, 1)) + 0.005
        i_lo, i_hi = math.floor((p - d) * s), math.ceil((p + d) * s)
        self.lo = float(srt[i_lo]) if s and i_lo >= 0 else -math.inf
        self.hi = float(srt[i_hi]) if s and i_hi < s else math.inf

    def feed(self, x: torch.Tensor, upd: torch.Tensor) -> None:
        """The next block (flat keys and their update flags, in flat order)."""
        if self.failed or self.count in (0, self.n):
            self.beyond_upd += _count(upd) if self.count == self.n else 0
            return
        xs, us = (_host(x), _host(upd)) if self.host else (x, upd)
        sure = xs > self.hi if self.largest else xs < self.lo
        self.beyond += _count(sure)
        self.beyond_upd += _count(sure & us)
        inside = (xs >= self.lo) & (xs <= self.hi)
        self.kept += _count(inside)
        if self.kept > self.cap:  # a bracket too wide (a sample unlike the matrix): the radix select instead
            self.failed, self.inside = True, []
            return
        self.inside.append((xs[inside], us[inside]))

    def selected(self) -> int | None:
        """Selected entries that are updated, or ``None`` when the bracket missed the threshold."""
        if self.count in (0, self.n):
            return self.beyond_upd
        need = self.count - self.beyond
        if self.failed or need < 0 or need > self.kept:
            return None
        if need == 0:
            return self.beyond_upd
        if isinstance(self.inside[0][0], np.ndarray):
            vals = np.concatenate([v for v, _ in self.inside])
            flags = np.concatenate([u for _, u in self.inside])
            k = need - 1 if not self.largest else vals.size - need
            t = np.partition(vals, k)[k]  # the threshold: the need-th largest (smallest) inside
            ties = np.flatnonzero(vals == t)
        else:
            vals = torch.cat([v for v, _ in self.inside])
            flags = torch.cat([u for _, u in self.inside])
            t = torch.kthvalue(vals, need if not self.largest else vals.numel() - need + 1).values
            ties = torch.nonzero(vals == t).reshape(-1)
        strict = vals > t if self.largest else vals < t
        ties = ties[: need - _count(strict)]  # the lowest flat positions first
        return self.beyond_upd + _count(strict & flags) + _count(flags[ties])


def _host(x: torch.Tensor):  # -> np.ndarray | torch.Tensor
    """A CPU tensor as a NumPy view (its comparisons and counts measured ~10x torch's on CPU), else itself."""
    return x.numpy() if x.device.type == "cpu" else x


def _count(mask) -> int:  # mask: np.ndarray | torch.Tensor of bool
    """True entries of a bool array (``count_nonzero``: a bool ``sum()`` measured ~90x slower in torch on CPU)."""
    return int(np.count_nonzero(mask)) if isinstance(mask, np.ndarray) else int(torch.count_nonzero(mask))


def localize(
    b: torch.Tensor,
    f: torch.Tensor,
    V: torch.Tensor,
    transposed: bool,
    *,
    alpha: float,
    eta: float,
    update_rows: Callable[[int, int], torch.Tensor] | None = None,
) -> Localization:
    """The kernel for one [out, in] pair, in row blocks of W0 (one pass, O(block) temporaries).

    ``V`` holds the top-r small-side singular vectors of W0 in the compute dtype ([in, r], or [out, r] when
    ``transposed``, i.e. out < in), shared with the angles and NSS via the pair's ``BaseSpectrum``; the
    reconstruction ``W0 V Vᵀ`` (or ``V Vᵀ W0``) is formed one block of rows at a time. ``update_rows(s, e)``,
    when given, is the update mask of rows ``s:e`` (True = updated; the FP8 rule on stored codes) instead of the
    bf16 rule on ``b``, ``f``. Both masks are selected in one pass (:class:`Bracket`, from a grid sample of the
    keys); a bracket that missed its threshold falls back to the radix select (:class:`Selector`, three passes).
    """
    rows, cols = b.shape
    n = b.numel()
    r = V.shape[-1]
    count = math.floor(alpha * n)
    cd = V.dtype
    spans = list(row_blocks(rows, cols, elements=ROW_BLOCK))  # ROW_BLOCK read here: tests shrink it
    R: torch.Tensor | None = None
    if transposed:  # V Vᵀ W0 by rows: V[rows] @ (Vᵀ W0), with the r × in factor accumulated once
        R = torch.zeros(r, cols, dtype=cd, device=b.device)
        for s, e in spans:
            R += V[s:e].mT @ b[s:e].to(cd)

    def keys(s: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        w0 = b[s:e].to(cd)
        recon = (V[s:e] @ R) if R is not None else (w0 @ V) @ V.mT
        return recon.abs_().reshape(-1), w0.abs().reshape(-1)  # abs(), not abs_(): w0 may be b itself

    def updated(s: int, e: int) -> torch.Tensor:
        mask = ~unchanged_mask(b[s:e], f[s:e], eta) if update_rows is None else update_rows(s, e).to(b.device)
        return mask.reshape(-1)

    # A grid sample of both keys (every i-th row, every j-th column) brackets the two thresholds.
    step = max(1, math.isqrt(max(1, n // max(_SAMPLE, n // 256))))
    ri, ci = torch.arange(0, rows, step, device=b.device), torch.arange(0, cols, step, device=b.device)
    w_s = b[ri].to(cd)
    rec_s = (V[ri] @ R[:, ci]) if R is not None else (w_s @ V) @ V[ci].mT
    princ = Bracket(rec_s.abs(), n, count, largest=True)
    low = Bracket(w_s[:, ci].abs(), n, count, largest=False)
    n_upd = 0
    for s, e in spans:
        rec, mag = keys(s, e)
        upd = updated(s, e)
        n_upd += _count(upd)
        princ.feed(rec, upd)
        low.feed(mag, upd)
    n_princ, n_low = princ.selected(), low.selected()
    if n_princ is None or n_low is None:
        n_princ, n_low = _radix_counts(n, count, cd, spans, keys, updated)
    po, lo = (n_princ / n_upd, n_low / n_upd) if n_upd else (float("nan"), float("nan"))
    return Localization(n_upd / n, po, lo, alpha, r, n_upd, n)


def _radix_counts(n: int, count: int, cd: torch.dtype, spans, keys, updated) -> tuple[int, int]:
    """Updated entries in the principal and low-magnitude masks by the radix select (three passes over the keys,
    kept between passes for matrices of up to ``_CACHE_BELOW`` entries)."""
    cache = [keys(s, e) for s, e in spans] if n <= _CACHE_BELOW else None
    blocks = (lambda: iter(cache)) if cache is not None else (lambda: (keys(s, e) for s, e in spans))
    princ = Selector(n, count, largest=True, dtype=cd)
    low = Selector(n, count, largest=False, dtype=cd)
    for _ in range(princ.passes):
        for rec, mag in blocks():
            princ.observe(rec)
            low.observe(mag)
        princ.end_pass()
        low.end_pass()
    n_princ = n_low = 0
    for (s, e), (rec, mag) in zip(spans, blocks()):
        upd = updated(s, e)
        n_princ += _count(princ.mark(rec) & upd)
        n_low += _count(low.mark(mag) & upd)
    return n_princ, n_low


def update_localization(
    base: Any, ft: Any, *, rank: int | float = RANK, alpha: float = ALPHA, eta: float = ETA
) -> Localization:
    """Density of the visible update and its overlap with the principal and low-magnitude masks (§1.4).

    >>> W0 = torch.tensor([[4.0, 0.1], [0.2, 3.0]])
    >>> loc = update_localization(W0, W0 + torch.tensor([[0.0, 0.5], [0.0, 0.0]]), rank=1, alpha=0.5)
    >>> loc.density, loc.principal_mask_overlap, loc.low_magnitude_overlap
    (0.25, 0.0, 1.0)

    Args:
        base: W0 [out, in] (tensor/array).
        ft: W+ [out, in].
        rank: r of the reconstruction defining M_princ: a count (default 64), or a fraction in (0, 1) of
            min(out, in); at or above min(out, in), ``principal_mask_overlap`` is ``None`` (not measurable).
        alpha: mask fraction α in [0, 1] (default 0.5; the paper's Fig. 3 is only feasible for 0.3).
        eta: bf16-rule tolerance of the update mask (default 1e-3).

    Returns:
        :class:`Localization`. Overlaps lie in [max(0, (α − (1 − d))/d), α/d] for density d; random
        baseline α. Reported (Fig. 3): low-magnitude overlap SFT 0.32 < OPD 0.54 < RLVR 0.73.
    """
    rank, alpha = check_rank_alpha(rank, alpha)
    eta = check_eta(eta)
    b, f = check_pair(base, ft, matrix=True, what="update_localization")
    spec = base_spectrum(b)
    p = min(b.shape)
    r = resolve_size(rank, p)
    loc = localize(b, f, spec.V_c[:, : min(r, p)], spec.transposed, alpha=alpha, eta=eta)
    return replace(loc, principal_mask_overlap=None) if r >= p else loc
