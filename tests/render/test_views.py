"""What a reader sees without a browser: terminal tables within 120 columns, the side-by-side summary, the
notebook view, pandas frames, the page's content and self-containment, figures from Report.plot and the CLI,
and values that were not measured shown as such (never as 0)."""

from __future__ import annotations

import json
import math
import re

import pytest

from weightgeo import Report
from weightgeo.cli import main
from weightgeo.render.cells import NOT_MEASURED, fmt, reason
from weightgeo.render.html import report_page
from weightgeo.render.panels import pair_panels, trajectory_panels
from weightgeo.render.text import side_by_side


def _widest(text: str) -> int:
    return max(len(line) for line in text.splitlines())


def _long_report(n_layers: int = 24) -> Report:
    """A 0.5B-shaped comparison (long names, every metric) without computing anything."""
    rows = []
    for i in range(n_layers):
        for mod, shape in (("q_proj", (896, 896)), ("k_proj", (128, 896)), ("down_proj", (896, 4864))):
            kind = "mlp" if mod == "down_proj" else "self_attn"
            rows.append(
                {
                    "name": f"model.layers.{i}.{kind}.{mod}.weight",
                    "shape": shape,
                    "numel": shape[0] * shape[1],
                    "module": mod,
                    "layer": i,
                    "dtype": "bfloat16",
                    "update_sparsity": 0.8 + i / 1000,
                    "principal_overlap": None if mod == "k_proj" else 0.99,
                    "max_principal_angle": None if mod == "k_proj" else 1.5 + i / 10,
                    "mean_principal_angle": 0.3,
                    "k_effective": 512,
                    "spectral_gap": 1.01,
                    "spectral_drift": 1e-4 * (1 + i),
                    "stable_rank": 30.0,
                    "delta_frobenius": 0.01,
                    "density": 0.2,
                    "principal_mask_overlap": 0.3,
                    "low_magnitude_overlap": 0.8,
                    **(
                        {
                            "not_measurable": {
                                "principal_overlap": "k=512 ≥ 128 rows",
                                "max_principal_angle": "k=512 ≥ 128 rows",
                            }
                        }
                        if mod == "k_proj"
                        else {}
                    ),
                }
            )
    from weightgeo.report import summarize_rows

    return Report(
        rows=rows,
        summary=summarize_rows(rows),
        meta={"kind": "compare", "ft": "/runs/opd/checkpoint-300", "params": {"k": 512, "alpha": 0.5}},
    )


def test_cells_show_not_measured_with_its_reason_never_zero():
    assert fmt(None) == fmt(math.nan) == NOT_MEASURED
    row = {"name": "k", "principal_overlap": None, "not_measurable": {"principal_overlap": "k=512 ≥ 128 rows"}}
    assert reason(row, "principal_overlap") == "k=512 ≥ 128 rows"
    assert reason({"name": "n", "x": None, "reason": "why"}, "x") == "why"
    assert reason({"name": "n", "x": 0.0}, "x") == ""  # 0 is a measured value
    r = _long_report(2)
    page = report_page({"OPD": r})
    # the k_proj cells are hatched with the reason on hover, and the table says n/m with it
    assert 'class="cell nm"' in page and "not measured (k=512 ≥ 128 rows)" in page
    assert f'title="k=512 ≥ 128 rows">{NOT_MEASURED}</td>' in page
    assert "values not measurable" in page  # counted in the accounting section


def test_tables_fit_120_columns_and_name_what_they_leave_out():
    r = _long_report()
    text = str(r)
    assert _widest(text) <= 120, text
    assert "more columns:" in text and "table(width=None) shows all" in text
    assert _widest(r.table(width=80)) <= 80
    assert _widest(r.summary_text()) <= 120
    assert len(r.summary_text().splitlines()) < 24  # the compact summary
    wide = r.table(width=None)
    assert "k_effective" in wide and _widest(wide) > 120  # everything, on request
    assert r.table(columns=["name", "spectral_drift"]).splitlines()[1].split() == ["name", "drift"]


def test_cli_output_fits_the_terminal_and_takes_columns_and_wide(tiny_run, tmp_path, capsys):
    assert _widest(tiny_run.compare_out) <= 120
    assert "==  (SFT)" in tiny_run.compare_out and "==  (RLVR)" in tiny_run.compare_out  # each table's input
    header = next(line for line in tiny_run.compare_out.splitlines() if line.startswith("metric"))
    assert header.split() == ["metric", "SFT", "RLVR"]  # several fine-tunes in one side-by-side table
    assert main(["report", *map(str, tiny_run.pair_json), "--columns", "60"]) == 0
    out = capsys.readouterr().out
    table = out.split("side by side:")[1]  # above it, a line per input: == its path == (its label)
    assert _widest(table) <= 60 and "sft" in table and "rlvr" in table  # labels from the paths
    assert main(["report", *map(str, tiny_run.pair_json), "--labels", "a-long-label-for-sft", "b", "--wide"]) == 0
    assert "a-long-label-for-sft" in capsys.readouterr().out
    assert main(["report", str(tiny_run.pair_json[0]), "--columns", "10"]) == 2
    assert "--columns 10" in capsys.readouterr().err
    assert (
        main(["report", *map(str, tiny_run.pair_json), "--labels", "only-one", "--out", str(tmp_path / "p.html")]) == 2
    )
    assert "1 label(s) for 2 input(s)" in capsys.readouterr().err
    assert main(["report", str(tiny_run.pair_json[0]), "--out", str(tmp_path / "p.png")]) == 2
    assert "needs a .html path" in capsys.readouterr().err


