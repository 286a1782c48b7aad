"""Symmetric products formed by column panels (policy.col_panels): the Gram, ΔᵀΔ and VᵀSV against float64, with
panels small enough that every matrix spans several, and the pair method through them against the float64
reference (tests/reference.py)."""

from __future__ import annotations

import numpy as np
import pytest
import reference as R
import torch

from weightgeo.linalg import policy
from weightgeo.linalg.pairwise import base_spectrum, pair_geometry, products
from weightgeo.linalg.svd import add_gram, congruence, gram, mirror_upper


@pytest.fixture
def panels(monkeypatch):
    """Panels of 8 columns and row blocks of 600 entries: a 96×64 matrix spans 8 panels and 10 row blocks."""
    monkeypatch.setattr(policy, "COL_PANEL", 8)
    monkeypatch.setattr(policy, "ROW_BLOCK", 600)


def test_col_panels_cover_the_columns_once():
    for n, w in [(1, 4), (8, 4), (9, 4), (17, 4), (100, 7)]:
        spans = policy.col_panels(n, width=w)
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert all(e - s <= w for s, e in spans) or spans == [(0, n)]
    assert policy.col_panels(8, width=4) == [(0, 8)]  # not wider than two panels: one GEMM


@pytest.mark.parametrize("shape", [(96, 64), (64, 96), (3, 70, 33)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_gram_by_panels_vs_float64(panels, gen, shape, dtype):
    A = torch.randn(shape, generator=gen).to(dtype)
    X = A.double() if shape[-2] >= shape[-1] else A.double().mT
    ref = X.mT @ X
    G = gram(A)
    assert G.dtype == torch.float64 and G.shape == ref.shape
    assert torch.equal(G, G.mT)
    assert float((G - ref).abs().max()) <= 1e-13 * float(ref.abs().max())
    G32 = gram(A, dtype=torch.float32)  # the compute-dtype Gram (exact_spectral_norm)
    assert torch.equal(G32, G32.mT)
    assert float((G32.double() - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def test_add_gram_of_two_factors_and_congruence(panels, gen):
    V = torch.linalg.qr(torch.randn(2, 40, 40, generator=gen, dtype=torch.float64)).Q
    S = torch.randn(2, 40, 40, generator=gen, dtype=torch.float64)
    S = S + S.mT
    ref = V.mT @ S @ V
    F = congruence(V, S)
    assert torch.equal(F, F.mT)
    assert float((F - ref).abs().max()) <= 1e-13 * float(ref.abs().max())
    G = mirror_upper(add_gram(torch.zeros(2, 40, 40, dtype=torch.float64), S @ V, V))
    assert float((G - ref).abs().max()) <= 1e-13 * float(ref.abs().max())
    one = congruence(V[0], S[0])  # unbatched
    assert one.shape == (40, 40) and float((one - ref[0]).abs().max()) <= 1e-13 * float(ref.abs().max())


def test_products_by_panels_vs_float64(panels, gen):
    a0 = (0.02 * torch.randn(3, 90, 50, generator=gen)).bfloat16()
    a1 = (a0.float() + 1e-3 * torch.randn(3, 90, 50, generator=gen)).bfloat16()
    p = products(a0, a1, P=True, C0=True, J=True, fro=True)
    x0, x1 = a0.double(), a1.double()
    d = x1 - x0
    J = d.mT @ d
    assert torch.equal(p.J, p.J.mT)
    assert float((p.J.double() - J).abs().max()) <= 1e-5 * float(J.abs().max())
    D = x1.mT @ x1 - x0.mT @ x0
    for Dp in (p.D(), p.C0 + p.C0.mT + p.J):
        assert float((Dp.double() - D).abs().max()) <= 1e-5 * float(D.abs().max())


@pytest.mark.parametrize("kind", ["powerlaw", "gaussian", "lowrank_noise"])
@pytest.mark.parametrize("update", ["1e-2", "2e-4"])
@pytest.mark.parametrize("shape,k", [((96, 64), 40), ((64, 96), 40), ((120, 120), 60)])
def test_pair_geometry_by_panels_vs_float64(panels, kind, update, shape, k):
    """The pair method through panelled Grams, ΔᵀΔ and VᵀDV keeps float64-level agreement: angles within 1 % of
    the tolerance (2 % + 0.005°) on both sides, NSS within 1e-3 relative (the held reference's bounds)."""
    b, f, _ = R.make_pair(kind, update, *shape, seed=11)
    W0, W1 = torch.from_numpy(b).bfloat16(), torch.from_numpy(f).bfloat16()  # bf16 values already: exact
    g = pair_geometry(W0, W1, k=k, sides=("right", "left"))
    for side in ("right", "left"):
        ref = R.principal_angles_deg(W0.float().numpy(), W1.float().numpy(), k, side)
        a = getattr(g, f"angles_{side}").numpy()
        assert a.shape == ref.shape
        tol = 0.02 * np.abs(ref) + 0.005
        assert np.all(np.abs(a - ref) <= 1e-2 * tol), (side, float(np.max(np.abs(a - ref) / tol)))
    assert abs(float(g.spectral_drift) / R.spectral_drift(W0.float().numpy(), W1.float().numpy()) - 1) < 1e-3


def test_batched_equals_looped_bit_for_bit_by_panels(panels, gen):
    """A member's numbers do not depend on its batch with panels either (cached rows equal fresh ones)."""
    from weightgeo.metrics.catalog import PAIR_METRICS
    from weightgeo.metrics.pair import batched_pair_metrics

    w0 = (0.02 * torch.randn(4, 70, 40, generator=gen)).bfloat16()
    w1 = (w0.float() + 1e-3 * torch.randn(4, 70, 40, generator=gen)).bfloat16()
    for side in ("right", "left"):
        kw = dict(metrics=frozenset(PAIR_METRICS), k=8, side=side, rank=4, alpha=0.5, eta=1e-3)
        batched = batched_pair_metrics(w0, w1, **kw)
        for i in range(4):
            assert batched_pair_metrics(w0[i : i + 1], w1[i : i + 1], **kw)[0] == batched[i]
    whole = base_spectrum(w0)
    one = base_spectrum(w0[2:3])
    assert torch.equal(one.sigma[0], whole.sigma[2]) and torch.equal(one.V_c[0], whole.V_c[2])
