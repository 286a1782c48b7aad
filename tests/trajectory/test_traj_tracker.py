"""Tracker: equals the offline stream results (exact mode); sketch mode within documented bounds."""

from __future__ import annotations

import pytest
import torch
from traj_planted import Q_NAME, SHAPES, planted_stream

from weightgeo.errors import WeightgeoError
from weightgeo.metrics.trajectory import LockingOnset
from weightgeo.track import Tracker
from weightgeo.trajectory import locking_onset, rank_curve

STEPS = [100, 200, 300, 400]


class Toy(torch.nn.Module):
    """Parameters named like the planted checkpoints (fp32 master weights)."""

    def __init__(self, state):
        super().__init__()
        self.names = list(state)
        for i, t in enumerate(state.values()):
            self.register_parameter(f"p{i}", torch.nn.Parameter(t.float().clone()))

    def named_parameters(self, *a, **k):  # the HF names, as a transformers model would give
        return [(n, getattr(self, f"p{i}")) for i, n in enumerate(self.names)]

    def load(self, state):
        with torch.no_grad():
            for i, n in enumerate(self.names):
                getattr(self, f"p{i}").copy_(state[n].float())


def _train(kind, mode="exact", every=1, **kw):
    """fp32 'training' through the planted stream; the offline stream is its bf16 checkpoints."""
    base, cks = planted_stream(kind, STEPS, switch_at=300, dtype=torch.float32)
    model = Toy(base)
    # the run trains fp32 masters and saves bf16 (below): the tracker rounds to what is saved
    tr = Tracker(model, mode=mode, every=every, **{"dtype": torch.bfloat16, **kw})
    logs = []
    for s, ck in zip(STEPS, cks):
        model.load(ck)
        logs.append(tr.update(model.named_parameters(), s))
    bf = lambda sd: {n: t.to(torch.bfloat16) for n, t in sd.items()}  # what save_pretrained(bf16) writes
    return tr, bf(base), [bf(c) for c in cks], logs


