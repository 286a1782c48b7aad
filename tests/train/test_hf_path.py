"""The optional transformers path: tiny Llama student / teacher through the SFT, OPD and RLVR loops.

Tests that need transformers take the ``transformers`` fixture (skipped where it is not installed); the
import-hygiene and missing-dependency tests run everywhere.
"""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import weightgeo
from weightgeo.errors import WeightgeoError
from weightgeo.train import opd, rlvr, sft
from weightgeo.train.hf import HFCausalLM, as_policy, tiny_hf_model
from weightgeo.train.model import GPT, GPTConfig, generate, response_logprobs
from weightgeo.train.task import ScratchpadAdditionTask

TASK = ScratchpadAdditionTask()
OPD_CFG = opd.OPDConfig(steps=3, n_prompts=4, group_size=4, save_every=2, eval_n=0, lr=1e-3)


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def _bytes(run_dir):
    return {d.name: (d / "model.safetensors").read_bytes() for d in sorted(run_dir.glob("checkpoint-*"))}


def _sft_then_opd(transformers, d, on_step=None):
    """SFT a tiny Llama, reload its last checkpoint as the OPD student, distil a wider Llama teacher."""
    sft.train(
        tiny_hf_model(TASK, seed=0), sft.SFTConfig(steps=3, batch_size=16, save_every=0, eval_n=0, lr=1e-3), d / "sft"
    )
    student = transformers.AutoModelForCausalLM.from_pretrained(d / "sft" / "checkpoint-3").float()
    teacher = tiny_hf_model(TASK, hidden_size=96, heads=4, seed=1)
    return student, opd.train(student, teacher, OPD_CFG, d / "opd", on_step=on_step)


