"""LoRA adapters: merged weights equal base + scaling·B@A (fp32, cast back); factored deltas; scaling rules."""

from __future__ import annotations

import json
import math

import pytest
import torch
from factories import tiny_llama_state, write_hf_checkpoint, write_lora_adapter
from safetensors.torch import load_file, save_file

from weightgeo.checkpoint import FactoredDelta, LoraAdapter, open_checkpoint
from weightgeo.checkpoint.lora import MergedAdapterCheckpoint, pattern_value


def expected(base_w, ad_tensors, module, scaling):
    A = ad_tensors[f"base_model.model.{module}.lora_A.weight"].double()
    B = ad_tensors[f"base_model.model.{module}.lora_B.weight"].double()
    return B @ A * scaling


CASES = {
    # name: (adapter kwargs, module -> expected scaling)
    "plain": (dict(r=4, alpha=8), lambda m: 8 / 4),
    "rslora": (dict(r=4, alpha=8, rslora=True), lambda m: 8 / math.sqrt(4)),
    "rank_pattern": (
        dict(r=4, alpha=8, rank_pattern={"q_proj": 2, r"layers\.1\.self_attn\.v_proj": 3}),
        lambda m: 8 / (2 if m.endswith("q_proj") else 3 if m == "model.layers.1.self_attn.v_proj" else 4),
    ),
    "alpha_pattern": (
        dict(r=4, alpha=8, alpha_pattern={"layers.0.self_attn.v_proj": 2, "q_proj": 16}),
        lambda m: (16 if m.endswith("q_proj") else 2 if m == "model.layers.0.self_attn.v_proj" else 8) / 4,
    ),
    "both_rslora": (
        dict(r=4, alpha=8, rslora=True, rank_pattern={"v_proj": 1}, alpha_pattern={"v_proj": 3}),
        lambda m: 3 / 1 if m.endswith("v_proj") else 8 / 2,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_merged_equals_base_plus_delta(tmp_path, case):
    kwargs, scale = CASES[case]
    sd = tiny_llama_state(num_layers=2)
    base_dir = write_hf_checkpoint(tmp_path / "base", sd)
    ad_dir = write_lora_adapter(tmp_path / "ad", sd, **kwargs)
    ad_t = load_file(str(ad_dir / "adapter_model.safetensors"))
    ckpt = open_checkpoint(ad_dir, base=base_dir)
    assert isinstance(ckpt, MergedAdapterCheckpoint)
    assert ckpt.names() == sorted(sd)
    targeted = [n for n in sd if n.endswith(("q_proj.weight", "v_proj.weight"))]
    assert ckpt.adapted() == sorted(targeted)
    for name, w in sd.items():
        got = ckpt.get(name)
        assert got.dtype == w.dtype
        fd = ckpt.factored_delta(name)
        if name not in targeted:
            assert torch.equal(got, w) and fd is None
            continue
        module = name[: -len(".weight")]
        dw = expected(w, ad_t, module, scale(module))
        assert isinstance(fd, FactoredDelta)
        assert fd.scaling == pytest.approx(scale(module))
        assert fd.B.shape[1] == fd.A.shape[0] == ad_t[f"base_model.model.{module}.lora_A.weight"].shape[0]
        torch.testing.assert_close(fd.dense().double(), dw, rtol=1e-5, atol=1e-7)
        ref = (w.float() + dw.float()).to(w.dtype)
        assert torch.equal(got, ref), name
        assert torch.equal(ckpt.get_rows(name, 3, 9), ref[3:9])


def test_adapter_from_bin_and_base_checkpoint_object(tmp_path):
    sd = tiny_llama_state(num_layers=1, dtype=torch.float32)
    ad = write_lora_adapter(tmp_path / "ad", sd, targets=("o_proj",))
    t = load_file(str(ad / "adapter_model.safetensors"))
    (ad / "adapter_model.safetensors").unlink()
    torch.save(t, ad / "adapter_model.bin")
    base = open_checkpoint(sd)
    ckpt = open_checkpoint(ad / "adapter_config.json", base=base)
    name = "model.layers.0.self_attn.o_proj.weight"
    torch.testing.assert_close(ckpt.get(name), sd[name] + ckpt.factored_delta(name).dense())


def test_embedding_and_fan_in_fan_out_transposed(tmp_path, gen):
    base = {
        "model.embed_tokens.weight": torch.randn(10, 6, generator=gen),
        "transformer.h.0.attn.c_attn.weight": torch.randn(6, 18, generator=gen),
    }  # Conv1D: [in, out]
    A_e, B_e = torch.randn(2, 10, generator=gen), torch.randn(6, 2, generator=gen)
    A_c, B_c = torch.randn(2, 6, generator=gen), torch.randn(18, 2, generator=gen)
    save_file(
        {
            "base_model.model.model.embed_tokens.lora_embedding_A": A_e,
            "base_model.model.model.embed_tokens.lora_embedding_B": B_e,
            "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": A_c,
            "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight": B_c,
        },
        str(tmp_path / "adapter_model.safetensors"),
    )
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2, "fan_in_fan_out": True})
    )
    ckpt = open_checkpoint(tmp_path, base=base)
    torch.testing.assert_close(ckpt.get("model.embed_tokens.weight"), base["model.embed_tokens.weight"] + (B_e @ A_e).T)
    torch.testing.assert_close(
        ckpt.get("transformer.h.0.attn.c_attn.weight"), base["transformer.h.0.attn.c_attn.weight"] + (B_c @ A_c).T
    )
    fd = ckpt.factored_delta("model.embed_tokens.weight")
    assert fd.B.shape == (10, 2) and fd.A.shape == (2, 6)


def test_pattern_value_matches_peft_rule():
    pats = {"q_proj": 1, r"layers\.[0-1]\.mlp\.up_proj": 2, "self_attn.k_proj": 3}
    assert pattern_value(pats, "model.layers.0.self_attn.q_proj", 9) == 1
    assert pattern_value(pats, "model.layers.1.mlp.up_proj", 9) == 2
    assert pattern_value(pats, "model.layers.2.mlp.up_proj", 9) == 9
    assert pattern_value(pats, "model.layers.0.self_attn.k_proj", 9) == 3
    assert pattern_value(pats, "model.layers.0.self_attn.xq_proj", 9) == 9  # suffix only at a '.' boundary
    assert pattern_value({"q_proj": 1, "self_attn.q_proj": 2}, "a.self_attn.q_proj", 9) == 1  # first key wins


def test_modules_to_save_replace_base(tmp_path, gen):
    sd = tiny_llama_state(num_layers=1)
    ad = write_lora_adapter(tmp_path / "ad", sd)
    t = load_file(str(ad / "adapter_model.safetensors"))
    new_head = torch.randn(40, 16, generator=gen)
    t["base_model.model.lm_head.weight"] = new_head
    save_file(t, str(ad / "adapter_model.safetensors"))
    ckpt = open_checkpoint(ad, base=sd)
    assert torch.equal(ckpt.get("lm_head.weight"), new_head.bfloat16())
    assert ckpt.factored_delta("lm_head.weight") is None


def test_adapter_repr_and_modules(tmp_path):
    sd = tiny_llama_state(num_layers=2)
    ad = LoraAdapter(write_lora_adapter(tmp_path, sd, r=2, alpha=4))
    assert set(ad.modules) == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    assert "modules=4" in repr(ad)
