"""matrix_pair_metrics: keys, agreement with the public functions, shared decompositions."""

import math

import numpy as np
import pytest
import reference as R
import torch
from cases import RANK, K, case

from weightgeo import WeightgeoError
from weightgeo.metrics import (
    ALL_METRICS,
    PAIR_METRICS,
    matrix_pair_metrics,
    principal_angles,
    spectral_drift,
    stable_rank,
    update_localization,
)

KEYS = {
    "principal_overlap": {
        "principal_overlap",
        "max_principal_angle",
        "mean_principal_angle",
        "k_effective",
        "spectral_gap",
    },
    "spectral_drift": {"spectral_drift"},
    "update_localization": {"density", "principal_mask_overlap", "low_magnitude_overlap"},
    "stable_rank": {"stable_rank", "delta_frobenius"},
}


def test_constants():
    assert PAIR_METRICS == ("principal_overlap", "spectral_drift", "update_localization", "stable_rank")
    assert ALL_METRICS == ("update_sparsity",) + PAIR_METRICS


@pytest.mark.parametrize("metric", PAIR_METRICS)
def test_keys_per_metric(metric):
    b, f, _, _ = case("powerlaw", "1e-3")
    out = matrix_pair_metrics(b, f, metrics=frozenset({metric}), k=K, rank=RANK)
    assert set(out) == KEYS[metric]
    assert all(isinstance(v, float) for v in out.values())


@pytest.mark.parametrize("kind,upd", [("gaussian", "1e-2"), ("lowrank", "2e-4"), ("lowrank_noise", "independent")])
def test_agrees_with_public_functions(kind, upd):
    b, f, b_np, f_np = case(kind, upd)
    out = matrix_pair_metrics(b, f, metrics=frozenset(ALL_METRICS), k=K, rank=RANK, alpha=0.3)
    assert "update_sparsity" not in out
    deg = principal_angles(b, f, k=K)
    assert out["k_effective"] == deg.numel()
    assert out["max_principal_angle"] == pytest.approx(float(deg.max()))
    assert out["mean_principal_angle"] == pytest.approx(float(deg.mean()))
    assert out["spectral_drift"] == pytest.approx(spectral_drift(b, f), rel=1e-9)  # eigh vs eigvalsh
    loc = update_localization(b, f, rank=RANK, alpha=0.3)
    assert (out["density"], out["principal_mask_overlap"], out["low_magnitude_overlap"]) == (
        loc.density,
        loc.principal_mask_overlap,
        loc.low_magnitude_overlap,
    )
    delta = f.float() - b.float()
    assert out["stable_rank"] == pytest.approx(stable_rank(delta))
    assert out["delta_frobenius"] == pytest.approx(float(np.linalg.norm(f_np.astype(np.float64) - b_np)), rel=1e-6)
    s = np.linalg.svd(b_np.astype(np.float64), compute_uv=False)
    k = int(out["k_effective"])
    expected_gap = math.inf if k == min(b.shape) or s[k] <= R.EPS32 * max(b.shape) * s[0] else s[k - 1] / s[k]
    if math.isinf(expected_gap):
        assert math.isinf(out["spectral_gap"]) or out["spectral_gap"] > 1e3
    else:
        assert out["spectral_gap"] == pytest.approx(expected_gap, rel=1e-6)


def test_full_k_is_not_measurable(gen):
    """k at the smaller side: the subspace is everything, so the gap (was inf) and the overlap (was 1.0) are null."""
    A = torch.randn(6, 4, generator=gen)
    out = matrix_pair_metrics(A, A * 1.1, metrics={"principal_overlap"}, k=512)
    assert out["k_effective"] == 4.0 and out["spectral_gap"] is None
    assert out["principal_overlap"] is None and "smaller side" in out["not_measurable"]["principal_overlap"]


def test_zero_matrix_gives_nan_angles():
    out = matrix_pair_metrics(torch.zeros(4, 3), torch.ones(4, 3), metrics={"principal_overlap", "stable_rank"})
    assert out["k_effective"] == 0.0 and math.isnan(out["principal_overlap"])
    assert out["stable_rank"] == pytest.approx(1.0)


def test_errors():
    with pytest.raises(WeightgeoError, match="unknown metric"):
        matrix_pair_metrics(torch.ones(3, 3), torch.ones(3, 3), metrics={"nss"})
    with pytest.raises(WeightgeoError, match="need matrices"):
        matrix_pair_metrics(torch.ones(3), torch.ones(3), metrics={"spectral_drift"})


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_equals_cuda():
    b, f, _, _ = case("powerlaw", "1e-3")
    cpu = matrix_pair_metrics(b, f, metrics=frozenset(PAIR_METRICS), k=K, rank=RANK)
    gpu = matrix_pair_metrics(b.cuda(), f.cuda(), metrics=frozenset(PAIR_METRICS), k=K, rank=RANK)
    for key, v in cpu.items():
        assert gpu[key] == pytest.approx(v, rel=1e-6, abs=2e-3 if "overlap" in key or key == "density" else 1e-6), key


@pytest.mark.parametrize("shape", [(96, 40), (40, 96)])
def test_batched_equals_looped_bit_for_bit(monkeypatch, gen, shape):
    """A member's row does not depend on the batch it is in (a cached or resumed row equals a fresh one): the
    policy's row blocks are per matrix, whatever the batch size. A small ROW_BLOCK makes every matrix span
    several blocks and the batch several member chunks."""
    from weightgeo.linalg import policy
    from weightgeo.linalg.svd import decompose, frobenius_sq
    from weightgeo.metrics.pair import batched_pair_metrics

    monkeypatch.setattr(policy, "ROW_BLOCK", 1000)
    w0 = (0.02 * torch.randn(5, *shape, generator=gen)).bfloat16()
    w1 = (w0.float() + 1e-3 * torch.randn(5, *shape, generator=gen)).bfloat16()
    kw = dict(metrics=frozenset(PAIR_METRICS), k=8, side="right", rank=4, alpha=0.5, eta=1e-3)
    batched = batched_pair_metrics(w0, w1, **kw)
    for i in range(5):
        assert batched_pair_metrics(w0[i : i + 1], w1[i : i + 1], **kw)[0] == batched[i]
    whole = decompose(w0)
    for i in (0, 3):
        one = decompose(w0[i : i + 1])
        assert torch.equal(one.S[0], whole.S[i]) and torch.equal(one.vectors[0], whole.vectors[i])
    assert torch.equal(frobenius_sq(w0)[2:3], frobenius_sq(w0[2:3]))


def test_batched_equals_looped_at_the_real_row_block(gen):
    """Two 4200×512 members hold more than ROW_BLOCK entries together but not alone: a row block sized over the
    batch would sum them in another order than each alone (relative differences of ~1e-9 before the fix)."""
    from weightgeo.metrics.pair import batched_pair_metrics

    w0 = (0.02 * torch.randn(2, 4200, 512, generator=gen)).bfloat16()
    w1 = (w0.float() + 1e-3 * torch.randn(2, 4200, 512, generator=gen)).bfloat16()
    kw = dict(
        metrics=frozenset({"principal_overlap", "spectral_drift", "stable_rank"}),
        k=16,
        side="right",
        rank=4,
        alpha=0.5,
        eta=1e-3,
    )
    batched = batched_pair_metrics(w0, w1, **kw)
    assert [batched_pair_metrics(w0[i : i + 1], w1[i : i + 1], **kw)[0] for i in range(2)] == batched
