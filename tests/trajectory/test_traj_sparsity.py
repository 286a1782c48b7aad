"""Sparsity curves of checkpoint streams (weightgeo.sparsity_curve, rank_curve(sparsity=True), follow, the CLI):
planted streams with known changed entries give exact cumulative and step sparsities, counts and patch sizes; odd
streams (a step where nothing changes, a tensor that appears later or changes shape, a dtype change, NaN
weights, FP8 checkpoints, native run folders) give a listed answer, never a silent one; each tensor is read once
per checkpoint, and the result cache keeps one entry per (tensor, pair of checkpoints)."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
from factories import write_hf_checkpoint
from live_factories import rows_json
from native_factories import fp8_quantize, write_dcp, write_fp8

import weightgeo
from weightgeo.checkpoint import canonical_name
from weightgeo.cli import main
from weightgeo.errors import WeightgeoError
from weightgeo.metrics.sparsity import fp8_unchanged_count

Q = "model.layers.0.self_attn.q_proj.weight"  # bf16 [8, 16]: 128 entries, a 16-byte bitmask
N = "model.layers.0.input_layernorm.weight"  # bf16 [16]: a 2-byte bitmask
B = "model.layers.0.mlp.up_proj.bias"  # fp32 [8]: the bf16 rule, 4-byte values
E = "model.layers.0.mlp.experts.down_proj"  # bf16 [2, 4, 8]: two experts of 32 entries
STEPS = [0, 10, 20, 30]


def _planted() -> list[dict[str, torch.Tensor]]:
    """The base and three checkpoints; what changes where is in the comments (a step 20 where nothing does)."""
    g = torch.Generator().manual_seed(0)
    w0 = {
        Q: (torch.randn(8, 16, generator=g) + 4).bfloat16(),  # away from 0: +1 always moves a value
        N: torch.ones(16, dtype=torch.bfloat16),
        B: torch.tensor([3.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]),
        E: (torch.randn(2, 4, 8, generator=g) + 4).bfloat16(),
    }
    w10 = {k: v.clone() for k, v in w0.items()}
    w10[Q].view(-1)[:5] += 1  # 5 entries
    w10[N][0] = 2.0  # 1 entry
    w10[B][0] = 4.0  # 1 entry; entry 1 moves below bf16's resolution: unchanged under the rule
    w10[B][1] = 1.0 + 2.0**-20
    w10[E][1].view(-1)[:8] += 1  # expert 1: 8 entries
    w20 = {k: v.clone() for k, v in w10.items()}  # nothing changes
    w30 = {k: v.clone() for k, v in w20.items()}
    w30[Q].view(-1)[:2] = w0[Q].view(-1)[:2]  # 2 entries back to the base values
    w30[Q].view(-1)[60:100] += 1  # 40 more
    w30[E][0].view(-1)[0] += 1  # expert 0: 1 entry
    return [w0, w10, w20, w30]


# (step, name, expert) -> (changed since the base, changed in the step, patch bytes), by hand
EXPECTED = {
    (10, Q, None): (5, 5, min(4 * 5, 16) + 5 * 2),
    (20, Q, None): (5, 0, 0),
    (30, Q, None): (43, 42, 16 + 42 * 2),
    (10, N, None): (1, 1, min(4, 2) + 2),
    (20, N, None): (1, 0, 0),
    (30, N, None): (1, 0, 0),
    (10, B, None): (1, 1, 1 + 4),  # a 1-byte bitmask < a 4-byte index; fp32 values
    (20, B, None): (1, 0, 0),
    (30, B, None): (1, 0, 0),
    (10, E, 0): (0, 0, 0),
    (20, E, 0): (0, 0, 0),
    (30, E, 0): (1, 1, 4 + 2),  # one index (4 B) ties a 4-byte bitmask: the index
    (10, E, 1): (8, 8, 4 + 8 * 2),
    (20, E, 1): (8, 0, 0),
    (30, E, 1): (8, 0, 0),
}
NUMEL = {Q: 128, N: 16, B: 8, E: 32}


def _check_rows(report, expected=EXPECTED):
    got = {(r["step"], r["name"], r.get("expert")): r for r in report.rows}
    want = {(s, canonical_name(n), e): v for (s, n, e), v in expected.items()}
    assert set(got) == set(want)
    for key, (up, st, patch) in want.items():
        r = got[key]
        n = NUMEL[next(k for k in NUMEL if canonical_name(k) == key[1])]
        assert r["numel"] == n, key
        assert (r["update_unchanged"], r["step_unchanged"], r["patch_bytes"]) == (n - up, n - st, patch), key
        assert r["update_sparsity"] == (n - up) / n and r["step_sparsity"] == (n - st) / n, key


def test_planted_stream_gives_exact_sparsities_counts_and_patch_sizes():
    rep = weightgeo.sparsity_curve(_planted(), steps=STEPS, cache=False)
    _check_rows(rep)
    by = rep.summary["by_step"]
    total = sum(NUMEL[k] * (2 if k == E else 1) for k in NUMEL)  # 216 entries
    for s in (10, 20, 30):
        rows = [v for (t, _, _), v in EXPECTED.items() if t == s]
        assert by[s]["numel"] == total
        assert by[s]["update_sparsity"] == pytest.approx((total - sum(u for u, _, _ in rows)) / total, rel=1e-15)
        assert by[s]["step_sparsity"] == pytest.approx((total - sum(t for _, t, _ in rows)) / total, rel=1e-15)
        assert by[s]["patch_bytes"] == sum(p for _, _, p in rows)
        assert by[s]["update_unchanged"] == total - sum(u for u, _, _ in rows)
    assert by[20]["step_sparsity"] == 1.0 and by[20]["patch_bytes"] == 0  # the step where nothing changed
    assert rep.summary["curves"]["patch_bytes"] == [55, 0, 100 + 6]
    assert rep.summary["curves"]["update_sparsity"] == [by[s]["update_sparsity"] for s in (10, 20, 30)]
    q = by[30]["by_module"]["q_proj"]
    assert (q["update_sparsity"], q["step_sparsity"], q["patch_bytes"]) == (85 / 128, 86 / 128, 100)
    assert by[10]["experts"][canonical_name(E)]["update_unchanged"] == 64 - 8
    assert by[10]["dense_bytes"] == 128 * 2 + 16 * 2 + 8 * 4 + 64 * 2
    assert rep.meta["not_measured"] == [] and rep.meta["kind"] == "sparsity_curve"
    assert "bitmask" in rep.meta["patch_encoding"]


def test_a_separate_base_and_dtype_rounding():
    w = _planted()
    rep = weightgeo.sparsity_curve(w[1:], base=w[0], steps=STEPS[1:], cache=False)
    _check_rows(rep)  # the first checkpoint's step sparsity is against the base
    rounded = weightgeo.sparsity_curve(w, steps=STEPS, dtype="bfloat16", cache=False)
    b_rows = [r for r in rounded.rows if r["name"] == canonical_name(B)]
    assert all(r["stored_dtype"] == "bfloat16" for r in b_rows)
    assert [r["patch_bytes"] for r in b_rows] == [1 + 2, 0, 0]  # the values sent as bf16
    with pytest.raises(WeightgeoError, match="no tensor to follow"):
        weightgeo.sparsity_curve(w, steps=STEPS, include="nothing_matches", cache=False)
    with pytest.raises(WeightgeoError, match="eta"):
        weightgeo.sparsity_curve(w, steps=STEPS, eta=-1, cache=False)


def test_a_tensor_that_appears_later_or_changes_shape_is_not_measured_where_it_cannot_be():
    w = _planted()
    late = "model.layers.0.mlp.up_proj.weight"
    w[2][late] = torch.zeros(4, 8, dtype=torch.bfloat16)  # appears at step 20
    w[3][late] = torch.zeros(4, 8, dtype=torch.bfloat16)
    w[3][late][0, 0] = 1
    w[3][N] = torch.ones(17, dtype=torch.bfloat16)  # the norm grows at step 30
    rep = weightgeo.sparsity_curve(w, steps=STEPS, cache=False)
    rows = {(r["step"], r["name"]): r for r in rep.rows}
    first, then = rows[(20, canonical_name(late))], rows[(30, canonical_name(late))]
    assert math.isnan(first["update_sparsity"]) and first["update_unchanged"] is None
    assert math.isnan(first["step_sparsity"]) and first["patch_bytes"] == first["dense_bytes"] == 64  # sent whole
    assert math.isnan(then["update_sparsity"]) and then["step_unchanged"] == 31 and then["patch_bytes"] == 4 + 2
    assert (10, canonical_name(late)) not in rows
    grown = rows[(30, canonical_name(N))]
    assert math.isnan(grown["update_sparsity"]) and grown["patch_bytes"] == 17 * 2 and grown["numel"] == 17
    assert grown["shape"] == (17,)
    reasons = {(x["name"], x["step"], x["metric"]): x["reason"] for x in rep.meta["not_measured"]}
    assert "absent" in reasons[(canonical_name(late), 20, "update_sparsity")]
    assert "shape (16,) -> (17,)" in reasons[(canonical_name(N), 30, "step_sparsity")]
    assert len(reasons) == 5  # late: update at 20 and 30, step at 20; the norm: update and step at 30
    # the model figure weighs what was measured; the other tensors' figures are unchanged
    _check_rows(
        weightgeo.sparsity_curve(w, steps=STEPS, exclude=["up_proj.weight", "input_layernorm"], cache=False),
        {k: v for k, v in EXPECTED.items() if k[1] != N},
    )


def test_a_dtype_change_between_checkpoints_is_compared_under_the_bf16_rule_and_said(tmp_path):
    w = _planted()
    w[3][Q] = w[3][Q].float()  # the last checkpoint stores q_proj in float32 (the same values)
    with pytest.warns(RuntimeWarning, match="change stored dtype"):
        rep = weightgeo.sparsity_curve(w, steps=STEPS, cache=False)
    _check_rows(rep, {k: v if k[:2] != (30, Q) else (43, 42, 16 + 42 * 4) for k, v in EXPECTED.items()})
    assert rep.meta["dtype_changes"] == [{"name": canonical_name(Q), "step": 30, "from": "bfloat16", "to": "float32"}]


def test_nan_weights_raise_naming_the_tensor_and_the_step():
    w = _planted()
    w[2][Q] = w[2][Q].clone()
    w[2][Q][3, 3] = float("nan")
    with pytest.raises(WeightgeoError, match=r"q_proj.weight at step 20 .*non-finite"):
        weightgeo.sparsity_curve(w, steps=STEPS, cache=False)
    w[2][Q][3, 3] = float("inf")
    with pytest.raises(WeightgeoError, match="non-finite"):
        weightgeo.rank_curve(w, steps=STEPS, sparsity=True, k=2, hill_k=2, cache=False)
    assert weightgeo.sparsity_curve(w, steps=STEPS, exclude="q_proj", cache=False).summary["steps"] == [10, 20, 30]


def test_fp8_checkpoints_follow_the_fp8_rule(tmp_path):
    block = (4, 8)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 16, generator=g)
    codes, scales = fp8_quantize(w, block)
    c10 = codes.float().clone()
    c10[0, :3] = c10[0, :3] + torch.sign(c10[0, :3]) * 32  # 3 codes of block (0, 0) move
    c10 = c10.to(torch.float8_e4m3fn)
    s20 = scales.clone()
    s20[1, 1] *= 2  # block (1, 1)'s scale doubles: its nonzero entries change
    versions = [(codes, scales), (c10, scales), (c10, s20)]
    norm = torch.ones(16, dtype=torch.bfloat16)
    name = "model.layers.0.self_attn.q_proj.weight"
    run = [write_fp8(tmp_path / f"step_{t}", {name: v, N: norm}, block=block) for t, v in zip((0, 10, 20), versions)]
    rep = weightgeo.sparsity_curve(run, cache=False)
    rows = {r["step"]: r for r in rep.rows if r["name"] == canonical_name(name)}
    nonzero = int(torch.count_nonzero(c10[4:, 8:].float()))
    changed10 = 128 - fp8_unchanged_count(codes, scales, c10, scales, block)
    changed20 = 128 - fp8_unchanged_count(c10, scales, c10, s20, block)
    assert (changed10, changed20) == (3, nonzero)
    assert rows[10]["update_rule"] == "fp8" and rows[10]["step_unchanged"] == 128 - 3
    assert rows[20]["update_unchanged"] == 128 - 3 - nonzero and rows[20]["step_unchanged"] == 128 - nonzero
    assert rows[10]["patch_bytes"] == min(4 * 3, 16) + 3  # 1-byte codes
    assert rows[20]["patch_bytes"] == min(4 * nonzero, 16) + nonzero + scales.numel() * 4  # + the scales
    bf = weightgeo.sparsity_curve(run, dtype="bfloat16", cache=False)  # rounded first: the bf16 rule
    assert all("update_rule" not in r for r in bf.rows)


def _reads(monkeypatch):
    """(file, tensor) -> the bytes read of it (whole, in row ranges, or an expert of a stack at a time)."""
    from weightgeo.checkpoint import safetensors as st

    seen: dict[tuple[str, str], int] = {}
    read = st._read_bytes

    def counted(path, start, nbytes, name):
        seen[(str(path), name)] = seen.get((str(path), name), 0) + nbytes
        return read(path, start, nbytes, name)

    monkeypatch.setattr(st, "_read_bytes", counted)
    return seen


def _run(tmp_path, states, steps=STEPS):
    run = tmp_path / "run"
    for t, sd in zip(steps, states):
        write_hf_checkpoint(run / f"checkpoint-{t}", sd)
        (run / f"checkpoint-{t}" / "trainer_state.json").write_text(json.dumps({"global_step": t}))
    return run


def test_the_cli_reports_sparsity_beside_the_spectra_from_one_read_of_each_checkpoint(tmp_path, monkeypatch, capsys):
    states = _planted()
    for sd in states:  # a second matrix, for spectra
        sd["model.layers.0.self_attn.k_proj.weight"] = sd[Q][:, :8].clone()
    run = _run(tmp_path, states)
    (run / "checkpoint-40").mkdir()  # being written: left out
    seen = _reads(monkeypatch)
    out = tmp_path / "traj.json"
    argv = ["trajectory", str(run), "--k", "2", "--hill-k", "2", "--no-cache", "--no-progress", "--out", str(out)]
    assert main([*argv, "--plot", str(tmp_path / "t.png")]) == 0
    files = {f"{run}/checkpoint-{t}/model.safetensors" for t in STEPS}
    assert {f for f, _ in seen} == files
    nbytes = {n: t.numel() * t.element_size() for n, t in states[0].items()}
    assert seen == {(f, n): nbytes[n] for f in files for n in nbytes}  # every tensor of every checkpoint, once
    text = capsys.readouterr().out
    assert "sparsity curves" in text and "since base" in text
    saved = json.loads(out.read_text())
    curves = saved["summary"]["curves"]
    assert set(curves) >= {"stable_rank", "update_sparsity", "step_sparsity", "patch_bytes"}
    assert saved["summary"]["by_step"]["20"]["patch_bytes"] == 0
    rows = {(r["step"], r["name"]): r for r in saved["rows"]}
    q = rows[(30, canonical_name(Q))]
    assert q["update_unchanged"] == 128 - 43 and "stable_rank" in q  # a matrix's row carries both
    assert "stable_rank" not in rows[(30, canonical_name(N))]  # a norm's row the sparsity only
    assert any(p["name"] == canonical_name(N) for p in saved["meta"]["partial"])
    seen.clear()
    assert main([*argv, "--no-sparsity"]) == 0  # spectra only: the norms and biases are not read
    assert not any(n in (N, B) for _, n in seen)


def test_rank_curve_with_sparsity_equals_the_two_passes(tmp_path):
    states = _planted()
    one = weightgeo.rank_curve(states, steps=STEPS, sparsity=True, k=2, hill_k=2, cache=False)
    spectra = weightgeo.rank_curve(states, steps=STEPS, k=2, hill_k=2, cache=False)
    sparse = weightgeo.sparsity_curve(states, steps=STEPS, cache=False)
    merged = {(r["step"], r["name"], r.get("expert")): r for r in one.rows}
    for r in spectra.rows + sparse.rows:
        m = merged[(r["step"], r["name"], r.get("expert"))]
        assert json.dumps({k: m[k] for k in r}, default=str) == json.dumps(r, default=str)
    assert len(merged) == len(sparse.rows)
    for s in (10, 20, 30):
        for key in ("update_sparsity", "step_sparsity", "patch_bytes"):
            assert one.summary["by_step"][s][key] == sparse.summary["by_step"][s][key]
        assert one.summary["by_step"][s]["stable_rank"] == spectra.summary["by_step"][s]["stable_rank"]
    assert weightgeo.locking_onset(one).per_matrix == weightgeo.locking_onset(spectra).per_matrix


def test_the_cache_keeps_one_entry_per_tensor_and_pair_of_checkpoints(tmp_path):
    states = _planted()
    run = _run(tmp_path, states[:3], STEPS[:3])
    cache = tmp_path / "cache"
    first = weightgeo.sparsity_curve(run, cache=cache)
    assert first.meta["cache"]["counts_computed"] == 5 * (2 + 1)  # per tensor: (b,10) = step 10, (b,20), (10,20)
    again = weightgeo.sparsity_curve(run, cache=cache)
    assert again.meta["cache"]["tensors_read"] == 0 and rows_json(again) == rows_json(first)
    _run(tmp_path, states[3:], STEPS[3:])  # one more checkpoint
    grown = weightgeo.sparsity_curve(run, cache=cache)
    c = grown.meta["cache"]
    assert c["counts_computed"] == 5 * 2 and c["tensors_read"] == 5 * 3  # base, step 20 and step 30, once each
    assert rows_json(grown) == rows_json(weightgeo.sparsity_curve(run, cache=False))
    _check_rows(grown)


def test_follow_with_sparsity_equals_offline(tmp_path):
    run = _run(tmp_path, _planted())
    updates = list(weightgeo.follow(run, sparsity=True, k=2, hill_k=2, idle_s=0, cache=False))
    assert [u.step for u in updates] == [10, 20, 30]
    offline = weightgeo.rank_curve(run, sparsity=True, k=2, hill_k=2, cache=False)
    assert rows_json(updates[-1].report) == rows_json(offline)
    assert updates[-1].report.meta["cache"]["counts_computed"] == 5 * 2  # the earlier steps came from the memo
    _check_rows(weightgeo.sparsity_curve(run, cache=False))


def test_native_run_folders_give_the_curves_of_their_hf_twin(tmp_path):
    states = _planted()
    plain = [{k: v for k, v in sd.items() if k != E} for sd in states]  # DCP keeps these names as they are
    expected = {k: v for k, v in EXPECTED.items() if k[1] != E}
    verl, titan = tmp_path / "verl", tmp_path / "titan"
    for t, sd in zip(STEPS, plain):
        write_hf_checkpoint(verl / f"global_step_{t}" / "actor" / "huggingface", sd)
        write_dcp(titan / f"step-{t}", dict(sd))
    (verl / "latest_checkpointed_iteration.txt").write_text("30")
    (titan / "step-40").mkdir()  # an empty step folder: left out
    hf = weightgeo.sparsity_curve(plain, steps=STEPS, cache=False)
    for run in (verl, titan):
        with pytest.warns(RuntimeWarning, match="left out") if run is titan else contextlib.nullcontext():
            rep = weightgeo.sparsity_curve(run, cache=False)
        _check_rows(rep, expected)
        assert rows_json(rep) == rows_json(hf), run.name
    assert [c["step"] for c in rep.meta["skipped"] if c.get("kind") == "checkpoint"] == [40]


def test_the_device_code_path_runs_on_cpu(monkeypatch):
    """What CUDA runs (the torch backends of the counts, versions moved to the counting device) gives the CPU
    report: tested here on the CPU, so a machine without CUDA checks the same code path."""
    import functools

    import weightgeo.stream_sparsity as ss

    cpu = weightgeo.sparsity_curve(_planted(), steps=STEPS, cache=False)
    monkeypatch.setattr(ss, "changed_count", functools.partial(ss.changed_count, backend="torch"))
    monkeypatch.setattr(ss.Version, "fast", lambda self: False)  # not the CPU bit path
    moved = weightgeo.sparsity_curve(_planted(), steps=STEPS, device="cpu", cache=False)
    assert rows_json(moved) == rows_json(cpu)
    _check_rows(moved)
