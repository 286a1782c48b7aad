"""examples/opd_vs_sft.py and its miniature/ package: the claim statistics' directions on constructed
measurements, the report schema, and a seconds-long end-to-end smoke run (the CI run of the whole pipeline)."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from weightgeo.train.stats import VERDICTS

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ex():
    path = ROOT / "examples" / "opd_vs_sft.py"
    spec = importlib.util.spec_from_file_location("opd_vs_sft_example", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve their module through sys.modules
    try:
        spec.loader.exec_module(mod)  # puts examples/ on sys.path: the miniature/ package beside it imports
        import miniature.claims
        import miniature.jobs
        import miniature.plan

        mod.plan, mod.claims, mod.jobs = miniature.plan, miniature.claims, miniature.jobs
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


M = 6  # matrices in the constructed measurements
STEPS = [20, 40, 60, 80, 100]


def _stream(rng, srank, sim20, unchanged, steps=STEPS):
    """A measure_stream-shaped result: stable rank per step (a curve), Sim_K at every step, unchanged rows."""
    srank = np.interp(steps, [steps[0], steps[-1]], srank)
    noise = lambda: rng.normal(0, 0.01, M)
    return {
        "steps": list(steps),
        "srank": {str(s): list(v * (1 + noise())) for s, v in zip(steps, srank)},
        "sim": {str(k): {str(s): list(np.clip(sim20 + noise(), 0, 1)) for s in steps} for k in (1, 2, 4, 16)},
        "unchanged_rows": {
            str(steps[-1]): [[f"m{i}", 100 * (i + 1), unchanged + 0.01 * rng.normal()] for i in range(M)]
        },
    }


def _pair(rng, nss, angle, density, low):
    j = lambda x: x * (1 + rng.normal(0, 0.02))
    return {
        "rows": [
            {
                "name": f"m{i}",
                "numel": 100,
                "spectral_drift": j(nss),
                "max_principal_angle": j(angle),
                "density": j(density),
                "low_magnitude_overlap": j(low),
            }
            for i in range(M)
        ]
    }


def _acc_file(out, name, reading, t1):
    d = out / "runs" / name
    d.mkdir(parents=True, exist_ok=True)
    t1 = torch.as_tensor(t1, dtype=torch.uint8)
    save_file({f"t1@{reading}": t1, f"greedy@{reading}": t1[:, 0].contiguous()}, str(d / "eval.safetensors"))


def _constructed(ex, out, *, paper: bool):
    """Measurements shaped like the paper's findings (paper=True) or like their opposite, 3 seeds."""
    plan = ex.plan.Plan(
        seeds=3,
        sft_steps=100,
        opd_steps=100,
        rlvr_steps=100,
        rlvr_matched=100,
        every=20,
        controls=True,
        project_ks=(4,),
        project_seeds=3,
        sparsify=(("random", 0.5),),
        mix_alphas=(0.05,),
    )
    rng = np.random.default_rng(0)
    # (unchanged, NSS, angle, density, low-mag overlap, srank start->end, Sim_K at 20%)
    P = {
        "sft": (0.1, 1e-3, 10.0, 0.9, 0.3, (10, 40), 0.3),
        "opd": (0.5, 1e-4, 1.0, 0.5, 0.5, (20, 20), 0.95),
        "rlvr": (0.8, 1e-5, 0.3, 0.2, 0.7, (20, 10), 0.4),
        "null": (0.9, 1e-6, 0.1, 0.1, 0.8, (30, 30), 0.2),
    }
    if not paper:  # SFT and RLVR swap; OPD rises; SFT locks, OPD does not
        P["sft"], P["rlvr"] = (0.8, 1e-5, 0.3, 0.2, 0.7, (20, 10), 0.95), (0.1, 1e-3, 10.0, 0.9, 0.3, (10, 40), 0.4)
        P["opd"] = (0.5, 1e-4, 1.0, 0.5, 0.5, (10, 20), 0.2)
    res = {}
    for m, (u, nss, ang, dens, low, sr, sim) in P.items():
        for s in range(3):
            res[f"m_{m}_s{s}"] = _stream(rng, sr, sim, u)
            res[f"p_{m}_s{s}"] = _pair(rng, nss, ang, dens, low)
            if m == "rlvr":
                res[f"m_rlvr_s{s}@100"], res[f"p_rlvr_s{s}@100"] = res[f"m_rlvr_s{s}"], res[f"p_rlvr_s{s}"]
    opd_sr = P["opd"][5]
    keep_sr, mix_sr = (opd_sr, (40, 60)) if paper else ((40, 60), opd_sr)
    res["m_ctrl_random_0.5"] = _stream(rng, keep_sr, 0.9, 0.5)
    res["m_ctrl_mix_0.05"] = _stream(rng, mix_sr, 0.9, 0.5)
    res["ctrl_mix_0.05"] = {"summary": {"opd_share_mean": 0.2}}
    # accuracies: 400 prompts x 4 samples; OPD gains, SFT loses to projection (paper) or the reverse
    n = 400
    u = rng.uniform(size=(n, 4))
    base_p = rng.uniform(0.3, 0.9, size=(n, 1))
    draw = lambda shift: (u < np.clip(base_p + shift, 0, 1)).astype(np.uint8)
    _acc_file(out, "sft_s0", 100, draw(0.0))
    for s in range(3):
        _acc_file(out, f"sft_s{s}", 100, draw(0.0))
        _acc_file(out, f"opd_s{s}", 100, draw(0.05))
        _acc_file(out, f"opd_head_s{s}", 100, draw(0.01))
        _acc_file(out, f"opd_proj_k4_s{s}", 100, draw(0.05 if paper else -0.1))
        _acc_file(out, f"sft_proj_k4_s{s}", 100, draw(-0.1 if paper else 0.05))
    return ex.claims.Data(plan, res, out)


