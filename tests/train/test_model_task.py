"""Model checkpoints (HF layout, bf16 on disk, fp32 in memory), sampling with explicit generators, the tasks."""

import json

import pytest
import torch
from safetensors import safe_open

from weightgeo.errors import WeightgeoError
from weightgeo.train.model import GPT, GPTConfig, generate, response_logprobs
from weightgeo.train.task import EOS, SEP, AdditionTask, ScratchpadAdditionTask

CFG = GPTConfig(n_layer=2, n_embd=32, n_head=2)


def test_llama_style_names():
    names = set(GPT(CFG).state_dict())
    for want in [
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.0.input_layernorm.weight",
    ]:
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
    task = ScratchpadAdditionTask()
    prompts = task.prompts(6, torch.Generator().manual_seed(0))
    state = torch.random.get_rng_state()
    a = generate(m, prompts, 5, generator=torch.Generator().manual_seed(7), eos_id=EOS)
    b = generate(m, prompts, 5, generator=torch.Generator().manual_seed(7), eos_id=EOS)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG was not touched
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert torch.allclose(a.logprobs, response_logprobs(m, prompts, a.tokens), atol=1e-5)
    with pytest.raises(WeightgeoError, match="generator=None.*temperature=0"):
        generate(m, prompts, 2, temperature=1.0)
    greedy = generate(m, prompts, 5, temperature=0)
    assert (greedy.logprobs <= 0).all()


class _ScriptedLM(torch.nn.Module):
    """Emits token 3, then <eos> forever (greedy), to check the response mask."""

    def __init__(self, prompt_len):
        super().__init__()
        self.p = prompt_len

    def forward(self, seq):
        logits = torch.zeros(seq.shape[0], seq.shape[1], 14)
        logits[:, -1, 3 if seq.shape[1] == self.p else EOS] = 10.0
        return logits


def test_generate_mask_stops_after_eos():
    prompts = torch.zeros(2, 4, dtype=torch.long)
    s = generate(_ScriptedLM(4), prompts, 4, temperature=0, eos_id=EOS)
    assert s.tokens[0].tolist() == [3, EOS, EOS, EOS]
    assert s.mask.tolist() == [[1, 1, 0, 0]] * 2


def test_answer_only_task_reward_and_batched_rewards():
    t = AdditionTask()
    assert t.vocab_size == 13 and t.completion_len == 5
    p = t.encode_prompt(999, 1)
    assert t.decode(t.answer(999, 1)) == "0001<eos>"
    assert t.reward(p, t.answer(999, 1)) == 1.0
    assert t.reward(p, t.answer(999, 1)[:-1] + [3]) == 0.0  # missing eos
    g = torch.Generator().manual_seed(0)
    prompts = t.prompts(64, g)
    comps = torch.randint(0, 13, (64, 5), generator=g)
    ops = [t.operands(r) for r in prompts]
    comps[::2] = torch.tensor([t.answer(a, b) for a, b in ops])[::2]
    loop = torch.tensor([t.reward(p, c) for p, c in zip(prompts, comps)])
    assert torch.equal(loop, t.rewards(prompts, comps)) and loop.sum() >= 32
    with pytest.raises(WeightgeoError, match="not a prompt of this task"):
        t.reward([1, 2, 3], [0])


def _column_sums(a, b, n):
    """Independent reference for the scratchpad: schoolbook addition on the decimal strings."""
    out, carry = [], 0
    for x, y in zip(reversed(str(a).zfill(n)), reversed(str(b).zfill(n))):
        s = int(x) + int(y) + carry
        carry = s // 10
        out += [int(x), int(y), s % 10, carry]
    return out


@pytest.mark.parametrize("n", [1, 3, 4])
def test_scratchpad_format(n):
    t = ScratchpadAdditionTask(n_digits=n)
    g = torch.Generator().manual_seed(n)
    for a, b in t.sample_operands(50, g).tolist() + [(10**n - 1, 10**n - 1), (0, 0)]:
        c = t.completion(a, b)
        assert len(c) == t.completion_len == 5 * n + 3
        assert c[: 4 * n] == _column_sums(a, b, n)  # a_i b_i s_i c_i, least-significant column first
        assert c[4 * n] == SEP and c[-1] == EOS
        assert int(t.decode(c[4 * n + 1 : -1])) == a + b  # the answer, most-significant first, n + 1 digits
        assert t.scratchpad(a, b)[-1] == c[4 * n + 1]  # the last carry is the answer's leading digit
    assert t.completion_len >= 16 or n < 3  # the miniature's 3 digits: 18 response tokens
    toks, mask = t.demonstrations(4, g)
    assert toks.shape == (4, t.prompt_len + t.completion_len) and mask.sum() == 4 * t.completion_len
    assert (toks[:, t.prompt_len + 4 * n] == SEP).all()


def test_scratchpad_verifier_reads_the_final_answer_only():
    t = ScratchpadAdditionTask()
    g = torch.Generator().manual_seed(0)
    prompts = t.prompts(200, g)
    good = torch.tensor([t.completion(*t.operands(p)) for p in prompts])
    assert t.rewards(prompts, good).all()
    # any scratchpad content (no <eos>) leaves the reward unchanged
    noisy = good.clone()
    noisy[:, : t.scratchpad_len] = torch.randint(0, 10, (200, t.scratchpad_len), generator=g)
    assert t.rewards(prompts, noisy).all()
    # so does a shorter or longer scratchpad, and tokens after <eos>
    p0, (a, b) = prompts[0], t.operands(prompts[0])
    ans = t.encode(">" + str(a + b).zfill(4) + "<eos>")
    assert t.reward(p0, ans) == 1.0 and t.reward(p0, [5] * 20 + ans + [3, 3]) == 1.0
    # one wrong answer digit, a missing ">", a missing or early <eos>: 0
    wrong = good.clone()
    wrong[:, -2] = (wrong[:, -2] + 1) % 10
    assert not t.rewards(prompts, wrong).any()
    no_sep = good.clone()
    no_sep[:, t.scratchpad_len] = 0
    assert not t.rewards(prompts, no_sep).any()
    no_eos = good.clone()
    no_eos[:, -1] = 0
    assert not t.rewards(prompts, no_eos).any()
    early = good.clone()
    early[:, 3] = EOS  # the response ends inside the scratchpad: no answer
    assert not t.rewards(prompts, early).any()
    # batched equals the per-example verifier on random completions
    rnd = torch.randint(0, t.vocab_size, (200, t.completion_len), generator=g)
    rnd[::3] = good[::3]
    loop = torch.tensor([t.reward(p, c) for p, c in zip(prompts, rnd)])
    assert torch.equal(loop, t.rewards(prompts, rnd))
    with pytest.raises(ValueError):
        t.reward(t.encode("12+345="), good[0])


def test_bad_training_inputs_are_weightgeo_errors_that_say_the_fix():
    from weightgeo.train.loop import lr_at

    m = GPT(CFG)
    too_long = torch.zeros(1, CFG.block_size + 1, dtype=torch.long)
    with pytest.raises(
        WeightgeoError, match=rf"length {CFG.block_size + 1} .*GPTConfig\(block_size={CFG.block_size + 1}\)"
    ):
        m(too_long)
    with pytest.raises(WeightgeoError, match="schedule='linear'.*schedule='constant' or schedule='cosine'"):
        lr_at(0, total=10, lr=1e-3, schedule="linear")
