"""Test factories for the checkpoints RL / distillation frameworks write (import as ``from native_factories import ...``).

Tiny HF models come from transformers itself (``save_pretrained``); DCP folders from
``torch.distributed.checkpoint.save``; the Megatron and torchtitan layouts are built from HF weights by the
documented layouts, written here with plain ``torch.cat``/``view`` code independent of weightgeo's einops
readers:

- ``tiny_hf(path, kind="llama"|"qwen2"|"qwen3", seed=0, dtype=torch.bfloat16, perturb=0.0) -> (folder, config dict,
  state_dict)``: a transformers model saved with ``save_pretrained``; ``perturb`` adds seeded noise (a
  fine-tune of the same base when the seed of the base is kept).
- ``write_dcp(path, tensors, *, extra=True) -> Path``: ``dcp.save`` in single-process mode; ``extra`` adds
  optimizer state, a TransformerEngine ``_extra_state`` entry and non-tensor entries, as training runs save.
- ``to_megatron(sd, cfg, *, pad_to=None, stacked=True) -> dict``: Megatron-core names (stacked layers,
  interleaved QKV, ``[gate; up]``, fused layer norms, padded vocabulary rows).
- ``to_torchtitan(sd, cfg) -> dict``: torchtitan names, q/k in Meta's rotary layout for Llama.
- ``fp8_quantize(w, block) -> (codes, scales)``: DeepSeek-style block quantisation (scale = amax / 448);
  ``fp8_reference(codes, scales, block)``: W = code x scale block by block in float64 (an independent loop);
  ``write_fp8(path, tensors, *, block, config=None)``: a safetensors folder (``save_file``) whose config.json
  declares ``quantization_config`` FP8 with ``weight_block_size``; a ``(codes, scales)`` value is stored as
  ``name`` + ``name_scale_inv``.
- ``assert_same_rows(report, expected)``: the same rows (names, every metric value) in both reports.
- ``tiny_qwen3_moe(seed)``: a tiny transformers Qwen3-MoE (``MOE_LAYERS`` layers of ``MOE_EXPERTS`` experts,
  ``MOE_FFN`` wide, hidden ``MOE_HIDDEN``) with fused expert stacks; ``experts_2d(sd)``: each expert of each
  stack as its own 2-D tensor (the per-expert reference).
- ``torchrun(script, *, port=None, nproc=2, timeout=300)``: run a script under torchrun (gloo, CPU; a free port
  by default); on a timeout the whole process group is killed, so no worker outlives the test.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

__all__ = [
    "tiny_hf",
    "write_dcp",
    "to_megatron",
    "to_torchtitan",
    "assert_same_rows",
    "torchrun",
    "HF_KINDS",
    "fp8_quantize",
    "fp8_reference",
    "write_fp8",
]

HF_KINDS = ("llama", "qwen2", "qwen3")


def tiny_hf(
    path: str | Path,
    kind: str = "llama",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    perturb: float = 0.0,
    perturb_seed: int = 1,
    tie: bool = False,
):
    """A tiny transformers model of ``kind`` saved at ``path``: (folder, config dict, state_dict as saved)."""
    import transformers

    common = dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    elif kind == "qwen3":
        cfg = transformers.Qwen3Config(head_dim=16, **common)
        cls = transformers.Qwen3ForCausalLM
    else:
        raise ValueError(kind)
    with torch.random.fork_rng(devices=[]):  # transformers initialises from the global RNG: leave it untouched
        torch.manual_seed(seed)
        model = cls(cfg).to(dtype)
    if perturb:
        g = torch.Generator().manual_seed(perturb_seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_((perturb * torch.randn(p.shape, generator=g)).to(p.dtype))
    path = Path(path)
    model.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if tie:
        sd.pop("lm_head.weight", None)
    return path, config, sd


def write_dcp(path: str | Path, tensors: dict, *, extra: bool = True) -> Path:
    import torch.distributed.checkpoint as dcp

    state = dict(tensors)
    if extra:
        some = next(iter(tensors))
        state["optimizer"] = {
            "state": {some: {"exp_avg": torch.zeros_like(tensors[some]), "step": 3}},
            "param_groups": [{"lr": 1e-5}],
        }
        state["decoder.layers.self_attention.linear_qkv._extra_state"] = {"fp8_meta": None}
        state["train_state"] = {"step": 7}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(path), no_dist=True)
    return Path(path)


def _qkv_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    """Megatron's fused QKV: for each query group g, [q heads of g; k of g; v of g] (rows of head_dim each)."""
    hd = k.shape[0] // groups
    per = heads // groups
    parts = []
    for g in range(groups):
        parts += [q[g * per * hd : (g + 1) * per * hd], k[g * hd : (g + 1) * hd], v[g * hd : (g + 1) * hd]]
    return torch.cat(parts, dim=0)


