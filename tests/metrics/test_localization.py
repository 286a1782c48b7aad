"""update_localization vs the float64 / stable-argsort reference; masks, ties, bounds (notes §1.4)."""

import dataclasses
import math

import numpy as np
import pytest
import reference as R
import torch
from cases import CASES, RANK, case
from hypothesis import given, settings
from hypothesis import strategies as st

from weightgeo import WeightgeoError
from weightgeo.metrics import Localization, update_localization
from weightgeo.metrics.localization import Selector


def _select(x: torch.Tensor, count: int, *, largest: bool, block: int = 3) -> torch.Tensor:
    """Run the streamed selector over ``x`` in flat-order blocks of ``block`` entries (ragged last block)."""
    blocks = list(x.reshape(-1).split(block))
    sel = Selector(x.numel(), count, largest=largest, dtype=x.dtype)
    for _ in range(sel.passes):
        for blk in blocks:
            sel.observe(blk)
        sel.end_pass()
    return torch.cat([sel.mark(blk) for blk in blocks])


@pytest.mark.parametrize("kind,upd", CASES)
@pytest.mark.parametrize("alpha", [0.3, 0.5])
def test_vs_reference(kind, upd, alpha):
    b, f, b_np, f_np = case(kind, upd)
    ref = R.localization(b_np, f_np, rank=RANK, alpha=alpha)
    got = update_localization(b, f, rank=RANK, alpha=alpha)
    assert got.n_updated == ref["n_updated"] and got.numel == b.numel()
    assert got.density == ref["density"]
    assert got.low_magnitude_overlap == ref["low_magnitude_overlap"]  # exact: same values, same ties
    assert abs(got.principal_mask_overlap - ref["principal_overlap"]) <= 2e-3


@pytest.mark.parametrize("kind,upd", CASES)
def test_feasibility_bounds(kind, upd):
    b, f, _, _ = case(kind, upd)
    for alpha in (0.1, 0.3, 0.5, 0.9):
        loc = update_localization(b, f, rank=RANK, alpha=alpha)
        d = loc.density
        a = math.floor(alpha * loc.numel) / loc.numel
        lo, hi = max(0.0, (a - (1 - d)) / d), min(1.0, a / d)
        for ov in (loc.principal_mask_overlap, loc.low_magnitude_overlap):
            assert lo - 1e-12 <= ov <= hi + 1e-12


def test_select_ties_lower_index_first():
    x = torch.tensor([1.0, 3.0, 2.0, 3.0, 2.0, 2.0, 0.0, 2.0])
    for count in range(0, 9):
        for largest in (True, False):
            got = _select(x, count, largest=largest).numpy()
            np.testing.assert_array_equal(got, R.select_mask(x.numpy(), count, largest))
    g = torch.Generator().manual_seed(0)
    bf = torch.randn(5000, generator=g).bfloat16().float().abs()  # many ties
    for count in (1, 777, 2500, 4999):
        for largest in (True, False):
            for block, dtype in ((1, torch.float32), (641, torch.float32), (5000, torch.float32), (333, torch.float64)):
                x = bf.to(dtype)
                np.testing.assert_array_equal(
                    _select(x, count, largest=largest, block=block).numpy(), R.select_mask(x.numpy(), count, largest)
                )


def test_select_above_quantile_limit():
    """More than 2**24 entries (torch.quantile refuses): exact count, ties resolved by index."""
    n = 2**24 + 3
    x = (torch.arange(n, dtype=torch.int32) % 7).float()
    count = n // 2
    m = _select(x, count, largest=False, block=1 << 22)
    assert int(m.sum()) == count
    t = float(x[m].max())
    assert bool((x[~m] >= t).all())
    tied = (x == t).nonzero().view(-1)
    chosen = m[tied]
    assert bool(chosen[: int(chosen.sum())].all()) and not bool(chosen[int(chosen.sum()) :].any())


def test_nothing_updated_gives_nan(gen):
    A = torch.randn(12, 8, generator=gen).bfloat16()
    loc = update_localization(A, A.clone(), rank=2)
    assert isinstance(loc, Localization)
    assert loc.density == 0.0 and loc.n_updated == 0
    assert math.isnan(loc.principal_mask_overlap) and math.isnan(loc.low_magnitude_overlap)


def test_rank_capped_and_fields(gen):
    A = torch.randn(6, 4, generator=gen)
    loc = update_localization(A, A + 1, rank=64, alpha=0.5)
    assert loc.rank == 4 and loc.alpha == 0.5 and loc.numel == 24 and loc.density == 1.0
    # the rank reaches the smaller side: the reconstruction is A itself, the principal mask the complement of the
    # low-magnitude one (0.5 = 1 - 0.5 whatever the update): not measurable, None
    assert loc.principal_mask_overlap is None and loc.low_magnitude_overlap == 0.5
    below = update_localization(A, A + 1, rank=0.5, alpha=0.5)  # a fraction of the smaller side: rank 2
    assert below.rank == 2 and 0.0 <= below.principal_mask_overlap <= 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        loc.density = 0.3  # type: ignore[misc]  # frozen


