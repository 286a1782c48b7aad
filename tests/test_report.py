import json
import math

import pytest

from weightgeo.errors import WeightgeoError
from weightgeo.report import Report, summarize_rows


def _rows():
    return [
        {
            "name": "layers.0.q_proj.weight",
            "shape": (4, 4),
            "numel": 16,
            "module": "q_proj",
            "layer": 0,
            "update_sparsity": 0.5,
            "spectral_drift": 1e-3,
            "max_principal_angle": 2.0,
            "principal_overlap": 0.9,
        },
        {
            "name": "layers.1.q_proj.weight",
            "shape": (4, 4),
            "numel": 16,
            "module": "q_proj",
            "layer": 1,
            "update_sparsity": 1.0,
            "spectral_drift": 3e-3,
            "max_principal_angle": 4.0,
            "principal_overlap": math.nan,
        },
        {"name": "norm.weight", "shape": (4,), "numel": 4, "module": "norm", "layer": None, "update_sparsity": 0.0},
    ]


def test_summary_weights_sparsity_by_numel_and_averages_the_rest_over_matrices():
    s = summarize_rows(_rows())
    assert s["update_sparsity"] == pytest.approx((0.5 * 16 + 1.0 * 16 + 0.0 * 4) / 36)
    assert s["spectral_drift"] == pytest.approx(2e-3)
    assert s["n_spectral_drift"] == 2
    assert s["max_principal_angle_overall"] == 4.0
    # NaN (undefined) values are left out of means, not propagated.
    assert s["principal_overlap"] == pytest.approx(0.9)
    assert s["by_module"]["q_proj"]["update_sparsity"] == pytest.approx(0.75)
    assert s["by_module"]["norm"]["n_tensors"] == 1


def test_json_round_trip_writes_standard_json_with_nan_as_null(tmp_path):
    r = Report(rows=_rows(), summary=summarize_rows(_rows()), meta={"weightgeo_version": "x", "skipped": []})
    p = tmp_path / "sub" / "r.json"
    r.to_json(p)
    data = json.loads(p.read_text())  # strict JSON: no NaN tokens
    assert set(data) == {"rows", "summary", "meta"}
    assert data["rows"][1]["principal_overlap"] is None
    back = Report.from_json(p)
    assert back.rows[0]["shape"] == (4, 4)
    assert math.isnan(back.rows[1]["principal_overlap"])
    assert back.summary["update_sparsity"] == pytest.approx(r.summary["update_sparsity"])
    assert not list(tmp_path.glob("sub/.r.json*")), "temporary file left behind"


def test_from_json_rejects_other_files(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("[1, 2]")
    with pytest.raises(WeightgeoError, match="not a weightgeo report"):
        Report.from_json(p)


def test_csv_and_pandas_and_text(tmp_path):
    r = Report(
        rows=_rows(),
        summary=summarize_rows(_rows()),
        meta={
            "skipped": [{"name": "pos_ids", "reason": "non-floating dtype"}],
            "unmatched": {"only_base": ["lm_head.weight"], "only_ft": []},
        },
    )
    p = tmp_path / "r.csv"
    r.to_csv(p)
    lines = p.read_text().splitlines()
    assert lines[0].split(",")[:6] == ["name", "shape", "numel", "module", "layer", "update_sparsity"]
    assert "4x4" in lines[1]
    df = r.to_pandas()
    assert list(df["numel"]) == [16, 16, 4]
    text = str(r)
    assert "layers.1.q_proj.weight" in text and "summary:" in text
    assert "skipped 1 tensor(s): pos_ids (non-floating dtype)" in text
    assert "only_base: 1 tensor(s)" in text
    assert r["norm.weight"]["module"] == "norm"


def test_writing_to_a_directory_or_under_a_file_is_a_clear_error_and_missing_folders_are_created(tmp_path):
    r = Report(rows=_rows(), summary=summarize_rows(_rows()), meta={})
    (tmp_path / "out.json").mkdir()
    for write in (r.to_json, r.to_csv):
        with pytest.raises(WeightgeoError, match="is an existing directory; give a file name inside it"):
            write(tmp_path / "out.json")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(WeightgeoError, match="is a file, not a folder"):
        r.to_json(tmp_path / "afile" / "sub" / "r.json")
    r.to_json(tmp_path / "new" / "deeper" / "r.json")
    r.to_csv(tmp_path / "new2" / "r.csv")
    assert Report.from_json(tmp_path / "new" / "deeper" / "r.json").rows[0]["shape"] == (4, 4)
    assert (tmp_path / "new2" / "r.csv").read_text().startswith("name,")
    assert not list(tmp_path.rglob("*.tmp"))
    pytest.importorskip("matplotlib")
    with pytest.raises(WeightgeoError, match="figure path .* is an existing directory"):
        r.plot(tmp_path / "out.json")


def test_output_paths_folders_are_created_and_directories_refused(tmp_path):
    r = Report(rows=_rows(), summary=summarize_rows(_rows()), meta={})
    r.to_json(tmp_path / "new" / "deeper" / "r.json")  # missing folders are created
    assert json.loads((tmp_path / "new" / "deeper" / "r.json").read_text())["rows"][0]["numel"] == 16
    with pytest.raises(WeightgeoError, match="is an existing directory; give a file name"):
        r.to_json(tmp_path / "new")
    with pytest.raises(WeightgeoError, match="is an existing directory"):
        r.to_csv(tmp_path)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(WeightgeoError, match="afile is a file, not a folder"):
        r.to_json(tmp_path / "afile" / "r.json")
