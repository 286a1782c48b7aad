"""What native checkpoints hold besides weights reaches every report; the CLI's --config for native folders."""

from __future__ import annotations

import json

import pytest
import torch
from native_factories import tiny_hf, to_megatron, write_dcp

import weightgeo
from weightgeo import WeightgeoError
from weightgeo.cli import main

OPTS = dict(k=4, rank=2, progress=False)


@pytest.fixture(scope="module")
def megatron_run(tmp_path_factory):
    """An HF pair (base, fine-tune) and the same weights as two Megatron DCP folders with optimizer state,
    TransformerEngine _extra_state and training state, inside a checkpoint-N stream folder."""
    tmp = tmp_path_factory.mktemp("megatron")
    base_dir, cfg, base = tiny_hf(tmp / "hf_base", "qwen2")
    ft_dir, _, ft = tiny_hf(tmp / "hf_ft", "qwen2", perturb=3e-3)
    run = tmp / "run"
    b = write_dcp(run / "checkpoint-0", to_megatron(base, cfg, pad_to=128))
    f = write_dcp(run / "checkpoint-10", to_megatron(ft, cfg, pad_to=128))
    return base_dir, ft_dir, b, f, run


def _sides(report):
    return {s["side"] for s in report.skipped if "side" in s}


def test_source_entries_that_are_not_weights_are_listed_by_side(megatron_run):
    base_dir, _, b, f, _ = megatron_run
    ck = weightgeo.open_checkpoint(f, config=base_dir)
    r = weightgeo.compare(base_dir, f, **OPTS)
    listed = [s for s in r.skipped if s.get("side") == "ft"]
    assert [{"name": s["name"], "reason": s["reason"]} for s in listed] == ck.skipped and listed
    assert {s["reason"] for s in listed} >= {"optimizer state", "training state (train_state)"}
    assert _sides(r) == {"ft"}  # the HF base holds nothing else
    text = r.summary_text()
    assert f"not weights, not analysed: {len(listed)} entries (ft {len(listed)})" in text and "optimizer state" in text
    # both sides native: both listed; compare_many lists each fine-tune's own
    two = weightgeo.compare(weightgeo.open_checkpoint(b, config=base_dir), f, **OPTS)
    assert _sides(two) == {"base", "ft"}
    many = weightgeo.compare_many(base_dir, [f, base_dir], **OPTS)
    assert _sides(many[0]) == {"ft"} and _sides(many[1]) == set()
    # the verbs return compare's report
    verb = weightgeo.update_sparsity(base_dir, f)
    assert [s for s in verb.skipped if "side" in s] == listed


def test_stream_reports_list_every_checkpoints_entries(megatron_run):
    base_dir, _, b, f, run = megatron_run
    curve = weightgeo.rank_curve(run, k=2, hill_k=2, config=base_dir, include="attention")
    entries = [s for s in curve.skipped if "side" in s]
    assert {s["side"] for s in entries} == {"base", "ft"}
    assert {s["step"] for s in entries if s["side"] == "ft"} == {10}
    assert "not weights, not analysed" in curve.summary_text()
    onset = weightgeo.locking_onset(run, k=2, config=base_dir, include="attention")
    assert [s for s in onset.meta["skipped"] if "side" in s] == entries


def test_three_d_tensors_without_an_expert_name_are_listed(gen):
    conv = {
        "model.layers.0.conv.weight": torch.randn(6, 1, 4, generator=gen),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(6, 6, generator=gen),
    }
    ft = {k: v + 0.01 for k, v in conv.items()}
    r = weightgeo.compare(conv, ft, **OPTS)
    row = r["layers.0.conv.weight"]
    assert "update_sparsity" in row and "principal_overlap" not in row  # elementwise only ...
    assert any(p["name"] == "layers.0.conv.weight" and "3-D" in p["reason"] for p in r.meta["partial"])  # ... said so
    svd_only = weightgeo.compare(conv, ft, metrics="spectral_drift", **OPTS)
    assert [s["name"] for s in svd_only.skipped] == ["layers.0.conv.weight"]
    curve = weightgeo.rank_curve([conv, ft, {k: v + 0.02 for k, v in conv.items()}], k=2, hill_k=2)
    assert [s["name"] for s in curve.skipped] == ["layers.0.conv.weight"]  # 1-D tensors are not followed, ≥3-D listed


def test_cli_config_reads_native_folders_without_their_own(megatron_run, tmp_path, capsys):
    base_dir, ft_dir, b, f, run = megatron_run
    assert main(["compare", str(b), str(f), "--no-progress", "--k", "4", "--rank", "2"]) == 2
    assert "pass config=" in capsys.readouterr().err  # no architecture numbers anywhere
    out = tmp_path / "r.json"
    assert (
        main(
            [
                "compare",
                str(b),
                str(f),
                "--config",
                str(base_dir / "config.json"),
                "--no-progress",
                "--k",
                "4",
                "--rank",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    got = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    want = weightgeo.compare(base_dir, ft_dir, **OPTS)
    assert sorted(got) == sorted(r["name"] for r in want.rows)
    for row in want.rows:
        for key in ("update_sparsity", "principal_overlap", "spectral_drift"):
            if key in row:
                assert got[row["name"]][key] == pytest.approx(row[key], rel=1e-6), (row["name"], key)
    out2 = tmp_path / "t.json"
    assert (
        main(
            [
                "trajectory",
                str(run),
                "--config",
                str(base_dir),
                "--k",
                "2",
                "--hill-k",
                "2",
                "--include",
                "attention",
                "--no-progress",
                "--out",
                str(out2),
            ]
        )
        == 0
    )
    rows = json.loads(out2.read_text())["rows"]
    assert {r["step"] for r in rows} == {10} and {r["module"] for r in rows} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    with pytest.raises(WeightgeoError, match="config"):
        weightgeo.rank_curve(run, k=2, hill_k=2)
