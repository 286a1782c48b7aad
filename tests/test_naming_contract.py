"""The naming contract, enforced against the glossary (``weightgeo.metrics.catalog.GLOSSARY``, docs/metrics.md).

1. What is emitted: every key of the rows and summaries that compare, rank_curve, follow, subspace_similarity
   and the Tracker emit, and every Tracker log key, is a glossary name of that context, and every value lies in
   the glossary's bounds (``*_overlap`` / ``*_similarity`` / ``*_sparsity`` in [0, 1], ``*_angle(s)`` degrees,
   ``*_angles`` ascending); one name is one quantity across pair and stream rows.
2. What is accepted: every parameter of every public signature (``weightgeo.__all__``, with Tracker and
   FollowUpdate) is a glossary name, and every default a signature gives is the glossary's. What differs on
   purpose is listed in ``DEFAULT_EXCEPTIONS`` with the reason; what is not yet consistent is listed in
   ``NOT_YET`` (each entry must still hold: a fixed one fails the test until it is taken off the list).
3. docs/metrics.md carries the glossary's table as ``glossary_markdown()`` writes it.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import tiny_llama_state, write_hf_checkpoint

import weightgeo
from weightgeo import Tracker
from weightgeo.checkpoint import canonical_name
from weightgeo.metrics.catalog import (
    ALL_METRICS,
    ARGUMENT,
    FIELD,
    GLOSSARY,
    LOG,
    OUTPUTS,
    PAIR,
    RENAMED,
    REQUIRED,
    SPARSITY_CURVES,
    SPARSITY_OUTPUTS,
    STREAM,
    SUMMARY,
    TRACKER_MODEL_LOGS,
    TRACKER_OUTPUTS,
    TRACKER_PREFIX,
    TRAJECTORY_CURVES,
    TRAJECTORY_OUTPUTS,
    VECTOR_OUTPUTS,
    glossary_markdown,
)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"
K, HILL_K = 4, 3


# --------------------------------------------------------------------------------------------------------------
# the glossary itself
def test_the_glossary_keeps_the_suffix_contract():
    for name, t in GLOSSARY.items():
        assert t.where and t.where <= {PAIR, STREAM, SUMMARY, LOG, ARGUMENT, FIELD}, name
        assert t.meaning and "\n" not in t.meaning, f"{name}: one meaning, in one sentence"
        if name.endswith(("_overlap", "_similarity", "_sparsity")):
            assert t.bounds == (0.0, 1.0) and t.range.startswith("[0, 1]"), name
        if name.endswith(("_angle", "_angles")):
            assert t.bounds == (0.0, 90.0) and "degrees" in t.range, name
        if name.endswith("_angles"):
            assert "ascending" in t.range, name
        if name.startswith("delta_") and name not in ("delta_a", "delta_b"):
            assert "update" in t.meaning, f"{name}: delta_* names a property of the update ΔW"
        if name.startswith("n_"):
            assert "count" in t.range, f"{name}: n_* names a count"
        assert t.family is None or t.family in ALL_METRICS, name
        assert t.summary in ("", "mean", "weighted", "sum"), name
        if t.summary == "sum":
            assert "count" in t.range or "bytes" in t.range, f"{name}: a sum adds counts or sizes"
        assert t.default is REQUIRED or ARGUMENT in t.where or name == "meta", f"{name}: a default is for arguments"


def test_the_catalog_lists_derive_from_the_glossary():
    assert set(TRAJECTORY_OUTPUTS) == {n for n, t in GLOSSARY.items() if STREAM in t.where and t.summary == "mean"}
    assert set(SPARSITY_OUTPUTS) == {
        n for n, t in GLOSSARY.items() if STREAM in t.where and t.summary in ("weighted", "sum")
    }
    assert set(SPARSITY_CURVES) <= set(SPARSITY_OUTPUTS)
    assert all(LOG in GLOSSARY[n].where for n in TRACKER_MODEL_LOGS)
    assert set(TRAJECTORY_CURVES) <= set(TRAJECTORY_OUTPUTS) and set(TRACKER_OUTPUTS) <= set(TRAJECTORY_OUTPUTS)
    assert all(LOG in GLOSSARY[n].where for n in TRACKER_OUTPUTS)
    assert all(PAIR in GLOSSARY[n].where for keys in OUTPUTS.values() for n in keys)
    for old, (new, where) in RENAMED.items():
        assert where in GLOSSARY[new].where, f"{old} -> {new}: the new name must be a glossary name of {where}"
        assert old not in GLOSSARY or where not in GLOSSARY[old].where, f"{old} is still a name of {where}"


def test_docs_metrics_md_carries_the_glossary():
    text = DOCS.read_text()
    found = re.search(r"<!-- glossary: begin[^\n]*-->\n(.*?)\n<!-- glossary: end -->", text, re.S)
    assert found, "docs/metrics.md lost its glossary markers"
    assert found.group(1) == glossary_markdown(), (
        "docs/metrics.md's glossary differs from metrics/catalog.py: replace the table between the markers with "
        'the output of `python -c "from weightgeo.metrics.catalog import glossary_markdown as g; print(g())"`'
    )


# --------------------------------------------------------------------------------------------------------------
# what compare, rank_curve, follow, subspace_similarity and the Tracker emit
def _check_value(key: str, value) -> None:
    t = GLOSSARY[key]
    if t.bounds is None:
        return
    lo, hi = t.bounds
    if isinstance(value, list):  # a vector
        assert all(lo <= v <= hi for v in value), (key, value)
        if key.endswith("_angles"):
            assert value == sorted(value), key
        return
    assert isinstance(value, float), (key, value)
    if math.isnan(value):
        assert "NaN" in t.range, f"{key} is NaN but the glossary never allows it"
    else:
        assert lo <= value <= hi, (key, value, t.bounds)
    if "count" in t.range:
        assert value == int(value), (key, value)


def _check_rows(rows, context: str) -> None:
    assert rows
    for row in rows:
        for key, value in row.items():
            assert key in GLOSSARY and context in GLOSSARY[key].where, f"{key!r} is not a glossary {context} key"
            if value is None and GLOSSARY[key].bounds is not None:  # a null metric says why, in its own row
                assert key in row.get("not_measurable", {}) and "null" in GLOSSARY[key].range, (key, row["name"])
                continue
            _check_value(key, value)
        for key, why in row.get("not_measurable", {}).items():
            assert row[key] is None and isinstance(why, str) and why, (key, row["name"])


def _summary_keys(summary, context: str, path: str = "summary") -> None:
    """Every key of a (nested) summary: a glossary summary name, or ``n_<row key>`` (rows that had it)."""
    for key, value in summary.items():
        if path.endswith(("by_module", "experts", "by_step")):  # keyed by module, tensor or step
            _summary_keys(value, context, f"{path}[{key}]")
            continue
        if key == "n_not_measurable":  # {row key: rows where it is null}
            assert all(context in GLOSSARY[m].where and isinstance(n, int) for m, n in value.items()), value
            continue
        name = key[2:] if key.startswith("n_") and key != "n_tensors" else key
        assert name in GLOSSARY, f"{path}: {key!r} is not a glossary name"
        assert SUMMARY in GLOSSARY[name].where or key != name and context in GLOSSARY[name].where, (path, key)
        if key == name and isinstance(value, float):
            _check_value(key, value)
        if value is None:  # a mean over no measurable row: null, and counted
            assert summary.get(f"n_{key}") == 0 and key in summary.get("n_not_measurable", {}), (path, key)
        if isinstance(value, dict) and key != "curves":
            _summary_keys(value, context, f"{path}.{key}")


@pytest.fixture(scope="module")
def emitted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("contract")
    base = tiny_llama_state(num_layers=2, hidden=16, intermediate=32, vocab=40)
    g = torch.Generator().manual_seed(0)
    ft = {k: (v.float() + 2e-3 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base.items()}
    ft["model.layers.1.self_attn.q_proj.weight"] = base["model.layers.1.self_attn.q_proj.weight"]  # no update
    b, f = write_hf_checkpoint(tmp / "b", base), write_hf_checkpoint(tmp / "f", ft)
    kw = dict(k=K, cache=False)
    pair = weightgeo.compare(b, f, metrics=list(ALL_METRICS) + list(VECTOR_OUTPUTS), rank=2, progress=False, **kw)
    run, states = tmp / "run", {}
    for step, scale in ((0, 0.0), (5, 1.0), (10, 2.0)):
        states[step] = {k: (v.float() + scale * (ft[k].float() - v.float())).to(v.dtype) for k, v in base.items()}
        write_hf_checkpoint(run / f"checkpoint-{step}", states[step])
    curve = weightgeo.rank_curve(run, hill_k=HILL_K, **kw)
    followed = list(weightgeo.follow(run, hill_k=HILL_K, idle_s=0, **kw))
    sim = weightgeo.subspace_similarity(f, run / "checkpoint-10", base=b, **kw)
    tracker = Tracker(base, k=K, hill_k=HILL_K, step_sparsity=True)
    logs = [tracker.update(states[s], s) for s in (5, 10)]
    one = weightgeo.rank_curve([b, f], steps=[0, 1], hill_k=HILL_K, **kw)
    sparse = weightgeo.sparsity_curve(run, cache=False)
    both = weightgeo.rank_curve(run, hill_k=HILL_K, sparsity=True, **kw)
    f2 = write_hf_checkpoint(tmp / "f2", {k: (v.float() * 1.01).to(v.dtype) for k, v in base.items()})
    masks = weightgeo.update_mask_overlap(b, f, f2)
    canon = {step: {canonical_name(k): v for k, v in st.items()} for step, st in states.items()}
    return dict(
        pair=pair,
        curve=curve,
        followed=followed,
        sim=sim,
        tracker=tracker,
        logs=logs,
        one=one,
        base=canon[0],
        states=canon,
        sparse=sparse,
        both=both,
        masks=masks,
    )


def test_compare_rows_and_summary_are_glossary_names(emitted):
    pair = emitted["pair"]
    _check_rows(pair.rows, PAIR)
    values = {key for keys in OUTPUTS.values() for key in keys} | set(VECTOR_OUTPUTS)
    for row in pair.rows:
        if len(row["shape"]) == 2:  # matrices carry every output of every family asked for
            assert values <= set(row), row["name"]
        else:
            assert set(row) & values == set(OUTPUTS["update_sparsity"]), row["name"]
    _summary_keys(pair.summary, PAIR)


def test_stream_rows_and_summaries_are_glossary_names(emitted):
    for report in (emitted["curve"], emitted["followed"][-1].report, emitted["tracker"].rank_curve()):
        _check_rows(report.rows, STREAM)
        for row in report.rows:
            assert set(TRAJECTORY_OUTPUTS) <= set(row), row["name"]
            assert row["stable_rank"] >= 1.0 - 1e-9  # in [1, rank] for a nonzero update
        _summary_keys(report.summary, STREAM)
        assert set(report.summary["curves"]) == set(TRAJECTORY_CURVES)
    assert [u.report.rows for u in emitted["followed"]][-1] == emitted["curve"].rows


def test_sparsity_rows_and_summaries_are_glossary_names(emitted):
    for report in (emitted["sparse"], emitted["both"], emitted["tracker"].sparsity_curve()):
        _check_rows(report.rows, STREAM)
        for row in report.rows:
            assert set(SPARSITY_OUTPUTS) <= set(row), row["name"]
            if "stable_rank" in row:  # the combined pass: a matrix's row carries the spectra too
                assert set(TRAJECTORY_OUTPUTS) <= set(row), row["name"]
        _summary_keys(report.summary, STREAM)
        assert set(SPARSITY_CURVES) <= set(report.summary["curves"])
    assert {r["name"] for r in emitted["both"].rows} == {r["name"] for r in emitted["sparse"].rows}
    _check_rows(emitted["masks"].rows, PAIR)
    _summary_keys(emitted["masks"].summary, PAIR)


def test_subspace_similarity_rows_are_glossary_names(emitted):
    _check_rows(emitted["sim"].rows, PAIR)
    _summary_keys(emitted["sim"].summary, PAIR)


def test_tracker_log_keys_are_glossary_names(emitted):
    first, second = emitted["logs"]
    assert f"{TRACKER_PREFIX}/previous_subspace_similarity/mean" in second
    for name in ("update_sparsity", "step_sparsity", "patch_bytes"):
        assert f"{TRACKER_PREFIX}/{name}" in second, name
    for logs in (first, second):
        for key, value in logs.items():
            prefix, name, *group = key.split("/")
            assert prefix == TRACKER_PREFIX and name in GLOSSARY and LOG in GLOSSARY[name].where, key
            modules = {r["module"] for r in emitted["sparse"].rows}
            assert group in ([], ["mean"]) or group[0] in modules, key
            assert group != [] or name in TRACKER_MODEL_LOGS, key  # the model figures have no group
            assert name != "n_matrices" or group == [], key
            _check_value(name, float(value))


def test_one_name_is_one_quantity_across_pair_and_stream_rows(emitted):
    """Keys in both pair and stream rows measure the same thing: on one (base, fine-tune) they agree; the two
    gaps are two quantities with two names (``spectral_gap`` of W0, ``delta_spectral_gap`` of ΔW)."""
    pair = {r["name"]: r for r in emitted["pair"].rows if len(r["shape"]) == 2}
    stream = {r["name"]: r for r in emitted["one"].rows}
    shared = {n for n, t in GLOSSARY.items() if {PAIR, STREAM} <= t.where}
    assert {"stable_rank", "delta_frobenius", "name", "shape", "numel", "module", "layer"} <= shared
    for name, s in stream.items():
        p = pair[name]
        for key in shared & set(s) & set(p):
            if isinstance(s[key], float):
                assert s[key] == pytest.approx(p[key], rel=1e-5), (name, key)
            else:
                assert s[key] == p[key], (name, key)
        s0 = np.linalg.svd(emitted["base"][name].double().numpy(), compute_uv=False)
        kk = int(p["k_effective"])
        if kk < len(s0):
            assert p["spectral_gap"] == pytest.approx(s0[kk - 1] / s0[kk], rel=1e-6), name
    assert "spectral_gap" not in shared and "delta_spectral_gap" not in shared


def test_delta_spectral_gap_is_the_updates_gap(emitted):
    """σ_K/σ_{K+1} of ΔW_t (float64 SVD of the update), where the pair rows' spectral_gap is W0's."""
    base, state = emitted["base"], emitted["states"][10]
    checked = 0
    for row in emitted["curve"].rows:
        if row["step"] != 10:
            continue
        d = (state[row["name"]].double() - base[row["name"]].double()).numpy()
        s = np.linalg.svd(d, compute_uv=False)
        if K < len(s) and s[K] > 1e-3 * s[0]:  # a resolved σ_{K+1} (below it the randomized tail is loose)
            assert row["delta_spectral_gap"] == pytest.approx(s[K - 1] / s[K], rel=1e-3), row["name"]
            assert row["delta_frobenius"] == pytest.approx(float(np.linalg.norm(d)), rel=1e-6), row["name"]
            checked += 1
    assert checked >= 8
    # a planted update with a known spectrum
    w0 = {"model.layers.0.self_attn.q_proj.weight": torch.zeros(12, 10)}
    d = torch.diag(torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.05, 0.02, 0.01]))
    w1 = {"model.layers.0.self_attn.q_proj.weight": torch.cat([d, torch.zeros(2, 10)])}
    r = weightgeo.rank_curve([w0, w1], steps=[0, 1], k=3, hill_k=2, cache=False).rows[0]
    assert r["delta_spectral_gap"] == pytest.approx(2.0 / 1.0, rel=1e-9)
    assert r["delta_frobenius"] == pytest.approx(float(torch.linalg.matrix_norm(d.double())), rel=1e-12)


# --------------------------------------------------------------------------------------------------------------
# the public signatures
def _public_callables() -> dict[str, tuple[object, type | None]]:
    """``{"name" or "Class.method": (function, its class)}`` of weightgeo.__all__ (Tracker and FollowUpdate
    included): functions, constructors and the public methods a class defines itself."""
    out: dict[str, tuple[object, type | None]] = {}
    for name in weightgeo.__all__:
        obj = getattr(weightgeo, name)
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if attr.startswith("_") and attr != "__init__":
                    continue
                if isinstance(member, (classmethod, staticmethod)):
                    member = member.__func__
                if inspect.isfunction(member):
                    out[f"{name}.{attr}"] = (member, obj)
        elif inspect.isfunction(obj):
            out[name] = (obj, None)
    return out


def _parameters():
    """``(where, name, default)`` of every parameter of every public signature (``REQUIRED``: no default)."""
    for where, (fn, cls) in _public_callables().items():
        for p in inspect.signature(fn).parameters.values():
            if p.name in ("self", "cls") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            default = REQUIRED if p.default is p.empty else p.default
            if repr(default) == "<factory>":  # a dataclass field's default_factory
                default = {f.name: f for f in dataclasses.fields(cls)}[p.name].default_factory()
            yield where, p.name, default


_UPDATE_K = "16, the paper's K for subspaces of updates ΔW (§4); 512 is k for the principal subspaces of weights (§3.1)"
#: (callable, parameter) -> (its default, why it differs from the glossary's) — differences on purpose
DEFAULT_EXCEPTIONS = {
    ("rank_curve", "k"): (16, _UPDATE_K),
    ("locking_onset", "k"): (16, _UPDATE_K),
    ("follow", "k"): (16, _UPDATE_K),
    ("Tracker.__init__", "k"): (16, _UPDATE_K),
    ("subspace_similarity", "k"): (16, _UPDATE_K),
    ("randomized_svd", "seed"): (None, "None keeps seed and generator exclusive; with neither it draws from seed 0"),
    ("stable_rank", "ft"): (None, "stable_rank(delta) of one update; given ft, stable_rank(base, ft) of the pair"),
    ("Report.to_json", "path"): (None, "to_json always returns the text; without a path it writes no file"),
}

#: what is not yet consistent, each with what makes it so; the options work (issue 18 item 1) removes them,
#: and a fixed entry fails test_not_yet_entries_still_hold until it is taken off this list
NOT_YET: dict[tuple[str, str], tuple[object, str]] = {}
#: parameters whose default agrees but whose meaning differs from the glossary's, with a check that it still does
NOT_YET_MEANING: dict[tuple[str, str], tuple[str, object]] = {}
#: the contract's keyword ``dtype`` is missing from these verbs that take ``device`` (issue 18 item 4)
NOT_YET_DTYPE: set[str] = set()
#: verbs that take device but never a dtype, with the reason
NO_DTYPE = {"Tracker.load": "the dtype is the saved Tracker's"}


def test_every_public_parameter_is_a_glossary_name():
    unknown = sorted({(w, n) for w, n, _ in _parameters() if n not in GLOSSARY})
    assert not unknown, f"add these to metrics/catalog.py's GLOSSARY (one meaning each): {unknown}"
    wrong = sorted(
        (w, n)
        for w, n, _ in _parameters()
        if not GLOSSARY[n].where & {ARGUMENT, FIELD} or (ARGUMENT not in GLOSSARY[n].where and ".__init__" not in w)
    )
    assert not wrong, f"glossary names used as parameters but not marked ARGUMENT (or a result's FIELD): {wrong}"


def test_every_default_is_the_glossarys():
    differ = {}
    for where, name, default in _parameters():
        expected = GLOSSARY[name].default
        if default is REQUIRED or expected is REQUIRED and default is REQUIRED:
            continue  # the caller always gives it here
        if (where, name) in DEFAULT_EXCEPTIONS or (where, name) in NOT_YET:
            continue
        if expected is REQUIRED or type(default) is not type(expected) or default != expected:
            differ[(where, name)] = (default, expected)
    assert not differ, (
        "defaults that differ from the glossary's (fix the signature, or list the difference with its reason "
        f"in DEFAULT_EXCEPTIONS): {differ}"
    )


def test_listed_exceptions_still_hold():
    """A listed difference that no longer exists fails: take it off the list (the lead empties NOT_YET)."""
    actual = {(w, n): d for w, n, d in _parameters()}
    for table in (DEFAULT_EXCEPTIONS, NOT_YET):
        for key, (default, why) in table.items():
            assert key in actual, f"{key} is listed but no longer a public parameter"
            assert actual[key] == default, f"{key} now defaults to {actual[key]!r}, not {default!r}: unlist it ({why})"
            assert actual[key] != GLOSSARY[key[1]].default, f"{key} now agrees with the glossary: unlist it"
    for key, (why, still) in NOT_YET_MEANING.items():
        assert key in actual and still(), f"{key} ({why}) is fixed: take it off NOT_YET_MEANING"


def test_verbs_that_take_device_take_dtype():
    params: dict[str, set[str]] = {}
    for where, name, _ in _parameters():
        params.setdefault(where, set()).add(name)
    missing = {w for w, names in params.items() if "device" in names and "dtype" not in names}
    assert missing - NOT_YET_DTYPE - set(NO_DTYPE) == set(), "add dtype= (the glossary's) to these"
    assert NOT_YET_DTYPE <= missing, f"these have dtype= now: take them off NOT_YET_DTYPE: {NOT_YET_DTYPE - missing}"


# --------------------------------------------------------------------------------------------------------------
# renamed names keep a warning alias
def test_renamed_names_warn_and_still_work(tmp_path):
    import weightgeo.linalg as L
    from weightgeo.linalg.pairwise import pair_geometry

    with pytest.warns(DeprecationWarning, match="spectral_drift_from_values"):
        shift = L.spectral_shift
    assert shift is L.spectral_drift_from_values
    g = pair_geometry(torch.eye(3), 2 * torch.eye(3), k=2)
    with pytest.warns(DeprecationWarning, match="spectral_drift"):
        assert torch.equal(g.nss, g.spectral_drift)

    old = {  # a rank_curve report as weightgeo wrote it before the renames
        "rows": [{"step": 5, "name": "w", "frobenius_norm": 2.0, "spectral_gap": 3.0, "stable_rank": 1.5}],
        "summary": {
            "by_step": {"5": {"frobenius_norm": 2.0, "n_frobenius_norm": 1, "by_module": {"w": {"spectral_gap": 3.0}}}},
            "curves": {"frobenius_norm": [2.0]},
        },
        "meta": {"kind": "rank_curve", "ranks": [{"rank": 0, "matrices": ["w"]}]},
    }
    (tmp_path / "old.json").write_text(json.dumps(old))
    with pytest.warns(DeprecationWarning, match="frobenius_norm -> delta_frobenius"):
        r = weightgeo.Report.from_json(tmp_path / "old.json")
    assert r.rows == [{"step": 5, "name": "w", "delta_frobenius": 2.0, "delta_spectral_gap": 3.0, "stable_rank": 1.5}]
    assert r.summary["by_step"]["5"] == {
        "delta_frobenius": 2.0,
        "n_delta_frobenius": 1,
        "by_module": {"w": {"delta_spectral_gap": 3.0}},
    }
    assert r.summary["curves"] == {"delta_frobenius": [2.0]}
    assert r.meta["processes"] == [{"process_rank": 0, "matrices": ["w"]}] and "ranks" not in r.meta
    pair = {"rows": [{"name": "w", "dtype": "bfloat16", "spectral_gap": 3.0}], "summary": {"spectral_gap": 3.0}}
    (tmp_path / "pair.json").write_text(json.dumps(pair))
    with pytest.warns(DeprecationWarning, match="dtype -> stored_dtype"):
        p = weightgeo.Report.from_json(tmp_path / "pair.json")
    assert p.rows == [{"name": "w", "stored_dtype": "bfloat16", "spectral_gap": 3.0}]  # W0's gap keeps its name
    assert p.summary == {"spectral_gap": 3.0}
    (tmp_path / "new.json").write_text(p.to_json())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert weightgeo.Report.from_json(tmp_path / "new.json").rows == p.rows  # today's files read silently
