"""pair_geometry / base_spectrum against an independent float64 NumPy/SciPy reference (docs/numerics.md)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from weightgeo.errors import WeightgeoError
from weightgeo.linalg import hardware
from weightgeo.linalg.pairwise import base_spectrum, pair_geometry


# ---- float64 reference (shares no code with the implementation) ---------------------------------
def ref_geometry(W0: torch.Tensor, W1: torch.Tensor, k: int) -> dict:
    A0, A1 = W0.double().numpy(), W1.double().numpy()
    U0, s0, V0h = np.linalg.svd(A0, full_matrices=False)
    U1, s1, V1h = np.linalg.svd(A1, full_matrices=False)
    k = min(k, *A0.shape)
    right = np.sort(np.degrees(scipy.linalg.subspace_angles(V0h[:k].T, V1h[:k].T)))
    left = np.sort(np.degrees(scipy.linalg.subspace_angles(U0[:, :k], U1[:, :k])))
    return dict(s0=s0, s1=s1, spectral_drift=np.linalg.norm(s1 - s0) / np.linalg.norm(s0), right=right, left=left)


def make_pair(m, n, rel, kind="dense", seed=0, rank=4):
    """bf16 pair: W0 = power-law spectrum σᵢ = i^-0.5 with random orthogonal factors; W1 = bf16(W0 + ΔW)."""
    rng = np.random.default_rng(seed)
    p = min(m, n)
    U, _ = np.linalg.qr(rng.standard_normal((m, p)))
    V, _ = np.linalg.qr(rng.standard_normal((n, p)))
    W0 = torch.from_numpy(((U * np.arange(1, p + 1) ** -0.5) @ V.T).astype(np.float32)).bfloat16()
    rms = float(W0.float().pow(2).mean().sqrt())
    if kind == "dense":
        D = rng.standard_normal((m, n)) * rel * rms
    else:
        D = rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n))
        D *= rel * rms * np.sqrt(m * n) / np.linalg.norm(D)
    W1 = (W0.float() + torch.from_numpy(D.astype(np.float32))).bfloat16()
    return W0, W1


def check_close(g, r, sides=("right", "left")):
    for side in sides:
        a = getattr(g, f"angles_{side}").numpy()
        ref = r[side][: a.shape[-1]] if a.shape[-1] == r[side].shape[-1] else r[side]
        assert a.shape == ref.shape
        tol = 0.02 * np.abs(ref) + 0.005
        assert np.all(np.abs(a - ref) <= 1e-2 * tol), (side, np.max(np.abs(a - ref) / tol))
        ov = np.mean(np.cos(np.radians(a)) ** 2) - np.mean(np.cos(np.radians(ref)) ** 2)
        assert abs(ov) < 1e-6
    assert (
        abs(float(g.spectral_drift) / r["spectral_drift"] - 1) < 1e-3
        or abs(float(g.spectral_drift) - r["spectral_drift"]) < 1e-12
    )
    # σ themselves carry the float32 Gram rounding (~eps32·σ₁); their differences do not.
    np.testing.assert_allclose(g.sigma0.numpy(), r["s0"], rtol=0, atol=1e-6 * r["s0"][0])
    d, dref = (g.sigma1 - g.sigma0).numpy(), r["s1"] - r["s0"]
    assert np.linalg.norm(d - dref) <= 1e-3 * np.linalg.norm(dref) + 1e-14


# Square / tall / wide, k inside the spectrum with σ_k/σ_{k+1} ≈ 1.003 (the hard case scaled down)
# and k = min(m, n); dense and low-rank ΔW at three sizes. k ≤ 0.4·min(m, n) takes the CPU's tridiagonal route
# for the pair eigenproblem (linalg.eigen.top_eigh), larger k a full eigh.
CASES = [
    (96, 96, 48),
    (320, 64, 40),
    (64, 320, 40),
    (96, 96, 12),
    (320, 64, 8),
    (64, 320, 25),
    (24, 128, 512),
    (128, 24, 512),
]


@pytest.mark.parametrize("m,n,k", CASES)
@pytest.mark.parametrize("rel", [1e-2, 2e-4])
@pytest.mark.parametrize("kind", ["dense", "lowrank"])
def test_matches_float64(m, n, k, rel, kind):
    W0, W1 = make_pair(m, n, rel, kind, seed=m + n)
    g = pair_geometry(W0, W1, k=k, sides=("right", "left"))
    r = ref_geometry(W0, W1, k)
    assert g.k == min(k, m, n)
    check_close(g, r)
    assert r["spectral_drift"] > 0 and g.spectral_drift > 0


def test_identical_pair_is_zero():
    W0, _ = make_pair(100, 60, 1e-3)
    g = pair_geometry(W0, W0, k=30, sides=("right", "left"))
    assert float(g.spectral_drift) == 0.0
    assert float(g.angles_right.abs().max()) == 0.0 and float(g.angles_left.abs().max()) < 1e-6
    assert float(g.overlap("right")) == 1.0


def test_rank_deficient_base_caps_k():
    rng = np.random.default_rng(3)
    B = np.zeros((90, 60))
    B[:, :40] = rng.standard_normal((90, 40))  # exactly rank 40 (zero columns survive bf16)
    W0 = torch.from_numpy(B.astype(np.float32)).bfloat16()
    W1 = (W0.float() + 1e-3 * torch.from_numpy(rng.standard_normal((90, 60)).astype(np.float32))).bfloat16()
    g = pair_geometry(W0, W1, k=50, sides=("right", "left"))
    assert g.k == 40  # numerical rank of W0
    r = ref_geometry(W0, W1, 40)
    check_close(g, r)


def test_weyl_and_mirsky_bounds():
    for m, n in [(100, 60), (60, 100)]:
        W0, W1 = make_pair(m, n, 1e-2, seed=7)
        g = pair_geometry(W0, W1, k=40)
        dW = W1.double() - W0.double()
        ds = (g.sigma1 - g.sigma0).abs()
        assert float(ds.max()) <= float(torch.linalg.matrix_norm(dW, 2)) * (1 + 1e-9)  # Weyl
        assert float(ds.norm()) <= float(torch.linalg.matrix_norm(dW, "fro")) * (1 + 1e-9)  # Mirsky


def test_base_reuse_and_batched_equal_looped():
    pairs = [make_pair(96, 64, rel, seed=s) for s, rel in enumerate([1e-2, 1e-3, 2e-4])]
    W0 = torch.stack([p[0] for p in pairs])
    W1 = torch.stack([p[1] for p in pairs])
    g = pair_geometry(W0, W1, k=24, sides=("right", "left"))
    for i, (a, b) in enumerate(pairs):
        base = base_spectrum(a)
        gi = pair_geometry(None, b, k=24, sides=("right", "left"), base=base)
        assert torch.allclose(g.angles_right[i], gi.angles_right, atol=1e-7)
        assert torch.allclose(g.angles_left[i], gi.angles_left, atol=1e-7)
        assert torch.allclose(g.spectral_drift[i], gi.spectral_drift, rtol=1e-8)


def test_float64_inputs_run_in_float64():
    W0, W1 = make_pair(80, 60, 1e-3)
    g = pair_geometry(W0.double(), W1.double(), k=30, sides=("right", "left"))
    check_close(g, ref_geometry(W0, W1, 30))


def test_errors():
    W0, W1 = make_pair(40, 30, 1e-3)
    with pytest.raises(WeightgeoError):
        pair_geometry(W0, W1[:-1], k=4)
    with pytest.raises(WeightgeoError):
        pair_geometry(W0, W1, k=0)
    with pytest.raises(WeightgeoError):
        pair_geometry(W0, W1, k=4, sides=("up",))
    with pytest.raises(WeightgeoError):
        pair_geometry(None, W1, k=4)
    with pytest.raises(WeightgeoError):
        pair_geometry(W0, W1, k=4).overlap("left")


def test_repeated_singular_values_identical_pair():
    """W0 = W1 with a repeated σ (identity): the basis must not be reordered, angles are 0."""
    for W in (torch.eye(5), torch.eye(6)[:, :4], torch.diag(torch.tensor([2.0, 1.0, 1.0, 1.0]))):
        g = pair_geometry(W, W.clone(), k=2, sides=("right", "left"))
        assert float(g.angles_right.max()) == 0.0 and float(g.angles_left.max()) < 1e-6
        assert float(g.spectral_drift) == 0.0


def same_spectrum_pair(seed: int, m: int = 96, p: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent [m, p] float32 draws with the same power-law spectrum (σᵢ = i^-0.5)."""
    rng = np.random.default_rng(seed)
    s = np.arange(1, p + 1) ** -0.5
    A = [
        (np.linalg.qr(rng.standard_normal((m, p)))[0] * s) @ np.linalg.qr(rng.standard_normal((p, p)))[0].T
        for _ in range(2)
    ]
    return torch.from_numpy(A[0].astype(np.float32)), torch.from_numpy(A[1].astype(np.float32))


