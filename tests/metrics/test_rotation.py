"""principal_angles / principal_overlap vs float64 SciPy, and their invariants (paper-notes §1.2)."""

import numpy as np
import pytest
import reference as R
import torch
from cases import CASES, K, angle_tolerance, case

from weightgeo import WeightgeoError
from weightgeo.metrics import principal_angles, principal_overlap


@pytest.mark.parametrize("kind,upd", CASES)
@pytest.mark.parametrize("side", ["right", "left"])
def test_vs_reference(kind, upd, side):
    b, f, b_np, f_np = case(kind, upd)
    ref = R.principal_angles_deg(b_np, f_np, K, side)
    got = principal_angles(b, f, k=K, side=side).numpy()
    assert got.shape == ref.shape  # same effective k
    assert np.all(np.diff(got) >= 0)
    assert np.all(np.abs(got - ref) <= angle_tolerance(ref))
    assert abs(principal_overlap(b, f, k=K, side=side) - R.overlap(ref)) <= 1e-4


def test_identity_and_symmetry(gen):
    A = torch.randn(30, 20, generator=gen)
    B = A + 0.05 * torch.randn(30, 20, generator=gen)
    assert principal_overlap(A, A, k=10) == pytest.approx(1.0, abs=1e-12)
    assert float(principal_angles(A, A, k=10).max()) < 1e-5
    torch.testing.assert_close(principal_angles(A, B, k=8), principal_angles(B, A, k=8), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("side", ["right", "left"])
def test_rotation_invariance(side):
    rng = np.random.default_rng(5)
    A = R.make_base("powerlaw", 40, 30, rng).astype(np.float64)
    B = A + 1e-2 * rng.standard_normal(A.shape) / np.sqrt(30)
    P, Q = R.orthogonal(rng, 40, 40), R.orthogonal(rng, 30, 30)
    t = torch.from_numpy
    a0 = principal_angles(t(A), t(B), k=12, side=side)
    a1 = principal_angles(t(P @ A @ Q.T), t(P @ B @ Q.T), k=12, side=side)
    torch.testing.assert_close(a0, a1, rtol=1e-6, atol=1e-9)


def test_scale_invariance(gen):
    A = torch.randn(25, 15, generator=gen, dtype=torch.float64)
    B = A + 0.1 * torch.randn(25, 15, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(principal_angles(A, B, k=6), principal_angles(3 * A, 3 * B, k=6))


def test_wedin_bound():
    """‖sin Θ(V_k(W0), V_k(W+))‖₂ ≤ ‖ΔW‖₂ / (σ_k(W0) − σ_{k+1}(W0)) (given a gap; notes §1.3)."""
    rng = np.random.default_rng(6)
    for trial in range(5):
        A = R.make_base("lowrank_noise", 50, 40, rng).astype(np.float64)
        D = 1e-3 * (trial + 1) * rng.standard_normal(A.shape)
        k = 8
        s = np.linalg.svd(A, compute_uv=False)
        gap = s[k - 1] - s[k]
        bound = np.linalg.norm(D, 2) / gap
        for side in ("right", "left"):
            theta = np.radians(principal_angles(torch.from_numpy(A), torch.from_numpy(A + D), k=k, side=side).numpy())
            assert np.sin(theta.max()) <= bound * (1 + 1e-9)


def test_k_above_rank_is_effective_k():
    rng = np.random.default_rng(7)
    A = R.make_base("lowrank", 40, 30, rng)  # rank 8 in fp32
    B = R.make_base("lowrank", 40, 30, rng)
    assert principal_angles(torch.from_numpy(A), torch.from_numpy(B), k=20).shape == (8,)
    with pytest.raises(WeightgeoError, match="smaller side"):  # k at the smaller side: nothing to measure
        principal_angles(
            torch.randn(5, 3, generator=torch.Generator().manual_seed(0)),
            torch.randn(5, 3, generator=torch.Generator().manual_seed(1)),
            k=512,
        )


def test_edge_cases():
    with pytest.raises(WeightgeoError, match="need matrices"):
        principal_angles(torch.ones(5), torch.ones(5))
    with pytest.raises(WeightgeoError, match=r"\(4, 3\) vs \(3, 4\)"):
        principal_angles(torch.ones(4, 3), torch.ones(3, 4))
    bad = torch.ones(4, 3)
    bad[1, 1] = float("nan")
    with pytest.raises(WeightgeoError, match="1 non-finite"):
        principal_overlap(torch.ones(4, 3), bad)
    with pytest.raises(WeightgeoError, match="rank 0"):
        principal_angles(torch.zeros(4, 3), torch.ones(4, 3))
    with pytest.raises(WeightgeoError, match="k must"):
        principal_angles(torch.ones(4, 3), torch.ones(4, 3), k=0)
    with pytest.raises(WeightgeoError, match="side"):
        principal_angles(torch.ones(4, 3), torch.ones(4, 3), side="V")


def test_zero_update_and_dtypes(gen):
    A = torch.randn(20, 12, generator=gen)
    for dt in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        a = A.to(dt)
        assert float(principal_angles(a, a.clone(), k=6).max()) < 1e-5
    assert principal_angles(A.numpy(), A.numpy(), k=4).dtype == torch.float64
