"""The FP8 update rule wired into compare, the verbs and update_mask: FP8 safetensors folders (save_file, an HF
config with quantization_config) against float64 references built from the stored codes and scales."""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference as R
import torch
from native_factories import fp8_quantize, fp8_reference, write_fp8

import weightgeo
from weightgeo.checkpoint import open_checkpoint
from weightgeo.metrics.sparsity import unchanged_mask_general

BLOCK = (4, 8)
ETA = 1e-3
UP, DOWN = "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"


def _fine_tune(codes: torch.Tensor, scales: torch.Tensor, gen: torch.Generator):
    """Codes changed at random entries; one block's scale moved below eta, two above (one of them by less than
    bf16's resolution); one block re-quantised with a doubled scale and halved codes."""
    c = codes.float().clone()
    flip = torch.rand(c.shape, generator=gen) < 0.15
    c[flip] *= 1.25
    s = scales.clone()
    s[0, 0] *= 1 + 1e-4
    s[1, 1] *= 1.01
    s[0, 1] *= 1.002
    s[2, 0] *= 2
    c[8:12, 0:8] /= 2
    return c.to(torch.float8_e4m3fn), s


def _unchanged_ref(c0, s0, c1, s1) -> torch.Tensor:
    w0, w1 = fp8_reference(c0, s0, BLOCK), fp8_reference(c1, s1, BLOCK)
    return (w1 - w0).abs() <= ETA * torch.maximum(w0.abs(), w1.abs())


@pytest.fixture(scope="module")
def fp8_pair(tmp_path_factory):
    gen = torch.Generator().manual_seed(0)
    tmp = tmp_path_factory.mktemp("fp8")
    base, ft, ref = {}, {}, {}
    for name, shape in ((UP, (12, 16)), (DOWN, (16, 12))):
        c0, s0 = fp8_quantize(torch.randn(shape, generator=gen), BLOCK)
        c1, s1 = _fine_tune(c0, s0, gen)
        base[name], ft[name], ref[name] = (c0, s0), (c1, s1), _unchanged_ref(c0, s0, c1, s1)
    norm = torch.randn(16, generator=gen).to(torch.bfloat16)
    base["model.norm.weight"], ft["model.norm.weight"] = norm, (norm.float() * 1.01).to(torch.bfloat16)
    return write_fp8(tmp / "base", base, block=BLOCK), write_fp8(tmp / "ft", ft, block=BLOCK), base, ft, ref


@pytest.mark.parametrize("metrics", [["update_sparsity"], None])  # the row-chunk stream; the shape groups
@pytest.mark.parametrize("row_block", [None, 40])  # the policy's blocks, or blocks of a few rows across FP8 blocks
def test_update_sparsity_follows_the_fp8_rule(fp8_pair, metrics, row_block, monkeypatch):
    b, f, _, _, ref = fp8_pair
    if row_block is not None:
        monkeypatch.setattr("weightgeo.linalg.policy.ROW_BLOCK", row_block)
    r = weightgeo.compare(b, f, metrics=metrics, k=4, rank=2, eta=ETA, progress=False)
    for name, unchanged in ref.items():
        row = r[name.removeprefix("model.")]
        assert row["update_rule"] == "fp8"
        assert row["update_sparsity"] == int(unchanged.sum()) / unchanged.numel()
        if metrics is None:
            assert row["density"] == pytest.approx(1 - row["update_sparsity"], abs=1e-12)
    assert 0 < r["layers.0.mlp.up_proj.weight"]["update_sparsity"] < 1  # the case has both kinds of entries
    assert "update_rule" not in r["norm.weight"]  # bf16 tensors: the bf16 rule


def test_the_rule_differs_from_bf16_rounding_of_the_dequantised_values(fp8_pair):
    """Why the rule matters: bf16 roundings of the dequantised values merge a scale move of 0.2% (> eta) in
    most entries of its block."""
    b, f, base, ft, ref = fp8_pair
    (c0, s0), (c1, s1) = base[UP], ft[UP]
    bf16 = unchanged_mask_general(fp8_reference(c0, s0, BLOCK).float(), fp8_reference(c1, s1, BLOCK).float(), ETA)
    moved = (slice(0, 4), slice(8, 16))  # block (0, 1)
    nonzero = c0.float()[moved] != 0
    assert not ref[UP][moved][nonzero].any()  # the FP8 rule: every nonzero entry of the block changed
    assert bf16[moved][nonzero].float().mean() > 0.3  # the bf16 rule: many of them "unchanged"


