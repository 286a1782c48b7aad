"""Property table over all pair metrics (scikit-learn test_common style): bounds, symmetry, invariances.

The table is keyed by the list of all metrics (``weightgeo.metrics.catalog.OUTPUTS``): a coverage test fails
when a metric is added without its row here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from weightgeo.metrics import (
    matrix_pair_metrics,
    principal_angles,
    principal_overlap,
    spectral_drift,
    stable_rank,
    update_localization,
    update_sparsity,
)
from weightgeo.metrics.catalog import COUNTS, OUTPUTS, PAIR_METRICS

K = 3


def _loc(field):
    return lambda b, f: getattr(update_localization(b, f, rank=2, alpha=0.4), field)


def _kernel(key):
    """A row key of the engine's pair kernel (for the outputs no public function returns alone)."""
    return lambda b, f: matrix_pair_metrics(b, f, metrics=frozenset(PAIR_METRICS), k=K, rank=2, alpha=0.4)[key]


# name: (fn(base, ft) -> float, (lo, hi or None = min(m, n)), symmetric, scale invariance, rotation invariance)
# scale: "any" = invariant under W -> c·W for c > 0; "pow2" = only for c = 2^j (the bf16 rule is binary);
# "linear" = f(c·W0, c·W+) = c·f(W0, W+) (a norm)
METRICS = {
    "update_sparsity": (update_sparsity, (0.0, 1.0), True, "pow2", False),
    "principal_overlap": (lambda b, f: principal_overlap(b, f, k=K), (0.0, 1.0), True, "any", True),
    "principal_overlap_left": (lambda b, f: principal_overlap(b, f, k=K, side="left"), (0.0, 1.0), True, "any", True),
    "max_principal_angle": (lambda b, f: float(principal_angles(b, f, k=K).max()), (0.0, 90.0), True, "any", True),
    "spectral_drift": (spectral_drift, (0.0, math.inf), False, "any", True),
    "density": (_loc("density"), (0.0, 1.0), True, "pow2", False),
    "principal_mask_overlap": (_loc("principal_mask_overlap"), (0.0, 1.0), False, "pow2", False),
    "low_magnitude_overlap": (_loc("low_magnitude_overlap"), (0.0, 1.0), False, "pow2", False),
    "stable_rank": (lambda b, f: stable_rank(f - b), (0.0, None), True, "any", True),
    "mean_principal_angle": (_kernel("mean_principal_angle"), (0.0, 90.0), True, "any", True),
    "k_effective": (_kernel("k_effective"), (0.0, None), True, "any", True),
    "spectral_gap": (_kernel("spectral_gap"), (1.0, math.inf), False, "any", True),  # σ_k/σ_{k+1} of W0
    "delta_frobenius": (_kernel("delta_frobenius"), (0.0, math.inf), True, "linear", True),
}


def test_the_table_covers_every_metric():
    """Every row key a comparison emits (the catalog's list) has its properties in the table."""
    listed = {key for keys in OUTPUTS.values() for key in keys}
    assert listed - set(METRICS) == set(), "add the new metric to METRICS with its properties"
    assert set(METRICS) - listed <= {"principal_overlap_left"}, "METRICS lists a metric the catalog does not"
    assert COUNTS <= listed


pairs = st.tuples(st.integers(4, 10), st.integers(4, 10), st.integers(0, 2**31 - 1), st.sampled_from([1e-3, 1e-2, 0.3]))
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True)