def test_fallback_equal_spectra_and_near_identical_fast_path():
    """Independent draws with the same spectrum (NSS ~ storage level) fall back to the policy's values;
    a near-identical well-conditioned pair does not."""
    W0, W1 = same_spectrum_pair(4)
    g = pair_geometry(W0, W1, k=8, sides=())
    ref = ref_geometry(W0, W1, 8)["spectral_drift"]
    assert g.fallback and abs(float(g.spectral_drift) - ref) <= 0.02 * ref + 1e-13
    W0, W1 = make_pair(96, 64, 1e-3)
    g = pair_geometry(W0, W1, k=8)
    assert not g.fallback


def test_fallback_decided_per_member_of_a_batch():
    """A batch with one member that falls back and one that does not: each gets what it gets alone (the fallback
    decomposes only its members; all of them without a copy of W1)."""
    same_spectrum = same_spectrum_pair(5)
    near = make_pair(96, 64, 1e-3)
    W0, W1 = torch.stack([same_spectrum[0], near[0]]), torch.stack([same_spectrum[1], near[1]])
    both = pair_geometry(W0, W1, k=8, sides=("right",))
    alone = [pair_geometry(W0[i], W1[i], k=8, sides=("right",)) for i in range(2)]
    assert both.fallback and alone[0].fallback and not alone[1].fallback
    for i in range(2):
        assert float(both.spectral_drift[i]) == float(alone[i].spectral_drift)
        assert torch.equal(both.angles_right[i], alone[i].angles_right)