def test_core_and_train_import_without_transformers():
    code = (
        "import sys, weightgeo, weightgeo.train.hf, weightgeo.train.opd, weightgeo.train.sft, "
        "weightgeo.train.rlvr; assert 'transformers' not in sys.modules, 'transformers was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_hf_path_without_transformers_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    with pytest.raises(WeightgeoError, match=r"weightgeo\[hf\]"):
        tiny_hf_model()
    with pytest.raises(WeightgeoError, match="transformers"):
        HFCausalLM(torch.nn.Linear(2, 2, device="meta"))
    m = GPT(GPTConfig(n_layer=1, n_embd=16, n_head=2))
    assert as_policy(m) is m


def test_adapter_matches_the_hf_model(transformers):
    hf = tiny_hf_model(TASK, seed=0)
    rng = torch.get_rng_state()
    assert all(torch.equal(a, b) for a, b in zip(hf.parameters(), tiny_hf_model(TASK, seed=0).parameters()))
    w = HFCausalLM(hf)
    assert [n for n, _ in w.named_parameters()] == [n for n, _ in hf.named_parameters()]
    assert w.state_dict().keys() == hf.state_dict().keys()
    assert w.eval() is w and not hf.training and w.train() is w and hf.training
    g = torch.Generator().manual_seed(0)
    prompts = TASK.prompts(8, g)
    s = generate(w, prompts, TASK.completion_len, generator=torch.Generator().manual_seed(1), eos_id=TASK.eos_id)
    again = generate(w, prompts, TASK.completion_len, generator=torch.Generator().manual_seed(1), eos_id=TASK.eos_id)
    assert torch.equal(s.tokens, again.tokens)
    assert torch.equal(torch.get_rng_state(), rng)  # building and sampling never touch the global RNG
    lp = response_logprobs(w, prompts, s.tokens)
    seq = torch.cat([prompts, s.tokens], 1)
    with torch.no_grad():
        logits = hf(input_ids=seq).logits[:, prompts.shape[1] - 1 : -1]
    direct = torch.log_softmax(logits.float(), -1).gather(-1, s.tokens.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(lp, direct, atol=1e-6)
    assert torch.allclose(s.logprobs, direct, atol=1e-5)  # T=1: sampling log-probs are the policy's own


def test_opd_run_streams_and_compares(transformers, tmp_path):
    tracker = None

    def on_step(model, step):  # the wrapper keeps the HF names, so a Tracker built on the HF model follows
        nonlocal tracker
        # weightgeo.train saves bf16 checkpoints of fp32 masters: the tracker rounds to what the run saves
        tracker = tracker or weightgeo.Tracker(model, k=4, hill_k=2, include="attention", dtype=torch.bfloat16)
        tracker.update(model.named_parameters(), step)

    student, out = _sft_then_opd(transformers, tmp_path, on_step)
    assert out["checkpoints"] == [0, 2, 3]
    for step in (0, 2, 3):
        d = tmp_path / "opd" / f"checkpoint-{step}"
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["model_type"] == "llama" and cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
        with safe_open(str(d / "model.safetensors"), "pt") as f:
            assert "model.layers.0.self_attn.q_proj.weight" in f.keys()
            assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
        assert json.loads((d / "trainer_state.json").read_text())["global_step"] == step
    assert _bytes(tmp_path / "opd")["checkpoint-0"] == _bytes(tmp_path / "sft")["checkpoint-3"]  # lossless reload
    last = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "opd" / "checkpoint-3").float()
    assert all(torch.equal(p.bfloat16().float(), q) for p, q in zip(student.parameters(), last.parameters()))

    report = weightgeo.compare(
        tmp_path / "opd" / "checkpoint-0", tmp_path / "opd" / "checkpoint-3", k=4, progress=False
    )
    assert report.meta["unmatched"] == {"only_base": [], "only_ft": []}
    assert any("q_proj" in r["name"] for r in report.rows)
    assert report.summary["update_sparsity"] < 0.5  # lr 1e-3: most bf16 values moved
    curve = weightgeo.rank_curve(tmp_path / "opd", include="attention", k=4, hill_k=2)
    assert {r["step"] for r in curve.rows} == {2, 3} and len(curve.rows) == 2 * 8  # 2 layers x q, k, v, o
    online = [r for r in tracker.rank_curve().rows if r["step"] in (2, 3)]  # the tracker also saw step 1
    assert [(r["step"], r["name"]) for r in online] == [(r["step"], r["name"]) for r in curve.rows]
    assert [r["stable_rank"] for r in online] == pytest.approx([r["stable_rank"] for r in curve.rows], rel=1e-5)


def test_opd_determinism(transformers, tmp_path):
    _sft_then_opd(transformers, tmp_path / "a")
    _sft_then_opd(transformers, tmp_path / "b")
    for run in ("sft", "opd"):
        a, b = _bytes(tmp_path / "a" / run), _bytes(tmp_path / "b" / run)
        assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    assert a["checkpoint-0"] != a["checkpoint-3"]


def test_mixed_architectures_and_rlvr(transformers, tmp_path):
    """A GPT student under a Llama teacher (and the reverse, with the projector); GRPO on a Llama."""
    gpt = GPT(GPTConfig(n_layer=1, n_embd=16, n_head=2), seed=0)
    opd.train(gpt, tiny_hf_model(TASK, seed=1), OPD_CFG, tmp_path / "gpt_student")
    GPT.from_pretrained(tmp_path / "gpt_student" / "checkpoint-3")
    cfg = opd.OPDConfig(
        steps=2, n_prompts=2, group_size=4, save_every=0, eval_n=8, rollout_source="teacher", project_at=1
    )  # the projector finds Llama's q/k/v/o and gate/up/down
    out = opd.train(tiny_hf_model(TASK, seed=2), gpt, cfg, tmp_path / "hf_student")
    assert out["checkpoints"] == [0, 2] and set(out["end"]) >= {"acc_greedy", "acc_t1"}
    out = rlvr.train(
        tiny_hf_model(TASK, seed=3), rlvr.RLVRConfig(steps=2, n_prompts=2, group_size=4, eval_n=0), tmp_path / "rlvr"
    )
    assert out["checkpoints"] == [0, 2]