@pytest.mark.parametrize("kind", ["switch", "fresh"])
def test_exact_tracker_equals_offline_stream(kind):
    tr, base, cks, logs = _train(kind, k=16, hill_k=10)
    off = rank_curve(cks, base=base, steps=STEPS, k=16, hill_k=10)
    on = tr.rank_curve()
    assert [(r["step"], r["name"]) for r in on.rows] == [(r["step"], r["name"]) for r in off.rows]
    for a, b in zip(on.rows, off.rows):
        for key in ("delta_frobenius", "spectral_norm", "stable_rank", "hill_alpha"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
        # both verified to the policy's RTOL = 1e-3 residual; different random test matrices
        assert a["final_subspace_similarity"] == pytest.approx(b["final_subspace_similarity"], abs=1e-3)
    lo_on, lo_off = tr.locking_onset(0.9), locking_onset(cks, base=base, steps=STEPS, k=16)
    assert isinstance(lo_on, LockingOnset)
    assert lo_on.step == lo_off.step == {"switch": 300, "fresh": None}[kind]
    assert lo_on.per_matrix == lo_off.per_matrix
    assert lo_on.mean_similarity == pytest.approx(lo_off.mean_similarity, abs=1e-3)
    assert on.summary["by_step"][400]["stable_rank"] == pytest.approx(off.summary["by_step"][400]["stable_rank"])


def test_update_logs_flat_dict():
    tr, _, _, logs = _train("switch", every=200, k=16)
    assert logs[0] == {} and logs[2] == {}  # steps 100, 300 are not multiples of 200
    first, second = logs[1], logs[3]
    assert all(isinstance(k, str) and isinstance(v, float) for k, v in second.items())
    for metric in ("stable_rank", "delta_frobenius", "spectral_norm", "hill_alpha"):
        assert f"weightgeo/{metric}/mean" in first
        assert f"weightgeo/{metric}/q_proj" in first and f"weightgeo/{metric}/o_proj" in first
    assert (
        "weightgeo/previous_subspace_similarity/mean" not in first
        and "weightgeo/previous_subspace_similarity/mean" in second
    )
    assert second["weightgeo/previous_subspace_similarity/mean"] < 0.05  # the switch happened between 200 and 400
    assert first["weightgeo/n_matrices"] == 2.0
    assert tr.steps == [200, 400]


def test_update_errors_and_unchanged_step():
    base, cks = planted_stream("fixed", STEPS)
    model = Toy(base)
    tr = Tracker(model, k=4, hill_k=4)
    first = tr.update(model.named_parameters(), 0)  # no update yet: no spectra; every entry unchanged
    assert {k: v for k, v in first.items() if "sparsity" not in k} == {"weightgeo/n_matrices": 0.0}
    assert first["weightgeo/update_sparsity"] == 1.0
    model.load(cks[0])
    tr.update(model.named_parameters(), 5)
    with pytest.raises(WeightgeoError, match="steps must increase"):
        tr.update(model.named_parameters(), 5)
    with pytest.raises(WeightgeoError, match="missing"):
        tr.update([(Q_NAME, model.p0)], 6)
    with pytest.raises(WeightgeoError, match="shape"):
        tr.update({**dict(model.named_parameters()), Q_NAME: torch.zeros(3, 3)}, 7)
    with pytest.raises(WeightgeoError, match="mode"):
        Tracker(model, mode="fast")
    with pytest.raises(WeightgeoError, match="no parameter to track"):
        Tracker(model, include="mlp")
    with pytest.raises(WeightgeoError, match="no tracked step"):
        Tracker(model).rank_curve()
    frozen = Toy(base)
    frozen.p0.requires_grad_(False)
    t2 = Tracker(frozen)
    assert t2.names == ["layers.1.self_attn.o_proj.weight"]
    assert t2.skipped[0]["reason"].startswith("requires_grad=False")


def test_save_load_roundtrip_and_continue(tmp_path):
    for mode in ("exact", "sketch"):
        base, cks = planted_stream("switch", STEPS, switch_at=300)
        model = Toy(base)
        tr = Tracker(model, mode=mode, k=8, hill_k=4)
        for s, ck in zip(STEPS[:2], cks[:2]):
            model.load(ck)
            tr.update(model.named_parameters(), s)
        path = tr.save(tmp_path / f"{mode}.safetensors")
        back = Tracker.load(path)
        for a, b in zip(back.rank_curve().rows, tr.rank_curve().rows, strict=True):
            assert a.keys() == b.keys()
            for key, val in b.items():  # floats to the last bits (BLAS summation order); the rest exactly
                assert a[key] == (pytest.approx(val, rel=1e-12) if isinstance(val, float) else val), key
        for s, ck in zip(STEPS[2:], cks[2:]):
            model.load(ck)
            assert back.update(model.named_parameters(), s) == pytest.approx(tr.update(model.named_parameters(), s))
        assert back.locking_onset().step == tr.locking_onset().step == 300
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(WeightgeoError, match="Tracker file"):
        Tracker.load(tmp_path / "bad.safetensors")


# Documented bounds (docs/trajectories.md) for the default sketch (s = 2·max(k, hill_k) + 1, l = 2s + 1) on
# updates with a clear top-16 structure: relative error of ‖ΔW‖_F ≤ 5%, of stable rank and ‖ΔW‖₂ ≤ 10%,
# absolute error of Sim_16 ≤ 0.1, same locking onset.
@pytest.mark.parametrize("kind", ["fixed", "switch", "fresh"])
def test_sketch_mode_within_documented_bounds(kind):
    ex, _, _, _ = _train(kind, k=16)
    sk, _, _, _ = _train(kind, mode="sketch", k=16)
    for a, b in zip(ex.rank_curve().rows, sk.rank_curve().rows):
        assert b["method"] == "sketch"
        assert b["delta_frobenius"] == pytest.approx(a["delta_frobenius"], rel=0.05)
        assert b["stable_rank"] == pytest.approx(a["stable_rank"], rel=0.10)
        assert b["spectral_norm"] == pytest.approx(a["spectral_norm"], rel=0.10)
        assert abs(b["final_subspace_similarity"] - a["final_subspace_similarity"]) <= 0.1
    assert sk.locking_onset().step == ex.locking_onset().step
    s = 2 * 16 + 1
    mem = sk.memory_bytes()["base"]
    want = sum(8 * (r * min(s, r, c) + min(2 * min(s, r, c) + 1, r) * c) for r, c in SHAPES.values())
    assert mem == want


def test_sketch_is_exact_for_low_rank_float64():
    g = torch.Generator().manual_seed(3)
    w0 = {"layers.0.mlp.up_proj.weight": torch.randn(300, 280, generator=g, dtype=torch.float64)}
    tr = Tracker(w0, mode="sketch", dtype=None, k=4, hill_k=4)
    ex = Tracker(w0, dtype=None, k=4, hill_k=4)
    d = torch.randn(300, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 280, generator=g, dtype=torch.float64)
    w1 = {"layers.0.mlp.up_proj.weight": w0["layers.0.mlp.up_proj.weight"] + 1e-3 * d}
    a, b = ex.update(w1, 1), tr.update(w1, 1)
    for key in ("delta_frobenius", "stable_rank", "spectral_norm"):
        assert b[f"weightgeo/{key}/mean"] == pytest.approx(a[f"weightgeo/{key}/mean"], rel=1e-6)


# --- distributed parameters -----------------------------------------------------------------------------------
def _zero3(t, status):
    p = torch.nn.Parameter(t.clone() if status == "AVAILABLE" else torch.empty(0))
    p.ds_id, p.ds_shape = 7, tuple(t.shape)
    p.ds_status = type("S", (), {"name": status})()
    return p


def test_zero3_shards_refused_unless_gathered():
    t = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(WeightgeoError, match="ZeRO-3.*GatheredParameters"):
        Tracker({"layers.0.self_attn.q_proj.weight": _zero3(t, "NOT_AVAILABLE")})
    tr = Tracker({"layers.0.self_attn.q_proj.weight": _zero3(t, "AVAILABLE")}, k=2, hill_k=2)
    assert tr.names == ["layers.0.self_attn.q_proj.weight"]
    with pytest.raises(WeightgeoError, match="ZeRO-3"):
        tr.update({"layers.0.self_attn.q_proj.weight": _zero3(t, "NOT_AVAILABLE")}, 1)


def test_fsdp_flat_parameters_refused():
    with pytest.raises(WeightgeoError, match="FSDP flat parameter"):
        Tracker({"_fsdp_wrapped_module._flat_param": torch.nn.Parameter(torch.zeros(4, 4))})