def test_localization_uses_the_fp8_update_mask(fp8_pair):
    b, f, _, _, ref = fp8_pair
    ck = open_checkpoint(b)
    r = weightgeo.update_localization(b, f, rank=2, alpha=0.5, eta=ETA)
    for name, unchanged in ref.items():
        want = R.localization(ck.get(name).double().numpy(), None, rank=2, alpha=0.5, upd=~unchanged.numpy())
        got = r[name.removeprefix("model.")]
        assert got["density"] == want["density"]
        assert got["low_magnitude_overlap"] == want["low_magnitude_overlap"]
        assert got["principal_mask_overlap"] == pytest.approx(want["principal_overlap"], abs=2e-2)


def test_update_mask_verb_gives_the_fp8_rules_mask(fp8_pair):
    b, f, _, _, ref = fp8_pair
    with weightgeo.update_mask(b, f, eta=ETA) as masks:
        for name, unchanged in ref.items():
            assert torch.equal(masks[name.removeprefix("model.")], ~unchanged)
        assert [s["side"] for s in masks.skipped] == ["base", "base", "ft", "ft"]  # the scales, folded in


def test_one_side_fp8_takes_the_bf16_rule_on_the_dequantised_values(fp8_pair, tmp_path):
    b, _, base, _, _ = fp8_pair
    c0, s0 = base[UP]
    plain = (fp8_reference(c0, s0, BLOCK) * 1.0005).to(torch.bfloat16)  # the model released in bf16
    f = tmp_path / "bf16"
    f.mkdir()
    from safetensors.torch import save_file

    save_file({UP: plain}, str(f / "model.safetensors"))
    row = weightgeo.compare(b, f, metrics="update_sparsity", progress=False)["layers.0.mlp.up_proj.weight"]
    assert "update_rule" not in row
    want = unchanged_mask_general(fp8_reference(c0, s0, BLOCK).float(), plain.float(), ETA)
    assert row["update_sparsity"] == int(want.sum()) / want.numel()


def test_bare_fp8_tensors_are_analysed_as_their_values(gen, tmp_path):
    """float8 tensors with no scales and no FP8 quantization_config: their stored values, upcast exactly."""
    w0 = (torch.randn(12, 10, generator=gen) * 4).to(torch.float8_e4m3fn)
    w1 = torch.where(torch.rand(12, 10, generator=gen) < 0.3, w0.float() * 1.25, w0.float()).to(torch.float8_e4m3fn)
    from safetensors.torch import save_file

    for name, w in (("b", w0), ("f", w1)):
        (tmp_path / name).mkdir()
        save_file({"lin.weight": w}, str(tmp_path / name / "model.safetensors"))
    r = weightgeo.compare(tmp_path / "b", tmp_path / "f", k=4, rank=2, progress=False)["lin.weight"]
    want = weightgeo.compare({"lin.weight": w0.float()}, {"lin.weight": w1.float()}, k=4, rank=2, progress=False).rows[
        0
    ]
    assert r["stored_dtype"] == "float8_e4m3fn"
    for key in ("update_sparsity", "principal_overlap", "spectral_drift", "stable_rank", "density"):
        assert r[key] == pytest.approx(want[key], rel=1e-6), key
    assert weightgeo.update_sparsity(w0, w1) == float(np.mean((w0.float() == w1.float()).numpy()))
    assert weightgeo.principal_overlap(w0, w1, k=3) == pytest.approx(
        weightgeo.principal_overlap(w0.float(), w1.float(), k=3)
    )
    nan = w0.clone()
    nan.view(torch.uint8)[0, 0] = 0x7F  # e4m3fn NaN
    with pytest.raises(weightgeo.WeightgeoError, match="non-finite"):
        weightgeo.spectral_drift(nan, w1)
    assert math.isfinite(weightgeo.spectral_drift(w0, w1))
