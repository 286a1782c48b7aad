"""MoE experts as batches in compare: an [E, out, in] expert stack gets one row per expert, equal to the 2-D
results of its experts; fused (transformers' in-memory Qwen3-MoE layout, as a state dict or safetensors file) and
Megatron stacked-expert layouts; other >=3-D tensors listed as skipped; the experts / router presets. (Expert
stacks in streams and the Tracker: tests/trajectory/test_traj_moe.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from native_factories import (
    MOE_EXPERTS,
    MOE_FFN,
    MOE_HIDDEN,
    MOE_LAYERS,
    assert_same_rows,
    experts_2d,
    tiny_qwen3_moe,
    write_dcp,
)
from safetensors.torch import load_file, save_file

import weightgeo
from weightgeo import WeightgeoError
from weightgeo.checkpoint import StateDictCheckpoint, compile_filter, open_checkpoint

L, E, F, H = MOE_LAYERS, MOE_EXPERTS, MOE_FFN, MOE_HIDDEN
STACK = "layers.{i}.mlp.experts.{p}"


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """A tiny Qwen3-MoE (fused experts in memory) and a fine-tune: a bf16 nudge to a random 30% of entries, so
    update_sparsity is neither 0 nor 1; both also saved by save_pretrained (per-expert names on disk)."""
    tmp = tmp_path_factory.mktemp("moe")
    base = tiny_qwen3_moe(0)
    ft = tiny_qwen3_moe(0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ft.parameters():
            mask = torch.rand(p.shape, generator=g) < 0.3
            p.add_((0.02 * torch.randn(p.shape, generator=g) * mask).to(p.dtype))
    base.save_pretrained(tmp / "base")
    ft.save_pretrained(tmp / "ft")
    sd0 = {k: v.detach().clone() for k, v in base.state_dict().items()}
    sd1 = {k: v.detach().clone() for k, v in ft.state_dict().items()}
    assert tuple(sd0["model.layers.0.mlp.experts.gate_up_proj"].shape) == (E, 2 * F, H)  # the fused layout
    return tmp, sd0, sd1


@pytest.mark.parametrize(
    "metrics,batch_bytes,row_block", [(None, None, None), (None, 0, None), (["update_sparsity"], None, 100)]
)
def test_expert_rows_equal_the_per_expert_2d_results(moe, metrics, batch_bytes, row_block, monkeypatch):
    _, sd0, sd1 = moe
    if row_block is not None:  # the row-chunk stream, in chunks of a few rows of one expert
        monkeypatch.setattr("weightgeo.linalg.policy.ROW_BLOCK", row_block)
    kw = dict(metrics=metrics, k=4, rank=4, progress=False, batch_bytes=batch_bytes)
    r = weightgeo.compare(sd0, sd1, **kw)
    want = weightgeo.compare(experts_2d(sd0), experts_2d(sd1), **kw)
    by_name = {w["name"]: w for w in want.rows}
    experts = [row for row in r.rows if "expert" in row]
    assert len(experts) == L * 2 * E and not r.meta["skipped"]
    for row in experts:
        ref = by_name[f"{row['name']}.{row['expert']}"]
        assert row["shape"] == ref["shape"] and row["numel"] == ref["numel"]
        for key, val in ref.items():
            if key not in ("name", "module", "layer", "shape", "numel", "stored_dtype"):
                assert row[key] == pytest.approx(val, rel=1e-6, abs=1e-9), (row["name"], row["expert"], key)
        assert row["module"] in ("gate_up_proj", "down_proj") and row["layer"] in range(L)
    name = STACK.format(i=1, p="down_proj")
    assert sorted(r[name]) == list(range(E))  # a stack's rows by expert
    summary = r.summary["experts"][name]
    rows = [r[name][j] for j in range(E)]
    assert summary["n_tensors"] == E
    assert summary["update_sparsity"] == pytest.approx(sum(x["update_sparsity"] for x in rows) / E)
    assert 0.5 < summary["update_sparsity"] < 0.9


def test_fused_stacks_on_disk_match_the_per_expert_hf_save(moe, tmp_path):
    """The fused state dict saved as one safetensors file (as a trainer's state_dict() save holds it) against
    save_pretrained's per-expert folders: down_proj is the same matrix under both spellings."""
    tmp, sd0, sd1 = moe
    for name, sd in (("b", sd0), ("f", sd1)):
        (tmp_path / name).mkdir()
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / name / "model.safetensors"))
    fused = weightgeo.compare(tmp_path / "b", tmp_path / "f", include="experts", k=4, rank=4, progress=False)
    split = weightgeo.compare(tmp / "base", tmp / "ft", include=r"experts\.\d+\.down_proj", k=4, rank=4, progress=False)
    assert len(split.rows) == L * E
    for row in split.rows:
        assert row["module"] == "down_proj" and row["expert"] is not None  # per-expert names get the field too
        got = fused[STACK.format(i=row["layer"], p="down_proj")][row["expert"]]
        for key in (
            "update_sparsity",
            "principal_overlap",
            "spectral_drift",
            "stable_rank",
            "density",
            "principal_mask_overlap",
            "low_magnitude_overlap",
        ):
            assert got[key] == pytest.approx(row[key], rel=1e-6, abs=1e-9), (row["name"], key)
    assert set(split.summary["experts"]) == {f"layers.{i}.mlp.experts.down_proj.weight" for i in range(L)}


