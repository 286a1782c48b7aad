"""compare_many: several fine-tunes against one base equal one compare() per fine-tune."""

import math

import pytest
import torch
from factories import tiny_llama_state, write_hf_checkpoint, write_lora_adapter

import weightgeo
from weightgeo import WeightgeoError

OPTS = dict(k=8, rank=4, progress=False)


def _perturb(state, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return {
        k: (v.float() + scale * v.float().abs().mean() * torch.randn(v.shape, generator=g)).to(v.dtype)
        for k, v in state.items()
    }


def _assert_same_rows(got, want):
    assert [r["name"] for r in got.rows] == [r["name"] for r in want.rows]
    for x, y in zip(got.rows, want.rows):
        assert x.keys() == y.keys(), y["name"]
        for key, val in y.items():
            if isinstance(val, float) and math.isnan(val):
                assert math.isnan(x[key]), (y["name"], key)
            elif isinstance(val, float):
                assert x[key] == pytest.approx(val, rel=1e-6, abs=1e-9), (y["name"], key)
            else:
                assert x[key] == val, (y["name"], key)


@pytest.fixture
def family(tmp_path):
    """A base and four fine-tunes that exercise every path: plain bf16 (sharded); one with a q_proj stored in
    fp32 (another dtype group); one missing a q_proj (a subset of the base's group); a LoRA adapter (read in
    the main thread); one with added vocabulary rows (analysed on its own)."""
    base = tiny_llama_state(num_layers=3, hidden=16, intermediate=32, vocab=40)
    b = write_hf_checkpoint(tmp_path / "base", base)
    a = _perturb(base, 1e-2, 1)
    fp32 = _perturb(base, 3e-2, 2)
    q = "model.layers.1.self_attn.q_proj.weight"
    fp32[q] = fp32[q].float()
    missing = _perturb(base, 1e-2, 3)
    del missing[q]
    grown = _perturb(base, 1e-2, 4)
    g = torch.Generator().manual_seed(5)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        grown[name] = torch.cat([grown[name], torch.randn(3, grown[name].shape[1], generator=g).to(grown[name].dtype)])
    fts = [
        write_hf_checkpoint(tmp_path / "a", a, shards=2),
        write_hf_checkpoint(tmp_path / "fp32", fp32),
        write_hf_checkpoint(tmp_path / "missing", missing),
        write_lora_adapter(tmp_path / "lora", base),
        write_hf_checkpoint(tmp_path / "grown", grown),
    ]
    return b, fts


@pytest.mark.parametrize("batch_bytes", [0, None])
def test_equals_one_compare_per_fine_tune(family, batch_bytes):
    b, fts = family
    reports = weightgeo.compare_many(b, fts, batch_bytes=batch_bytes, **OPTS)
    assert len(reports) == len(fts)
    for ft, got in zip(fts, reports):
        want = weightgeo.compare(b, ft, batch_bytes=batch_bytes, **OPTS)
        _assert_same_rows(got, want)
        assert got.meta["shared_base"] is True and got.meta["ft"] == want.meta["ft"]
        assert got.meta["unmatched"] == want.meta["unmatched"]
        assert got.summary.keys() == want.summary.keys()


def test_metric_subsets(family):
    b, fts = family
    for metrics in (["update_sparsity"], ["stable_rank"], ["principal_overlap", "update_localization"]):
        for ft, got in zip(fts[:3], weightgeo.compare_many(b, fts[:3], metrics=metrics, **OPTS)):
            _assert_same_rows(got, weightgeo.compare(b, ft, metrics=metrics, **OPTS))


def test_rejects_a_single_path_and_an_empty_list(family):
    b, fts = family
    with pytest.raises(WeightgeoError, match="list of fine-tuned"):
        weightgeo.compare_many(b, str(fts[0]), **OPTS)
    with pytest.raises(WeightgeoError, match="empty"):
        weightgeo.compare_many(b, [], **OPTS)
