"""Model checkpoints (HF layout, bf16 on disk, fp32 in memory), sampling with explicit generators, the task."""

import json

import pytest
import torch
from safetensors import safe_open

from weightgeo.train.model import GPT, GPTConfig, generate, response_logprobs
from weightgeo.train.task import EOS, AdditionTask

CFG = GPTConfig(n_layer=2, n_embd=32, n_head=2)


def test_llama_style_names():
    names = set(GPT(CFG).state_dict())
    for want in ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                 "model.layers.1.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight",
                 "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight",
                 "model.layers.0.input_layernorm.weight"]:
        assert want in names


def test_save_load_roundtrip_bf16(tmp_path):
    m = GPT(CFG, seed=3)
    m.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and cfg["num_hidden_layers"] == 2
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    m2 = GPT.from_pretrained(tmp_path)
    for (n, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert b.dtype == torch.float32
        assert torch.equal(a.to(torch.bfloat16).float(), b), n
    with pytest.raises(FileNotFoundError):
        GPT.from_pretrained(tmp_path / "missing")


def test_generate_explicit_generator_and_logprobs():
    m = GPT(CFG, seed=0)
    task = AdditionTask()
    prompts = task.prompts(6, torch.Generator().manual_seed(0))
    state = torch.random.get_rng_state()
    a = generate(m, prompts, 5, generator=torch.Generator().manual_seed(7), eos_id=EOS)
    b = generate(m, prompts, 5, generator=torch.Generator().manual_seed(7), eos_id=EOS)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG was not touched
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert torch.allclose(a.logprobs, response_logprobs(m, prompts, a.tokens), atol=1e-5)
    with pytest.raises(ValueError):
        generate(m, prompts, 2, temperature=1.0)
    greedy = generate(m, prompts, 5, temperature=0)
    assert (greedy.logprobs <= 0).all()


class _ScriptedLM(torch.nn.Module):
    """Emits token 3, then <eos> forever (greedy), to check the response mask."""

    def __init__(self, prompt_len):
        super().__init__()
        self.p = prompt_len

    def forward(self, seq):
        logits = torch.zeros(seq.shape[0], seq.shape[1], 13)
        logits[:, -1, 3 if seq.shape[1] == self.p else EOS] = 10.0
        return logits


def test_generate_mask_stops_after_eos():
    prompts = torch.zeros(2, 4, dtype=torch.long)
    s = generate(_ScriptedLM(4), prompts, 4, temperature=0, eos_id=EOS)
    assert s.tokens[0].tolist() == [3, EOS, EOS, EOS]
    assert s.mask.tolist() == [[1, 1, 0, 0]] * 2


def test_task_reward_and_batched_rewards():
    t = AdditionTask()
    p = t.encode_prompt(999, 1)
    assert t.decode(t.answer(999, 1)) == "0001<eos>"
    assert t.reward(p, t.answer(999, 1)) == 1.0
    assert t.reward(p, t.answer(999, 1)[:-1] + [3]) == 0.0  # missing eos
    g = torch.Generator().manual_seed(0)
    prompts = t.prompts(64, g)
    comps = torch.randint(0, 13, (64, 5), generator=g)
    ops = [(int(t.decode(r[:3])), int(t.decode(r[4:7]))) for r in prompts]
    comps[::2] = torch.tensor([t.answer(a, b) for a, b in ops])[::2]
    loop = torch.tensor([t.reward(p, c) for p, c in zip(prompts, comps)])
    assert torch.equal(loop, t.rewards(prompts, comps)) and loop.sum() >= 32
    toks, mask = t.demonstrations(4, g)
    assert toks.shape == (4, 13) and mask.shape == (4, 12) and mask.sum() == 4 * 5
    with pytest.raises(ValueError):
        t.reward([1, 2, 3], [0])
