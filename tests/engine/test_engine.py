"""compare(): the streaming pass over real HF-layout checkpoints, against the tensor-level metric functions."""

import math

import pytest
import torch
from factories import tiny_llama_state, write_hf_checkpoint

import weightgeo
from weightgeo import WeightgeoError


def _perturb(state, *, scale=1e-2, seed=1, skip=()):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if k in skip or not v.is_floating_point():
            out[k] = v.clone()
            continue
        w = v.float()
        out[k] = (w + scale * w.abs().mean() * torch.randn(w.shape, generator=g)).to(v.dtype)
    return out


@pytest.fixture
def pair(tmp_path):
    base = tiny_llama_state(num_layers=2, hidden=16, intermediate=32, vocab=40)
    ft = _perturb(base)
    b = write_hf_checkpoint(tmp_path / "base", base)
    f = write_hf_checkpoint(tmp_path / "ft", ft, shards=2)
    return base, ft, b, f


def test_rows_agree_with_the_tensor_level_functions(pair):
    base, ft, b, f = pair
    r = weightgeo.compare(b, f, k=8, rank=4, progress=False)
    assert len(r.rows) == len(base)
    by_name = {row["name"]: row for row in r.rows}
    q = by_name["layers.0.self_attn.q_proj.weight"]
    w0, w1 = base["model.layers.0.self_attn.q_proj.weight"], ft["model.layers.0.self_attn.q_proj.weight"]
    assert q["module"] == "q_proj" and q["layer"] == 0 and q["shape"] == (16, 16) and q["numel"] == 256
    assert q["update_sparsity"] == weightgeo.update_sparsity(w0, w1)
    assert q["principal_overlap"] == pytest.approx(weightgeo.principal_overlap(w0, w1, k=8), abs=1e-6)
    assert q["max_principal_angle"] == pytest.approx(float(weightgeo.principal_angles(w0, w1, k=8).max()), rel=1e-5)
    assert q["spectral_drift"] == pytest.approx(weightgeo.spectral_drift(w0, w1), rel=1e-5)
    loc = weightgeo.update_localization(w0, w1, rank=4)
    assert q["density"] == pytest.approx(loc.density)
    assert q["low_magnitude_overlap"] == pytest.approx(loc.low_magnitude_overlap)
    assert q["stable_rank"] == pytest.approx(weightgeo.stable_rank(w1.float() - w0.float()), rel=1e-5)
    # 1-D tensors get the elementwise metrics only, and say so.
    norm = by_name["layers.0.input_layernorm.weight"]
    assert "update_sparsity" in norm and "spectral_drift" not in norm
    assert any(p["name"] == "layers.0.input_layernorm.weight" for p in r.meta["partial"])
    # Model-level sparsity is weighted by parameter count over every analysed tensor.
    expected = sum(row["update_sparsity"] * row["numel"] for row in r.rows) / sum(row["numel"] for row in r.rows)
    assert r.summary["update_sparsity"] == pytest.approx(expected)
    assert r.summary["by_module"]["q_proj"]["n_tensors"] == 2
    assert r.meta["world_size"] == 1 and r.meta["metrics"][0] == "update_sparsity"


def test_every_source_kind_gives_the_same_rows(pair, tmp_path):
    base, ft, b, f = pair
    ref = weightgeo.compare(b, f, metrics=["update_sparsity", "spectral_drift"], progress=False)
    for src_b, src_f in [(base, ft), (b / "model.safetensors", f), (b, ft)]:
        r = weightgeo.compare(src_b, src_f, metrics=["update_sparsity", "spectral_drift"], progress=False)
        assert [x["name"] for x in r.rows] == [x["name"] for x in ref.rows]
        for x, y in zip(r.rows, ref.rows):
            assert x["update_sparsity"] == y["update_sparsity"]
            assert ("spectral_drift" in x) == ("spectral_drift" in y)
            if "spectral_drift" in y:  # matrices only
                assert x["spectral_drift"] == pytest.approx(y["spectral_drift"], rel=1e-6)


