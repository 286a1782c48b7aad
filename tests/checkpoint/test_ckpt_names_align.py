"""Names, presets and alignment (prefixes, tied lm_head)."""

from __future__ import annotations

import pytest
import torch
from factories import tiny_llama_state, write_hf_checkpoint

from weightgeo.checkpoint import align, canonical_name, compile_filter, layer_index, module_type, open_checkpoint
from weightgeo.errors import WeightgeoError


@pytest.mark.parametrize(
    "name",
    [
        "model.layers.0.self_attn.q_proj.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.weight",
        "layers.0.self_attn.q_proj.weight",
        "module._orig_mod.model.layers.0.self_attn.q_proj.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight",
    ],
)
def test_canonical_prefixes(name):
    assert canonical_name(name) == "layers.0.self_attn.q_proj.weight"


def test_canonical_keeps_meaningful_names():
    assert canonical_name("model.weight") == "model.weight"
    assert canonical_name("transformer.h.0.attn.c_attn.weight") == "transformer.h.0.attn.c_attn.weight"


@pytest.mark.parametrize(
    "name,mt,li",
    [
        ("model.layers.3.self_attn.q_proj.weight", "q_proj", 3),
        ("model.layers.3.self_attn.q_proj.bias", "q_proj", 3),
        ("model.embed_tokens.weight", "embed_tokens", None),
        ("lm_head.weight", "lm_head", None),
        ("model.layers.11.input_layernorm.weight", "input_layernorm", 11),
        ("transformer.h.7.mlp.c_fc.weight", "c_fc", 7),
        ("encoder.block.2.layer.1.DenseReluDense.wi.weight", "wi", 2),
        ("model.layers.1.block_sparse_moe.experts.5.w1.weight", "w1", 1),
        ("vision.blocks.4.attn.qkv.weight", "qkv", 4),
        ("stages.3.conv.weight", "conv", 3),
        ("model.rotary_emb.inv_freq", "inv_freq", None),
    ],
)
def test_module_type_and_layer_index(name, mt, li):
    assert module_type(name) == mt
    assert layer_index(name) == li


ATTN = [
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.o_proj.weight",
    "transformer.h.0.attn.c_attn.weight",
    "transformer.h.0.attn.c_proj.weight",
    "gpt_neox.layers.0.attention.query_key_value.weight",
    "gpt_neox.layers.0.attention.dense.weight",
    "transformer.h.0.self_attention.dense.weight",
    "transformer.blocks.0.attn.Wqkv.weight",
    "model.layers.0.self_attn.qkv_proj.weight",
    "model.decoder.layers.0.self_attn.out_proj.weight",
]
MLP = [
    "model.layers.0.mlp.gate_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
    "transformer.h.0.mlp.c_fc.weight",
    "transformer.h.0.mlp.c_proj.weight",
    "model.decoder.layers.0.fc1.weight",
    "gpt_neox.layers.0.mlp.dense_h_to_4h.weight",
    "gpt_neox.layers.0.mlp.dense_4h_to_h.weight",
    "model.layers.0.block_sparse_moe.experts.0.w3.weight",
]
OTHER = [
    "model.embed_tokens.weight",
    "lm_head.weight",
    "model.norm.weight",
    "transformer.wte.weight",
    "gpt_neox.embed_out.weight",
]


def test_presets():
    att, mlp, lin = compile_filter("attention"), compile_filter("mlp"), compile_filter("linear")
    for n in ATTN:
        assert att(n, (8, 8)) and not mlp(n, (8, 8)) and lin(n, (8, 8)), n
    for n in MLP:
        assert mlp(n, (8, 8)) and not att(n, (8, 8)) and lin(n, (8, 8)), n
    for n in OTHER:
        assert not att(n, (8, 8)) and not mlp(n, (8, 8)), n
    for n in OTHER[:2] + OTHER[3:]:
        assert not lin(n, (8, 8)), n
    assert not att("model.layers.0.self_attn.q_proj.bias", (8,))
    assert not att("model.layers.0.self_attn.q_proj.weight", (8,))  # presets are 2-D only
    assert not lin("model.norm.weight", (8,)) and not lin("model.norm.weight")
    assert lin("model.layers.0.mlp.up_proj.weight")