def test_megatron_stacked_experts_pair_with_the_hf_base(moe, tmp_path):
    """Megatron's [L, E, 2F, H] linear_fc1 ([gate; up] per expert) and per-expert linear_fc2 keys, written by
    torch.distributed.checkpoint.save from the fine-tune's HF weights: the rows equal the HF pair's."""
    tmp, _, _ = moe
    hf = load_file(str(tmp / "ft" / "model.safetensors"))
    cfg = json.loads((tmp / "ft" / "config.json").read_text())

    def stack(fn):
        return torch.stack([torch.stack([fn(i, j) for j in range(E)]) for i in range(L)])

    w = "model.layers.{i}.mlp.experts.{j}.{p}.weight"
    megatron = {
        "embedding.word_embeddings.weight": torch.cat(
            [hf["model.embed_tokens.weight"], torch.zeros(8, H, dtype=torch.bfloat16)]
        ),
        "decoder.layers.mlp.experts.experts.linear_fc1.weight": stack(
            lambda i, j: torch.cat([hf[w.format(i=i, j=j, p="gate_proj")], hf[w.format(i=i, j=j, p="up_proj")]])
        ),
        "decoder.layers.mlp.router.weight": torch.stack([hf[f"model.layers.{i}.mlp.gate.weight"] for i in range(L)]),
    }
    for j in range(E):
        megatron[f"decoder.layers.mlp.experts.linear_fc2.weight{j}"] = torch.stack(
            [hf[w.format(i=i, j=j, p="down_proj")] for i in range(L)]
        )
    meg = open_checkpoint(write_dcp(tmp_path / "iter_0000005", megatron, extra=False), config=cfg)
    kw = dict(include=["experts", "router"], k=4, rank=4, progress=False)
    got = weightgeo.compare(tmp / "base", meg, **kw)
    want = weightgeo.compare(tmp / "base", tmp / "ft", **kw)
    assert_same_rows(got, want)
    assert len([r for r in got.rows if "expert" in r]) == L * E * 3 and len(got.rows) == L * E * 3 + L
    assert got.summary["experts"].keys() == want.summary["experts"].keys()


def test_other_3d_tensors_are_listed_as_skipped_with_the_reason(gen):
    b = {
        "conv.weight": torch.randn(4, 3, 5, generator=gen),
        "blocks.0.attn.bias4d": torch.randn(2, 2, 2, 2, generator=gen),
        "layers.0.mlp.experts.down_proj": torch.randn(2, 6, 4, generator=gen),
    }
    f = {k: v * 1.01 for k, v in b.items()}
    r = weightgeo.compare(b, f, k=2, rank=2, progress=False)
    skipped = {s["name"]: s["reason"] for s in r.meta["skipped"]}
    assert set(skipped) == {"conv.weight", "blocks.0.attn.bias4d"}
    assert "3-D tensor: SVD metrics need a matrix" in skipped["conv.weight"] and "experts" in skipped["conv.weight"]
    assert "4-D" in skipped["blocks.0.attn.bias4d"]
    assert r["conv.weight"]["update_sparsity"] == 0.0 and "principal_overlap" not in r["conv.weight"]
    only = weightgeo.compare(b, f, metrics="update_sparsity", progress=False)  # nothing it asked for is missing
    assert not only.meta["skipped"] and [row.get("expert") for row in only.rows] == [None, None, 0, 1]


