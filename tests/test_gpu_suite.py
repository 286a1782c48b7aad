"""benchmarks/gpu_suite.py dry-runs on CPU (``--device cpu --small``): the same code paths the GPU run takes, so
the suite that a GPU session gets ~15 minutes for cannot rot. Timings are not checked; results and shape are."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.py"


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_device_part_dry_runs(suite, tmp_path):
    """rsvd, pair (with the float64 route inline), profile and engine at --small sizes, one k, stacks of 2."""
    out = tmp_path / "gpu.json"
    threads = suite.torch.get_num_threads()
    rec = suite.main(
        [
            "--device",
            "cpu",
            "--small",
            "--parts",
            "rsvd,pair,profile,engine",
            "--budget",
            "600",
            "--rsvd-k",
            "8",
            "--stack",
            "2",
            "--reps",
            "1",
            "--pair-reps",
            "1",
            "--batch",
            "2",
            "--ref-threads",
            "1",
            "--out",
            str(out),
        ]
    )
    assert suite.torch.get_num_threads() == threads  # the inline float64 route restores the thread count
    rows = rec["rows"]
    bad = [(r["case"], r["status"], r["note"]) for r in rows if r["status"] in ("error", "FAIL", "skipped")]
    assert not bad, bad
    rsvd = [r for r in rows if r["part"] == "rsvd" and r["status"] == "ok" and "k=" in r["case"]]
    # 4 shapes x (weightgeo bf16, weightgeo fp32, svd_lowrank), each timed against its memory floor
    assert len(rsvd) == 12
    for r in rsvd:
        assert r["ms"] > 0 and r["floor_s"] > 0 and math.isclose(r["ratio"], r["ms"] / 1e3 / r["floor_s"])
        assert r["sigma_err_planted"] < 0.1 and r["sigma_err_ref"] < 0.1  # q = 2 on σᵢ = i^-0.5: a few %
    assert [r["status"] for r in rows if "svd_lowrank on the bf16 stack" in r["case"]] in (["unsupported"], ["ok"])
    agree = [r for r in rows if "agreement with the float64 CPU route" in r["case"]]
    assert len(agree) == 4 and all(r["status"] == "pass" for r in agree)
    assert all(r["worst_angle_over_tol"] < 0.01 and r["nss_rel_err"] < 1e-4 for r in agree)
    projection = [r for r in rows if "whole model projected" in r["case"]]
    assert len(projection) == 1 and projection[0]["projected_s"] > 0
    steps = rec["parts"]["profile"]["steps"]
    assert sorted(steps) == ["down_proj", "gate_proj", "k_proj", "q_proj"]
    assert all(t >= 0 for v in steps.values() for t in v["steps_s"].values())
    assert any("CholeskyQR2" in r["case"] for r in rows) and any("eigvalsh" in r["case"] for r in rows)
    engine = [r for r in rows if r["part"] == "engine" and r["case"].startswith("weightgeo.compare")]
    assert len(engine) == 1 and engine[0]["rows"] == 16  # 2 layers x 7 matrices + 2 norms
    saved = json.loads(out.read_text())
    assert saved["table"].count("\n| rsvd |") == len([r for r in rows if r["part"] == "rsvd"])
    assert saved["env"]["ceilings"]["copy_TBs"] > 0 and "bandwidth_for_floor" in saved["env"]


def test_float64_route_in_a_background_process(suite):
    """The GPU default: the float64 route runs as benchmarks/_f64_route.py beside the device parts."""
    rec = suite.main(
        [
            "--device",
            "cpu",
            "--small",
            "--parts",
            "pair",
            "--ref",
            "background",
            "--ref-threads",
            "1",
            "--budget",
            "600",
            "--pair-reps",
            "1",
            "--batch",
            "1",
        ]
    )
    agree = [r for r in rec["rows"] if "agreement with the float64 CPU route" in r["case"]]
    assert len(agree) == 4 and all(r["status"] == "pass" and "ran alongside" in r["note"] for r in agree)
    assert rec["parts"]["pair"]["ref_mode"] == "background" and "ref_worker_output" not in rec["parts"]["pair"]


def test_a_short_budget_skips_and_says_so(suite, tmp_path):
    """A part whose time box is spent is listed as skipped with the reason, and the JSON is still written."""
    out = tmp_path / "gpu.json"
    rec = suite.main(["--device", "cpu", "--small", "--parts", "rsvd,engine", "--budget", "1", "--out", str(out)])
    skipped = [r for r in rec["rows"] if r["status"] == "skipped"]
    assert [r["part"] for r in skipped] == ["rsvd", "engine"] and all("time box" in r["note"] for r in skipped)
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(rec["rows"]))


def test_tests_part_selects_the_cuda_tests(suite, tmp_path):
    """``pytest -m cuda`` in a subprocess, read back per test (here: the CPU-runnable CUDA case of bad inputs)."""
    # a generous budget: the part's time box is a share of it, and a pytest start-up on a loaded 2-core machine
    # can take longer than the share of a 60 s budget (the test checks the selection, not the time box)
    rec = suite.main(
        ["--device", "cpu", "--small", "--parts", "tests", "--tests", "tests/test_bad_inputs.py", "--budget", "900"]
    )
    rows = [r for r in rec["rows"] if r["part"] == "tests"]
    assert [(r["case"], r["status"]) for r in rows[:-1]] == [
        ("tests/test_bad_inputs.py::test_tensor_level_rejects[CUDA asked for but absent]", "passed")
    ]
    assert rows[-1]["case"] == "pytest -m cuda" and rows[-1]["status"] == "ok"


def test_no_cuda_is_a_clear_instruction(suite, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(suite.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        suite.main(["--out", str(tmp_path / "g.json")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "installs nothing" in err and "CUDA build of torch" in err and "--device cpu --small" in err
    assert "no usable CUDA" in json.loads((tmp_path / "g.json").read_text())["error"]