@pytest.mark.parametrize("lapack", ["torch", "scipy"])
@pytest.mark.parametrize("m,n,k", [(96, 96, 48), (64, 320, 40), (96, 96, 12), (320, 64, 8)])
def test_either_lapack_matches_float64(monkeypatch, lapack, m, n, k):
    """The full eigenproblems (W0's Gram; the pair problem above the top-k route's limit) by torch's LAPACK or
    SciPy's (linalg.hardware.eigh_lapack picks one per CPU kind): both agree with the float64 reference."""
    monkeypatch.setattr(hardware, "EIGH_LAPACK", lapack)
    monkeypatch.setattr(hardware, "SCIPY_LAPACK_MAX_CORES", 1 << 20)  # the tridiagonal route on any machine
    W0, W1 = make_pair(m, n, 1e-3, seed=m + n + k)
    g = pair_geometry(W0, W1, k=k, sides=("right", "left"))
    check_close(g, ref_geometry(W0, W1, k))


@pytest.mark.parametrize("lapack", ["torch", "scipy"])
def test_repeated_singular_values_either_lapack_and_route(monkeypatch, lapack):
    """W0 = W1 = identity-like with ties at the k-th value: zero angles whichever LAPACK and whichever route (k = 2
    of 5 takes the top-k route, k = 3 a full eigh)."""
    monkeypatch.setattr(hardware, "EIGH_LAPACK", lapack)
    monkeypatch.setattr(hardware, "SCIPY_LAPACK_MAX_CORES", 1 << 20)  # the tridiagonal route on any machine
    for W in (torch.eye(5), torch.diag(torch.tensor([2.0, 1.0, 1.0, 1.0, 1.0]))):
        for k in (2, 3):
            g = pair_geometry(W, W.clone(), k=k, sides=("right", "left"))
            assert float(g.angles_right.max()) == 0.0 and float(g.angles_left.max()) < 1e-6, (W, k)
