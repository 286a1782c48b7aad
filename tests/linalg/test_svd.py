"""The numerical policy (linalg/svd.py) and spectra against float64 NumPy."""

import numpy as np
import pytest
import reference as R
import torch

from weightgeo import WeightgeoError
from weightgeo.linalg import (
    compute_dtype,
    decompose,
    exact_svd,
    hill_tail_index,
    numerical_rank,
    singular_values,
    spectral_drift_from_values,
    stable_rank_from_values,
    to_compute_dtype,
    top_singular_vectors,
)


def test_compute_dtype():
    assert compute_dtype(torch.bfloat16) == torch.float32
    assert compute_dtype(torch.float16) == torch.float32
    assert compute_dtype(torch.float32) == torch.float32
    assert compute_dtype(torch.float64) == torch.float64
    x = torch.ones(2, dtype=torch.float64)
    assert to_compute_dtype(x) is x
    with pytest.raises(WeightgeoError, match="floating"):
        compute_dtype(torch.int32)


@pytest.mark.parametrize("kind", R.KINDS)
@pytest.mark.parametrize("shape", [(96, 64), (64, 96)])
@pytest.mark.parametrize("storage", ["bf16", "fp32", "fp64"])
def test_singular_values_vs_float64(kind, shape, storage):
    A = R.make_base(kind, *shape, np.random.default_rng(1))
    t = {
        "bf16": lambda a: torch.from_numpy(a).bfloat16(),
        "fp32": torch.from_numpy,
        "fp64": lambda a: torch.from_numpy(a.astype(np.float64)),
    }[storage](A)
    ref = np.linalg.svd(t.double().numpy(), compute_uv=False)
    s = singular_values(t).numpy()
    # policy accuracy: ~1e-16·σ1²/σi, floor sqrt(eps64)·σ1 for the Gram route
    assert np.all(np.abs(s - ref) <= 1e-12 * ref[0] ** 2 / np.maximum(ref, 1e-300) + 2e-8 * ref[0])
    assert np.all(np.diff(s) <= 0)


@pytest.mark.parametrize("shape", [(80, 48), (48, 80)])
@pytest.mark.parametrize("side", ["right", "left"])
def test_top_singular_vectors_span(shape, side):
    A = R.make_base("powerlaw", *shape, np.random.default_rng(2))
    U, s, Vh = R.svd(A)
    Q = top_singular_vectors(torch.from_numpy(A), 10, side=side).numpy()
    ref = Vh[:10].T if side == "right" else U[:, :10]
    assert Q.shape == ref.shape
    np.testing.assert_allclose(Q.T @ Q, np.eye(10), atol=1e-10)
    # same span: projector difference
    np.testing.assert_allclose(Q @ Q.T, ref @ ref.T, atol=1e-9)


def test_k_capped_at_min_dim():
    A = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    assert top_singular_vectors(A, 100, side="left").shape == (5, 3)
    with pytest.raises(WeightgeoError, match="side"):
        top_singular_vectors(A, 2, side="top")


