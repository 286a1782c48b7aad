"""Megatron-core and torchtitan checkpoints under HF names: exact tensors, compare rows equal to the HF twin's."""

from __future__ import annotations

import pytest
import torch
from native_factories import assert_same_rows, tiny_hf, to_megatron, to_torchtitan, write_dcp

import weightgeo
from weightgeo import WeightgeoError
from weightgeo.checkpoint import MappedCheckpoint, open_checkpoint

OPTS = dict(k=4, rank=2, progress=False)


def _hf_pair(tmp_path, kind, tie=False):
    base_dir, cfg, base = tiny_hf(tmp_path / "hf_base", kind, tie=tie)
    ft_dir, _, ft = tiny_hf(tmp_path / "hf_ft", kind, perturb=3e-3, tie=tie)
    return base_dir, ft_dir, cfg, base, ft


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("stacked", [True, False])
def test_megatron_layout_reads_as_the_hf_tensors(tmp_path, kind, stacked):
    hf_dir, cfg, sd = tiny_hf(tmp_path / "hf", kind)
    d = write_dcp(tmp_path / "iter_0000010", to_megatron(sd, cfg, pad_to=128, stacked=stacked))
    ck = open_checkpoint(d, config=hf_dir)
    assert isinstance(ck, MappedCheckpoint) and ck.scheme == "Megatron"
    assert ck.names() == sorted(sd)
    for name, t in sd.items():
        got = ck.get(name)
        assert got.dtype == t.dtype and torch.equal(got, t), name
    emb = sd["model.embed_tokens.weight"]
    assert torch.equal(ck.get_rows("model.embed_tokens.weight", 90, 200), emb[90:])  # padding rows never appear
    assert torch.equal(
        ck.get_rows("model.layers.1.mlp.up_proj.weight", 3, 7), sd["model.layers.1.mlp.up_proj.weight"][3:7]
    )
    assert torch.equal(
        ck.get_rows("model.layers.0.self_attn.k_proj.weight", 2, 5), sd["model.layers.0.self_attn.k_proj.weight"][2:5]
    )
    assert "interleaved" in ck.origin("model.layers.1.self_attn.q_proj.weight").note
    assert any("_extra_state" in s["name"] for s in ck.skipped)


def test_hf_base_vs_megatron_fine_tune_gives_the_hf_rows(tmp_path):
    base_dir, ft_dir, cfg, base, ft = _hf_pair(tmp_path, "qwen2")
    native = write_dcp(tmp_path / "iter_0000020", to_megatron(ft, cfg, pad_to=128))
    # the architecture numbers come from the HF base of the pair
    assert_same_rows(weightgeo.compare(base_dir, native, **OPTS), weightgeo.compare(base_dir, ft_dir, **OPTS))
    # two native checkpoints pair with each other
    native_base = write_dcp(tmp_path / "iter_0000000", to_megatron(base, cfg, pad_to=128, stacked=False))
    report = weightgeo.compare(open_checkpoint(native_base, config=cfg), native, **OPTS)
    assert_same_rows(report, weightgeo.compare(base_dir, ft_dir, **OPTS))


def test_tied_megatron_checkpoint_ties_lm_head(tmp_path):
    base_dir, ft_dir, cfg, base, ft = _hf_pair(tmp_path, "llama", tie=True)
    native = write_dcp(tmp_path / "iter_1", to_megatron(ft, cfg, pad_to=100))
    r = weightgeo.compare(base_dir, native, **OPTS)
    assert r.meta["tied"] == ["lm_head.weight"]
    assert_same_rows(r, weightgeo.compare(base_dir, ft_dir, **OPTS))


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_torchtitan_layout_reads_as_the_hf_tensors(tmp_path, kind):
    base_dir, ft_dir, cfg, base, ft = _hf_pair(tmp_path, kind)
    d = write_dcp(tmp_path / "step-10", to_torchtitan(ft, cfg))
    ck = open_checkpoint(d, config=cfg)
    assert ck.scheme == "torchtitan" and ck.names() == sorted(ft)
    for name, t in ft.items():
        assert torch.equal(ck.get(name), t), name
    permuted = ck.origin("model.layers.0.self_attn.q_proj.weight").transform is not None
    assert permuted == (kind == "llama")  # torchtitan's Llama uses Meta's rotary layout, its Qwen3 HF's
    assert_same_rows(weightgeo.compare(base_dir, d, **OPTS), weightgeo.compare(base_dir, ft_dir, **OPTS))


