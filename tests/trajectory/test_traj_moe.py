"""MoE expert stacks in streams and the Tracker: rank_curve / locking_onset follow each expert of a stack as its own
matrix (equal to a run saving each expert as a 2-D tensor); other >=3-D tensors and the Tracker's fused stacks are
listed as skipped with the reason; the Tracker follows fused stacks per expert. (Expert stacks in compare: tests/engine/test_moe.py.)"""

from __future__ import annotations

import pytest
import torch
from native_factories import MOE_EXPERTS as E
from native_factories import MOE_FFN as F
from native_factories import MOE_HIDDEN as H
from native_factories import MOE_LAYERS as L
from native_factories import experts_2d, tiny_qwen3_moe
from safetensors.torch import save_file

import weightgeo
from weightgeo import WeightgeoError

STACK = "layers.{i}.mlp.experts.{p}"


def _moe_run(root, sds: dict[int, dict], *, per_expert: bool):
    """A run folder of checkpoint-N with fused stacks, or with each expert saved as its own 2-D tensor."""
    for step, sd in sds.items():
        d = root / f"checkpoint-{step}"
        d.mkdir(parents=True)
        save_file(experts_2d(sd) if per_expert else sd, str(d / "model.safetensors"))
        (d / "trainer_state.json").write_text("{}")
    return root


def test_expert_stacks_in_a_stream_are_followed_per_expert(gen, tmp_path, monkeypatch):
    """rank_curve / locking_onset follow each expert of a stack as its own matrix: one row per (step, expert),
    equal to the run whose experts are stored as separate 2-D tensors; each expert is read alone."""
    low = lambda *s: torch.randn(*s[:-1], 2, generator=gen) @ torch.randn(2, s[-1], generator=gen)
    w0 = {
        "layers.0.mlp.experts.gate_up_proj": torch.randn(E, 2 * F, H, generator=gen),
        "layers.0.mlp.experts.down_proj": torch.randn(E, H, F, generator=gen),
        "layers.0.self_attn.q_proj.weight": torch.randn(H, H, generator=gen),
    }
    u = {k: low(*v.shape) for k, v in w0.items()}
    sds = {t: {k: v + 0.01 * t * u[k] for k, v in w0.items()} for t in (0, 10, 20)}
    stacked = _moe_run(tmp_path / "stacked", sds, per_expert=False)
    split = _moe_run(tmp_path / "split", sds, per_expert=True)
    reads = []
    real = weightgeo.checkpoint.SafetensorsCheckpoint.get
    monkeypatch.setattr(
        weightgeo.checkpoint.SafetensorsCheckpoint, "get", lambda self, name: reads.append(name) or real(self, name)
    )
    kw = dict(k=2, hill_k=2, cache=False)
    got = weightgeo.rank_curve(stacked, **kw)
    assert not [n for n in reads if ".experts." in n]  # stacks are read one expert at a time, not whole
    want = {(r["step"], r["name"]): r for r in weightgeo.rank_curve(split, **kw).rows}
    experts = [r for r in got.rows if "expert" in r]
    assert len(experts) == 2 * 2 * E and len(got.rows) == 2 * (2 * E + 1)
    assert not [s for s in got.meta["skipped"] if ".experts." in s["name"]]
    for row in experts:
        ref = want[(row["step"], f"{row['name']}.{row['expert']}")]
        assert row["shape"] == ref["shape"] and row["module"] in ("gate_up_proj", "down_proj")
        for key in ("stable_rank", "delta_frobenius", "spectral_norm", "final_subspace_similarity"):
            assert row[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), (row["name"], row["expert"], key)
    assert f"{STACK.format(i=0, p='down_proj')}[{E - 1}]" in got.meta["similarity"]
    onset = weightgeo.locking_onset(stacked, k=2, threshold=0.5, cache=False)
    assert f"{STACK.format(i=0, p='gate_up_proj')}[0]" in onset.per_matrix


def test_other_3d_tensors_in_a_stream_are_listed_as_skipped(gen, tmp_path):
    w0 = {
        "conv.weight": torch.randn(4, 3, 5, generator=gen),
        "layers.0.self_attn.q_proj.weight": torch.randn(6, 6, generator=gen),
    }
    run = _moe_run(
        tmp_path / "run", {t: {k: v * (1 + 0.01 * t) for k, v in w0.items()} for t in (0, 10)}, per_expert=False
    )
    r = weightgeo.rank_curve(run, k=2, hill_k=2, cache=False)
    skipped = {s["name"]: s["reason"] for s in r.meta["skipped"] if "name" in s}
    assert "not an expert stack" in skipped["conv.weight"] and {x["name"] for x in r.rows} == {
        "layers.0.self_attn.q_proj.weight"
    }


def test_tracker_follows_fused_expert_stacks_per_expert():
    """The Tracker follows each expert of a fused stack of a live MoE model as its own matrix, as rank_curve does
    in saved checkpoints (one selector decides for both): the same rows, per (step, expert); nothing listed as
    skipped for a stack. A 3-D tensor that is not an expert stack is listed with the reason."""
    base, ft = tiny_qwen3_moe(0), tiny_qwen3_moe(0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ft.parameters():
            mask = torch.rand(p.shape, generator=g) < 0.3
            p.add_((0.02 * torch.randn(p.shape, generator=g) * mask).to(p.dtype))
    sd0 = {k: v.detach().clone() for k, v in base.state_dict().items()}
    sd1 = {k: v.detach().clone() for k, v in ft.state_dict().items()}
    tracker = weightgeo.Tracker(tiny_qwen3_moe(0), every=1, k=2, hill_k=2, include=["experts", "attention"])
    stack = STACK.format(i=0, p="gate_up_proj")
    assert not [s for s in tracker.skipped if ".experts." in s["name"]]
    assert [f"{stack}[{j}]" for j in range(E)] == [n for n in tracker.names if n.startswith(stack)]
    tracker.update(sd1, 1)
    live = tracker.rank_curve()
    off = weightgeo.rank_curve([sd1], base=sd0, steps=[1], k=2, hill_k=2, include=["experts", "attention"])
    assert [(r["name"], r.get("expert")) for r in live.rows] == [(r["name"], r.get("expert")) for r in off.rows]
    assert len([r for r in live.rows if r.get("expert") is not None]) == 2 * L * E
    for a, b in zip(live.rows, off.rows):
        for key in ("delta_frobenius", "spectral_norm", "stable_rank"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["name"], a.get("expert"), key)
    with pytest.raises(WeightgeoError, match="no parameter to track.*3-D tensor"):
        weightgeo.Tracker({"conv.weight": torch.ones(4, 3, 5)}, every=1, k=2)
