"""Randomized SVD on CUDA: same answers as on CPU, seeded, batched == looped. Skipped without CUDA."""

from __future__ import annotations

import math

import pytest
import torch

from weightgeo import WeightgeoError
from weightgeo.linalg.rsvd import randomized_svd, randomized_svd_with_info, spectral_norm

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def gapped(m: int, n: int, seed: int = 0, rank: int = 16, noise: float = 1e-3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, rank, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64)).Q
    A = (U * torch.linspace(10, 1, rank, dtype=torch.float64)) @ V.mT
    return (A + noise * torch.randn(m, n, generator=g, dtype=torch.float64) / math.sqrt(n)).float()


def max_sin(Q1: torch.Tensor, Q2: torch.Tensor) -> float:
    Q1, Q2 = Q1.double().cpu(), Q2.double().cpu()
    return float(torch.linalg.matrix_norm(Q2 - Q1 @ (Q1.mT @ Q2), ord=2))


@pytest.mark.parametrize("pass_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("shape", [(600, 400), (400, 600)])
def test_cpu_equals_cuda_within_tolerance(shape, pass_dtype):
    A = gapped(*shape)
    c = randomized_svd_with_info(A, 16, seed=0, pass_dtype=pass_dtype)
    g = randomized_svd_with_info(A.cuda(), 16, seed=0, pass_dtype=pass_dtype)
    assert g.U.is_cuda and g.S.is_cuda and g.Vh.is_cuda and g.gap.is_cuda
    assert g.U.dtype == torch.float32 and g.method == c.method == "randomized"
    tol = 1e-4 if pass_dtype is None else 1e-2  # Ω differs (per-device RNG); gapped spectrum → same answer
    assert torch.allclose(g.S.cpu(), c.S, rtol=tol)
    assert max_sin(c.U, g.U) < 10 * tol and max_sin(c.Vh.mT, g.Vh.mT) < 10 * tol
    eye = torch.eye(16, device="cuda")
    assert float((g.U.mT @ g.U - eye).abs().max()) < 1e-5


def test_cuda_seeded_reproducible_and_global_rng_untouched():
    A = torch.randn(500, 300, device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    state = torch.cuda.get_rng_state()
    a = randomized_svd(A, 8, seed=5)
    b = randomized_svd(A, 8, seed=5)
    c = randomized_svd(A, 8, generator=torch.Generator(device="cuda").manual_seed(5))
    d = randomized_svd(A, 8, seed=6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(x, y) for x, y in zip(a, c))
    assert not torch.equal(a[1], d[1])
    assert torch.equal(state, torch.cuda.get_rng_state())


def test_cuda_batched_equals_looped():
    A = torch.stack([gapped(300, 200, seed=i) for i in range(4)]).cuda()
    r = randomized_svd_with_info(A, 8, seed=3)
    assert r.gap.shape == (4,)
    for i in range(4):
        U, S, Vh = randomized_svd(A[i], 8, seed=3)
        assert torch.allclose(r.S[i], S, rtol=1e-5)
        # cuSOLVER may pick another driver for a batch than for one matrix: vectors agree up to sign.
        sign = (r.U[i] * U).sum(0).sign()
        assert torch.allclose(r.U[i], U * sign, atol=1e-4) and torch.allclose(r.Vh[i], Vh * sign[:, None], atol=1e-4)


def test_cuda_rank_deficient_fallback_and_exact():
    g = torch.Generator(device="cuda").manual_seed(1)
    D = torch.randn(3, 400, 16, device="cuda", generator=g) @ torch.randn(16, 300, device="cuda", generator=g)
    U, S, Vh = randomized_svd(D, 24, seed=0)  # Cholesky fails on every entry: Householder per entry
    eye = torch.eye(24, device="cuda")
    assert float((U.mT @ U - eye).abs().amax()) < 1e-5
    assert float((Vh @ Vh.mT - eye).abs().amax()) < 1e-5
    assert randomized_svd_with_info(D[:, :40, :30], 4).method == "exact"
    assert torch.allclose(spectral_norm(D), torch.linalg.matrix_norm(D, ord=2), rtol=1e-4)


def test_cuda_generator_on_wrong_device():
    with pytest.raises(WeightgeoError, match="generator"):
        randomized_svd(torch.ones(60, 50, device="cuda"), 3, generator=torch.Generator())
