"""Randomized SVD (linalg/rsvd.py) against float64 NumPy references and its own invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weightgeo import WeightgeoError
from weightgeo.linalg.rsvd import (
    RSVDResult,
    _orth_rows,
    default_oversample,
    low_rank_reconstruction,
    randomized_svd,
    randomized_svd_with_info,
    spectral_norm,
)


# ---- float64 references and test matrices ---------------------------------------------------
def _orthogonal(rng: np.random.Generator, n: int, p: int) -> np.ndarray:
    Q, R = np.linalg.qr(rng.standard_normal((n, p)))
    return Q * np.sign(np.diag(R))


def gapped(m: int, n: int, rng: np.random.Generator, rank: int = 16, noise: float = 1e-3) -> np.ndarray:
    """Rank-16 signal (σ from 10 down to 1) plus Gaussian noise: σ_16/σ_17 ≈ 1 / (noise·(√m+√n)/√n)."""
    s = np.linspace(10, 1, rank)
    A = (_orthogonal(rng, m, rank) * s) @ _orthogonal(rng, n, rank).T
    return A + noise * rng.standard_normal((m, n)) / math.sqrt(n)


def powerlaw(m: int, n: int, rng: np.random.Generator, exponent: float = 0.5) -> np.ndarray:
    p = min(m, n)
    return (_orthogonal(rng, m, p) * np.arange(1, p + 1) ** -exponent) @ _orthogonal(rng, n, p).T


def lora_like(m: int, n: int, r: int, rng: np.random.Generator) -> np.ndarray:
    """Exactly rank-r merged-LoRA delta B @ A (fp32-representable)."""
    return (rng.standard_normal((m, r)) @ rng.standard_normal((r, n))).astype(np.float32)


def ref_svd(A: np.ndarray):
    return np.linalg.svd(np.asarray(A, np.float64), full_matrices=False)


def max_angle(Q_ref: np.ndarray, Q: np.ndarray) -> float:
    """Largest principal angle (radians) between the column spaces, from sines (float64)."""
    Qr, _ = np.linalg.qr(np.asarray(Q, np.float64))
    resid = Qr - Q_ref @ (Q_ref.T @ Qr)
    return float(np.arcsin(min(1.0, np.linalg.norm(resid, 2))))


def orth_err(Q: torch.Tensor) -> float:
    """max |QᵀQ − I| for Q (*, N, k)."""
    Q = Q.double()
    eye = torch.eye(Q.shape[-1], dtype=torch.float64)
    return float((Q.mT @ Q - eye).abs().max()) if Q.numel() else 0.0


def t(a: np.ndarray, dtype=torch.float32) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)


# ---- accuracy on gapped spectra --------------------------------------------------------------
@pytest.mark.parametrize("shape", [(300, 200), (200, 300)])
@pytest.mark.parametrize("pass_dtype", [None, torch.bfloat16])
def test_sigma_and_subspace_vs_float64(shape, pass_dtype):
    A = gapped(*shape, np.random.default_rng(0))
    U0, s0, V0h = ref_svd(A)
    r = randomized_svd_with_info(t(A), 16, seed=3, pass_dtype=pass_dtype)
    assert r.method == "randomized" and r.U.dtype == torch.float32
    rel = np.abs(r.S.double().numpy() - s0[:16]) / s0[:16]
    tol_s, tol_a = (1e-5, 1e-3) if pass_dtype is None else (1e-2, 3e-2)  # bf16 noise floor 2^-8·σ1
    assert rel.max() < tol_s
    assert max_angle(U0[:, :16], r.U.numpy()) < tol_a
    assert max_angle(V0h[:16].T, r.Vh.mT.numpy()) < tol_a
    # the gap estimate is the Ritz ratio σ16/σ17, far above the 1.05 threshold here
    assert float(r.gap) > 100 and bool(r.reproducible)
    if pass_dtype is None:  # bf16 passes lift σ17 to their noise floor, so the gap reads smaller
        assert float(r.gap) == pytest.approx(s0[15] / s0[16], rel=0.2)


@pytest.mark.parametrize("pass_dtype", [None, torch.bfloat16])
def test_orthonormal_factors(pass_dtype):
    A = t(powerlaw(400, 250, np.random.default_rng(1)))
    U, S, Vh = randomized_svd(A, 16, seed=0, pass_dtype=pass_dtype)
    assert orth_err(U) < 1e-5 and orth_err(Vh.mT) < 1e-5
    assert bool((S[:-1] >= S[1:]).all()) and bool((S >= 0).all())


def test_float64_path_is_float64_accurate():
    A = gapped(250, 180, np.random.default_rng(2), noise=1e-6)
    s0 = ref_svd(A)[1]
    U, S, Vh = randomized_svd(t(A, torch.float64), 16, seed=0)
    assert U.dtype == S.dtype == Vh.dtype == torch.float64
    assert np.abs(S.numpy() - s0[:16]).max() / s0[0] < 1e-12
    assert orth_err(U) < 1e-13


# ---- exactly low rank: the Cholesky fallback keeps Q orthonormal -----------------------------
@pytest.mark.parametrize("k", [16, 24])
@pytest.mark.parametrize("shape", [(320, 150), (150, 320)])
def test_exactly_low_rank_stays_orthonormal(shape, k):
    D = lora_like(*shape, 16, np.random.default_rng(3))
    s0 = ref_svd(D)[1]
    U, S, Vh = randomized_svd(t(D), k, seed=0)
    assert orth_err(U) < 1e-5 and orth_err(Vh.mT) < 1e-5
    assert np.abs(S[:16].double().numpy() - s0[:16]).max() / s0[0] < 1e-5
    if k > 16:
        assert float(S[16:].max()) < 1e-4 * s0[0]  # rank-deficient tail ≈ 0
    assert torch.allclose((U * S) @ Vh, t(D), atol=1e-4 * s0[0])


def test_orth_rows_cholesky_fallback_rank_deficient():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(12, 3, generator=g) @ torch.randn(3, 400, generator=g)  # rank 3 < 12 rows
    Wb = torch.stack([W, torch.randn(12, 400, generator=g)])  # one good and one bad batch entry
    for X in (W, Wb, W.mT.contiguous().mT):
        Q = _orth_rows(X)
        assert orth_err(Q.mT) < 1e-5
        # rows of Q span the row space of X: projecting X onto them loses nothing
        P = X - (X @ Q.mT) @ Q
        assert float(P.abs().max()) < 1e-4 * float(X.abs().max())


def test_orth_rows_ill_conditioned_gets_third_pass():
    g = torch.Generator().manual_seed(1)
    scales = torch.logspace(0, -3.3, 20)  # κ ≈ 2000: first CholeskyQR loses ~κ²u of orthogonality
    W = scales[:, None] * torch.linalg.qr(torch.randn(600, 20, generator=g)).Q.mT
    W = torch.linalg.qr(torch.randn(20, 20, generator=g)).Q @ W
    assert orth_err(_orth_rows(W).mT) < 1e-5


# ---- tiny matrices and the exact fallback ----------------------------------------------------
@pytest.mark.parametrize("shape,k", [((5, 3), 2), ((3, 5), 3), ((1, 7), 1), ((40, 30), 6), ((128, 896), 64)])
def test_exact_fallback(shape, k):
    A = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    U0, s0, V0h = ref_svd(A)
    r = randomized_svd_with_info(t(A), k, seed=0)
    assert r.method == "exact" and r.n_iter == 0 and r.oversample == 0
    assert np.allclose(r.S.numpy(), s0[:k], rtol=1e-5, atol=1e-5 * s0[0])
    assert orth_err(r.U) < 1e-5 and orth_err(r.Vh.mT) < 1e-5
    # U, Vh are singular vectors: Uᵀ A Vᵀ = diag(S) (vectors themselves are not unique on flat spectra)
    assert torch.allclose(r.U.mT @ t(A) @ r.Vh.mT, torch.diag(r.S), atol=1e-4 * s0[0])
    exp_gap = s0[k - 1] / s0[k] if k < min(shape) else math.inf
    assert float(r.gap) == pytest.approx(exp_gap, rel=1e-4)


def test_exact_fallback_threshold():
    A = torch.randn(100, 60, generator=torch.Generator().manual_seed(0))
    assert randomized_svd_with_info(A, 4, oversample=10).method == "randomized"  # 2·14 < 60
    assert randomized_svd_with_info(A, 20, oversample=10).method == "exact"  # 2·30 ≥ 60


# ---- batching and seeds ----------------------------------------------------------------------
@pytest.mark.parametrize("pass_dtype", [None, torch.bfloat16])
def test_batched_equals_looped_same_seed(pass_dtype):
    rng = np.random.default_rng(5)
    A = t(np.stack([np.stack([gapped(120, 90, rng) for _ in range(2)]) for _ in range(3)]))  # (3, 2, 120, 90)
    r = randomized_svd_with_info(A, 8, seed=11, pass_dtype=pass_dtype)
    assert r.U.shape == (3, 2, 120, 8) and r.S.shape == (3, 2, 8) and r.Vh.shape == (3, 2, 8, 90)
    assert r.gap.shape == (3, 2)
    for i in range(3):
        for j in range(2):
            U, S, Vh = randomized_svd(A[i, j], 8, seed=11, pass_dtype=pass_dtype)
            # one Ω per call, shared by every batch entry: entry (i, j) is the call on A[i, j], up to the batched
            # and the single GEMMs' rounding (float32), which bf16 passes can turn into one bf16 rounding of the
            # basis the other way (2⁻⁸ of an entry; measured 2.6e-5 relative in σ here)
            rtol, atol = (1e-5, 1e-4) if pass_dtype is None else (2e-4, 1e-3)
            assert torch.allclose(r.S[i, j], S, rtol=rtol)
            assert torch.allclose(r.U[i, j], U, atol=atol)
            assert torch.allclose(r.Vh[i, j], Vh, atol=atol)


def test_batched_generator_semantics():
    A = torch.randn(4, 60, 50, generator=torch.Generator().manual_seed(0))
    r = randomized_svd_with_info(A, 3, generator=torch.Generator().manual_seed(7))
    for i in range(4):
        U, S, Vh = randomized_svd(A[i], 3, generator=torch.Generator().manual_seed(7))
        assert torch.allclose(r.S[i], S, rtol=1e-5)
        assert torch.allclose(r.U[i], U, atol=1e-4)
    # an int seed is the same as a fresh CPU generator seeded with it
    U1, S1, _ = randomized_svd(A, 3, seed=7)
    assert torch.equal(S1, r.S) and torch.equal(U1, r.U)


def test_seed_reproducible_and_seed_sensitive():
    A = torch.randn(300, 200, generator=torch.Generator().manual_seed(1))  # flat spectrum: Ω matters
    a = randomized_svd(A, 5, seed=42)
    b = randomized_svd(A, 5, seed=42)
    c = randomized_svd(A, 5, seed=43)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[1], c[1])
    # default (no seed, no generator) is seed 0: reproducible by default
    assert all(torch.equal(x, y) for x, y in zip(randomized_svd(A, 5), randomized_svd(A, 5, seed=0)))


def test_generator_is_advanced_not_reset():
    A = torch.randn(300, 200, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(5)
    first = randomized_svd(A, 5, generator=g)[1]
    second = randomized_svd(A, 5, generator=g)[1]
    assert not torch.equal(first, second)


def test_global_rng_untouched():
    A = torch.randn(200, 150, generator=torch.Generator().manual_seed(2))
    state = torch.get_rng_state()
    randomized_svd(A, 8)
    randomized_svd(A, 8, seed=3)
    randomized_svd(A, 8, generator=torch.Generator().manual_seed(1))
    spectral_norm(A)
    low_rank_reconstruction(A, 4)
    assert torch.equal(state, torch.get_rng_state())


def test_transposed_view_matches_contiguous():
    A = t(gapped(260, 170, np.random.default_rng(6)))
    W = A.mT.contiguous()  # (170, 260) row-major; W.mT is a column-major view of A
    U1, S1, Vh1 = randomized_svd(A, 10, seed=0)
    U2, S2, Vh2 = randomized_svd(W.mT, 10, seed=0)
    assert torch.allclose(S1, S2, rtol=1e-5)
    assert torch.allclose(U1 * S1 @ Vh1, U2 * S2 @ Vh2, atol=1e-4)


def test_non_contiguous_input():
    A = torch.randn(3, 200, 300, generator=torch.Generator().manual_seed(0))[:, ::2, 1::2]  # (3, 100, 150)
    r = randomized_svd(A, 4, seed=0)
    ref = randomized_svd(A.contiguous(), 4, seed=0)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(r, ref))


# ---- dtypes and errors -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "dtype,out",
    [
        (torch.float64, torch.float64),
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
    ],
)
def test_dtype_rule(dtype, out):
    A = torch.randn(80, 60, generator=torch.Generator().manual_seed(0)).to(dtype)
    for kk in (3, 25):  # randomized and exact paths
        U, S, Vh = randomized_svd(A, kk)
        assert U.dtype == S.dtype == Vh.dtype == out
    assert A.dtype == dtype  # input untouched


def test_bf16_passes_on_bf16_weights():
    A = t(gapped(300, 200, np.random.default_rng(7)), torch.bfloat16)
    s0 = ref_svd(A.double().numpy())[1]
    U, S, Vh = randomized_svd(A, 16, pass_dtype=torch.bfloat16)
    assert S.dtype == torch.float32
    assert np.abs(S.double().numpy() - s0[:16]).max() / s0[0] < 2**-7
    assert orth_err(U) < 1e-5


def test_errors_name_shapes_and_fix():
    A = torch.zeros(7, 5)
    with pytest.raises(WeightgeoError, match=r"k=6 > min\(m, n\)=5.*\(7, 5\).*k <= 5"):
        randomized_svd(A, 6)
    with pytest.raises(WeightgeoError, match="floating"):
        randomized_svd(torch.zeros(7, 5, dtype=torch.int64), 2)
    with pytest.raises(WeightgeoError, match="floating"):
        randomized_svd(torch.zeros(7, 5, dtype=torch.complex64), 2)
    with pytest.raises(WeightgeoError, match=r"\(\*, m, n\)"):
        randomized_svd(torch.zeros(7), 1)
    with pytest.raises(WeightgeoError, match="k must be"):
        randomized_svd(A, 0)
    with pytest.raises(WeightgeoError, match="not both"):
        randomized_svd(A, 2, seed=1, generator=torch.Generator())
    with pytest.raises(WeightgeoError, match="n_iter"):
        randomized_svd(A, 2, n_iter=-1)
    with pytest.raises(WeightgeoError, match="oversample"):
        randomized_svd(A, 2, oversample=-3)
    with pytest.raises(WeightgeoError, match="pass_dtype"):
        randomized_svd(A, 2, pass_dtype=torch.int8)
    with pytest.raises(ValueError):  # WeightgeoError is a ValueError
        randomized_svd(A, 9)


def test_numpy_input_and_empty_batch():
    U, S, Vh = randomized_svd(np.eye(6, 4), 2)
    assert U.dtype == torch.float64 and np.allclose(S.numpy(), [1, 1])
    U, S, Vh = randomized_svd(torch.zeros(0, 50, 40), 3)
    assert U.shape == (0, 50, 3) and S.shape == (0, 3) and Vh.shape == (0, 3, 40)


def test_default_oversample_matches_baselines_rule():
    for k in (1, 5, 10, 16, 40, 64, 100, 500):
        assert k + default_oversample(k) == max(k + 10, min(2 * k, k + 64))
    r = randomized_svd_with_info(torch.randn(500, 400, generator=torch.Generator().manual_seed(0)), 16)
    assert r.oversample == 16 and r.n_iter == 2


# ---- the spectral gap report -----------------------------------------------------------------
def test_gap_flags_flat_spectra():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(2, 400, 300, generator=g)  # Marchenko–Pastur: σ16/σ17 ≈ 1.01
    r = randomized_svd_with_info(A, 16)
    assert r.gap.shape == (2,) and bool((r.gap < 1.05).all()) and not bool(r.reproducible.any())
    assert math.isnan(float(randomized_svd_with_info(A[0], 4, oversample=0).gap))


def test_gap_of_exactly_low_rank_is_infinite_or_large():
    D = t(lora_like(300, 200, 6, np.random.default_rng(8)))
    assert float(randomized_svd_with_info(D, 6).gap) > 1e4
    assert float(randomized_svd_with_info(D, 6, n_iter=0).gap) > 1e4


def test_result_unpacks_like_the_tuple():
    A = torch.randn(60, 50, generator=torch.Generator().manual_seed(0))
    r = randomized_svd_with_info(A, 3)
    U, S, Vh = r
    assert isinstance(r, RSVDResult) and U is r.U and S is r.S and Vh is r.Vh
    with pytest.raises(AttributeError):
        r.method = "x"  # frozen


# ---- spectral norm and low-rank reconstruction -----------------------------------------------
def test_spectral_norm_power_law_accuracy():
    rng = np.random.default_rng(9)
    A = np.stack([powerlaw(300, 200, rng), 3 * powerlaw(300, 200, rng)])
    s1 = np.array([ref_svd(a)[1][0] for a in A])
    est = spectral_norm(t(A))
    assert est.shape == (2,) and est.dtype == torch.float32
    rel = (s1 - est.double().numpy()) / s1
    assert np.abs(rel).max() < 1e-4
    assert float(spectral_norm(t(A, torch.float64))[1]) == pytest.approx(s1[1], rel=1e-8)
    assert float(spectral_norm(t(A[0, :10, :20]))) == pytest.approx(ref_svd(A[0, :10, :20])[1][0], rel=1e-5)


def test_low_rank_reconstruction_near_optimal():
    A = powerlaw(300, 200, np.random.default_rng(10), exponent=1.0)
    U0, s0, V0h = ref_svd(A)
    best = np.sqrt((s0[8:] ** 2).sum())
    for accurate, tol in ((True, 1e-4), (False, 1e-3)):
        R = low_rank_reconstruction(t(A), 8, accurate=accurate)
        err = np.linalg.norm(A - R.double().numpy())
        assert R.shape == A.shape and best <= err * (1 + 1e-5) and err <= best * (1 + tol)


# ---- properties over small random inputs -----------------------------------------------------
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.sampled_from([(), (2,), (2, 1)]),
    m=st.integers(1, 48),
    n=st.integers(1, 48),
    data=st.data(),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    n_iter=st.integers(0, 3),
    seed=st.integers(0, 2**31 - 1),
    low_rank=st.booleans(),
)
def test_properties_small_random(batch, m, n, data, dtype, n_iter, seed, low_rank):
    k = data.draw(st.integers(1, min(m, n)), label="k")
    p = data.draw(st.one_of(st.none(), st.integers(0, 12)), label="oversample")
    g = torch.Generator().manual_seed(seed)
    if low_rank:
        r = data.draw(st.integers(1, min(m, n)), label="rank")
        A = torch.randn(*batch, m, r, generator=g, dtype=torch.float64) @ torch.randn(
            r, n, generator=g, dtype=torch.float64
        )
    else:
        A = torch.randn(*batch, m, n, generator=g, dtype=torch.float64)
    A = A.to(dtype)
    res = randomized_svd_with_info(A, k, n_iter=n_iter, oversample=p, seed=seed)
    out = torch.float64 if dtype == torch.float64 else torch.float32
    U, S, Vh = res
    assert U.shape == (*batch, m, k) and S.shape == (*batch, k) and Vh.shape == (*batch, k, n)
    assert U.dtype == S.dtype == Vh.dtype == out and res.gap.shape == batch
    assert bool(torch.isfinite(U).all() & torch.isfinite(S).all() & torch.isfinite(Vh).all())
    assert bool((S >= 0).all()) and bool((S[..., :-1] >= S[..., 1:]).all())
    tol = 1e-4 if out == torch.float32 else 1e-10
    assert orth_err(U) < tol * 10 and orth_err(Vh.mT) < tol * 10
    # Ritz values never exceed the true singular values; the error is between Eckart–Young's
    # optimum and ‖A‖_F (U S Vh is the best rank-k approximation of a projection of A).
    A64 = A.double()
    s_true = torch.linalg.svdvals(A64)
    scale = float(s_true.max()) if s_true.numel() else 1.0
    assert bool((S.double() <= s_true[..., :k] + tol * 10 * scale).all())
    err = torch.linalg.matrix_norm(A64 - (U.double() * S.double().unsqueeze(-2)) @ Vh.double())
    opt = s_true[..., k:].square().sum(-1).sqrt()
    fro = torch.linalg.matrix_norm(A64)
    slack = tol * 10 * scale * math.sqrt(m * n)
    assert bool((err >= opt - slack).all()) and bool((err <= fro + slack).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])  # with and without a cast copy
def test_cpu_chunking_does_not_change_results(monkeypatch, dtype):
    import weightgeo.linalg.rsvd as rsvd

    A = torch.randn(5, 120, 90, generator=torch.Generator().manual_seed(0)).to(dtype)
    whole = randomized_svd_with_info(A, 6, seed=2)
    monkeypatch.setattr(rsvd, "_CPU_CAST_BATCH_BYTES", 0)  # a cast copy is never made whole ...
    monkeypatch.setattr(rsvd, "_CPU_CAST_CHUNK_BYTES", 2 * 120 * 90 * 4)  # ... but in chunks of 2 matrices
    chunked = randomized_svd_with_info(A, 6, seed=2)
    for x, y in zip((whole.U, whole.S, whole.Vh, whole.gap), (chunked.U, chunked.S, chunked.Vh, chunked.gap)):
        assert torch.equal(x, y)


def test_intermediate_basis_takes_a_second_pass_when_ill_conditioned(gen):
    """One CholeskyQR pass between products is enough for a well-conditioned W (orthonormal to ~u·κ²); an
    ill-conditioned one (κ = 1e4) gets the second pass, and a rank-deficient one Householder: orthonormal rows
    spanning W's row space either way."""
    from weightgeo.linalg.rsvd import _orth_rows

    Q = torch.linalg.qr(torch.randn(300, 8, generator=gen, dtype=torch.float64)).Q.mT
    for scale in (torch.logspace(0, -1, 8), torch.logspace(0, -4, 8), torch.tensor([1.0] * 7 + [0.0])):
        W = (scale.double()[:, None] * Q).float()
        rows = _orth_rows(W, passes=1)
        eye = rows @ rows.mT
        tol = 1e-3 if scale.min() > 0.05 else 1e-5
        assert float((eye - torch.eye(8)).abs().max()) <= tol
        # same span: W's rows lie in it
        resid = W - (W @ rows.mT) @ rows
        assert float(resid.abs().max()) <= 1e-5 * float(W.abs().max())


# ---- the hardware policy: pass dtype -------------------------------------------------------------
def test_policy_pass_dtype_is_recorded_and_overridable():
    from weightgeo.linalg.hardware import hardware, pass_dtype

    hw = hardware("cpu")
    big = torch.ones(1024, 1024, dtype=torch.bfloat16)
    assert pass_dtype(torch.bfloat16, "cpu", (1024, 1024)) == (torch.bfloat16 if hw.bf16_gemm else torch.float32)
    assert pass_dtype(torch.bfloat16, "cpu", (128, 896)) == torch.float32  # too small to pay for bf16 passes
    assert pass_dtype(torch.float32, "cpu", (4096, 4096)) == torch.float32
    assert pass_dtype(torch.float64, "cpu", (4096, 4096)) == torch.float64
    assert randomized_svd_with_info(big, 4).pass_dtype == pass_dtype(torch.bfloat16, "cpu", (1024, 1024))
    assert randomized_svd_with_info(big, 4, pass_dtype=torch.float32).pass_dtype == torch.float32
    assert randomized_svd_with_info(big.float(), 4).pass_dtype == torch.float32
    assert randomized_svd_with_info(big[:100, :100], 60).pass_dtype == torch.float32  # the exact method
