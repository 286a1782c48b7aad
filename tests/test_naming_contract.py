"""The naming contract (docs/metrics.md), enforced on the rows compare and rank_curve emit: every key is in the
catalog, and each suffix means what the contract says (*_overlap / *_similarity / *_sparsity in [0, 1],
*_angle in degrees, *_angles ascending degrees, spectral_gap = σ_k/σ_{k+1} ≥ 1)."""

import math

import pytest
import torch
from factories import tiny_llama_state, write_hf_checkpoint

import weightgeo
from weightgeo.metrics.catalog import ALL_METRICS, OUTPUTS, TRAJECTORY_OUTPUTS, VECTOR_OUTPUTS

IDENTIFIERS = {
    "name",
    "shape",
    "numel",
    "module",
    "layer",
    "dtype",
    "rows_compared",
    "rows_added",
    "layout",
    "step",
    "method",
}


def _check_value(key, value):
    if key.endswith(("_overlap", "_similarity", "_sparsity")) or key == "density":
        assert math.isnan(value) or 0.0 <= value <= 1.0, (key, value)
    elif key.endswith("_angles"):
        assert isinstance(value, list) and value == sorted(value) and all(0.0 <= a <= 90.0 for a in value), key
    elif key.endswith("_angle"):
        assert math.isnan(value) or 0.0 <= value <= 90.0, (key, value)
    elif key == "spectral_gap":
        assert math.isnan(value) or value >= 1.0, (key, value)
    elif key == "k_effective":
        assert value == int(value) >= 0, (key, value)
    else:
        assert isinstance(value, float) and (math.isnan(value) or value >= 0.0), (key, value)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("contract")
    base = tiny_llama_state(num_layers=2, hidden=16, intermediate=32, vocab=40)
    g = torch.Generator().manual_seed(0)
    ft = {k: (v.float() + 2e-3 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base.items()}
    ft["model.layers.1.self_attn.q_proj.weight"] = base["model.layers.1.self_attn.q_proj.weight"]  # no update
    b, f = write_hf_checkpoint(tmp / "b", base), write_hf_checkpoint(tmp / "f", ft)
    pair = weightgeo.compare(b, f, metrics=list(ALL_METRICS) + list(VECTOR_OUTPUTS), k=4, rank=2, progress=False)
    run = tmp / "run"
    for step, scale in ((0, 0.0), (5, 1.0), (10, 2.0)):
        write_hf_checkpoint(
            run / f"checkpoint-{step}",
            {k: (v.float() + scale * (ft[k].float() - v.float())).to(v.dtype) for k, v in base.items()},
        )
    return pair, weightgeo.rank_curve(run, k=4, hill_k=3)


def test_compare_rows_use_the_catalog_and_keep_the_contract(reports):
    pair, _ = reports
    scalars = {key for keys in OUTPUTS.values() for key in keys}
    for row in pair.rows:
        for key, value in row.items():
            assert key in IDENTIFIERS | scalars | set(VECTOR_OUTPUTS), f"{key} is not in metrics/catalog.py"
            if key not in IDENTIFIERS:
                _check_value(key, value)
        if len(row["shape"]) == 2:  # matrices carry every output of every family asked for
            assert set(row) - IDENTIFIERS == scalars | set(VECTOR_OUTPUTS), row["name"]
        else:
            assert set(row) - IDENTIFIERS == set(OUTPUTS["update_sparsity"]), row["name"]


def test_rank_curve_rows_use_the_catalog_and_keep_the_contract(reports):
    _, curve = reports
    assert curve.rows
    for row in curve.rows:
        assert set(row) - IDENTIFIERS == set(TRAJECTORY_OUTPUTS), row["name"]
        for key in TRAJECTORY_OUTPUTS:
            _check_value(key, row[key])
        assert row["stable_rank"] >= 1.0 - 1e-9  # in [1, rank] for a nonzero update


def test_one_spectral_gap_convention(reports):
    """σ_k/σ_{k+1} in pair rows and in trajectory rows alike (never its inverse)."""
    pair, curve = reports
    assert all(r["spectral_gap"] >= 1.0 for r in pair.rows if "spectral_gap" in r and not math.isnan(r["spectral_gap"]))
    assert all(r["spectral_gap"] >= 1.0 for r in curve.rows if not math.isnan(r["spectral_gap"]))
