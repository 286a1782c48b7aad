"""Seconds-long end-to-end runs: valid bf16 checkpoint streams, bitwise determinism, the §5 switches."""

import json
import warnings

import pytest
import torch
from safetensors import safe_open

from weightgeo.errors import WeightgeoError
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
    opd.train(
        anchor, teacher, opd.OPDConfig(steps=3, n_prompts=4, group_size=4, save_every=2, eval_n=0), tmp_path / "opd"
    )
    _check_stream(tmp_path / "opd", [0, 2, 3])
    r = rlvr.train(
        GPT.from_pretrained(tmp_path / "sft" / "checkpoint-4"),
        rlvr.RLVRConfig(steps=3, n_prompts=4, group_size=4, save_every=10, eval_n=0),
        tmp_path / "rlvr",
    )
    _check_stream(tmp_path / "rlvr", [0, 3])
    assert r["steps_without_update"] <= 3
    # checkpoint-0 of a run from the anchor equals the anchor
    assert _bytes(tmp_path / "opd")["checkpoint-0"] == _bytes(tmp_path / "sft")["checkpoint-4"]


def test_determinism_bitwise(tmp_path):
    def run(d):
        m = GPT(TINY, seed=0)
        sft.train(m, sft.SFTConfig(steps=3, batch_size=8, save_every=1, eval_n=0, lr=1e-3), d / "sft")
        t = GPT(TINY, seed=5)
        opd.train(
            m,
            t,
            opd.OPDConfig(
                steps=2, n_prompts=2, group_size=4, save_every=1, eval_n=0, keep_ratio=0.5, keep_mode="random", lr=1e-3
            ),
            d / "opd",
        )
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


@pytest.mark.parametrize(
    "kw",
    [
        dict(rollout_source="teacher"),
        dict(keep_ratio=0.25, keep_mode="topk"),
        dict(rlvr_alpha=0.05),
        dict(project_at=1),
    ],
)
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

    meta = pretrain(
        PretrainConfig(model=TINY, max_steps=2, eval_every=1, stop_acc=2.0, threads=None, batch_size=8),
        tmp_path / "base",
        verbose=False,
    )
    assert meta["steps"] == 2 and len(meta["history"]) == 2
    m = GPT.from_pretrained(tmp_path / "base")
    assert m.config == TINY
    assert json.loads((tmp_path / "base" / "pretrain.json").read_text())["recipe"]["stop_acc"] == 2.0


def test_fp32_masters_beside_bf16_and_save_at(tmp_path):
    m = GPT(TINY, seed=0)
    sft.train(
        m, sft.SFTConfig(steps=5, batch_size=8, save_every=4, save_at=(3,), save_fp32=True, eval_n=0, lr=1e-3), tmp_path
    )
    _check_stream(tmp_path, [0, 3, 4, 5])
    for s in (0, 3, 4, 5):
        d = tmp_path / "fp32" / f"checkpoint-{s}"
        assert json.loads((d / "config.json").read_text())["torch_dtype"] == "float32"
        assert json.loads((d / "trainer_state.json").read_text())["global_step"] == s
    last = GPT.from_pretrained(tmp_path / "fp32" / "checkpoint-5")
    for (n, a), (_, b) in zip(m.state_dict().items(), last.state_dict().items()):
        assert torch.equal(a, b), n  # the fp32 masters exactly; the bf16 checkpoint is their rounding
    bf = GPT.from_pretrained(tmp_path / "checkpoint-5")
    assert all(torch.equal(a.to(torch.bfloat16).float(), b) for a, b in zip(m.parameters(), bf.parameters()))


def test_checkpoint_stream_alias_is_deprecated(tmp_path):
    from weightgeo.train import loop

    with pytest.warns(DeprecationWarning, match="CheckpointWriter"):
        alias = loop.CheckpointStream
    assert alias is loop.CheckpointWriter
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from weightgeo.train.loop import CheckpointWriter  # noqa: F401  (the new name warns nothing)


def test_null_run_permutes_and_head_only_freezes(tmp_path):
    """The null moves the weights like OPD (same advantage values) with a different update; the head-only
    control changes lm_head and the embeddings only."""
    t = GPT(TINY, seed=1)
    cfg = dict(steps=1, n_prompts=4, group_size=4, save_every=0, eval_n=0, lr=1e-3, seed=7)
    a, b, h = GPT(TINY, seed=0), GPT(TINY, seed=0), GPT(TINY, seed=0)
    start = {n: p.detach().clone() for n, p in h.named_parameters()}
    opd.train(a, t, opd.OPDConfig(**cfg), tmp_path / "opd")
    opd.train(b, t, opd.OPDConfig(**cfg, permute_advantages=True), tmp_path / "null")
    logs = [[json.loads(x) for x in (tmp_path / r / "log.jsonl").read_text().splitlines()] for r in ("opd", "null")]
    # same rollouts and teacher scores, and the same loss value (on-policy it is −Σ A_t / N: the multiset of
    # advantages is kept) ...
    assert logs[0][0]["reverse_kl"] == logs[1][0]["reverse_kl"]
    assert logs[0][0]["loss"] == pytest.approx(logs[1][0]["loss"], rel=1e-5)
    # ... but each token's advantage is another token's: a different update
    assert not torch.equal(a.lm_head.weight, b.lm_head.weight)
    head_only = r"^(lm_head|model\.embed_tokens|model\.embed_positions)\.weight$"
    opd.train(h, t, opd.OPDConfig(**{**cfg, "steps": 2}, trainable=head_only), tmp_path / "head")
    changed = {n for n, p in h.named_parameters() if not torch.equal(p, start[n])}
    assert changed == {"lm_head.weight", "model.embed_tokens.weight", "model.embed_positions.weight"}
    with pytest.raises(WeightgeoError, match="matches no parameter.*trainable=None"):
        opd.train(GPT(TINY), t, opd.OPDConfig(**cfg, trainable="nothing"), tmp_path / "x")


def test_mix_logs_realised_share(tmp_path):
    out = opd.train(
        GPT(TINY, seed=0),
        GPT(TINY, seed=1),
        opd.OPDConfig(steps=2, n_prompts=2, group_size=4, save_every=0, eval_n=0, rlvr_alpha=0.05),
        tmp_path,
    )
    shares = [json.loads(x).get("opd_share") for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert out["opd_share_mean"] == pytest.approx(sum(shares) / 2) and all(0 <= s <= 1 for s in shares)