def to_megatron(sd: dict, cfg: dict, *, pad_to: int | None = None, stacked: bool = True) -> dict:
    """HF Llama/Qwen2 weights in Megatron-core's torch_dist layout (TransformerEngine names)."""
    L, heads, groups = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    V = cfg["vocab_size"]
    pad_to = pad_to or V

    def pad(w: torch.Tensor) -> torch.Tensor:
        return torch.cat([w, torch.zeros(pad_to - V, *w.shape[1:], dtype=w.dtype)]) if pad_to > V else w

    out = {
        "embedding.word_embeddings.weight": pad(sd["model.embed_tokens.weight"]),
        "decoder.final_layernorm.weight": sd["model.norm.weight"],
    }
    if "lm_head.weight" in sd:
        out["output_layer.weight"] = pad(sd["lm_head.weight"])
    per_layer: dict[str, list[torch.Tensor]] = {}
    for i in range(L):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        layer = {
            "self_attention.linear_qkv.weight": _qkv_fused(
                sd[a + "q_proj.weight"], sd[a + "k_proj.weight"], sd[a + "v_proj.weight"], heads, groups
            ),
            "self_attention.linear_qkv.layer_norm_weight": sd[p + "input_layernorm.weight"],
            "self_attention.linear_proj.weight": sd[a + "o_proj.weight"],
            "mlp.linear_fc1.weight": torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]]),
            "mlp.linear_fc1.layer_norm_weight": sd[p + "post_attention_layernorm.weight"],
            "mlp.linear_fc2.weight": sd[p + "mlp.down_proj.weight"],
        }
        if a + "q_norm.weight" in sd:
            layer["self_attention.q_layernorm.weight"] = sd[a + "q_norm.weight"]
            layer["self_attention.k_layernorm.weight"] = sd[a + "k_norm.weight"]
        if a + "q_proj.bias" in sd:
            layer["self_attention.linear_qkv.bias"] = _qkv_fused(
                sd[a + "q_proj.bias"], sd[a + "k_proj.bias"], sd[a + "v_proj.bias"], heads, groups
            )
        for rest, t in layer.items():
            if stacked:
                per_layer.setdefault(rest, []).append(t)
            else:
                out[f"decoder.layers.{i}.{rest}"] = t
    for rest, ts in per_layer.items():
        out[f"decoder.layers.{rest}"] = torch.stack(ts)
    return {k: v.contiguous() for k, v in out.items()}