def test_exact_svd_reconstructs_and_dtype():
    A = torch.randn(7, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    U, S, Vh = exact_svd(A)
    assert S.dtype == torch.float64
    torch.testing.assert_close(U @ torch.diag(S) @ Vh, A)
    assert exact_svd(A.bfloat16())[1].dtype == torch.float32  # bf16 SVD does not exist: upcast
    with pytest.raises(WeightgeoError, match="matrix"):
        exact_svd(torch.ones(3))
    for fn in (exact_svd, decompose):  # asked for explicitly, a dtype no SVD exists in is a clear error
        with pytest.raises(WeightgeoError, match=r"no bf16/fp16 SVD.*torch.float32"):
            fn(A, dtype=torch.bfloat16)


def test_batched_equals_looped(gen):
    A = torch.randn(3, 2, 20, 12, generator=gen).bfloat16()
    d = decompose(A)
    assert d.S.shape == (3, 2, 12) and d.vectors.shape == (3, 2, 12, 12)
    for i in range(3):
        for j in range(2):
            torch.testing.assert_close(d.S[i, j], singular_values(A[i, j]), rtol=0, atol=1e-12)
            Qb = d.vectors_for(A, 5, "left")[i, j]
            Ql = top_singular_vectors(A[i, j], 5, side="left")
            torch.testing.assert_close(Qb @ Qb.mT, Ql @ Ql.mT, rtol=0, atol=1e-10)
    torch.testing.assert_close(d.rank(), torch.full((3, 2), 12))


def test_numerical_rank_exact_lowrank():
    A = R.make_base("lowrank", 60, 40, np.random.default_rng(0))  # exact rank 8 in fp32
    assert int(decompose(torch.from_numpy(A)).rank()) == 8
    assert int(decompose(torch.zeros(4, 3)).rank()) == 0
    assert int(numerical_rank(torch.tensor([1.0, 0.5]), (2, 2), eps=1e-7)) == 2


def test_spectra_helpers():
    assert float(stable_rank_from_values(torch.zeros(3))) == 0.0
    assert float(stable_rank_from_values(torch.tensor([4.0, 3.0]))) == pytest.approx(25 / 16)
    assert float(spectral_drift_from_values(torch.zeros(2), torch.zeros(2))) == 0.0
    assert float(spectral_drift_from_values(torch.zeros(2), torch.ones(2))) == float("inf")
    s = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    k = 4
    ref = 1.0 / (np.log(s[: k - 1].numpy() / s[k - 1].item()).sum() / (k - 1))
    assert float(hill_tail_index(s, k)) == pytest.approx(ref)
    assert float(hill_tail_index(torch.ones(4), 3)) == float("inf")
    batched = hill_tail_index(torch.stack([s, 2 * s]), k)
    torch.testing.assert_close(batched, torch.full((2,), ref, dtype=torch.float64))
    with pytest.raises(WeightgeoError):
        hill_tail_index(s, 1)
    with pytest.raises(WeightgeoError):
        hill_tail_index(s, 6)


def test_power_law_tail_index_recovers_exponent():
    # σ_i = i^(-1/a) has a Pareto-like tail with index a (Hill on the top k values)
    a = 2.0
    s = torch.arange(1, 2001, dtype=torch.float64) ** (-1 / a)
    assert float(hill_tail_index(s, 200)) == pytest.approx(a, rel=0.1)


@pytest.mark.parametrize("shape", [(300, 120), (120, 300)])
@pytest.mark.parametrize("kind", ["gauss", "bf16diff", "lowrank", "powerlaw"])
def test_exact_spectral_norm_and_gram_vs_float64(shape, kind):
    """σ₁ from the compute-dtype Gram + float64 eigvalsh: < 1e-6 relative (measured ≤ 5e-9 at layer shapes)."""
    from weightgeo.linalg.svd import exact_spectral_norm, frobenius_sq, gram

    rng = np.random.default_rng(11)
    m, n = shape
    if kind == "gauss":
        D = rng.standard_normal(shape).astype(np.float32)
    elif kind == "bf16diff":
        W = torch.from_numpy(0.02 * rng.standard_normal(shape).astype(np.float32)).bfloat16()
        D = (
            (W.float() + torch.from_numpy(2e-5 * rng.standard_normal(shape).astype(np.float32))).bfloat16().float()
            - W.float()
        ).numpy()
    elif kind == "lowrank":
        D = (rng.standard_normal((m, 8)) @ rng.standard_normal((8, n)) + 1e-3 * rng.standard_normal(shape)).astype(
            np.float32
        )
    else:
        D = R.make_base("powerlaw", m, n, rng)
    ref = np.linalg.svd(D.astype(np.float64), compute_uv=False)[0]
    assert abs(float(exact_spectral_norm(torch.from_numpy(D))) / ref - 1) < 1e-6
    assert float(frobenius_sq(torch.from_numpy(D))) == pytest.approx(
        float((D.astype(np.float64) ** 2).sum()), rel=1e-12
    )
    D64 = D.astype(np.float64)
    G_ref = D64.T @ D64 if m >= n else D64 @ D64.T
    np.testing.assert_allclose(gram(torch.from_numpy(D)).numpy(), G_ref, rtol=1e-12, atol=1e-12 * np.abs(G_ref).max())


def test_gram_and_frobenius_of_an_empty_batch_keep_the_batch_shape():
    from weightgeo.linalg.svd import frobenius_sq, gram

    A = torch.zeros(0, 3, 5, 4)
    assert gram(A).shape == (0, 3, 4, 4) and gram(A).dtype == torch.float64
    assert frobenius_sq(A).shape == (0, 3)
