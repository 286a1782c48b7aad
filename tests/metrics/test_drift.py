"""spectral_drift (NSS) and stable_rank vs float64 NumPy; Weyl and Mirsky bounds (notes §1.3, §2)."""

import numpy as np
import pytest
import reference as R
import torch
from cases import CASES, case

from weightgeo import WeightgeoError
from weightgeo.linalg import singular_values
from weightgeo.metrics import spectral_drift, stable_rank


@pytest.mark.parametrize("kind,upd", CASES)
def test_nss_vs_reference(kind, upd):
    b, f, b_np, f_np = case(kind, upd)
    ref = R.spectral_drift(b_np, f_np)
    # 2% relative, even where the true NSS is at fp32 storage level (identical spectra, ~1e-9)
    assert abs(spectral_drift(b, f) - ref) <= 0.02 * ref + 1e-13


@pytest.mark.parametrize("rel", [2e-4, 1e-5])
def test_nss_not_inflated_at_small_updates(rel):
    """fp32 master weights, tiny relative updates (RLVR regime): must match float64 to 2%."""
    rng = np.random.default_rng(3)
    for kind in ("gaussian", "powerlaw"):
        A = R.make_base(kind, 160, 128, rng)
        rms = np.sqrt(np.mean(A.astype(np.float64) ** 2))
        B = (A + rel * rms * rng.standard_normal(A.shape)).astype(np.float32)
        ref = R.spectral_drift(A, B)
        assert spectral_drift(torch.from_numpy(A), torch.from_numpy(B)) == pytest.approx(ref, rel=0.02)


def test_exactly_low_rank_values_refined():
    """σ below 1e-6·σ₁ trigger LAPACK float64 values: NSS of identical-spectrum pairs stays exact."""
    for seed in range(3):
        b, f, _ = R.make_pair("lowrank", "independent", 48, 40, seed)
        ref = R.spectral_drift(b, f)
        assert spectral_drift(torch.from_numpy(b), torch.from_numpy(f)) == pytest.approx(ref, rel=1e-4)


def test_weyl_and_mirsky(gen):
    for scale in (1e-4, 1e-2, 1.0):
        A = torch.randn(40, 30, generator=gen, dtype=torch.float64)
        D = scale * torch.randn(40, 30, generator=gen, dtype=torch.float64)
        s0, s1 = singular_values(A), singular_values(A + D)
        assert float((s1 - s0).abs().max()) <= float(torch.linalg.matrix_norm(D, 2)) * (1 + 1e-10)
        nss = spectral_drift(A, A + D)
        assert nss * float(s0.norm()) <= float(torch.linalg.matrix_norm(D)) * (1 + 1e-10)


def test_nss_edge_cases(gen):
    A = torch.randn(6, 4, generator=gen)
    assert spectral_drift(A, A.clone()) == 0.0
    assert spectral_drift(A, 2 * A) == pytest.approx(1.0, rel=1e-6)
    assert spectral_drift(torch.zeros(3, 3), torch.zeros(3, 3)) == 0.0
    assert spectral_drift(torch.zeros(3, 3), torch.eye(3)) == float("inf")
    with pytest.raises(WeightgeoError, match="need matrices"):
        spectral_drift(torch.ones(4), torch.ones(4))


@pytest.mark.parametrize("kind", R.KINDS)
def test_stable_rank_vs_reference(kind):
    rng = np.random.default_rng(4)
    D = R.make_base(kind, 70, 50, rng)
    assert stable_rank(torch.from_numpy(D)) == pytest.approx(R.stable_rank(D), rel=1e-6)
    assert stable_rank(torch.from_numpy(D).bfloat16()) == pytest.approx(
        R.stable_rank(torch.from_numpy(D).bfloat16().float().numpy()), rel=1e-6
    )


def test_stable_rank_edges():
    assert stable_rank(torch.zeros(5, 4)) == 0.0
    assert stable_rank(torch.eye(4)) == pytest.approx(4.0)
    assert stable_rank(np.outer(np.arange(1.0, 4), np.arange(1.0, 3))) == pytest.approx(1.0)
    with pytest.raises(WeightgeoError, match="need matrices"):
        stable_rank(torch.ones(3))
    with pytest.raises(WeightgeoError, match="non-finite"):
        stable_rank(torch.tensor([[1.0, float("inf")]]))
