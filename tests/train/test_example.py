"""examples/opd_vs_sft.py: the claim criteria on hand-made numbers, and a seconds-long end-to-end smoke run."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ex():
    path = ROOT / "examples" / "opd_vs_sft.py"
    spec = importlib.util.spec_from_file_location("opd_vs_sft_example", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve their module through sys.modules
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


def _pair(unchanged, nss, angle, density, low):
    return {"unchanged_frac": unchanged, "nss_mean": nss, "max_angle_mean_deg": angle, "density": density,
            "low_mag_overlap": low}


def _stream(srank, sim=(), steps=(16, 32, 48, 64)):
    return {"steps": list(steps), "srank": list(srank), "sim_to_final": list(sim), "sim_random_baseline": 0.125,
            "locking_onset_step": None}


def _run(acc, se=0.01):
    return {"end": {"acc_t1": acc, "acc_t1_se": se}}


def _numbers(ex, *, paper=True):
    """Numbers shaped like the paper's findings (paper=True) or like their opposite."""
    plan = ex.Plan(sft_steps=64, opd_steps=64, rlvr_steps=64, sparsify=[("random", 0.5)], mix_alphas=[0.05])
    if paper:
        pairs = {"sft": _pair(0.1, 1e-3, 10.0, 0.9, 0.3), "opd": _pair(0.5, 1e-4, 1.0, 0.5, 0.5),
                 "rlvr": _pair(0.8, 1e-5, 0.3, 0.2, 0.7)}
        opd = _stream([20, 21, 20, 19], [0.95, 0.96, 0.98, 1.0])
        streams = {"sft": _stream([10, 20, 30, 40], [0.3, 0.5, 0.8, 1.0]), "opd": opd,
                   "rlvr": _stream([20, 15, 12, 10], [0.4, 0.6, 0.8, 1.0]),
                   "ctrl_random_0.5": _stream([21, 21, 20, 19], opd["sim_to_final"]),
                   "ctrl_offpolicy": _stream([19, 20, 21, 20], opd["sim_to_final"]),
                   "ctrl_mix_0.05": _stream([20, 15, 12, 10], opd["sim_to_final"])}
        runs = {"opd": _run(0.9), "opd_proj": _run(0.9), "sft": _run(0.9), "sft_proj": _run(0.8)}
    else:
        pairs = {"sft": _pair(0.8, 1e-5, 0.3, 0.2, 0.7), "opd": _pair(0.5, 1e-4, 1.0, 0.5, 0.5),
                 "rlvr": _pair(0.1, 1e-3, 10.0, 0.9, 0.3)}
        flat = _stream([20, 20, 20, 20], [0.2, 0.4, 0.6, 1.0])
        streams = {"sft": _stream([40, 30, 20, 10], [0.95, 0.95, 0.95, 1.0]), "opd": flat,
                   "rlvr": _stream([10, 20, 30, 40], [0.2, 0.4, 0.6, 1.0]),
                   "ctrl_random_0.5": _stream([40, 40, 40, 40], flat["sim_to_final"]),
                   "ctrl_offpolicy": flat, "ctrl_mix_0.05": flat}
        runs = {"opd": _run(0.9), "opd_proj": _run(0.5), "sft": _run(0.9), "sft_proj": _run(0.9)}
    return plan, pairs, streams, runs


def test_claims_all_pass_on_paper_shaped_numbers(ex):
    claims = ex.evaluate_claims(*_numbers(ex, paper=True))
    assert [c["claim"] for c in claims] == list(range(1, 8))
    assert all(c["reproduced"] for c in claims), [c for c in claims if not c["reproduced"]]
    json.dumps(claims)  # the values are plain JSON


def test_claims_all_fail_on_opposite_numbers(ex):
    claims = ex.evaluate_claims(*_numbers(ex, paper=False))
    assert not any(c["reproduced"] for c in claims), [c["claim"] for c in claims if c["reproduced"]]


def test_shape_and_curve_deviation(ex):
    assert ex._shape(_stream([10, 10, 11, 12]), 64)[0] == "flat"  # +20% from the 20% checkpoint
    assert ex._shape(_stream([10, 10, 11, 13]), 64)[0] == "rising"
    assert ex._shape(_stream([0.0, 0.0, 1, 1]), 64)[0] == "undefined"  # nothing passed the bf16 gate yet
    ref = _stream([10, 20, 10, 20])
    assert ex._curve_dev(_stream([11, 22, 11, 22]), ref) == pytest.approx(0.1)
    assert ex._curve_dev(_stream([11, 22], steps=(16, 32)), ref) == pytest.approx(0.1)  # shared checkpoints
    assert math.isnan(ex._curve_dev(_stream([1.0], steps=(8,)), ref))


def test_smoke_run_end_to_end(ex, tmp_path):
    """The whole pipeline in seconds: training, weightgeo measurement, Tracker agreement, report, figures."""
    out = tmp_path / "smoke"
    threads = torch.get_num_threads()
    try:
        assert ex.main(["--smoke", "--threads", "1", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)  # the example pins the process's intra-op threads
    rep = json.loads((out / "report.json").read_text())
    assert [c["claim"] for c in rep["claims"]] == list(range(1, 8))
    assert all(isinstance(c["reproduced"], bool) for c in rep["claims"])
    for m in ("sft", "opd", "rlvr"):
        p = rep["pairs"][m]
        assert 0 < p["unchanged_frac"] < 1 and p["nss_mean"] > 0 and p["n_matrices"] == 24
        s = rep["streams"][m]
        assert len(s["steps"]) == len(s["srank"]) == len(s["sim_to_final"]) == len(s["unchanged_frac"])
        assert s["sim_to_final"][-1] == pytest.approx(1.0, abs=1e-6)
    tr = rep["tracker_opd"]
    assert tr["rank_curve"]["steps"] == rep["streams"]["opd"]["steps"]
    assert set(tr["locking_onset"]) >= {"step", "per_matrix", "mean_similarity", "k", "threshold", "final_step"}
    agree = tr["agreement_with_offline"]
    assert agree["rows_matched"] == agree["rows_tracker"] == agree["rows_offline"] > 0
    for key, d in agree["max_diff"].items():
        assert d["max_rel" if key != "final_subspace_similarity" else "max_abs"] <= 1e-3, (key, d)
    assert agree["same_onset"]
    assert "## Claims" in (out / "report.md").read_text()
    pytest.importorskip("matplotlib")
    assert rep["figures"] and all((out / f).stat().st_size > 10_000 for f in rep["figures"])
