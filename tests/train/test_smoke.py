"""Seconds-long end-to-end runs: valid bf16 checkpoint streams, bitwise determinism, the §5 switches."""

import json

import pytest
import torch
from safetensors import safe_open

from weightgeo.train import opd, rlvr, sft
from weightgeo.train.model import GPT, GPTConfig

TINY = GPTConfig(n_layer=1, n_embd=16, n_head=2)


def _check_stream(run_dir, steps):
    dirs = sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [int(d.name.split("-")[1]) for d in dirs] == steps
    for d in dirs:
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["torch_dtype"] == "bfloat16"
        with safe_open(str(d / "model.safetensors"), "pt") as f:
            keys = list(f.keys())
            assert "model.layers.0.self_attn.q_proj.weight" in keys
            assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in keys)
        assert json.loads((d / "trainer_state.json").read_text())["global_step"] == int(d.name.split("-")[1])
        GPT.from_pretrained(d)  # loads back
    assert len((run_dir / "log.jsonl").read_text().splitlines()) == steps[-1]


def _bytes(run_dir):
    return {d.name: (d / "model.safetensors").read_bytes() for d in sorted(run_dir.glob("checkpoint-*"))}


def test_sft_opd_rlvr_streams(tmp_path):
    student = GPT(TINY, seed=0)
    teacher = GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2), seed=1)
    s = sft.train(student, sft.SFTConfig(steps=4, batch_size=16, save_every=2, eval_n=16, lr=1e-3), tmp_path / "sft")
    _check_stream(tmp_path / "sft", [0, 2, 4])
    assert set(s["end"]) >= {"acc_greedy", "acc_t1"}
    anchor = GPT.from_pretrained(tmp_path / "sft" / "checkpoint-4")
    opd.train(anchor, teacher, opd.OPDConfig(steps=3, n_prompts=4, group_size=4, save_every=2, eval_n=0),
              tmp_path / "opd")
    _check_stream(tmp_path / "opd", [0, 2, 3])
    r = rlvr.train(GPT.from_pretrained(tmp_path / "sft" / "checkpoint-4"),
                   rlvr.RLVRConfig(steps=3, n_prompts=4, group_size=4, save_every=10, eval_n=0), tmp_path / "rlvr")
    _check_stream(tmp_path / "rlvr", [0, 3])
    assert r["steps_without_update"] <= 3
    # checkpoint-0 of a run from the anchor equals the anchor
    assert _bytes(tmp_path / "opd")["checkpoint-0"] == _bytes(tmp_path / "sft")["checkpoint-4"]


def test_determinism_bitwise(tmp_path):
    def run(d):
        m = GPT(TINY, seed=0)
        sft.train(m, sft.SFTConfig(steps=3, batch_size=8, save_every=1, eval_n=0, lr=1e-3), d / "sft")
        t = GPT(TINY, seed=5)
        opd.train(m, t, opd.OPDConfig(steps=2, n_prompts=2, group_size=4, save_every=1, eval_n=0,
                                      keep_ratio=0.5, keep_mode="random", lr=1e-3), d / "opd")
        return {**_bytes(d / "sft"), **{"opd/" + k: v for k, v in _bytes(d / "opd").items()}}

    a, b = run(tmp_path / "a"), run(tmp_path / "b")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    assert a["checkpoint-0"] != a["checkpoint-3"]  # it did train


def test_micro_batching_matches_full_batch(tmp_path):
    def run(d, mb):
        m = GPT(TINY, seed=0)
        sft.train(m, sft.SFTConfig(steps=2, batch_size=8, micro_batch_size=mb, save_every=0, eval_n=0), d)
        return torch.cat([p.detach().flatten() for p in m.parameters()])

    full, acc = run(tmp_path / "full", None), run(tmp_path / "acc", 3)
    assert torch.allclose(full, acc, atol=1e-7)


@pytest.mark.parametrize("kw", [dict(rollout_source="teacher"), dict(keep_ratio=0.25, keep_mode="topk"),
                                dict(rlvr_alpha=0.05), dict(project_at=1)])
def test_opd_controls_run(tmp_path, kw):
    m, t = GPT(TINY, seed=0), GPT(TINY, seed=1)
    opd.train(m, t, opd.OPDConfig(steps=2, n_prompts=2, group_size=4, save_every=0, eval_n=0, **kw), tmp_path)
    _check_stream(tmp_path, [0, 2])


def test_projected_run_branches_exactly(tmp_path):
    """project_at=s: identical to the plain run up to s; afterwards the block-matrix updates differ."""
    cfg = dict(steps=4, batch_size=8, save_every=1, eval_n=0, lr=1e-3)
    sft.train(GPT(TINY, seed=0), sft.SFTConfig(**cfg), tmp_path / "plain")
    sft.train(GPT(TINY, seed=0), sft.SFTConfig(**cfg, project_at=2, project_k=2), tmp_path / "proj")
    a, b = _bytes(tmp_path / "plain"), _bytes(tmp_path / "proj")
    assert a["checkpoint-2"] == b["checkpoint-2"] and a["checkpoint-4"] != b["checkpoint-4"]


def test_pretrain_writes_asset(tmp_path):
    from weightgeo.train.pretrain import PretrainConfig, pretrain

    meta = pretrain(PretrainConfig(model=TINY, max_steps=2, eval_every=1, stop_acc=2.0, threads=None, batch_size=8),
                    tmp_path / "base", verbose=False)
    assert meta["steps"] == 2 and len(meta["history"]) == 2
    m = GPT.from_pretrained(tmp_path / "base")
    assert m.config == TINY
    assert json.loads((tmp_path / "base" / "pretrain.json").read_text())["recipe"]["stop_acc"] == 2.0