def test_principal_overlap_is_a_deprecated_alias(gen):
    A = torch.randn(6, 4, generator=gen)
    loc = update_localization(A, A + 0.5 * (A > 0), rank=2, alpha=0.5)
    with pytest.warns(DeprecationWarning, match="principal_mask_overlap"):
        assert loc.principal_overlap == loc.principal_mask_overlap


def test_errors():
    with pytest.raises(WeightgeoError, match="alpha"):
        update_localization(torch.ones(3, 3), torch.ones(3, 3), alpha=1.5)
    with pytest.raises(WeightgeoError, match="rank"):
        update_localization(torch.ones(3, 3), torch.ones(3, 3), rank=0)
    with pytest.raises(WeightgeoError, match="need matrices"):
        update_localization(torch.ones(9), torch.ones(9))


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.integers(0, 6), min_size=1, max_size=60),
    frac=st.floats(0, 1),
    block=st.integers(1, 70),
    largest=st.booleans(),
    f64=st.booleans(),
)
def test_selector_matches_stable_argsort(values, frac, block, largest, f64):
    x = torch.tensor(values, dtype=torch.float64 if f64 else torch.float32) * 0.25
    count = int(frac * len(values))
    np.testing.assert_array_equal(
        _select(x, count, largest=largest, block=block).numpy(), R.select_mask(x.numpy(), count, largest)
    )


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_streamed_blocks_equal_one_block(monkeypatch, gen, shape):
    """Row blocks of one row, reconstruction recomputed every pass: the same masks as one cached block."""
    import weightgeo.metrics.localization as L

    b = torch.randn(*shape, generator=gen).bfloat16()
    f = (b.float() + 0.02 * torch.randn(*shape, generator=gen)).bfloat16()
    whole = update_localization(b, f, rank=5, alpha=0.3)
    monkeypatch.setattr(L, "ROW_BLOCK", 1)
    monkeypatch.setattr(L, "_CACHE_BELOW", 0)
    assert update_localization(b, f, rank=5, alpha=0.3) == whole


def _reference_selected(x: np.ndarray, upd: np.ndarray, count: int, largest: bool) -> int:
    return int((R.select_mask(x, count, largest) & upd).sum())


@settings(max_examples=150, deadline=None)
@given(
    values=st.lists(st.integers(0, 9), min_size=1, max_size=80),
    sample=st.lists(st.integers(0, 9), min_size=0, max_size=30),
    flags=st.lists(st.booleans(), min_size=80, max_size=80),
    frac=st.floats(0, 1),
    block=st.integers(1, 50),
    largest=st.booleans(),
    host=st.booleans(),
)
def test_bracket_is_exact_or_declines(values, sample, flags, frac, block, largest, host):
    """Whatever the sample (even one unlike the data), the one-pass bracket selects exactly the stable-argsort
    entries, or says it cannot (``None``); with the data itself as the sample it always can (unless capped)."""
    from weightgeo.metrics.localization import Bracket

    x = torch.tensor(values, dtype=torch.float32) * 0.25
    u = torch.tensor(flags[: len(values)])
    count = int(frac * len(values))
    ref = _reference_selected(x.numpy(), u.numpy(), count, largest)
    for smp in (torch.tensor(sample, dtype=torch.float32) * 0.25, x):
        br = Bracket(smp, x.numel(), count, largest=largest, host=host)
        for xb, ub in zip(x.split(block), u.split(block)):
            br.feed(xb, ub)
        got = br.selected()
        assert got is None or got == ref
    assert got == ref  # the data as its own sample brackets its threshold


def test_localize_falls_back_to_the_radix_select(monkeypatch, gen):
    """A bracket that holds too many entries (its cap) hands over to the three-pass radix select: same result."""
    import weightgeo.metrics.localization as L

    b = torch.randn(40, 24, generator=gen).bfloat16()
    f = (b.float() + 0.02 * torch.randn(40, 24, generator=gen)).bfloat16()
    one_pass = update_localization(b, f, rank=5, alpha=0.3)
    calls = []
    radix = L._radix_counts
    monkeypatch.setattr(L, "_radix_counts", lambda *a: calls.append(1) or radix(*a))
    monkeypatch.setattr(L, "_BRACKET_CAP", 0)  # cap = n // 8 = 120 entries, fewer than the bracket holds
    assert update_localization(b, f, rank=5, alpha=0.3) == one_pass
    assert calls == [1]