@pytest.mark.parametrize("paper", [True, False])
def test_claim_directions_on_constructed_measurements(ex, tmp_path, paper, monkeypatch):
    monkeypatch.setattr(ex.claims, "N_BOOT", 300)
    D = _constructed(ex, tmp_path, paper=paper)
    ev = ex.claims.evaluate_claims(D, {"passed": True})
    verdicts = {c["id"]: c["verdict"] for c in ev["claims"]}
    want = "reproduced" if paper else "contradicted"
    assert verdicts == {i: want for i in range(1, 8)}, ev["details"]
    pk = ev["primary_k"]  # K* = the largest K <= the smaller stable rank at 20% (here 10, at step 20)
    assert pk["k"] == 4 and pk["s"] == pytest.approx(10, rel=0.05)
    for c in ev["claims"]:
        assert set(c) == {"id", "text", "verdict", "statistic", "ci95", "per_seed"}
        assert len(c["per_seed"]) == (1 if c["id"] == 7 else 3) and c["ci95"][0] <= c["statistic"] <= c["ci95"][1]
    # a failed regime check makes every claim untestable, whatever the numbers
    ev2 = ex.claims.evaluate_claims(D, {"passed": False})
    assert {c["verdict"] for c in ev2["claims"]} == {"untestable"}


def test_claim6_needs_an_opd_gain(ex, tmp_path, monkeypatch):
    monkeypatch.setattr(ex.claims, "N_BOOT", 300)
    D = _constructed(ex, tmp_path, paper=True)
    anchor = ex.jobs.load_eval(tmp_path, "sft_s0", 100)["t1"]
    for s in range(3):  # OPD now gains nothing over the anchor: "keeps OPD's accuracy" would be vacuous
        _acc_file(tmp_path, f"opd_s{s}", 100, anchor)
    c6 = next(c for c in ex.claims.evaluate_claims(D, {"passed": True})["claims"] if c["id"] == 6)
    assert c6["verdict"] == "untestable"


