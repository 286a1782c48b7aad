"""Trajectories on CUDA give the CPU figures: rank_curve (a stream) and the Tracker (in the training loop), with
the randomized SVD's test matrices drawn on the device (other Ω than on CPU, so the tolerances are those of two
runs verified to the same residual, as in test_traj_tracker.py)."""

from __future__ import annotations

import pytest
import torch
from traj_planted import planted_stream

import weightgeo
from weightgeo.track import Tracker
from weightgeo.trajectory import locking_onset, rank_curve

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

STEPS = [100, 200, 300, 400]
VALUES = ("delta_frobenius", "spectral_norm", "stable_rank", "hill_alpha")


def _same_rows(on, off):
    assert [(r["step"], r["name"]) for r in on.rows] == [(r["step"], r["name"]) for r in off.rows]
    for a, b in zip(on.rows, off.rows):
        for key in VALUES:
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["name"], a["step"], key)
        assert a["final_subspace_similarity"] == pytest.approx(b["final_subspace_similarity"], abs=1e-3)


def test_rank_curve_and_locking_onset_on_cuda_equal_cpu(device="cuda"):
    base, cks = planted_stream("switch", STEPS, switch_at=300, dtype=torch.bfloat16)
    _same_rows(
        rank_curve(cks, base=base, steps=STEPS, k=16, hill_k=10, device=device, progress=False),
        rank_curve(cks, base=base, steps=STEPS, k=16, hill_k=10, progress=False),
    )
    on = locking_onset(cks, base=base, steps=STEPS, k=16, device=device, progress=False)
    assert on.step == locking_onset(cks, base=base, steps=STEPS, k=16, progress=False).step == 300


def _track(base, cks, mode, device):
    tr = Tracker({n: t.clone() for n, t in base.items()}, mode=mode, device=device, k=16, hill_k=10)
    for step, ck in zip(STEPS, cks):
        tr.update({n: t.to(device or "cpu") for n, t in ck.items()}, step)
    return tr


def test_tracker_on_cuda_equals_cpu(device="cuda"):
    """Exact mode: the CPU figures. Sketch mode (its Ω and Ψ drawn on the device): within the documented
    bounds of the exact figures (test_traj_tracker.py), same locking onset."""
    base, cks = planted_stream("switch", STEPS, switch_at=300, dtype=torch.float32)
    ex = _track(base, cks, "exact", None)
    _same_rows(_track(base, cks, "exact", device).rank_curve(), ex.rank_curve())
    sk = _track(base, cks, "sketch", device)
    for a, b in zip(ex.rank_curve().rows, sk.rank_curve().rows, strict=True):
        assert b["method"] == "sketch"
        assert b["delta_frobenius"] == pytest.approx(a["delta_frobenius"], rel=0.05)
        assert b["stable_rank"] == pytest.approx(a["stable_rank"], rel=0.10)
        assert b["spectral_norm"] == pytest.approx(a["spectral_norm"], rel=0.10)
        assert abs(b["final_subspace_similarity"] - a["final_subspace_similarity"]) <= 0.1
    assert sk.locking_onset().step == ex.locking_onset().step == 300


def test_sparsity_curves_on_cuda_equal_cpu(device="cuda"):
    """Counts are exact integers: the CUDA pass (the torch backend of changed_count, the FP8 rule on the device)
    gives the CPU report row for row, and the Tracker's logs on CUDA parameters equal the CPU ones."""
    base, cks = planted_stream("switch", STEPS, switch_at=300, dtype=torch.bfloat16)
    on = weightgeo.sparsity_curve(cks, base=base, steps=STEPS, device=device, cache=False)
    off = weightgeo.sparsity_curve(cks, base=base, steps=STEPS, cache=False)
    assert on.rows == off.rows and on.summary == off.summary
    both = weightgeo.rank_curve(cks, base=base, steps=STEPS, k=16, hill_k=10, sparsity=True, device=device)
    assert [r["update_sparsity"] for r in both.rows] == [r["update_sparsity"] for r in off.rows]
    logs = []
    for dev in (device, None):
        tr = Tracker({n: t.to(dev or "cpu") for n, t in base.items()}, device=dev, step_sparsity=True, k=2, hill_k=2)
        logs.append([tr.update({n: t.to(dev or "cpu") for n, t in ck.items()}, s) for s, ck in zip(STEPS, cks)])
    for a, b in zip(*logs):
        assert {k: v for k, v in a.items() if "sparsity" in k or "patch" in k} == {
            k: v for k, v in b.items() if "sparsity" in k or "patch" in k
        }