def test_include_presets_and_regexes(pair):
    _, _, b, f = pair
    r = weightgeo.compare(b, f, metrics="update_sparsity", include="attention", progress=False)
    assert {row["module"] for row in r.rows} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    r = weightgeo.compare(b, f, metrics="update_sparsity", include=r"layers\.1\.", exclude="mlp", progress=False)
    assert {row["layer"] for row in r.rows} == {1} and all("mlp" not in row["name"] for row in r.rows)


def test_unknown_metric_is_rejected_before_anything_is_read(tmp_path):
    with pytest.raises(WeightgeoError, match="unknown metric 'bogus'"):
        weightgeo.compare(tmp_path / "nope", tmp_path / "nope2", metrics=["bogus"])


def test_no_tensors_in_common(tmp_path):
    with pytest.raises(WeightgeoError, match="no tensors in common"):
        weightgeo.compare({"a.weight": torch.ones(2, 2)}, {"b.weight": torch.ones(2, 2)}, progress=False)


def test_mismatched_shapes_name_the_tensor():
    with pytest.raises(WeightgeoError, match=r"'layers.0.q_proj.weight'.*\(4, 4\).*\(4, 5\)"):
        weightgeo.compare(
            {"layers.0.q_proj.weight": torch.ones(4, 4)}, {"layers.0.q_proj.weight": torch.ones(4, 5)}, progress=False
        )


def test_nan_is_an_error_naming_the_tensor():
    a = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    b = a.clone()
    b[1, 2] = float("nan")
    with pytest.raises(WeightgeoError, match=r"'w rows 0:4: ft \(as bf16\)'.*non-finite"):
        weightgeo.compare({"w": a}, {"w": b}, progress=False)


def test_integer_tensors_are_skipped_and_reported_never_silently():
    a = {"w": torch.randn(4, 4, generator=torch.Generator().manual_seed(0)), "position_ids": torch.arange(8)}
    r = weightgeo.compare(a, dict(a), metrics="update_sparsity", progress=False)
    assert [row["name"] for row in r.rows] == ["w"]
    assert r.skipped == [{"name": "position_ids", "reason": "non-floating dtype (torch.int64 / torch.int64)"}]
    assert "skipped 1 tensor(s)" in str(r)
    with pytest.raises(WeightgeoError, match="nothing to analyse"):
        weightgeo.compare({"p": torch.arange(3)}, {"p": torch.arange(3)}, progress=False)


def test_added_tokens_compare_the_shared_rows():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(10, 4, generator=g)
    grown = torch.cat([emb, torch.randn(2, 4, generator=g)])
    r = weightgeo.compare(
        {"model.embed_tokens.weight": emb},
        {"model.embed_tokens.weight": grown},
        metrics=["update_sparsity", "spectral_drift"],
        k=2,
        progress=False,
    )
    row = r.rows[0]
    assert row["rows_compared"] == 10 and row["rows_added"] == 2
    assert row["update_sparsity"] == 1.0 and row["spectral_drift"] == pytest.approx(0.0, abs=1e-7)


def test_unmatched_names_are_listed(pair):
    base, ft, b, f = pair
    extra = dict(ft)
    extra["model.extra_head.weight"] = torch.ones(3, 3)
    r = weightgeo.compare(base, extra, metrics="update_sparsity", progress=False)
    assert r.unmatched["only_ft"] == ["model.extra_head.weight"]


def test_metric_functions_called_with_sources_return_a_report(pair):
    _, _, b, f = pair
    r = weightgeo.spectral_drift(b, f)
    assert isinstance(r, weightgeo.Report) and r.meta["metrics"] == ["spectral_drift"]
    assert all(math.isfinite(row["spectral_drift"]) for row in r.rows if "spectral_drift" in row)


def test_lora_adapter_against_its_base(tmp_path):
    from factories import write_lora_adapter

    base = tiny_llama_state(num_layers=2, hidden=16, intermediate=32, vocab=40, dtype=torch.float32)
    b = write_hf_checkpoint(tmp_path / "base", base)
    a = write_lora_adapter(tmp_path / "adapter", base, targets=("q_proj", "v_proj"), r=2, alpha=4)
    r = weightgeo.compare(b, a, metrics=["update_sparsity", "stable_rank"], progress=False)
    q = r["layers.0.self_attn.q_proj.weight"]
    assert q["update_sparsity"] < 0.5 and 1.0 <= q["stable_rank"] <= 2.0 + 1e-4
    assert r["layers.0.self_attn.k_proj.weight"]["update_sparsity"] == 1.0