def test_bad_expert_stacks_name_the_tensor_and_expert(gen):
    b = {"layers.0.mlp.experts.gate_up_proj": torch.randn(3, 6, 4, generator=gen)}
    with pytest.raises(WeightgeoError, match=r"layers.0.mlp.experts.gate_up_proj.*\(3, 6, 4\).*\(4, 6, 4\)"):
        weightgeo.compare(b, {"layers.0.mlp.experts.gate_up_proj": torch.randn(4, 6, 4, generator=gen)}, progress=False)
    bad = b["layers.0.mlp.experts.gate_up_proj"].clone()
    bad[2, 1, 1] = float("nan")
    for metrics in (None, "update_sparsity"):
        with pytest.raises(WeightgeoError, match=r"gate_up_proj\[2\].*non-finite"):
            weightgeo.compare(b, {"layers.0.mlp.experts.gate_up_proj": bad}, metrics=metrics, progress=False)


def test_update_mask_of_a_stack_is_its_whole_tensor(gen):
    w0 = torch.randn(3, 6, 4, generator=gen)
    w1 = torch.where(torch.rand(w0.shape, generator=gen) < 0.5, w0 * 1.1, w0)
    with weightgeo.update_mask({"mlp.experts.down_proj": w0}, {"mlp.experts.down_proj": w1}) as m:
        assert torch.equal(m["mlp.experts.down_proj"], w1 != w0)


def test_experts_and_router_presets():
    keep_e, keep_r = compile_filter("experts"), compile_filter("router")
    names = {
        "model.layers.0.mlp.experts.gate_up_proj": (4, 16, 8),  # fused stack
        "model.layers.0.mlp.experts.3.down_proj.weight": (8, 4),  # per-expert
        "model.layers.0.mlp.shared_experts.down_proj.weight": (8, 4),  # dense, always on
        "model.layers.0.mlp.shared_expert_gate.weight": (1, 8),
        "model.layers.0.mlp.gate.weight": (4, 8),
        "model.layers.0.block_sparse_moe.gate.weight": (4, 8),
        "model.layers.0.mlp.router.weight": (4, 8),
        "layers.0.moe.router.gate.weight": (4, 8),
        "model.layers.0.mlp.gate_proj.weight": (4, 8),
        "model.layers.0.mlp.experts.gate_up_proj_bias": (4, 16),
    }
    assert [n for n, s in names.items() if keep_e(n, s)] == list(names)[:2]
    assert [n for n, s in names.items() if keep_r(n, s)] == list(names)[3:8]
    assert compile_filter("mlp")("model.layers.0.mlp.experts.gate_up_proj", (4, 16, 8))
    assert compile_filter("linear")("model.layers.0.mlp.experts.gate_up_proj", (4, 16, 8))
    assert not compile_filter("linear")("conv.weight", (4, 16, 8))


def test_gpt_oss_stacks_are_marked_in_out_per_expert(gen):
    """gpt-oss applies x @ W[e]: its stacks are [E, in, out], so each expert's row says layout in_out (as Conv1D)."""
    sd = {
        "model.layers.0.mlp.experts.gate_up_proj": torch.randn(2, 8, 12, generator=gen),
        "model.layers.0.mlp.experts.gate_up_proj_bias": torch.randn(2, 12, generator=gen),
    }
    b = StateDictCheckpoint(sd, config={"model_type": "gpt_oss"})
    f = StateDictCheckpoint({k: v * 1.01 for k, v in sd.items()}, config={"model_type": "gpt_oss"})
    r = weightgeo.compare(b, f, k=2, rank=2, progress=False)
    rows = r["layers.0.mlp.experts.gate_up_proj"]
    assert [rows[j]["layout"] for j in (0, 1)] == ["in_out", "in_out"] and rows[0]["shape"] == (8, 12)
    assert "layout" not in r["layers.0.mlp.experts.gate_up_proj_bias"]
    assert "stored [in, out]" in r.summary_text()