def test_missing_architecture_numbers_name_the_keyword(tmp_path):
    _, cfg, sd = tiny_hf(tmp_path / "hf", "llama")
    d = write_dcp(tmp_path / "iter_0000005", to_megatron(sd, cfg, pad_to=128))
    with pytest.raises(WeightgeoError, match="needs the model's vocab_size") as e:
        open_checkpoint(d)
    assert "config=" in str(e.value) and str(d) in str(e.value)
    with pytest.raises(WeightgeoError, match="num_attention_heads.*config="):
        open_checkpoint(d, config={"vocab_size": cfg["vocab_size"]})
    t = write_dcp(tmp_path / "step-1", to_torchtitan(sd, cfg))
    with pytest.raises(WeightgeoError, match="model_type None.*config="):
        open_checkpoint(t)


def test_vocabulary_and_heads_inconsistent_with_the_config(tmp_path):
    hf_dir, cfg, sd = tiny_hf(tmp_path / "hf", "llama")
    d = write_dcp(tmp_path / "iter_0000005", to_megatron(sd, cfg, pad_to=128))
    with pytest.raises(WeightgeoError, match="128 rows but the config says vocab_size=130"):
        open_checkpoint(d, config={**cfg, "vocab_size": 130})
    with pytest.raises(WeightgeoError, match="padded_vocab_size=256"):
        open_checkpoint(d, config={**cfg, "padded_vocab_size": 256})
    with pytest.raises(WeightgeoError, match="num_key_value_heads=4"):
        open_checkpoint(d, config={**cfg, "num_key_value_heads": 4})
    with pytest.raises(WeightgeoError, match="num_hidden_layers=3"):
        open_checkpoint(d, config={**cfg, "num_hidden_layers": 3})


def test_megatron_run_folder_and_other_backends(tmp_path):
    run = tmp_path / "run"
    (run / "iter_0000010").mkdir(parents=True)
    (run / "iter_0000020").mkdir()
    (run / "latest_checkpointed_iteration.txt").write_text("20")
    with pytest.raises(WeightgeoError, match="training run folder.*latest_checkpointed_iteration.txt: '20'") as e:
        open_checkpoint(run)
    assert "iter_0000020" in str(e.value)
    zarr = tmp_path / "iter_0000001"
    zarr.mkdir()
    (zarr / "metadata.json").write_text('{"sharded_backend": "zarr"}')
    with pytest.raises(WeightgeoError, match="sharded_backend 'zarr'.*torch_dist"):
        open_checkpoint(zarr)


