"""Checkpoint.identity of the native formats: JSON-able, stable across opens, changed by a rewrite of a file it
names, and distinct for tensors (or views) whose bytes differ."""

from __future__ import annotations

import json
import time

import pytest
import torch
from native_factories import tiny_hf, to_megatron, to_torchtitan, write_dcp
from safetensors.torch import save_file

from weightgeo.checkpoint import DcpCheckpoint, open_checkpoint


def _rewrite(path):
    time.sleep(0.05)  # file times come from a coarse clock: make the rewrite visible
    path.write_bytes(path.read_bytes())


def test_dcp_identity_names_the_chunks_and_their_files(tmp_path, gen):
    d = write_dcp(tmp_path / "step-1", {"a.weight": torch.randn(4, 3, generator=gen), "b.weight": torch.ones(2)})
    ident = DcpCheckpoint(d).identity("a.weight")
    json.dumps(ident)
    assert ident == DcpCheckpoint(d).identity("a.weight")
    assert ident["chunks"][0]["offsets"] == [0, 0] and ident["chunks"][0]["sizes"] == [4, 3]
    assert DcpCheckpoint(d).identity("b.weight") != ident
    _rewrite(next(d.glob("*.distcp")))
    assert DcpCheckpoint(d).identity("a.weight") != ident


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return tiny_hf(tmp_path_factory.mktemp("hf") / "llama", "llama")


def test_mapped_views_add_their_recipe(hf, tmp_path):
    hf_dir, cfg, sd = hf
    meg = open_checkpoint(write_dcp(tmp_path / "iter_1", to_megatron(sd, cfg, pad_to=128)), config=hf_dir)
    q, k = (meg.identity(f"model.layers.0.self_attn.{p}_proj.weight") for p in ("q", "k"))
    json.dumps(q)
    assert q["format"] == "view" and q["scheme"] == "Megatron" and q["transform"]["qkv"] == "q" and q != k
    assert q["stored"] == k["stored"]  # one fused tensor, two recipes
    gate, up = (meg.identity(f"model.layers.1.mlp.{p}_proj.weight") for p in ("gate", "up"))
    assert gate["start"] != up["start"] and gate["transform"] is None  # the halves of linear_fc1 by box
    assert meg.identity("model.embed_tokens.weight")["stop"] == [cfg["vocab_size"]]  # padding rows excluded
    again = open_checkpoint(tmp_path / "iter_1", config=hf_dir)
    assert again.identity("model.layers.0.self_attn.q_proj.weight") == q
    titan = open_checkpoint(write_dcp(tmp_path / "step-1", to_torchtitan(sd, cfg)), config=hf_dir)
    tq = titan.identity("model.layers.0.self_attn.q_proj.weight")
    assert tq["transform"] == {"rotary_to_half": cfg["num_attention_heads"]}
    assert titan.identity("model.layers.0.self_attn.v_proj.weight")["format"] == "dcp"  # offered as stored
    _rewrite(next((tmp_path / "iter_1").glob("*.distcp")))
    assert open_checkpoint(tmp_path / "iter_1", config=hf_dir).identity("model.layers.0.self_attn.q_proj.weight") != q


def test_fp8_identity_holds_codes_scales_and_block(tmp_path, gen):
    d = tmp_path / "fp8"
    d.mkdir()
    save_file(
        {
            "lin.weight": torch.randn(4, 6, generator=gen).to(torch.float8_e4m3fn),
            "lin.weight_scale_inv": torch.ones(2, 2),
            "norm.weight": torch.ones(6),
        },
        str(d / "model.safetensors"),
    )
    (d / "config.json").write_text(
        json.dumps({"quantization_config": {"quant_method": "fp8", "weight_block_size": [2, 3]}})
    )
    ck = open_checkpoint(d)
    ident = ck.identity("lin.weight")
    assert ident["format"] == "fp8" and ident["block"] == [2, 3]
    assert ident["codes"]["tensor"] == "lin.weight" and ident["scales"]["tensor"] == "lin.weight_scale_inv"
    assert ck.identity("norm.weight")["format"] == "safetensors"
    assert open_checkpoint(d).identity("lin.weight") == ident
    _rewrite(d / "model.safetensors")
    assert open_checkpoint(d).identity("lin.weight") != ident


def test_in_memory_sources_are_never_cached(gen):
    assert open_checkpoint({"w": torch.randn(2, 2, generator=gen)}).identity("w") is None