def _pair(m, n, seed, rel, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(m, n, generator=g, dtype=torch.float64)
    f = b + rel * torch.randn(m, n, generator=g, dtype=torch.float64)
    return b.to(dtype), f.to(dtype)


def _close(a, b, tol):
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= tol * max(1.0, abs(a), abs(b))


@pytest.mark.parametrize("name", list(METRICS))
@SETTINGS
@given(p=pairs)
def test_bounded(name, p):
    fn, (lo, hi), *_ = METRICS[name]
    m, n, seed, rel = p
    for dt in (torch.bfloat16, torch.float32, torch.float64):
        v = fn(*_pair(m, n, seed, rel, dt))
        if math.isnan(v):
            assert name.endswith("overlap") and "principal_overlap" not in name  # nothing updated
            continue
        assert lo - 1e-9 <= v <= (min(m, n) if hi is None else hi) + 1e-9


@pytest.mark.parametrize("name", [k for k, v in METRICS.items() if v[2]])
@SETTINGS
@given(p=pairs)
def test_symmetric(name, p):
    fn = METRICS[name][0]
    b, f = _pair(*p)
    assert _close(fn(b, f), fn(f, b), 1e-7)


@pytest.mark.parametrize("name", list(METRICS))
@SETTINGS
@given(p=pairs, j=st.integers(-3, 3))
def test_scale_invariant(name, p, j):
    fn, _, _, scale, _ = METRICS[name]
    b, f = _pair(*p)
    c = 2.0**j if scale == "pow2" else 2.0**j * 1.37
    want = c * fn(b, f) if scale == "linear" else fn(b, f)
    assert _close(want, fn(c * b, c * f), 1e-7)


@pytest.mark.parametrize("name", [k for k, v in METRICS.items() if v[4]])
@SETTINGS
@given(p=pairs, seed=st.integers(0, 2**31 - 1))
def test_rotation_invariant(name, p, seed):
    fn = METRICS[name][0]
    b, f = _pair(*p)
    m, n = b.shape
    g = torch.Generator().manual_seed(seed)
    P = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))[0]
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    assert _close(fn(b, f), fn(P @ b @ Q.T, P @ f @ Q.T), 1e-6)


@pytest.mark.parametrize("name", list(METRICS))
def test_identity_is_best(name):
    fn = METRICS[name][0]
    b, _ = _pair(8, 6, 0, 0.0)
    v = fn(b, b.clone())
    best = {
        "update_sparsity": 1.0,
        "principal_overlap": 1.0,
        "principal_overlap_left": 1.0,
        "max_principal_angle": 0.0,
        "spectral_drift": 0.0,
        "density": 0.0,
        "stable_rank": 0.0,
        "mean_principal_angle": 0.0,
        "delta_frobenius": 0.0,
        "k_effective": float(K),
    }
    if name == "spectral_gap":  # a property of W0 alone: σ_k/σ_{k+1}
        s = torch.linalg.svdvals(b)
        assert v == pytest.approx(float(s[K - 1] / s[K]), rel=1e-9)
    elif name in best:
        assert v == pytest.approx(best[name], abs=1e-5)
    else:
        assert math.isnan(v)  # overlaps of an empty update mask


def test_numpy_equals_torch():
    b, f = _pair(7, 5, 1, 1e-2, torch.float32)
    for name, (fn, *_rest) in METRICS.items():
        assert _close(fn(b, f), fn(b.numpy(), f.numpy()), 0), name
    assert np.isfinite(spectral_drift(b.numpy(), f.numpy()))


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 3),
    m=st.integers(2, 12),
    n=st.integers(2, 12),
    low_rank=st.booleans(),
    bf16=st.booleans(),
    side=st.sampled_from(["right", "left"]),
    seed=st.integers(0, 2**16),
)
def test_batched_pair_metrics_equal_one_at_a_time(B, m, n, low_rank, bf16, side, seed):
    """The engine's shape-group kernel gives every member what it gets alone (incl. rank-deficient members,
    whose effective k differs, and the ill-conditioned fallbacks)."""
    from weightgeo.metrics.pair import PAIR_METRICS, batched_pair_metrics

    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(B, m, n, generator=g, dtype=torch.float64)
    if low_rank:  # the first member exactly rank 1: a different effective k from the others
        W0[0] = torch.randn(m, 1, generator=g, dtype=torch.float64) @ torch.randn(
            1, n, generator=g, dtype=torch.float64
        )
    W1 = W0 + 0.05 * torch.randn(B, m, n, generator=g, dtype=torch.float64)
    dt = torch.bfloat16 if bf16 else torch.float32
    W0, W1 = W0.to(dt), W1.to(dt)
    opts = dict(metrics=frozenset(PAIR_METRICS), k=K, side=side, rank=2, alpha=0.4, eta=1e-3)
    together = batched_pair_metrics(W0, W1, **opts)
    for i in range(B):
        alone = batched_pair_metrics(W0[i : i + 1], W1[i : i + 1], **opts)[0]
        assert together[i].keys() == alone.keys()
        for key, val in alone.items():
            if val is None or isinstance(val, dict):  # not measurable (k or rank at the smaller side), and why
                assert together[i][key] == val, key
            elif math.isnan(val):
                assert math.isnan(together[i][key]), key
            else:
                assert together[i][key] == pytest.approx(val, rel=1e-5, abs=1e-7), key
