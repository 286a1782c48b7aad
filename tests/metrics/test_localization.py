"""update_localization vs the float64 / stable-argsort reference; masks, ties, bounds (notes §1.4)."""

import math

import numpy as np
import pytest
import torch

import reference as R
from cases import CASES, RANK, case
from weightgeo import WeightgeoError
from weightgeo.metrics import Localization, update_localization
from weightgeo.metrics.localization import _select


@pytest.mark.parametrize("kind,upd", CASES)
@pytest.mark.parametrize("alpha", [0.3, 0.5])
def test_vs_reference(kind, upd, alpha):
    b, f, b_np, f_np = case(kind, upd)
    ref = R.localization(b_np, f_np, rank=RANK, alpha=alpha)
    got = update_localization(b, f, rank=RANK, alpha=alpha)
    assert got.n_updated == ref["n_updated"] and got.numel == b.numel()
    assert got.density == ref["density"]
    assert got.low_magnitude_overlap == ref["low_magnitude_overlap"]  # exact: same values, same ties
    assert abs(got.principal_overlap - ref["principal_overlap"]) <= 2e-3


@pytest.mark.parametrize("kind,upd", CASES)
def test_feasibility_bounds(kind, upd):
    b, f, _, _ = case(kind, upd)
    for alpha in (0.1, 0.3, 0.5, 0.9):
        loc = update_localization(b, f, rank=RANK, alpha=alpha)
        d = loc.density
        a = math.floor(alpha * loc.numel) / loc.numel
        lo, hi = max(0.0, (a - (1 - d)) / d), min(1.0, a / d)
        for ov in (loc.principal_overlap, loc.low_magnitude_overlap):
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
            np.testing.assert_array_equal(_select(bf, count, largest=largest).numpy(),
                                          R.select_mask(bf.numpy(), count, largest))


def test_select_above_quantile_limit():
    """More than 2**24 entries (torch.quantile refuses): exact count, ties resolved by index."""
    n = 2**24 + 3
    x = (torch.arange(n, dtype=torch.int32) % 7).float()
    count = n // 2
    m = _select(x, count, largest=False)
    assert int(m.sum()) == count
    t = float(x[m].max())
    assert bool((x[~m] >= t).all())
    tied = (x == t).nonzero().view(-1)
    chosen = m[tied]
    assert bool(chosen[: int(chosen.sum())].all()) and not bool(chosen[int(chosen.sum()):].any())


def test_nothing_updated_gives_nan(gen):
    A = torch.randn(12, 8, generator=gen).bfloat16()
    loc = update_localization(A, A.clone())
    assert isinstance(loc, Localization)
    assert loc.density == 0.0 and loc.n_updated == 0
    assert math.isnan(loc.principal_overlap) and math.isnan(loc.low_magnitude_overlap)


def test_rank_capped_and_fields(gen):
    A = torch.randn(6, 4, generator=gen)
    loc = update_localization(A, A + 1, rank=64, alpha=0.5)
    assert loc.rank == 4 and loc.alpha == 0.5 and loc.numel == 24 and loc.density == 1.0
    assert loc.principal_overlap == 0.5 and loc.low_magnitude_overlap == 0.5
    with pytest.raises(Exception):
        loc.density = 0.3  # frozen


def test_errors():
    with pytest.raises(WeightgeoError, match="alpha"):
        update_localization(torch.ones(3, 3), torch.ones(3, 3), alpha=1.5)
    with pytest.raises(WeightgeoError, match="rank"):
        update_localization(torch.ones(3, 3), torch.ones(3, 3), rank=0)
    with pytest.raises(WeightgeoError, match="need matrices"):
        update_localization(torch.ones(9), torch.ones(9))