def test_stacked_experts_map_to_per_expert_hf_names(tmp_path, gen):
    L, E, F, H, V = 2, 3, 4, 8, 10
    hf = {
        f"model.layers.{i}.mlp.experts.{j}.{p}.weight": torch.randn(shape, generator=gen)
        for i in range(L)
        for j in range(E)
        for p, shape in (("gate_proj", (F, H)), ("up_proj", (F, H)), ("down_proj", (H, F)))
    }
    hf.update({f"model.layers.{i}.mlp.gate.weight": torch.randn(E, H, generator=gen) for i in range(L)})
    hf["model.embed_tokens.weight"] = torch.randn(V, H, generator=gen)

    def stack(fn):
        return torch.stack([torch.stack([fn(i, j) for j in range(E)]) for i in range(L)])

    fc1 = stack(
        lambda i, j: torch.cat(
            [
                hf[f"model.layers.{i}.mlp.experts.{j}.gate_proj.weight"],
                hf[f"model.layers.{i}.mlp.experts.{j}.up_proj.weight"],
            ]
        )
    )
    megatron = {
        "embedding.word_embeddings.weight": torch.cat([hf["model.embed_tokens.weight"], torch.zeros(6, H)]),
        "decoder.layers.mlp.experts.experts.linear_fc1.weight": fc1,  # SequentialMLP / TEGroupedMLP: [L, E, 2F, H]
        "decoder.layers.mlp.router.weight": torch.stack([hf[f"model.layers.{i}.mlp.gate.weight"] for i in range(L)]),
    }
    for j in range(E):  # singleton_local_shards spelling: one key per expert, stacked over layers only
        megatron[f"decoder.layers.mlp.experts.linear_fc2.weight{j}"] = torch.stack(
            [hf[f"model.layers.{i}.mlp.experts.{j}.down_proj.weight"] for i in range(L)]
        )
    cfg = {"model_type": "qwen3_moe", "vocab_size": V, "num_hidden_layers": L, "moe_intermediate_size": F}
    ck = open_checkpoint(write_dcp(tmp_path / "iter_0000003", megatron, extra=False), config=cfg)
    assert ck.names() == sorted(hf)
    for name, t in hf.items():
        assert torch.equal(ck.get(name), t), name

    titan = {"tok_embeddings.weight": hf["model.embed_tokens.weight"]}
    for i in range(L):
        for w, p in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            titan[f"layers.{i}.moe.experts.{w}"] = torch.stack(
                [hf[f"model.layers.{i}.mlp.experts.{j}.{p}.weight"] for j in range(E)]
            )
        titan[f"layers.{i}.moe.router.gate.weight"] = hf[f"model.layers.{i}.mlp.gate.weight"]
    ck = open_checkpoint(write_dcp(tmp_path / "step-3", titan, extra=False), config=cfg)
    assert ck.names() == sorted(hf)
    for name, t in hf.items():
        assert torch.equal(ck.get(name), t), name


def _fake_megatron_enum(monkeypatch):
    """A class living in a megatron.* module, as Megatron pickles into common.pt (megatron is not installed)."""
    import sys
    import types

    names = ["megatron", "megatron.core", "megatron.core.enums"]
    for n in names:
        monkeypatch.setitem(sys.modules, n, types.ModuleType(n))

    class ModelType:
        def __init__(self, value):
            self.value = value

        def __reduce__(self):
            return (ModelType, (self.value,))

    ModelType.__module__, ModelType.__qualname__ = "megatron.core.enums", "ModelType"
    sys.modules["megatron.core.enums"].ModelType = ModelType
    return ModelType, names


def test_megatron_common_pt_args_supply_the_numbers(tmp_path, monkeypatch):
    import argparse
    import sys

    _, cfg, sd = tiny_hf(tmp_path / "hf", "qwen3")
    d = write_dcp(tmp_path / "iter_0000004", to_megatron(sd, cfg, pad_to=128))
    ModelType, mods = _fake_megatron_enum(monkeypatch)
    args = argparse.Namespace(
        num_attention_heads=4,
        num_query_groups=2,
        group_query_attention=True,
        kv_channels=16,
        num_layers=2,
        hidden_size=32,
        ffn_hidden_size=48,
        vocab_size=97,
        padded_vocab_size=128,
        untie_embeddings_and_output_weights=True,
        model_type=ModelType(1),
    )
    torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 4}, d / "common.pt")
    (d / "metadata.json").write_text('{"sharded_backend": "torch_dist", "sharded_backend_version": 1}')
    for n in reversed(mods):
        monkeypatch.delitem(sys.modules, n)
    ck = open_checkpoint(d)  # no config: Megatron's own args, read without Megatron installed
    assert ck.config["num_key_value_heads"] == 2 and ck.config["head_dim"] == 16
    for name, t in sd.items():
        assert torch.equal(ck.get(name), t), name


def test_unsafe_common_pt_is_not_read_and_says_so(tmp_path):
    import os

    _, cfg, sd = tiny_hf(tmp_path / "hf", "llama")
    d = write_dcp(tmp_path / "iter_0000004", to_megatron(sd, cfg, pad_to=128))
    torch.save({"args": os.system}, d / "common.pt")
    ck = open_checkpoint(d, config=cfg)
    unread = [s for s in ck.skipped if s["name"] == "common.pt"]
    assert len(unread) == 1 and "refused" in unread[0]["reason"] and "posix.system" in unread[0]["reason"]