def to_torchtitan(sd: dict, cfg: dict) -> dict:
    """HF Llama weights in torchtitan's names; wq/wk rows back in Meta's interleaved rotary layout."""
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    permute = cfg["model_type"] == "llama"

    def meta_layout(w: torch.Tensor, n: int) -> torch.Tensor:  # torchtitan's from_hf (_reverse_permute)
        out, cols = w.shape
        return w.view(n, 2, out // n // 2, cols).transpose(1, 2).reshape(out, cols) if permute else w

    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"]}
    if "lm_head.weight" in sd:
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(cfg["num_hidden_layers"]):
        p, t = f"model.layers.{i}.", f"layers.{i}."
        out[t + "attention.wq.weight"] = meta_layout(sd[p + "self_attn.q_proj.weight"], heads)
        out[t + "attention.wk.weight"] = meta_layout(sd[p + "self_attn.k_proj.weight"], kv)
        out[t + "attention.wv.weight"] = sd[p + "self_attn.v_proj.weight"]
        out[t + "attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[t + "feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        out[t + "feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        out[t + "feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        if p + "self_attn.q_norm.weight" in sd:
            out[t + "attention.q_norm.weight"] = sd[p + "self_attn.q_norm.weight"]
            out[t + "attention.k_norm.weight"] = sd[p + "self_attn.k_norm.weight"]
        out[t + "attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[t + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def fp8_quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    import math

    b0, b1 = block
    rows, cols = math.ceil(w.shape[0] / b0), math.ceil(w.shape[1] / b1)
    scales = torch.empty(rows, cols)
    codes = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    for i in range(rows):
        for j in range(cols):
            blk = w[i * b0 : (i + 1) * b0, j * b1 : (j + 1) * b1]
            s = blk.abs().max().clamp_min(1e-12) / 448
            scales[i, j] = s
            codes[i * b0 : (i + 1) * b0, j * b1 : (j + 1) * b1] = (blk / s).to(torch.float8_e4m3fn)
    return codes, scales


def fp8_reference(codes: torch.Tensor, scales: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    out = torch.empty(codes.shape, dtype=torch.float64)
    b0, b1 = block
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            out[i * b0 : (i + 1) * b0, j * b1 : (j + 1) * b1] = (
                codes[i * b0 : (i + 1) * b0, j * b1 : (j + 1) * b1].double() * scales[i, j].double()
            )
    return out


def write_fp8(path: str | Path, tensors: dict, *, block: tuple[int, int], config: dict | None = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True)
    flat = {}
    for name, value in tensors.items():
        if isinstance(value, tuple):
            flat[name], flat[name + "_scale_inv"] = value
        else:
            flat[name] = value
    save_file({k: v.contiguous() for k, v in flat.items()}, str(path / "model.safetensors"))
    cfg = (
        config
        if config is not None
        else {
            "model_type": "qwen3",
            "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(block)},
        }
    )
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def assert_same_rows(report, expected, *, rel: float = 1e-6) -> None:
    import math

    import pytest

    assert [r["name"] for r in report.rows] == [r["name"] for r in expected.rows]
    for got, want in zip(report.rows, expected.rows):
        assert set(got) == set(want), got["name"]
        for key, val in want.items():
            if isinstance(val, float) and math.isnan(val):
                assert math.isnan(got[key]), (want["name"], key)
            elif isinstance(val, float):
                assert got[key] == pytest.approx(val, rel=rel, abs=1e-9), (want["name"], key)
            else:
                assert got[key] == val, (want["name"], key)


def torchrun(script: Path, *, port: int | None = None, nproc: int = 2, timeout: float = 300) -> None:
    import os
    import signal
    import socket
    import subprocess
    import sys

    if port is None:  # a port the OS says is free now: suites running side by side do not collide
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(nproc),
            "--master-port",
            str(port),
            str(script),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"{script} did not finish within {timeout} s under torchrun") from None
    assert proc.returncode == 0, err[-4000:]


#: the tiny Qwen3-MoE of the MoE tests: layers, experts per layer, expert FFN width, hidden size
MOE_LAYERS, MOE_EXPERTS, MOE_FFN, MOE_HIDDEN = 2, 3, 8, 16


def tiny_qwen3_moe(seed: int):
    """A tiny transformers Qwen3-MoE (fused expert stacks in memory), bf16, initialised from ``seed``."""
    import transformers

    cfg = transformers.Qwen3MoeConfig(
        vocab_size=40,
        hidden_size=MOE_HIDDEN,
        intermediate_size=24,
        moe_intermediate_size=MOE_FFN,
        num_hidden_layers=MOE_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        num_experts=MOE_EXPERTS,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=32,
    )
    with torch.random.fork_rng(devices=[]):  # transformers initialises from the global RNG: leave it untouched
        torch.manual_seed(seed)
        return transformers.Qwen3MoeForCausalLM(cfg).to(torch.bfloat16)


def experts_2d(sd: dict) -> dict:
    """Each expert of each stack as its own 2-D tensor (the per-expert reference)."""
    return {f"{k}.{j}": v[j] for k, v in sd.items() if ".experts." in k for j in range(v.shape[0])}
