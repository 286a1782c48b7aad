"""Trajectory metrics against float64 NumPy references and planted streams with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from traj_planted import BIG_NAME, Q_NAME, K, planted_stream, ref_delta, ref_hill, ref_sim, ref_stable_rank

from weightgeo.checkpoint import Checkpoint, canonical_name, open_checkpoint
from weightgeo.errors import WeightgeoError
from weightgeo.metrics.trajectory import LockingOnset, onset_step, subspace_similarity, update_spectra
from weightgeo.trajectory import locking_onset, rank_curve

STEPS = [100, 200, 300, 400]


def _lowrank(m, n, r, g, noise=0.0):
    A = torch.randn(m, r, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, r, dtype=torch.float64)
    A = A @ torch.randn(r, n, generator=g, dtype=torch.float64)
    return A + noise * torch.randn(m, n, generator=g, dtype=torch.float64)


# --- subspace_similarity ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(40, 60), (270, 300)])
@pytest.mark.parametrize("side", ["right", "left"])
def test_subspace_similarity_matches_float64_reference(shape, side, gen):
    a = _lowrank(*shape, 24, gen, 1e-4)
    b = a + 0.3 * _lowrank(*shape, 24, gen)
    got = subspace_similarity(a.float(), b.float(), k=K, side=side)
    A, B = a.float().double().numpy(), b.float().double().numpy()
    want = ref_sim(A, B, K) if side == "right" else ref_sim(A.T, B.T, K)
    assert got == pytest.approx(want, abs=1e-4)
    assert 0.0 <= got <= 1.0


def test_subspace_similarity_invariants(gen):
    a = _lowrank(50, 70, 20, gen, 1e-3).float()
    b = _lowrank(50, 70, 20, gen, 1e-3).float()
    assert subspace_similarity(a, a, k=8) == pytest.approx(1.0, abs=1e-6)
    assert subspace_similarity(a, -3.0 * a, k=8) == pytest.approx(1.0, abs=1e-6)  # scale and sign
    assert subspace_similarity(a, b, k=8) == pytest.approx(subspace_similarity(b, a, k=8), abs=1e-6)
    assert subspace_similarity(a.numpy(), b.numpy(), k=8) == pytest.approx(subspace_similarity(a, b, k=8))
    # random subspaces: E[Sim] = K / n
    assert subspace_similarity(a, b, k=8) < 0.5


def test_subspace_similarity_errors(gen):
    a = torch.randn(10, 12, generator=gen)
    with pytest.raises(WeightgeoError, match="all zeros"):
        subspace_similarity(a, torch.zeros(10, 12), k=4)
    with pytest.raises(WeightgeoError, match="k=11"):
        subspace_similarity(a, a, k=11)
    with pytest.raises(WeightgeoError, match="sides differ"):
        subspace_similarity(a, torch.randn(10, 13, generator=gen), k=4)
    with pytest.raises(WeightgeoError, match="side"):
        subspace_similarity(a, a, k=4, side="top")
    with pytest.raises(WeightgeoError, match="2-D"):
        subspace_similarity(a[0], a[0], k=1)


# --- the spectrum kernel ------------------------------------------------------------------------------------
def test_update_spectra_randomized_and_fallback_match_float64(gen):
    fast = _lowrank(300, 280, 40, gen, 1e-5)
    flat = torch.randn(300, 280, generator=gen, dtype=torch.float64)  # no decay: randomized cannot verify
    D = torch.stack([fast, flat]).float()
    specs = update_spectra(D, r=K, k=K, generator=torch.Generator().manual_seed(1))
    assert [s.method for s in specs] == ["randomized", "exact"]
    for sp, x in zip(specs, D):
        X = x.double().numpy()
        s = np.linalg.svd(X, compute_uv=False)
        np.testing.assert_allclose(sp.S.numpy(), s[: K + 1], rtol=1e-5)
        assert sp.frobenius == pytest.approx(float(np.linalg.norm(X)), rel=1e-12)
        Vt = np.linalg.svd(X, full_matrices=False)[2][:K]
        assert (
            np.linalg.norm(sp.Vh.double().numpy() @ Vt.T) ** 2 / K == pytest.approx(1.0, abs=1e-4)
            or sp.method == "exact"
        )  # the flat matrix's V_16 is ill-defined (gap ≈ 1) but exact


# --- onset rule -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "curve, threshold, want",
    [
        ({1: 0.95, 2: 0.97, 3: 1.0}, 0.9, 1),
        ({1: 0.5, 2: 0.95, 3: 1.0}, 0.9, 2),
        ({1: 0.95, 2: 0.5, 3: 1.0}, 0.9, None),  # dips again: locks only if it stays
        ({1: 0.95, 2: 0.89, 3: 1.0}, 0.9, None),  # t_end never counts
        ({1: 0.9, 2: 0.9, 3: 1.0}, 0.9, 1),  # ≥ threshold
        ({1: math.nan, 2: 0.95, 3: 1.0}, 0.9, 2),  # NaN never passes
        ({7: 1.0}, 0.9, 7),  # a single checkpoint: vacuous, t_end
    ],
)
def test_onset_rule(curve, threshold, want):
    assert onset_step(curve, threshold) == want


# --- planted streams ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, want", [("fixed", 100), ("switch", 300), ("fresh", None)])
def test_locking_onset_planted(kind, want):
    base, cks = planted_stream(kind, STEPS, switch_at=300)
    res = locking_onset(cks, base=base, steps=STEPS, k=K, threshold=0.9)
    assert isinstance(res, LockingOnset)
    assert res.step == want
    assert set(res.per_matrix.values()) == {want}
    assert res.final_step == STEPS[-1]
    assert set(res.per_matrix) == {canonical_name(Q_NAME), canonical_name(BIG_NAME)}  # the 1-D norm is not a matrix
    for curve in res.similarity.values():
        assert list(curve) == STEPS
        assert curve[STEPS[-1]] == pytest.approx(1.0, abs=1e-6)
    if kind == "switch":
        assert all(res.mean_similarity[s] < 0.05 for s in (100, 200))
    assert res.mean_similarity == pytest.approx({s: np.mean([c[s] for c in res.similarity.values()]) for s in STEPS})


def test_rank_curve_matches_float64_reference():
    base, cks = planted_stream("fresh", STEPS, dtype=torch.bfloat16)  # bf16 storage: ΔW exact in fp32
    rep = rank_curve(cks, base=base, steps=STEPS, k=K, hill_k=10)
    names = {canonical_name(Q_NAME): Q_NAME, canonical_name(BIG_NAME): BIG_NAME}
    assert len(rep.rows) == len(STEPS) * 2
    methods = set()
    for row in rep.rows:
        i = STEPS.index(row["step"])
        full = names[row["name"]]
        D = ref_delta(cks[i][full], base[full])
        Dend = ref_delta(cks[-1][full], base[full])
        assert row["stable_rank"] == pytest.approx(ref_stable_rank(D), rel=1e-5)
        assert row["delta_frobenius"] == pytest.approx(float(np.linalg.norm(D)), rel=1e-10)
        assert row["spectral_norm"] == pytest.approx(float(np.linalg.svd(D, compute_uv=False)[0]), rel=1e-6)
        assert row["hill_alpha"] == pytest.approx(ref_hill(D, 10), rel=1e-4)
        # verified randomized triplets (residual ≤ 1e-3·σ_i): Sim_K to about 1e-3
        assert row["final_subspace_similarity"] == pytest.approx(ref_sim(D, Dend, K), abs=1e-3)
        assert row["module"] in ("q_proj", "o_proj") and row["layer"] in (0, 1)
        assert 1.0 <= row["stable_rank"] <= min(row["shape"])
        methods.add(row["method"])
    assert methods == {"exact", "randomized"}
    for s in STEPS:  # summary: unweighted means over matrices, per step
        rs = [r for r in rep.rows if r["step"] == s]
        assert rep.summary["by_step"][s]["stable_rank"] == pytest.approx(np.mean([r["stable_rank"] for r in rs]))
        assert set(rep.summary["by_step"][s]["by_module"]) == {"q_proj", "o_proj"}
    assert rep.summary["steps"] == STEPS
    assert len(rep.summary["curves"]["stable_rank"]) == len(STEPS)
    # the report's similarities give the same onset without re-reading the stream
    again = locking_onset(rep, threshold=0.9)
    assert again.step is None and set(again.similarity) == set(names)


def test_rank_curve_include_preset_and_zero_updates():
    base, cks = planted_stream("fixed", STEPS[:2])
    cks = [dict(ck) for ck in cks]
    cks[0][BIG_NAME] = base[BIG_NAME].clone()  # no update yet at the first step
    rep = rank_curve(cks, base=base, steps=STEPS[:2], include="attention", k=4, hill_k=4)
    assert [(r["step"], r["name"]) for r in rep.rows] == [
        (100, canonical_name(Q_NAME)),
        (200, canonical_name(Q_NAME)),
        (200, canonical_name(BIG_NAME)),
    ]
    assert rep.meta["zero_updates"] == [
        {"name": canonical_name(BIG_NAME), "step": 100, "reason": "ΔW is exactly zero at this step"}
    ]
    rep = rank_curve(cks, base=base, steps=STEPS[:2], include=r"q_proj", k=4, hill_k=4)
    assert {r["name"] for r in rep.rows} == {canonical_name(Q_NAME)}
    with pytest.raises(WeightgeoError, match="no matrix to follow"):
        rank_curve(cks, base=base, steps=STEPS[:2], include=r"nothing_matches")
    with pytest.raises(WeightgeoError, match="hill_k"):
        rank_curve(cks, base=base, steps=STEPS[:2], hill_k=1)
    with pytest.raises(WeightgeoError, match="threshold"):
        locking_onset(cks, base=base, steps=STEPS[:2], threshold=1.5)


class _Counting(Checkpoint):
    """Counts tensor reads."""

    def __init__(self, tensors):
        super().__init__()
        self._t = tensors
        self.reads: dict[str, int] = {}
        self.source = "counting"

    def _infos(self):
        return open_checkpoint(self._t).infos

    def _get(self, name):
        self.reads[name] = self.reads.get(name, 0) + 1
        return self._t[name]


def test_each_tensor_is_read_once():
    base, cks = planted_stream("fixed", STEPS)
    b = _Counting(base)
    wrapped = [_Counting(c) for c in cks]
    rank_curve(wrapped, base=b, steps=STEPS, k=4, hill_k=4)
    for ck in [b, *wrapped]:
        assert ck.reads == {Q_NAME: 1, BIG_NAME: 1}  # the 1-D norm is never read
