"""Block-scaled FP8 weights: dequantisation against a float64 reference, the FP8 update rule, refused formats."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from native_factories import fp8_quantize, fp8_reference
from safetensors.torch import save_file

import weightgeo
from weightgeo import WeightgeoError
from weightgeo.checkpoint import Fp8Checkpoint, fp8_dequantize, open_checkpoint
from weightgeo.metrics import fp8_unchanged_count, fp8_update_mask

E4M3 = torch.float8_e4m3fn
reference, quantize = fp8_reference, fp8_quantize


@pytest.mark.parametrize(
    "shape,block", [((300, 200), (128, 128)), ((5, 7), (2, 3)), ((128, 256), (128, 128)), ((1, 9), (4, 4))]
)
def test_dequantize_matches_float64_reference(gen, shape, block):
    codes, scales = quantize(torch.randn(shape, generator=gen), block)
    ref = reference(codes, scales, block)
    assert torch.equal(fp8_dequantize(codes, scales, block, dtype=torch.float64), ref)  # exact in float64
    assert torch.equal(fp8_dequantize(codes, scales, block), ref.float())  # float32: the rounded products
    for start, stop in [(0, 1), (1, shape[0]), (shape[0] // 2, shape[0])]:
        got = fp8_dequantize(codes[start:stop], scales, block, row_start=start, rows=shape[0], dtype=torch.float64)
        assert torch.equal(got, ref[start:stop])


def test_dequantize_rejects_mismatched_scales():
    with pytest.raises(WeightgeoError, match=r"needs float scales of shape \(3, 2\)"):
        fp8_dequantize(torch.zeros(300, 200, dtype=E4M3), torch.ones(2, 2), (128, 128))


def _fp8_folder(tmp_path, name, w, *, block=(128, 128), extra=None, config=None):
    codes, scales = quantize(w, block)
    d = tmp_path / name
    d.mkdir()
    tensors = {
        "model.layers.0.mlp.up_proj.weight": codes,
        "model.layers.0.mlp.up_proj.weight_scale_inv": scales,
        "model.norm.weight": torch.ones(w.shape[1], dtype=torch.bfloat16),
        **(extra or {}),
    }
    save_file(tensors, str(d / "model.safetensors"))
    cfg = (
        config
        if config is not None
        else {
            "model_type": "qwen3",
            "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(block)},
        }
    )
    (d / "config.json").write_text(json.dumps(cfg))
    return d, codes, scales


def test_fp8_checkpoint_reads_dequantised_and_keeps_the_codes(tmp_path, gen):
    w = torch.randn(300, 200, generator=gen)
    d, codes, scales = _fp8_folder(tmp_path, "fp8", w, block=(64, 128))
    ck = open_checkpoint(d)
    assert isinstance(ck, Fp8Checkpoint) and ck.block == (64, 128)
    name = "model.layers.0.mlp.up_proj.weight"
    assert ck.names() == [name, "model.norm.weight"]  # the scales are consumed ...
    assert ck.skipped == [
        {
            "name": name + "_scale_inv",
            "reason": f"FP8 scales of {name!r}, folded into its dequantised values (stored codes: fp8_weight())",
        }
    ]
    assert ck.info(name).dtype == torch.float32
    ref = reference(codes, scales, (64, 128)).float()
    assert torch.equal(ck.get(name), ref)
    assert torch.equal(ck.get_rows(name, 60, 130), ref[60:130])  # rows crossing block edges
    raw = ck.fp8_weight(name)  # ... and the stored codes and scales stay reachable
    assert torch.equal(raw.codes.view(torch.uint8), codes.view(torch.uint8)) and torch.equal(raw.scales, scales)
    assert ck.fp8_weight("model.norm.weight") is None


def test_compare_fp8_checkpoints_like_their_dequantised_weights(tmp_path, gen):
    w = torch.randn(160, 136, generator=gen)
    b, bc, bs = _fp8_folder(tmp_path, "b", w)
    f, fc, fs = _fp8_folder(tmp_path, "f", w + 0.05 * torch.randn(w.shape, generator=gen))
    opts = dict(k=8, rank=4, progress=False)
    r = weightgeo.compare(b, f, **opts)  # previously refused: "not a real floating-point dtype"
    plain = weightgeo.compare(
        {"model.layers.0.mlp.up_proj.weight": reference(bc, bs, (128, 128)).float()},
        {"model.layers.0.mlp.up_proj.weight": reference(fc, fs, (128, 128)).float()},
        **opts,
    )
    got = next(x for x in r.rows if x["name"] == "layers.0.mlp.up_proj.weight")
    want = plain.rows[0]
    for key in ("principal_overlap", "spectral_drift", "stable_rank"):
        assert got[key] == pytest.approx(want[key], rel=1e-6), key


def test_compressed_tensors_per_channel_scales(tmp_path, gen):
    w = torch.randn(6, 8, generator=gen)
    scale = w.abs().amax(dim=1, keepdim=True) / 448
    codes = (w / scale).to(E4M3)
    d = tmp_path / "ct"
    d.mkdir()
    save_file(
        {"lin.weight": codes, "lin.weight_scale": scale, "lin.input_scale": torch.ones(1)}, str(d / "model.safetensors")
    )
    (d / "config.json").write_text(
        json.dumps({"quantization_config": {"quant_method": "compressed-tensors", "format": "float-quantized"}})
    )
    ck = open_checkpoint(d)
    assert ck.names() == ["lin.weight"] and {s["name"] for s in ck.skipped} == {"lin.weight_scale", "lin.input_scale"}
    assert torch.equal(ck.get("lin.weight"), (codes.double() * scale.double()).float())


def test_block_size_defaults_to_128x128_when_the_config_gives_none(tmp_path, gen):
    w = torch.randn(300, 200, generator=gen)  # partial edge blocks on both axes
    d, codes, scales = _fp8_folder(tmp_path, "default", w, config={"quantization_config": {"quant_method": "fp8"}})
    ck = open_checkpoint(d)
    name = "model.layers.0.mlp.up_proj.weight"
    assert ck.block == (128, 128) and ck.fp8_block(name) == (128, 128)
    assert torch.equal(ck.get(name), reference(codes, scales, (128, 128)).float())  # the exact product, rounded once
    rows = ck.fp8_weight(name, 100, 260)  # the codes of some rows, with the whole weight's scales
    assert (rows.row_start, rows.rows, tuple(rows.codes.shape)) == (100, 300, (160, 200))


def test_fp8_without_its_scales_and_bad_block_sizes(tmp_path, gen):
    d = tmp_path / "noscale"
    d.mkdir()
    save_file({"w.weight": torch.randn(4, 4, generator=gen).to(E4M3)}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "fp8"}}))
    with pytest.raises(WeightgeoError, match="no scales found.*'w.weight_scale_inv'"):
        open_checkpoint(d)
    w = torch.randn(300, 200, generator=gen)
    bad, _, _ = _fp8_folder(
        tmp_path, "bad", w, config={"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 64]}}
    )
    with pytest.raises(WeightgeoError, match=r"needs \(5, 4\); fix quantization_config.weight_block_size"):
        open_checkpoint(bad)


@pytest.mark.parametrize("method,name", [("gptq", "GPTQ"), ("awq", "AWQ"), ("bitsandbytes", "bitsandbytes")])
def test_packed_integer_formats_are_refused_by_name(tmp_path, method, name):
    d = tmp_path / method
    d.mkdir()
    save_file(
        {
            "model.layers.0.mlp.up_proj.qweight": torch.zeros(4, 8, dtype=torch.int32),
            "model.layers.0.mlp.up_proj.scales": torch.ones(1, 8, dtype=torch.float16),
        },
        str(d / "model.safetensors"),
    )
    (d / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": method, "bits": 4}}))
    with pytest.raises(WeightgeoError, match=f"quantised with {name}") as e:
        open_checkpoint(d)
    assert "qweight" in str(e.value) and "unquantised" in str(e.value)


# --- the FP8 update rule --------------------------------------------------------------------------------
def _codes(values) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float32).to(E4M3)


def test_rule_on_constructed_inputs():
    block = (2, 2)
    c0 = _codes([[1.0, 2.0, 0.0], [-3.0, 0.5, 4.0]])
    s0 = torch.tensor([[1.0, 2.0]])
    # one code changes in block (0, 0); nothing else
    c1 = _codes([[1.0, 2.25, 0.0], [-3.0, 0.5, 4.0]])
    assert fp8_update_mask(c0, s0, c1, s0, block).tolist() == [[False, True, False], [False, False, False]]
    # block (0, 1)'s scale moves by 1e-4 relative (< eta): unchanged; by 1e-2: its nonzero entries changed
    for rel, changed in ((1e-4, False), (1e-2, True)):
        s1 = torch.tensor([[1.0, 2.0 * (1 + rel)]])
        assert fp8_update_mask(c0, s0, c0, s1, block).tolist() == [[False, False, False], [False, False, changed]]
    # -0 and +0 are equal; a zero stays unchanged whatever its block's scale
    z0, z1 = _codes([[0.0, 1.0]]), _codes([[-0.0, 1.0]])
    assert fp8_unchanged_count(z0, torch.tensor([[1.0]]), z1, torch.tensor([[1.0]]), (1, 2)) == 2
    assert fp8_update_mask(z0, torch.tensor([[1.0]]), z1, torch.tensor([[3.0]]), (1, 2)).tolist() == [[False, True]]
    # re-quantised with a doubled scale and halved codes: the stored weights are the same
    assert fp8_unchanged_count(c0, s0, _codes(c0.float() / 2), s0 * 2, block) == c0.numel()


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    eta=st.sampled_from([0.0, 1e-3, 0.05, 0.1, 0.5]),
    rows=st.integers(1, 9),
    cols=st.integers(1, 9),
    b0=st.integers(1, 4),
    b1=st.integers(1, 4),
)
def test_rule_equals_the_exact_float64_rule(seed, eta, rows, cols, b0, b1):
    g = torch.Generator().manual_seed(seed)
    c0 = (torch.randn(rows, cols, generator=g) * 4).to(E4M3)
    flip = torch.rand(rows, cols, generator=g) < 0.3
    c1 = torch.where(flip, (c0.float() * 1.2).to(E4M3).float(), c0.float()).to(E4M3)
    s0 = torch.rand(math.ceil(rows / b0), math.ceil(cols / b1), generator=g) + 0.5
    s1 = torch.where(torch.rand(s0.shape, generator=g) < 0.5, s0, s0 * (1 + 1e-3 * torch.rand(s0.shape, generator=g)))
    w0, w1 = reference(c0, s0, (b0, b1)), reference(c1, s1, (b0, b1))
    want = (w1 - w0).abs() > eta * torch.maximum(w0.abs(), w1.abs())
    got = fp8_update_mask(c0, s0, c1, s1, (b0, b1), eta=eta)
    assert torch.equal(got, want)
    for start in range(rows):  # row chunks (the engine's reads) give the same mask rows
        part = fp8_update_mask(c0[start:], s0, c1[start:], s1, (b0, b1), eta=eta, row_start=start, rows=rows)
        assert torch.equal(part, want[start:])


def test_rule_rejects_bad_inputs():
    c = _codes([[1.0, 2.0]])
    s = torch.tensor([[1.0]])
    nan = torch.tensor([[float("nan"), 1.0]]).to(E4M3)
    with pytest.raises(WeightgeoError, match="fine-tuned FP8 codes hold 1 NaN"):
        fp8_update_mask(c, s, nan, s, (1, 2), name="w")
    with pytest.raises(WeightgeoError, match="finite and non-negative"):
        fp8_update_mask(c, s, c, -s, (1, 2))
    with pytest.raises(WeightgeoError, match="differ in shape"):
        fp8_update_mask(c, s, _codes([[1.0, 2.0, 3.0]]), s, (1, 2))
    with pytest.raises(WeightgeoError, match="eta must be"):
        fp8_update_mask(c, s, c, s, (1, 2), eta=float("nan"))


def test_the_fp8_rule_lives_in_metrics_only():
    """The FP8 update rule is a metric (weightgeo.metrics); the never-released forward from weightgeo.checkpoint is
    gone, so the checkpoint layer imports nothing above it (tests/test_architecture.py)."""
    import weightgeo.checkpoint as ckpt_pkg
    import weightgeo.metrics as metrics

    assert metrics.fp8_update_mask is fp8_update_mask and metrics.fp8_unchanged_count is fp8_unchanged_count
    for name in ("fp8_update_mask", "fp8_unchanged_count", "no_such_name"):
        with pytest.raises(AttributeError):
            getattr(ckpt_pkg, name)