def _rows_by_name(report):
    return {row["name"]: row for row in report.rows}


@pytest.mark.parametrize("batch_bytes", [1 << 14, 1 << 30])
def test_shape_groups_equal_one_matrix_at_a_time(pair, batch_bytes):
    """Batched shape groups (small budget: several groups per shape; large: one per shape) give the rows of
    the one-matrix-at-a-time engine."""
    _, _, b, f = pair
    single = _rows_by_name(weightgeo.compare(b, f, k=8, rank=4, progress=False, batch_bytes=0))
    grouped = _rows_by_name(weightgeo.compare(b, f, k=8, rank=4, progress=False, batch_bytes=batch_bytes))
    assert grouped.keys() == single.keys()
    for name, row in single.items():
        assert grouped[name].keys() == row.keys(), name
        for key, val in row.items():
            if isinstance(val, float) and not math.isnan(val):
                assert grouped[name][key] == pytest.approx(val, rel=1e-6, abs=1e-9), (name, key)
            elif isinstance(val, float):
                assert math.isnan(grouped[name][key]), (name, key)
            else:
                assert grouped[name][key] == val, (name, key)


def test_group_with_a_rank_deficient_member_keeps_per_matrix_k(tmp_path):
    """One q_proj of rank 3 among full-rank ones: its k is capped, the others keep k = 8 (as looped)."""
    base = tiny_llama_state(num_layers=3, hidden=16, intermediate=32, vocab=40)
    q1 = "model.layers.1.self_attn.q_proj.weight"
    g = torch.Generator().manual_seed(5)
    qs = [q1.replace(".1.", f".{i}.") for i in range(3)]
    for name in qs:  # float32: a bf16-rounded low-rank matrix is numerically full rank
        base[name] = base[name].float()
    base[q1] = torch.randn(16, 3, generator=g) @ torch.randn(3, 16, generator=g)
    ft = _perturb(base, skip=(q1,))
    ft[q1] = base[q1] * 1.01
    b = write_hf_checkpoint(tmp_path / "b", base)
    f = write_hf_checkpoint(tmp_path / "f", ft)
    rows = _rows_by_name(
        weightgeo.compare(
            b, f, k=8, progress=False, metrics="principal_overlap", include=r"q_proj", batch_bytes=1 << 30
        )
    )
    key = q1.removeprefix("model.")  # report rows carry canonical names
    assert rows[key]["k_effective"] == 3
    assert rows[key.replace(".1.", ".0.")]["k_effective"] == 8
    assert rows[key.replace(".1.", ".2.")]["k_effective"] == 8


def test_batched_pair_metrics_equal_the_loop(gen):
    from weightgeo.metrics.pair import PAIR_METRICS, batched_pair_metrics, matrix_pair_metrics

    W0 = torch.randn(4, 24, 40, generator=gen).bfloat16()
    W1 = (W0.float() + 1e-2 * torch.randn(4, 24, 40, generator=gen)).bfloat16()
    opts = dict(k=6, side="right", rank=4, alpha=0.3, eta=1e-3)
    together = batched_pair_metrics(W0, W1, metrics=frozenset(PAIR_METRICS), **opts)
    for i in range(4):
        alone = matrix_pair_metrics(W0[i], W1[i], metrics=frozenset(PAIR_METRICS), **opts)
        assert together[i].keys() == alone.keys()
        for key in alone:
            assert together[i][key] == pytest.approx(alone[key], rel=1e-6, abs=1e-9), key


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_shape_groups_equal_cpu(pair):
    """device="cuda": pinned groups moved to the GPU give the CPU rows (same float64 small problems)."""
    _, _, b, f = pair
    cpu = _rows_by_name(weightgeo.compare(b, f, k=8, rank=4, progress=False, batch_bytes=0))
    gpu = _rows_by_name(weightgeo.compare(b, f, k=8, rank=4, progress=False, device="cuda"))
    for name, row in cpu.items():
        for key, val in row.items():
            if isinstance(val, float) and not math.isnan(val):
                assert gpu[name][key] == pytest.approx(val, rel=1e-4, abs=1e-6), (name, key)
