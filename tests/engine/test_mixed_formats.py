"""Mixed storage formats are said: a tensor stored in one float format in the base and another in the fine-tune
is compared by one documented rule (docs/metrics.md), named in its row, and the report warns once with the count.

The rule: where one format holds every value of the other (bf16 or fp16 in fp32, fp32 in fp64) the stored values
are compared (nothing is rounded); where neither does (fp16 and bf16) both are rounded to the one with the coarser
significand (bf16) first. ``dtype=`` overrides it (both rounded to that)."""

from __future__ import annotations

import warnings

import pytest
import torch
from factories import tiny_llama_state, write_hf_checkpoint
from live_factories import rows_json

import weightgeo
from weightgeo.cli import main as cli_main
from weightgeo.linalg.policy import compared_format

KW = dict(k=2, rank=2, progress=False, cache=False)


def _same_weights(fmt_base: torch.dtype, fmt_ft: torch.dtype):
    """One set of fp32 weights, stored in two formats (as a base saved in fp16 and a copy saved in bf16)."""
    w = tiny_llama_state(num_layers=1, hidden=16, intermediate=32, vocab=20, dtype=torch.float32)
    return {k: v.to(fmt_base) for k, v in w.items()}, {k: v.to(fmt_ft) for k, v in w.items()}


def test_the_rule():
    assert compared_format(torch.bfloat16, torch.bfloat16) is None
    assert compared_format(torch.bfloat16, torch.float32) == (torch.float32, False)  # fp32 holds bf16: as stored
    assert compared_format(torch.float32, torch.float16) == (torch.float32, False)
    assert compared_format(torch.float64, torch.float32) == (torch.float64, False)
    assert compared_format(torch.float16, torch.bfloat16) == (torch.bfloat16, True)  # neither: both to bf16
    assert compared_format(torch.bfloat16, torch.float16) == (torch.bfloat16, True)


def test_fp16_base_and_bf16_fine_tune_of_the_same_weights(tmp_path):
    base, ft = _same_weights(torch.float16, torch.bfloat16)
    b, f = write_hf_checkpoint(tmp_path / "b", base), write_hf_checkpoint(tmp_path / "f", ft)
    with pytest.warns(RuntimeWarning, match=r"12 tensors.*float16.*bfloat16.*rounded to bfloat16") as w:
        r = weightgeo.compare(b, f, **KW)
    assert len([x for x in w if "float formats" in str(x.message)]) == 1  # once per report
    for row in r.rows:
        assert row["stored_dtype"] == "float16" and row["ft_stored_dtype"] == "bfloat16"
        assert row["compared_in"] == "bfloat16"
    assert r.meta["mixed_formats"] == {"float16 vs bfloat16: both rounded to bfloat16": 12}
    assert "float formats" in r.summary_text()
    # the rule is dtype=bfloat16 for these tensors: the same numbers as asking for it
    asked = weightgeo.compare(b, f, dtype=torch.bfloat16, **KW)
    strip = [{k: v for k, v in row.items() if k not in ("compared_in", "ft_stored_dtype")} for row in rows_json(r)]
    assert strip == rows_json(asked) and all("compared_in" not in row for row in asked.rows)


def test_a_format_that_holds_the_other_compares_the_stored_values(tmp_path):
    base, ft = _same_weights(torch.bfloat16, torch.bfloat16)
    ft32 = {k: v.float() for k, v in ft.items()}  # a fine-tune saved in fp32 from bf16 weights: no update
    with pytest.warns(RuntimeWarning, match=r"compared as stored.*float32 holds every bfloat16 value"):
        r = weightgeo.compare(base, ft32, **KW)
    q = r["layers.0.self_attn.q_proj.weight"]
    assert q["compared_in"] == "float32" and q["update_sparsity"] == 1.0 and q["delta_frobenius"] == 0.0


def test_compare_many_applies_the_rule_per_fine_tune(tmp_path):
    base, ft16 = _same_weights(torch.float16, torch.float16)
    _, ftbf = _same_weights(torch.float16, torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    ft16 = {k: (v.float() + 1e-2 * torch.randn(v.shape, generator=g)).half() for k, v in ft16.items()}
    b, f1, f2 = (write_hf_checkpoint(tmp_path / n, sd) for n, sd in (("b", base), ("f1", ft16), ("f2", ftbf)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        many = weightgeo.compare_many(b, [f1, f2], **KW)
        alone = [weightgeo.compare(b, f, **KW) for f in (f1, f2)]
    for m, a in zip(many, alone):
        assert rows_json(m) == rows_json(a)
    assert "compared_in" not in many[0].rows[0] and many[1].rows[0]["compared_in"] == "bfloat16"


def test_cli_warns_once_with_the_count_and_the_flag(tmp_path, capsys):
    base, ft = _same_weights(torch.float16, torch.bfloat16)
    b, f = write_hf_checkpoint(tmp_path / "b", base), write_hf_checkpoint(tmp_path / "f", ft)
    assert cli_main(["compare", str(b), str(f), "--k", "2", "--no-progress", "--no-cache", "--summary"]) == 0
    err = capsys.readouterr().err
    assert err.count("weightgeo: warning: 12 tensors") == 1 and "--dtype" in err and "dtype=" not in err


def test_rows_of_mixed_formats_are_served_from_the_cache(tmp_path):
    base, ft = _same_weights(torch.float16, torch.bfloat16)
    b, f = write_hf_checkpoint(tmp_path / "b", base), write_hf_checkpoint(tmp_path / "f", ft)
    kw = {**KW, "cache": tmp_path / "cache"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        first = weightgeo.compare(b, f, **kw)
        again = weightgeo.compare(b, f, **kw)
    assert again.meta["cache"]["rows_cached"] == len(again.rows) and again.meta["cache"]["corrupt"] == 0
    assert rows_json(again) == rows_json(first)


def test_a_stream_applies_the_rule_and_says_so():
    w = tiny_llama_state(num_layers=1, hidden=16, intermediate=32, vocab=20, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    steps = [{k: v + s * 1e-2 * torch.randn(v.shape, generator=g) for k, v in w.items()} for s in (1, 2)]
    base16 = {k: v.half() for k, v in w.items()}
    cks = [{k: v.bfloat16() for k, v in sd.items()} for sd in steps]
    with pytest.warns(RuntimeWarning, match=r"float16 vs bfloat16: both rounded to bfloat16"):
        mixed = weightgeo.rank_curve(cks, base=base16, steps=[1, 2], k=2, hill_k=2, cache=False)
    asked = weightgeo.rank_curve(cks, base=base16, steps=[1, 2], k=2, hill_k=2, cache=False, dtype=torch.bfloat16)
    assert mixed.rows == asked.rows and "mixed_formats" not in asked.meta
    assert sum(mixed.meta["mixed_formats"].values()) == 2 * 9
