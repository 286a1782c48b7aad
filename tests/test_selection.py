"""One selector of the tensors to analyse (weightgeo/selection.py): the pair plan, the stream plan and the Tracker
decide alike, with the same reason for the same tensor."""

from __future__ import annotations

import pytest
import torch

import weightgeo
from weightgeo.selection import FILTERED, Selector, tensor_uid

Q = "layers.0.self_attn.q_proj.weight"
NORM = "layers.0.input_layernorm.weight"
STACK = "layers.0.mlp.experts.down_proj"
IDS = "layers.0.position_ids"
GATE = "layers.0.mlp.gate_proj.weight"  # left out by exclude=
E = 3


@pytest.fixture
def states(gen):
    """A base and two fine-tunes holding a matrix, a 1-D norm, an expert stack, a non-float tensor and a filtered
    name."""
    base = {
        Q: torch.randn(8, 6, generator=gen),
        NORM: torch.randn(6, generator=gen),
        STACK: torch.randn(E, 6, 4, generator=gen),
        IDS: torch.arange(12).reshape(3, 4),
        GATE: torch.randn(10, 6, generator=gen),
    }
    fts = [
        {n: w + c * torch.randn(w.shape, generator=gen) if w.is_floating_point() else w for n, w in base.items()}
        for c in (0.01, 0.02)
    ]
    return base, fts


def _reasons(skipped):
    return {s["name"]: s["reason"] for s in skipped if "side" not in s and s.get("kind") != "checkpoint"}


def test_the_same_tensor_gets_the_same_reason_in_every_pass(states):
    base, fts = states
    select = Selector(exclude="gate_proj")
    want = {
        n: select.choose(n, tuple(base[n].shape), base[n].dtype).skipped for n in (NORM, IDS)
    }  # what the one module decides
    assert want == {
        NORM: "1-D tensor: SVD metrics need a matrix",
        IDS: "non-floating dtype (torch.int64 / torch.int64)",
    }
    assert select.choose(GATE, (10, 6), torch.float32).filtered and FILTERED

    pair = weightgeo.compare(base, fts[0], metrics="spectral_drift", exclude="gate_proj", k=2, rank=2)
    stream = weightgeo.rank_curve([base, *fts], exclude="gate_proj", k=2, hill_k=2)
    tracker = weightgeo.Tracker(base, exclude="gate_proj", k=2, hill_k=2)
    tracker.update(fts[0], 1)
    live = tracker.rank_curve()
    for report in (pair, stream, live):
        assert _reasons(report.skipped) == want, report.meta["kind"]
        assert report.meta["filtered_out"] == 1
        uids = {tensor_uid(r["name"], r.get("expert")) for r in report.rows}
        assert uids == {Q, *(f"{STACK}[{j}]" for j in range(E))}, report.meta["kind"]
    assert _reasons(tracker.skipped) == want and tracker.filtered_out == 1

    # with update_sparsity the pair pass analyses the norm elementwise, said under partial with the same reason
    full = weightgeo.compare(base, fts[0], exclude="gate_proj", k=2, rank=2)
    assert {p["name"]: p["reason"] for p in full.meta["partial"]} == {NORM: want[NORM]}
    assert _reasons(full.skipped) == {IDS: want[IDS]} and "update_sparsity" in full[NORM]


def test_frozen_parameters_and_non_stacks_are_said_so():
    select = Selector()
    assert select.choose(Q, (8, 6), torch.float32, trainable=False).skipped.startswith("requires_grad=False")
    conv = select.choose("conv.weight", (4, 3, 5), torch.float32)
    assert conv.analyse is None and "3-D tensor: SVD metrics need a matrix (not an expert stack" in conv.skipped
    pair = Selector(elementwise=True, svd=True).choose("conv.weight", (4, 3, 5), torch.float32)
    assert pair.analyse == "elementwise" and pair.partial and pair.skipped.endswith("update_sparsity only")
    assert Selector(experts=False, elementwise=True, svd=False).choose(STACK, (E, 6, 4), torch.float32).analyse == (
        "elementwise"
    )  # update_mask: a stack's mask is its whole [E, out, in]
    assert select.choose(Q, (0, 6), torch.float32).skipped == "empty tensor"
