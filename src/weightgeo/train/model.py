"""A nanoGPT-sized pre-norm causal transformer with Llama-style tensor names.

Tensor names follow HF Llama so weightgeo's presets and name helpers work on the checkpoints unchanged::

    model.embed_tokens.weight                 [vocab, d]
    model.embed_positions.weight              [block, d]   (learned positions; Llama uses RoPE)
    model.layers.{i}.input_layernorm.weight   [d]          (RMSNorm)
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight  [d, d]
    model.layers.{i}.post_attention_layernorm.weight  [d]
    model.layers.{i}.mlp.up_proj.weight       [4d, d]      (GELU MLP, no gate)
    model.layers.{i}.mlp.down_proj.weight     [d, 4d]
    model.norm.weight                         [d]
    lm_head.weight                            [vocab, d]   (untied)

Weights are fp32 masters in memory; ``save_pretrained`` writes them in bf16 (HF layout: ``config.json`` +
``model.safetensors``), ``from_pretrained`` reads them back into fp32. Sampling takes an explicit
``torch.Generator`` and never touches the global RNG.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..errors import WeightgeoError
from ..jsonfile import read_json_object

__all__ = ["GPTConfig", "GPT", "Sample", "generate", "response_logprobs"]


@dataclass
class GPTConfig:
    vocab_size: int = 14  # task vocabulary (digits, "+", "=", <eos>, ">"; see task.py)
    block_size: int = 26  # longest sequence (prompt + completion: 8 + 18 for 3-digit scratchpad addition)
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads; head dim = n_embd // n_head
    n_embd: int = 128  # residual width d
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * d
    norm_eps: float = 1e-5  # RMSNorm epsilon
    init_std: float = 0.02  # N(0, init_std) for every matrix; residual projections scaled by 1/sqrt(2 n_layer)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        d = cfg.n_embd
        self.n_head = cfg.n_head
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, cache: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (
            p(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        past = cache is not None and "k" in cache
        if cache is not None:
            if past:  # decoding: the new token(s) attend to every cached position
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        if past and T > 1:
            raise WeightgeoError(
                f"attention cache already holds {k.shape[2] - T} position(s) and {T} new tokens came in; "
                f"decoding takes one token at a time: pass the prompt once with an empty cache, then one token per call"
            )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=not past)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.up_proj = nn.Linear(cfg.n_embd, cfg.mlp_ratio * cfg.n_embd, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_ratio * cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cache: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Backbone(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.embed_positions = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)


class GPT(nn.Module):
    """Pre-norm causal transformer. ``forward(idx [B, T]) -> logits [B, T, vocab]`` (fp32).

    >>> m = GPT(GPTConfig(n_layer=1, n_embd=16, n_head=2), seed=0)
    >>> m(torch.zeros(2, 5, dtype=torch.long)).shape
    torch.Size([2, 5, 14])
    """

    def __init__(self, cfg: GPTConfig, *, seed: int = 0):
        super().__init__()
        self.config = cfg
        # Built on the meta device: the modules' default init would draw from the global RNG (and be thrown
        # away); reset_parameters draws every weight from this model's own seeded generator instead.
        with torch.device("meta"):
            self.model = _Backbone(cfg)
            self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.to_empty(device="cpu")
        self.reset_parameters(torch.Generator().manual_seed(seed))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        std, resid = self.config.init_std, self.config.init_std / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():  # named_parameters order is fixed -> deterministic init
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                nn.init.normal_(
                    p, 0.0, resid if name.endswith(("o_proj.weight", "down_proj.weight")) else std, generator=generator
                )

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, idx: torch.Tensor, *, cache: list[dict[str, torch.Tensor]] | None = None, start_pos: int = 0
    ) -> torch.Tensor:
        """``cache``: one dict per layer for incremental decoding (``generate`` uses it); ``start_pos``: the
        position of ``idx[:, 0]`` when decoding after a cached prefix."""
        T = idx.shape[1]
        if start_pos + T > self.config.block_size:
            raise WeightgeoError(
                f"GPT.forward: sequence length {start_pos + T} (start_pos={start_pos} + {T} tokens) is longer than "
                f"block_size={self.config.block_size}; shorten the input or build the model with "
                f"GPTConfig(block_size={start_pos + T})"
            )
        m = self.model
        x = m.embed_tokens(idx) + m.embed_positions(torch.arange(start_pos, start_pos + T, device=idx.device))
        for i, block in enumerate(m.layers):
            x = block(x, None if cache is None else cache[i])
        return self.lm_head(m.norm(x))

    # ---- HF-layout checkpoints -------------------------------------------------------------------------
    def save_pretrained(
        self, directory: str | Path, *, dtype: torch.dtype = torch.bfloat16, extra: dict | None = None
    ) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (weights cast to ``dtype``, round-to-nearest-even)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        c = self.config
        config = {
            "architectures": ["WeightgeoGPT"],
            "model_type": "weightgeo-gpt",
            "hidden_size": c.n_embd,
            "num_hidden_layers": c.n_layer,
            "num_attention_heads": c.n_head,
            "intermediate_size": c.mlp_ratio * c.n_embd,
            "vocab_size": c.vocab_size,
            "max_position_embeddings": c.block_size,
            "rms_norm_eps": c.norm_eps,
            "tie_word_embeddings": False,
            "torch_dtype": str(dtype).removeprefix("torch."),
            "weightgeo_gpt_config": asdict(c),
            **(extra or {}),
        }
        (d / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        state = {k: v.detach().to(dtype).contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
        return d

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> GPT:
        """Load a ``save_pretrained`` folder into fp32 master weights."""
        d = Path(directory)
        cfg_path, w_path = d / "config.json", d / "model.safetensors"
        if not cfg_path.is_file() or not w_path.is_file():
            raise FileNotFoundError(f"{d}: expected config.json and model.safetensors (written by save_pretrained)")
        raw = read_json_object(cfg_path, what="config.json").get("weightgeo_gpt_config")
        if not isinstance(raw, dict):
            raise WeightgeoError(f"{cfg_path}: no weightgeo_gpt_config object; save the model with GPT.save_pretrained")
        cfg = GPTConfig(**{f.name: raw[f.name] for f in fields(GPTConfig) if f.name in raw})
        model = cls(cfg)
        state = {k: v.float() for k, v in load_file(str(w_path)).items()}
        model.load_state_dict(state, strict=True)
        return model


class Sample(NamedTuple):
    """Sampled completions: ``tokens`` [B, N], their ``logprobs`` [B, N] under the sampling distribution,
    and ``mask`` [B, N] (1 up to and including the first ``eos``; 0 after it)."""

    tokens: torch.Tensor
    logprobs: torch.Tensor
    mask: torch.Tensor


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: torch.Tensor,
    max_new_tokens: int,
    *,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    eos_id: int | None = None,
) -> Sample:
    """Sample ``max_new_tokens`` after each prompt (``temperature=0``: greedy, no generator needed).

    ``model``: a ``GPT`` (decoded with its key/value cache) or any module whose ``forward(idx)`` returns
    logits, e.g. :class:`~weightgeo.train.hf.HFCausalLM` (the whole sequence re-run each step).

    ``logprobs`` are log π(a_t | s_t) of the temperature-scaled distribution that produced the token (at
    T=1, the policy's own log-probabilities). Positions after the first ``eos_id`` are still filled (the
    sequence keeps length N) but masked out.
    """
    if temperature > 0 and generator is None:
        raise WeightgeoError(
            f"generate(temperature={temperature}) samples, and got generator=None: pass "
            f"generator=torch.Generator().manual_seed(...) (the global RNG is never used), or temperature=0 for "
            f"greedy decoding"
        )
    was_training = model.training
    model.eval()
    seq, toks, lps = prompts, [], []
    use_cache = isinstance(model, GPT)  # a key/value cache: each step feeds only the newest token
    cache: list[dict[str, torch.Tensor]] | None = [{} for _ in model.model.layers] if isinstance(model, GPT) else None
    for t in range(max_new_tokens):
        if use_cache:
            inp, pos = (seq, 0) if t == 0 else (seq[:, -1:], seq.shape[1] - 1)
            logits = model(inp, cache=cache, start_pos=pos)[:, -1, :].float()
        else:
            logits = model(seq)[:, -1, :].float()
        if temperature > 0:
            logp = torch.log_softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(logp.exp(), 1, generator=generator)
        else:
            logp = torch.log_softmax(logits, dim=-1)
            nxt = logits.argmax(-1, keepdim=True)
        toks.append(nxt)
        lps.append(logp.gather(-1, nxt))
        seq = torch.cat([seq, nxt], dim=1)
    model.train(was_training)
    tokens, logprobs = torch.cat(toks, 1), torch.cat(lps, 1)
    mask = torch.ones_like(tokens, dtype=torch.float32)
    if eos_id is not None:
        is_eos = (tokens == eos_id).long()
        before = torch.cumsum(is_eos, 1) - is_eos  # number of eos strictly before t
        mask = (before == 0).float()
    return Sample(tokens, logprobs, mask)


def response_logprobs(model: nn.Module, prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
    """log π(completion_t | prompt, completion_<t) for every completion token: [B, N] (with grad if enabled)."""
    seq = torch.cat([prompts, completions], dim=1)
    logits = model(seq[:, :-1])[:, prompts.shape[1] - 1 :, :].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, completions.unsqueeze(-1)).squeeze(-1)
