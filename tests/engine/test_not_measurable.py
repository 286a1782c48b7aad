"""No silently trivial result: where k (or the localization rank) reaches a matrix's smaller side, the metrics
that would say nothing are null with the reason, counted in the summary, shown as such in every output; a
relative k (a fraction of each matrix's smaller side) keeps every matrix of every model size measurable."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from factories import tiny_llama_state, write_hf_checkpoint

import weightgeo
from weightgeo import WeightgeoError
from weightgeo.cli import main as cli_main
from weightgeo.metrics.catalog import GLOSSARY, PAIR

ROTATION = ("principal_overlap", "max_principal_angle", "mean_principal_angle", "spectral_gap")


def _pair(hidden=8, intermediate=16, dtype=torch.bfloat16):
    base = tiny_llama_state(num_layers=1, hidden=hidden, intermediate=intermediate, vocab=12, dtype=dtype)
    g = torch.Generator().manual_seed(3)
    ft = {k: (v.float() + 2e-3 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base.items()}
    return base, ft


def test_k_at_or_above_the_smaller_side_gives_null_with_the_reason():
    base, ft = _pair()
    r = weightgeo.compare(base, ft, k=512, rank=2, cache=False, metrics=["principal_angles", "spectral_drift"])
    mats = [row for row in r.rows if len(row["shape"]) == 2]
    assert mats
    for row in mats:
        for key in (*ROTATION, "principal_angles"):
            assert row[key] is None, (row["name"], key, row[key])  # never 0°, 1.0 or inf
            assert "smaller side" in row["not_measurable"][key] and "512" in row["not_measurable"][key]
        assert row["spectral_drift"] > 0 and row["k_effective"] == min(row["shape"])  # NSS does not depend on k
    s = r.summary
    assert s["principal_overlap"] is None and s["n_principal_overlap"] == 0
    assert s["n_not_measurable"] == {key: len(mats) for key in (*ROTATION, "principal_angles")}
    assert s["by_module"]["q_proj"]["n_not_measurable"]["principal_overlap"] == 1
    assert not math.isnan(s["spectral_drift"])
    assert "not_measurable" in GLOSSARY and PAIR in GLOSSARY["not_measurable"].where


def test_some_matrices_measurable_some_not_the_summary_skips_and_counts():
    base, ft = _pair(hidden=8, intermediate=32)  # q/k/v/o 8x8 (k=16 reaches 8), mlp 32x8 (also 8): all out
    base["extra.wide.weight"] = torch.randn(40, 24, generator=torch.Generator().manual_seed(1))
    ft["extra.wide.weight"] = base["extra.wide.weight"] * 1.01 + 1e-3
    r = weightgeo.compare(base, ft, k=16, cache=False, metrics=["principal_overlap"])
    wide = r["extra.wide.weight"]
    assert isinstance(wide["principal_overlap"], float) and "not_measurable" not in wide
    assert r.summary["principal_overlap"] == pytest.approx(wide["principal_overlap"])
    assert r.summary["n_principal_overlap"] == 1
    n_null = sum(1 for row in r.rows if row.get("principal_overlap", 0) is None)
    assert n_null > 0 and r.summary["n_not_measurable"]["principal_overlap"] == n_null


def test_the_localization_rank_at_the_smaller_side_gives_a_null_principal_mask_overlap():
    base, ft = _pair()
    r = weightgeo.compare(base, ft, k=2, rank=8, cache=False, metrics=["update_localization"])
    row = r["layers.0.self_attn.q_proj.weight"]  # 8x8: rank 8 reaches the side
    assert row["principal_mask_overlap"] is None and "rank 8" in row["not_measurable"]["principal_mask_overlap"]
    assert isinstance(row["low_magnitude_overlap"], float) and isinstance(row["density"], float)
    loc = weightgeo.update_localization(torch.eye(4) * 3, torch.eye(4) * 3 + 0.5, rank=4)
    assert loc.principal_mask_overlap is None and loc.low_magnitude_overlap is not None


def test_tensor_verbs_refuse_a_k_that_says_nothing():
    W0 = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    for verb in (weightgeo.principal_angles, weightgeo.principal_overlap):
        with pytest.raises(WeightgeoError, match=r"k=6 reaches 6, the smaller side.*k=0\.125"):
            verb(W0, W0 * 1.01, k=6)
    assert weightgeo.principal_angles(W0, W0 * 1.01, k=5).shape == (5,)


def test_a_relative_k_is_a_fraction_of_each_matrixs_smaller_side():
    base, ft = _pair(hidden=16, intermediate=64)
    r = weightgeo.compare(base, ft, k=0.25, rank=0.5, cache=False, metrics=["principal_overlap"])
    assert r["layers.0.self_attn.q_proj.weight"]["k_effective"] == 4  # 16x16
    assert r["layers.0.mlp.up_proj.weight"]["k_effective"] == 4  # 64x16: an eighth... a quarter of 16
    default = weightgeo.compare(base, ft, cache=False, metrics=["principal_overlap"])
    assert default["layers.0.self_attn.q_proj.weight"]["k_effective"] == 2  # 0.125 of 16
    assert default.meta["params"]["k"] == 0.125
    assert all(row.get("principal_overlap", 0.0) is not None for row in default.rows)  # every matrix measurable
    for bad in (1.5, -0.1, 0.0, "0.1", True):
        with pytest.raises(WeightgeoError, match="fraction"):
            weightgeo.compare(base, ft, k=bad, cache=False)


def test_nulls_in_json_csv_pandas_and_text(tmp_path):
    base, ft = _pair()
    r = weightgeo.compare(base, ft, k=512, cache=False, metrics=["principal_overlap"])
    r.to_json(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    q = next(row for row in data["rows"] if row["name"] == "layers.0.self_attn.q_proj.weight")
    assert q["principal_overlap"] is None and q["spectral_gap"] is None and q["not_measurable"]["spectral_gap"]
    back = weightgeo.Report.from_json(tmp_path / "r.json")
    assert back["layers.0.self_attn.q_proj.weight"]["principal_overlap"] is None  # None again, not NaN
    assert back.summary["principal_overlap"] is None
    r.to_csv(tmp_path / "r.csv")
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    q = next(row for row in rows if row["name"] == "layers.0.self_attn.q_proj.weight")
    assert q["principal_overlap"] == "" and "smaller side" in q["not_measurable"]
    df = r.to_pandas()
    assert df["principal_overlap"].isna().all()
    text = str(r)
    assert "n/m" in text and "NOT MEASURABLE" in text and "k=0.125" in text


def test_cli_closing_lines_count_the_nulls_in_flag_syntax(tmp_path, capsys):
    base, ft = _pair()
    b, f = write_hf_checkpoint(tmp_path / "b", base), write_hf_checkpoint(tmp_path / "f", ft)
    assert cli_main(["compare", str(b), str(f), "--k", "512", "--no-progress", "--no-cache", "--summary"]) == 0
    out = capsys.readouterr().out
    assert "NOT MEASURABLE" in out and "--k 0.125" in out and "k=0.125" not in out
    assert cli_main(["compare", str(b), str(f), "--k", "0.25", "--rank", "0.25", "--no-progress", "--no-cache"]) == 0
    assert "NOT MEASURABLE" not in capsys.readouterr().out


def test_stream_k_at_the_smaller_side_gives_null_similarity(tmp_path):
    base, ft = _pair()
    mid = {k: (v.float() * 0.5 + ft[k].float() * 0.5).to(v.dtype) for k, v in base.items()}
    r = weightgeo.rank_curve([base, mid, ft], steps=[0, 1, 2], k=8, hill_k=2, cache=False)
    row = next(x for x in r.rows if x["name"] == "layers.0.self_attn.q_proj.weight" and x["step"] == 1)
    assert row["final_subspace_similarity"] is None and row["delta_spectral_gap"] is None
    assert "K 8" in row["not_measurable"]["final_subspace_similarity"]
    assert r.summary["by_step"][1]["n_not_measurable"]["final_subspace_similarity"] > 0
    onset = weightgeo.locking_onset(r)
    assert onset.per_matrix["layers.0.self_attn.q_proj.weight"] is None  # never "locked" on a trivial Sim_K
    sim = weightgeo.subspace_similarity(mid, ft, base=base, k=8, cache=False)
    q = sim["layers.0.self_attn.q_proj.weight"]
    assert q["subspace_similarity"] is None and q["not_measurable"]["subspace_similarity"]
    with pytest.raises(WeightgeoError, match="smaller side"):
        weightgeo.subspace_similarity(torch.ones(8, 8), torch.eye(8), k=8)


def test_tracker_rows_and_logs_skip_a_similarity_that_says_nothing():
    base, ft = _pair()  # 8-wide matrices and 16x8 ones: K = 8 reaches every smaller side
    tr = weightgeo.Tracker(base, k=8, hill_k=2)
    mid = {k: (v.float() * 0.5 + ft[k].float() * 0.5).to(v.dtype) for k, v in base.items()}
    tr.update(mid, 1)
    logs = tr.update(ft, 2)
    assert "weightgeo/previous_subspace_similarity/mean" not in logs  # no measurable matrix: no mean of ones
    rows = tr.rank_curve().rows
    assert all(r["final_subspace_similarity"] is None and r["not_measurable"] for r in rows)
