import json
import subprocess
import sys

import torch
from factories import tiny_llama_state, write_hf_checkpoint

from weightgeo.cli import main


def _pair(tmp_path):
    base = tiny_llama_state(num_layers=1, hidden=8, intermediate=16, vocab=20)
    ft = {k: (v.float() * 1.01).to(v.dtype) for k, v in base.items()}
    return write_hf_checkpoint(tmp_path / "b", base), write_hf_checkpoint(tmp_path / "f", ft)


def test_compare_prints_table_and_summary_and_writes_json(tmp_path, capsys):
    b, f = _pair(tmp_path)
    out = tmp_path / "r.json"
    assert main(["compare", str(b), str(f), "--k", "4", "--rank", "2", "--no-progress", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "layers.0.self_attn.q_proj.weight" in text and "summary:" in text and "update_sparsity" in text
    data = json.loads(out.read_text())
    assert set(data) == {"rows", "summary", "meta"} and data["meta"]["params"]["k"] == 4


def test_several_fine_tunes_write_one_report_each(tmp_path, capsys):
    b, f = _pair(tmp_path)
    f2 = write_hf_checkpoint(
        tmp_path / "f2",
        {
            k: (v.float() * 1.05).to(v.dtype)
            for k, v in tiny_llama_state(num_layers=1, hidden=8, intermediate=16, vocab=20).items()
        },
    )
    out = tmp_path / "r.json"
    assert (
        main(
            [
                "compare",
                str(b),
                str(f),
                str(f2),
                "--k",
                "4",
                "--rank",
                "2",
                "--summary",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    # --summary: one side-by-side table (a column per fine-tune, labelled), each label tied to its path
    assert f"== {f} ==  (f)" in text and f"== {f2} ==  (f2)" in text
    header = next(line for line in text.splitlines() if line.startswith("metric"))
    assert header.split() == ["metric", "f", "f2"]
    assert text.count("update_sparsity") == 1
    reports = [json.loads((tmp_path / f"r-{i}.json").read_text()) for i in (1, 2)]
    assert [r["meta"]["ft"] for r in reports] == [str(f), str(f2)]
    assert all(r["meta"]["shared_base"] for r in reports)
    drift = [r["summary"]["spectral_drift"] for r in reports]
    assert drift[0] < drift[1]


def test_summary_only_and_csv(tmp_path, capsys):
    b, f = _pair(tmp_path)
    out = tmp_path / "r.csv"
    assert (
        main(
            [
                "compare",
                str(b),
                str(f),
                "--metrics",
                "update_sparsity",
                "--summary",
                "--no-progress",
                "--include",
                "attention",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert text.startswith("summary:") and "q_proj.weight" not in text.split("by_module")[0]
    assert out.read_text().splitlines()[0].startswith("name,shape,numel,module,layer,")


def test_bad_input_exits_2_with_the_message(tmp_path, capsys):
    b, _ = _pair(tmp_path)
    assert main(["compare", str(b), str(tmp_path / "missing"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("weightgeo: error:") and "missing" in err
    assert main(["compare", str(b), str(b), "--metrics", "nope"]) == 2
    assert "unknown metric 'nope'" in capsys.readouterr().err


def test_console_entry_point_runs_as_module(tmp_path):
    b, f = _pair(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "weightgeo", "compare", str(b), str(f), "--summary", "--metrics", "update_sparsity"],
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "update_sparsity" in proc.stdout


def test_trajectory_prints_curves_and_onset_and_draws(tmp_path, capsys):
    import torch

    base = tiny_llama_state(num_layers=1, hidden=16, intermediate=32, vocab=20, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    direction = {k: torch.randn(v.shape, generator=g) for k, v in base.items()}
    for step in (0, 10, 20, 30):
        write_hf_checkpoint(
            tmp_path / "run" / f"checkpoint-{step}", {k: v + 1e-2 * step * direction[k] for k, v in base.items()}
        )
    out, fig = tmp_path / "traj.json", tmp_path / "traj.png"
    assert (
        main(
            [
                "trajectory",
                str(tmp_path / "run"),
                "--include",
                "attention",
                "--k",
                "4",
                "--no-progress",
                "--out",
                str(out),
                "--plot",
                str(fig),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    # A straight-line update keeps one direction: locked from the first checkpoint after the base.
    assert "locking onset (Sim_4 >= 0.9 from then on): step 10" in text
    data = json.loads(out.read_text())
    assert {r["step"] for r in data["rows"]} == {10, 20, 30}
    assert {r["module"] for r in data["rows"]} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert fig.stat().st_size > 10_000


def test_out_to_a_directory_is_refused_before_the_analysis_and_missing_folders_are_created(tmp_path, capsys):
    b, f = _pair(tmp_path)
    (tmp_path / "dir.json").mkdir()
    assert main(["compare", str(b), str(f), "--no-progress", "--out", str(tmp_path / "dir.json")]) == 2
    cap = capsys.readouterr()
    assert "is an existing directory" in cap.err and cap.out == ""  # nothing was computed
    assert main(["trajectory", str(tmp_path), "--no-progress", "--plot", str(tmp_path / "dir.json")]) == 2
    assert "--plot path" in capsys.readouterr().err
    out = tmp_path / "results" / "sft" / "r.json"
    assert (
        main(["compare", str(b), str(f), "--k", "4", "--rank", "2", "--summary", "--no-progress", "--out", str(out)])
        == 0
    )
    assert f"created folder {tmp_path / 'results'}" in capsys.readouterr().err
    assert json.loads(out.read_text())["rows"]


def test_cache_info_and_prune(tmp_path, capsys, monkeypatch):
    import os
    import time

    from weightgeo.cache import ResultCache

    monkeypatch.setenv("WEIGHTGEO_CACHE", str(tmp_path / "env-cache"))
    cache = ResultCache(tmp_path / "c")
    keys = [cache.key("pair_row", inputs=[{"f": i}], policy="p") for i in range(3)]
    for i, k in enumerate(keys):
        cache.put(k, {"i": i})
        os.utime(cache.path(k), (time.time() - 86400 * (5 - i),) * 2)  # 5, 4 and 3 days old
    assert main(["cache", "info", "--cache", str(tmp_path / "c")]) == 0
    assert "3 entries" in capsys.readouterr().out
    assert main(["cache", "prune", "--cache", str(tmp_path / "c"), "--older-than", "3.5", "--dry-run"]) == 0
    assert "would remove 2 file(s)" in capsys.readouterr().out and cache.info().entries == 3
    assert main(["cache", "prune", "--cache", str(tmp_path / "c"), "--older-than", "3.5"]) == 0
    assert "removed 2 file(s)" in capsys.readouterr().out and cache.info().entries == 1
    assert main(["cache", "prune", "--cache", str(tmp_path / "c"), "--max-gb", "0"]) == 0
    assert cache.info().entries == 0
    assert main(["cache", "info"]) == 0  # WEIGHTGEO_CACHE's folder, not yet created
    assert f"weightgeo cache at {tmp_path / 'env-cache'}: 0 entries" in capsys.readouterr().out
    assert main(["cache", "prune", "--max-gb", "-1"]) == 2
    assert "give a number" in capsys.readouterr().err


def test_out_creates_missing_folders_and_refuses_a_directory_before_the_pass(tmp_path, capsys):
    b, f = _pair(tmp_path)
    out = tmp_path / "runs" / "today" / "r.csv"
    assert main(["compare", str(b), str(f), "--metrics", "update_sparsity", "--no-progress", "--out", str(out)]) == 0
    assert out.read_text().startswith("name,shape")
    capsys.readouterr()
    (tmp_path / "d.json").mkdir()
    assert main(["compare", str(b), str(f), "--no-progress", "--out", str(tmp_path / "d.json")]) == 2
    captured = capsys.readouterr()
    assert "is an existing directory" in captured.err and "summary:" not in captured.out  # refused before computing


def test_bad_flags_are_named_as_flags(tmp_path, capsys):
    """Validation messages spell options the way the interface in use does: --hill-k on the command line."""
    b, f = _pair(tmp_path)
    cases = {
        ("trajectory", str(tmp_path), "--hill-k", "1"): "--hill-k must be an integer ≥ 2",
        ("compare", str(b), str(f), "--k", "0"): "--k must be an integer ≥ 1",
        ("compare", str(b), str(f), "--batch-mb", "-1"): "--batch-mb must be an integer ≥ 0",
        ("compare", str(b), str(f), "--dtype", "int8"): "--dtype int8: give a floating torch dtype",
        ("compare", str(b), str(f), "--eta", "-1"): "--eta must be a finite relative tolerance",
        ("trajectory", str(tmp_path), "--follow", "--poll-s", "-1"): "--poll-s -1.0: give a number of seconds",
        ("cache", "prune", "--cache", str(tmp_path / "c"), "--max-gb", "-1"): "--max-gb -1.0: give a number of GB",
        ("cache", "prune", "--cache", str(tmp_path / "c"), "--max-gb", "nan"): "--max-gb nan: give a number of GB",
    }
    for argv, want in cases.items():
        assert main([*argv, "--no-progress"] if argv[0] != "cache" else list(argv)) == 2, argv
        err = capsys.readouterr().err
        assert want in err and "Traceback" not in err, (argv, err)


def test_dtype_flag_rounds_both_sides(tmp_path, capsys):
    b, f = _pair(tmp_path)
    out = tmp_path / "r.json"
    assert (
        main(
            ["compare", str(b), str(f), "--k", "4", "--rank", "2", "--dtype", "float16", "--no-progress"]
            + ["--out", str(out)]
        )
        == 0
    )
    assert json.loads(out.read_text())["meta"]["params"]["dtype"] == "float16"


def test_mask_overlap_prints_the_pairwise_matrices_and_writes_one_report_per_pair(tmp_path, capsys):
    base = tiny_llama_state(num_layers=1, hidden=16, intermediate=32, vocab=40)
    g = torch.Generator().manual_seed(0)

    def moved(p):
        return {
            k: torch.where(torch.rand(v.shape, generator=g) < p, (v.float() + 0.5).to(v.dtype), v)
            for k, v in base.items()
        }

    b = write_hf_checkpoint(tmp_path / "b", base)
    fts = [str(write_hf_checkpoint(tmp_path / f"f{i}", moved(p))) for i, p in enumerate((0.2, 0.5, 0.5))]
    out = tmp_path / "ov" / "masks.json"
    assert main(["compare", str(b), *fts, "--mask-overlap", "--no-progress", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Jaccard index" in text and "overlap coefficient" in text and "[3]" in text
    reports = {p.name: json.loads(p.read_text()) for p in sorted(out.parent.glob("masks-*.json"))}
    assert set(reports) == {"masks-1-2.json", "masks-1-3.json", "masks-2-3.json"}
    s = reports["masks-2-3.json"]["summary"]
    assert f"{s['mask_jaccard']:.4f} ({s['random_mask_jaccard']:.4f})" in text  # the matrix shows the pooled figure
    assert main(["compare", str(b), fts[0], "--mask-overlap"]) == 2
    assert "two or more fine-tunes" in capsys.readouterr().err
    assert main(["compare", str(b), *fts[:2], "--mask-overlap", "--metrics", "nss"]) == 2
