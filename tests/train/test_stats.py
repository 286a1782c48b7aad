"""The paired bootstrap, the two-level bootstrap and the verdict rule, on constructed inputs."""

import math

import numpy as np
import pytest

from weightgeo.errors import WeightgeoError
from weightgeo.train.stats import VERDICTS, cluster_bootstrap, paired_bootstrap, verdict


def test_paired_bootstrap_recovers_a_known_difference_and_uses_the_pairing():
    rng = np.random.default_rng(0)
    difficulty = rng.uniform(0, 1, size=(1000, 1))  # prompts differ a lot in difficulty
    u = rng.uniform(size=(1000, 4))  # common random numbers: the same uniforms for both models
    a = (u < difficulty).astype(np.uint8)
    b = (u < np.clip(difficulty + 0.02, 0, 1)).astype(np.uint8)  # model B: +2 points on every prompt
    r = paired_bootstrap(a, b, n_boot=2000, seed=1)
    assert r["diff"] == pytest.approx(b.mean() - a.mean())
    lo, hi = r["ci95"]
    assert 0 < lo < r["diff"] < hi and hi - lo < 0.01  # paired + CRN: tight, excludes 0
    # the same accuracies unpaired (B's rows shuffled across prompts) cannot be that tight
    r_unpaired = paired_bootstrap(a, b[rng.permutation(1000)], n_boot=2000, seed=1)
    assert r_unpaired["ci95"][1] - r_unpaired["ci95"][0] > 3 * (hi - lo)
    # no difference: the interval covers 0; swapping the models negates everything
    same = paired_bootstrap(a, a.copy())
    assert same["diff"] == 0 and same["ci95"] == (0.0, 0.0)
    rev = paired_bootstrap(b, a, n_boot=2000, seed=1)
    assert rev["diff"] == pytest.approx(-r["diff"]) and rev["ci95"][1] == pytest.approx(-lo)
    with pytest.raises(WeightgeoError, match="different prompt sets"):
        paired_bootstrap(a, b[:999])


def test_paired_bootstrap_coverage():
    """About 95% of intervals cover the true difference (100 simulated experiments)."""
    rng = np.random.default_rng(3)
    cover = 0
    for _ in range(100):
        d = rng.normal(0.01, 0.1, size=400)
        r = paired_bootstrap(np.zeros(400), d, n_boot=500, seed=int(rng.integers(1 << 30)))
        cover += r["ci95"][0] <= 0.01 <= r["ci95"][1]
    assert 88 <= cover <= 100


def test_cluster_bootstrap_resamples_seeds_and_items():
    x = np.array([[1.0, 2.0, 3.0, 4.0], [1.5, 2.5, 3.5, 4.5], [0.5, 1.5, 2.5, 3.5]])  # 3 seeds x 4 matrices
    r = cluster_bootstrap(lambda s, idx: x[s, idx].mean(), 3, 4, n_boot=1000, seed=0)
    assert r["statistic"] == pytest.approx(2.5) and r["per_seed"] == [2.5, 3.0, 2.0]
    lo, hi = r["ci95"]
    assert lo < 2.5 < hi and lo >= 0.5 and hi <= 4.5
    # a statistic that is constant over items varies only through the seeds
    r2 = cluster_bootstrap(lambda s, idx: float(s), 3, 4, n_boot=1000, seed=0)
    assert 0.0 <= r2["ci95"][0] < 1.0 < r2["ci95"][1] <= 2.0
    # one seed: items only
    r1 = cluster_bootstrap(lambda s, idx: x[0, idx].mean(), 1, 4, n_boot=1000, seed=0)
    assert r1["per_seed"] == [2.5] and r1["ci95"][0] < 2.5 < r1["ci95"][1]
    # a statistic that is NaN on every resample gives no interval
    r3 = cluster_bootstrap(lambda s, idx: math.nan, 2, 4, n_boot=50)
    assert r3["ci95"] is None


@pytest.mark.parametrize(
    "per_seed, ci, testable, want",
    [
        ([0.2, 0.1, 0.3], (0.05, 0.3), True, "reproduced"),
        ([0.2, 0.1, 0.3], (0.05, 0.3), False, "untestable"),  # a regime check failed: never "no"
        ([0.2, -0.01, 0.3], (0.01, 0.3), True, "inconclusive"),  # one seed against: not every seed
        ([0.2, 0.1, 0.3], (-0.01, 0.3), True, "inconclusive"),  # CI touches 0
        ([0.2, 0.1, 0.3], (0.0, 0.3), True, "inconclusive"),  # "excludes 0" is strict
        ([-0.2, -0.1], (-0.3, -0.05), True, "contradicted"),
        ([-0.2, -0.1], (-0.3, 0.01), True, "inconclusive"),
        ([-0.2, 0.1], (-0.3, -0.05), True, "inconclusive"),
        ([0.1], None, True, "inconclusive"),  # no interval
        ([], (0.1, 0.2), True, "inconclusive"),  # no data
        ([math.nan, 0.1], (0.1, 0.2), True, "inconclusive"),
    ],
)
def test_verdict_rule(per_seed, ci, testable, want):
    assert verdict(per_seed, ci, testable=testable) == want
    assert want in VERDICTS