def test_include_exclude_regex_and_lists():
    f = compile_filter(["attention", r"mlp\.up"], exclude=[r"\.0\.", "k_proj"])
    assert f("model.layers.1.self_attn.q_proj.weight", (4, 4))
    assert f("model.layers.1.mlp.up_proj.weight", (4, 4))
    assert not f("model.layers.0.self_attn.q_proj.weight", (4, 4))
    assert not f("model.layers.1.self_attn.k_proj.weight", (4, 4))
    assert not f("model.layers.1.mlp.down_proj.weight", (4, 4))
    everything = compile_filter()
    assert everything("anything", (1,))
    # regexes see the canonical name: '^layers' matches with or without the model. prefix
    assert compile_filter(r"^layers\.1\.")("model.layers.1.mlp.up_proj.weight")


@pytest.mark.parametrize("bad", ["(unclosed", ["ok", "[bad"], 3, [None]])
def test_invalid_filter(bad):
    with pytest.raises(WeightgeoError):
        compile_filter(bad)
    with pytest.raises(WeightgeoError):
        compile_filter(None, exclude=bad)


def test_align_prefixes_and_only(tmp_path):
    sd = tiny_llama_state(num_layers=2)
    base = open_checkpoint(sd)
    ft_sd = {"base_model.model." + k: v for k, v in sd.items() if "layers.1.mlp" not in k}
    ft_sd["base_model.model.model.extra.weight"] = torch.zeros(2)
    a = align(base, open_checkpoint(ft_sd))
    assert [p.key for p in a.pairs] == sorted(
        (canonical_name(k) for k in sd if "layers.1.mlp" not in k),
        key=lambda k: [int(t) if t.isdigit() else t for t in __import__("re").split(r"(\d+)", k)],
    )
    p = next(p for p in a.pairs if p.key == "layers.0.self_attn.q_proj.weight")
    assert p.base_name == "model.layers.0.self_attn.q_proj.weight"
    assert p.ft_name == "base_model.model.model.layers.0.self_attn.q_proj.weight"
    assert a.only_base == sorted(k for k in sd if "layers.1.mlp" in k)
    assert a.only_ft == ["base_model.model.model.extra.weight"]
    assert a.tied == []


def test_align_natural_order():
    sd = {f"model.layers.{i}.w.weight": torch.zeros(1) for i in (10, 2, 1)}
    a = align(open_checkpoint(sd), open_checkpoint(sd))
    assert [p.key for p in a.pairs] == ["layers.1.w.weight", "layers.2.w.weight", "layers.10.w.weight"]


@pytest.mark.parametrize("tie,expect_tied", [(None, True), (True, True), (False, False)])
def test_align_tied_lm_head(tmp_path, tie, expect_tied):
    sd = tiny_llama_state(num_layers=1)
    no_head = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    cfg = {} if tie is None else {"tie_word_embeddings": tie}
    base = open_checkpoint(write_hf_checkpoint(tmp_path / "b", no_head, config=cfg))
    ft = open_checkpoint(sd)
    a = align(base, ft)
    assert a.tied == (["lm_head.weight"] if expect_tied else [])
    assert a.only_ft == ([] if expect_tied else ["lm_head.weight"])
    both = align(base, base)
    assert both.tied == (["lm_head.weight"] if expect_tied else []) and not both.only_ft and not both.only_base


def test_align_collision():
    ck = open_checkpoint({"model.norm.weight": torch.zeros(1), "norm.weight": torch.zeros(1)})
    with pytest.raises(WeightgeoError, match="'model.norm.weight' and 'norm.weight'"):
        align(ck, ck)
