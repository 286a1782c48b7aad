"""Checkpoint streams: directories of checkpoint-<step> folders, explicit sequences, and their errors."""

from __future__ import annotations

import json

import pytest
import torch
from factories import write_hf_checkpoint
from traj_planted import Q_NAME, planted_stream

from weightgeo.errors import WeightgeoError
from weightgeo.stream import CheckpointStream, open_stream
from weightgeo.trajectory import locking_onset, rank_curve


def _write_run(root, steps, kind="switch", switch_at=30, states=None):
    base, cks = planted_stream(kind, steps, switch_at=switch_at, dtype=torch.bfloat16)
    for s, ck in zip(steps, cks):
        write_hf_checkpoint(root / f"checkpoint-{s}", ck)
    return base, cks


def test_directory_stream_matches_sequence(tmp_path):
    steps = [5, 10, 30, 40]
    base, cks = _write_run(tmp_path, steps)
    (tmp_path / "runs").mkdir()  # other Trainer output is ignored
    write_hf_checkpoint(tmp_path / "base", base)
    s = open_stream(tmp_path, base=tmp_path / "base")
    assert s.steps == (5, 10, 30, 40) and s.base_step is None  # numeric, not lexicographic order
    from_dir = locking_onset(tmp_path, base=tmp_path / "base", k=16)
    from_seq = locking_onset(cks, base=base, steps=steps, k=16)
    assert from_dir.step == from_seq.step == 30
    for name, curve in from_seq.similarity.items():
        assert from_dir.similarity[name] == pytest.approx(curve, abs=1e-6)
    # default base: the first checkpoint, which gets no row
    rep = rank_curve(tmp_path, k=4, hill_k=4)
    assert sorted({r["step"] for r in rep.rows}) == [10, 30, 40]
    assert rep.meta["base_step"] == 5


def test_paths_named_checkpoint_give_their_steps(tmp_path):
    _write_run(tmp_path, [10, 20, 30])
    s = open_stream([tmp_path / "checkpoint-10", tmp_path / "checkpoint-20", tmp_path / "checkpoint-30"])
    assert s.steps == (20, 30) and s.base_step == 10


def test_trainer_state_must_agree(tmp_path):
    _write_run(tmp_path, [10, 20])
    # a Trainer writes trainer_state.json into every checkpoint (one without it would be an unfinished save)
    (tmp_path / "checkpoint-10" / "trainer_state.json").write_text(json.dumps({"global_step": 10}))
    (tmp_path / "checkpoint-20" / "trainer_state.json").write_text(json.dumps({"global_step": 20}))
    assert open_stream(tmp_path).steps == (20,)
    (tmp_path / "checkpoint-20" / "trainer_state.json").write_text(json.dumps({"global_step": 21}))
    with pytest.raises(WeightgeoError, match="global_step is 21"):
        open_stream(tmp_path)


def test_stream_errors(tmp_path):
    base, cks = planted_stream("fixed", [1, 2])
    with pytest.raises(WeightgeoError, match="one checkpoint"):
        open_stream([cks[0]], steps=[1])
    assert open_stream([cks[0]], base=base, steps=[1]).steps == (1,)  # fine with a separate base
    with pytest.raises(WeightgeoError, match="duplicate step 1"):
        open_stream(cks, steps=[1, 1])
    with pytest.raises(WeightgeoError, match="not increasing"):
        open_stream(cks, steps=[2, 1])
    with pytest.raises(WeightgeoError, match="2 entries for 3"):
        open_stream([base, *cks], steps=[1, 2])
    with pytest.raises(WeightgeoError, match="empty sequence"):
        open_stream([])
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightgeoError, match="it is empty"):
        open_stream(tmp_path / "empty")
    write_hf_checkpoint(tmp_path / "single", base)
    with pytest.raises(WeightgeoError, match="single checkpoint"):
        open_stream(tmp_path / "single")
    with pytest.raises(WeightgeoError, match="does not exist"):
        open_stream(tmp_path / "nope")
    with pytest.raises(WeightgeoError, match="steps="):
        open_stream(tmp_path, steps=[1])
    _write_run(tmp_path / "one", [7])
    with pytest.raises(WeightgeoError, match="one checkpoint"):
        open_stream(tmp_path / "one")


def test_default_positional_steps():
    base, cks = planted_stream("fixed", [1, 2])
    assert open_stream(cks).steps == (1,)  # base = position 0
    assert open_stream(cks, base=base).steps == (1, 2)
    assert isinstance(open_stream(open_stream(cks)), CheckpointStream)


def test_unmatched_and_shape_changes_are_reported():
    base, cks = planted_stream("fixed", [1, 2, 3])
    cks = [dict(c) for c in cks]
    del cks[1][Q_NAME]  # missing in one checkpoint
    cks[2]["model.extra.weight"] = torch.zeros(3, 3)  # only in one checkpoint
    rep = rank_curve(cks, base=base, steps=[1, 2, 3], k=4, hill_k=4)
    assert {r["name"] for r in rep.rows} == {"layers.1.self_attn.o_proj.weight"}
    assert Q_NAME in rep.unmatched["only_base"]
    assert "model.extra.weight" in rep.unmatched["only_ft"]
    rep = rank_curve(cks, base=base, steps=[1, 2, 3], include=["norm", "o_proj"], k=4, hill_k=4)
    assert rep.skipped == [
        {"name": "layers.0.input_layernorm.weight", "reason": "1-D tensor: SVD metrics need a matrix"}
    ]