def test_side_by_side_summary_has_a_column_per_run(tiny_run):
    runs = {"a": Report.from_json(tiny_run.pair_json[0]), "b": Report.from_json(tiny_run.pair_json[1])}
    text = side_by_side(runs)
    lines = text.splitlines()
    assert lines[0].split() == ["metric", "a", "b"]
    assert any(line.startswith("update_sparsity") for line in lines)
    narrow = side_by_side({f"run{i}": runs["a"] for i in range(12)}, width=60)
    assert _widest(narrow) <= 60 and "run11" in narrow  # runs that do not fit continue below


def test_notebook_view_and_plain_repr(tiny_run):
    r = Report.from_json(tiny_run.pair_json[0])
    html = r._repr_html_()
    assert "<svg" in html and "<script" not in html and "update_sparsity" in html
    assert html.count("<tr>") <= 12 + 20  # the head of the table, not all rows
    assert "more rows" in html
    text = repr(r)
    assert text.startswith("Report(compare") and "update_sparsity=" in text and len(text) < 300
    t = Report.from_json(tiny_run.traj_json)
    assert "<svg" in t._repr_html_() and repr(t).startswith("Report(rank_curve")


def test_to_pandas_types_and_summary_frame(tiny_run):
    pytest.importorskip("pandas")
    r = Report.from_json(tiny_run.pair_json[0])
    df = r.to_pandas()
    assert str(df["layer"].dtype) == "Int64" and df["layer"].isna().sum() == 3  # embed, head, final norm
    assert str(df["rows"].dtype) == "Int64" and str(df["cols"].dtype) == "Int64" and "shape" not in df
    norm = df[df["name"] == "norm.weight"].iloc[0]
    assert norm["rows"] == 32 and norm["cols"] is __import__("pandas").NA
    s = r.to_pandas(summary=True)
    assert s.index[0] == "model" and "q_proj" in s.index
    assert s.loc["model", "update_sparsity"] == pytest.approx(r.summary["update_sparsity"])
    t = Report.from_json(tiny_run.traj_json).to_pandas(summary=True)
    assert list(t.index) == [10, 20, 30, 40, 50] and "stable_rank" in t


def test_page_is_self_contained_with_shared_scales(tiny_run):
    page = tiny_run.side_page.read_text()
    assert not re.search(r"""(src|href)=["'](https?:)?//""", page), "the page must not load anything"
    assert "<link" not in page and "@import" not in page
    assert page.count("<script>") == 1
    runs = {"SFT": Report.from_json(tiny_run.pair_json[0]), "RLVR": Report.from_json(tiny_run.pair_json[1])}
    for h in pair_panels(runs).heatmaps:  # one scale spans every run's values
        vals = [v for _, g in h.grids for v in g.measured_values()]
        assert h.scale.lo <= min(vals) and h.scale.hi >= max(vals)
        assert [label for label, _ in h.grids] == ["SFT", "RLVR"]
    for section in ("headline", "figures", "table", "accounting", "provenance"):
        assert f'id="{section}"' in page
    data = json.loads(tiny_run.pair_json[0].read_text())
    assert data["meta"]["weightgeo_version"] in page


def test_trajectory_panels_mark_and_label_the_onset(tiny_run):
    t = Report.from_json(tiny_run.traj_json)
    tp = trajectory_panels({"run": t})
    sim = next(p for p in tp.curves if p.key == "final_subspace_similarity")
    assert sim.hline == (0.9, "threshold 0.9")
    assert sim.series[0].marker is not None and "onset step" in sim.series[0].marker[1]
    assert [p.key for p in tp.curves][:1] == ["stable_rank"]


def test_figures_from_plot_and_cli_are_drawn(tiny_run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from PIL import Image

    t = Report.from_json(tiny_run.traj_json)
    p = t.plot(tmp_path / "traj.png")  # the Sim_K panel and the onset come from the report itself
    assert Image.open(p).size[0] > 1000
    r = Report.from_json(tiny_run.pair_json[0])
    assert r.plot(tmp_path / "pair.svg").read_text().startswith("<?xml")
    assert (
        main(["report", *map(str, tiny_run.pair_json), "--labels", "SFT", "RLVR", "--plot", str(tmp_path / "both.png")])
        == 0
    )
    img = Image.open(tmp_path / "both.png").convert("L")
    assert img.getextrema()[0] < 100  # something dark was drawn
    capsys.readouterr()