def test_smoke_run_end_to_end(ex, tmp_path):
    """The whole pipeline in seconds: training, regime, weightgeo measurement, Tracker agreement, report, figures."""
    out = tmp_path / "smoke"
    threads = torch.get_num_threads()
    try:
        assert ex.main(["--smoke", "--jobs", "1", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)  # the example pins the process's intra-op threads
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["regime"]) == {
        "teacher_acc_t1",
        "teacher_acc_greedy",
        "anchor_acc_t1",
        "anchor_acc_greedy",
        "reverse_kl_nats",
        "response_tokens",
        "checks",
        "passed",
    }
    assert set(rep["regime"]["checks"]) == {"R1", "R2", "R3"}
    assert all(isinstance(v, bool) for v in rep["regime"]["checks"].values())
    assert rep["regime"]["passed"] == all(rep["regime"]["checks"].values())
    assert rep["regime"]["response_tokens"] >= 16
    assert [c["id"] for c in rep["claims"]] == list(range(1, 8))
    for c in rep["claims"]:
        assert set(c) == {"id", "text", "verdict", "statistic", "ci95", "per_seed"}
        assert c["verdict"] in VERDICTS and (c["ci95"] is None or len(c["ci95"]) == 2)
        if not rep["regime"]["passed"]:
            assert c["verdict"] == "untestable"
    # the streams: bf16 checkpoints and fp32 masters, measured; the null and both RLVR readings exist
    assert (out / "runs" / "opd_s0" / "fp32" / "checkpoint-4" / "model.safetensors").is_file()
    done = {p.stem for p in (out / "results").glob("*.json")}
    assert {"m_null_s0", "m_rlvr_s0", "m_rlvr_s0@4", "p_rlvr_s0@4"} <= done
    c_tilde = rep["mechanism"]["consistency_c_tilde"]["opd_s0"]["by_type"]
    assert {"q_proj", "lm_head", "embed_tokens"} <= set(c_tilde) and all(v["c_tilde"] > 0 for v in c_tilde.values())
    assert set(rep["mechanism"]["half_ulp_over_lr_anchor"]["by_type"]) >= {"q_proj", "down_proj", "lm_head"}
    assert rep["mechanism"]["realised_opd_share"]["ctrl_mix_0.05"] is not None
    tr = rep["tracker_opd"]
    assert tr["rows_matched"] == tr["rows_tracker"] == tr["rows_offline"] > 0
    assert max(tr["max_rel_diff"].values()) <= 1e-3
    md = (out / "report.md").read_text()
    assert "## Regime" in md and "## Claims" in md
    # the report opens with the conclusion, then every link with its own verdict and CI, then the claims
    sections = [line for line in md.splitlines() if line.startswith("## ")]
    assert sections[:3] == [
        "## Conclusion",
        "## Every link (each claim is the smallest of its links; > 0 = the paper's direction)",
        "## Claims",
    ]
    links = [d for d in rep["claim_details"] if not d.get("not_run")]
    n_links = sum(len(d["links"]) for d in links)
    table = md.split("## Every link")[1].split("## Claims")[0]
    assert table.count("\n| ") - 1 == n_links  # a row per link (the header row aside)
    assert "regime checks" in md.split("## Every link")[0]
    page = (out / "report.html").read_text()
    assert page.startswith("<!doctype html>") and "Conclusion" in page and "<script" not in page
    assert not __import__("re").search(r"(src|href)=[\"'](https?:)?//", page), "report.html must open offline"
    pytest.importorskip("matplotlib")
    assert set(rep["figures"]) == {"fig_trajectories.png", "fig_simk.png", "fig_projection.png", "fig_controls.png"}
    assert all((out / f).stat().st_size > 10_000 for f in rep["figures"])
    assert set(rep["figure_captions"]) == set(rep["figures"])
    assert page.count("<svg") >= len(rep["figures"])  # the figures inline, plus weightgeo's heatmaps
    assert (out / "geometry.html").is_file() and "heatmap" in page
