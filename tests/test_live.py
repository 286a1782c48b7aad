"""Live and interrupted runs (issue 13): incomplete checkpoints left out, follow mode, the result cache, resuming
after ``kill -9``, and streams of native checkpoint folders (issue 12 item 5)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from factories import tiny_llama_state, write_hf_checkpoint
from native_factories import write_dcp

import weightgeo
from weightgeo.cache import ResultCache
from weightgeo.checkpoint import Checkpoint
from weightgeo.cli import main
from weightgeo.errors import WeightgeoError
from weightgeo.report import Report

TESTS = Path(__file__).resolve().parent
KW = dict(k=2, hill_k=2)  # rank_curve options of every stream test here
PAIR_KW = dict(k=4, rank=2, progress=False)


def _state(step: int, **shape: int) -> dict[str, torch.Tensor]:
    """The tiny model after ``step`` steps: a planted rank-2 update growing with the step, plus noise."""
    base = tiny_llama_state(**shape)
    g = torch.Generator().manual_seed(1000 + step)
    out = {}
    for name, w in base.items():
        if w.ndim == 2:
            u = torch.randn(w.shape[0], 2, generator=torch.Generator().manual_seed(len(name)))
            v = torch.randn(2, w.shape[1], generator=torch.Generator().manual_seed(len(name) + 1))
            d = 1e-3 * step * (u @ v) + 1e-4 * step**0.5 * torch.randn(w.shape, generator=g)
            w = (w.float() + d).to(w.dtype)
        out[name] = w
    return out


def _trainer_save(folder: Path, step: int) -> Path:
    """What the HF Trainer writes: the weights, then ``trainer_state.json`` last (its completion marker)."""
    write_hf_checkpoint(folder, _state(step))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def _run(root: Path, steps) -> Path:
    for t in steps:
        _trainer_save(root / f"checkpoint-{t}", t)
    return root


def _truncated(folder: Path, step: int) -> None:
    """A save killed mid-way: half of the shard's bytes, no marker (the full file never appears in the run)."""
    scratch = folder.parent.parent / f"scratch-{step}"
    write_hf_checkpoint(scratch, _state(step))
    data = (scratch / "model.safetensors").read_bytes()
    folder.mkdir(parents=True)
    (folder / "config.json").write_text((scratch / "config.json").read_text())
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def _rows_json(report: Report) -> list:
    return json.loads(report.to_json())["rows"]


class _Reads:
    """Counts the tensors read through any Checkpoint (``get`` calls, and tensors read in row chunks)."""

    def __init__(self, monkeypatch):
        self.names: list[tuple[int, str]] = []
        self.chunked: set[tuple[int, str]] = set()
        get, get_rows = Checkpoint.get, Checkpoint.get_rows

        def counted_get(ck, name):
            self.names.append((id(ck), name))
            return get(ck, name)

        def counted_rows(ck, name, start, stop):
            self.chunked.add((id(ck), name))
            return get_rows(ck, name, start, stop)

        monkeypatch.setattr(Checkpoint, "get", counted_get)
        monkeypatch.setattr(Checkpoint, "get_rows", counted_rows)

    def take(self) -> int:
        n = len(self.names) + len(self.chunked)
        self.names.clear()
        self.chunked.clear()
        return n


# --------------------------------------------------------------------------------------------------------------
# 1. incomplete checkpoints are left out, loudly when they are not the newest; strict fails fast
def test_incomplete_checkpoints_are_left_out_listed_and_strict_fails(tmp_path):
    run = _run(tmp_path / "run", [0, 10, 20])
    _truncated(run / "checkpoint-15", 15)  # an older save that failed: corrupt
    (run / "checkpoint-30").mkdir()  # the trainer has just created it: in progress
    with pytest.warns(RuntimeWarning) as seen:
        rep = weightgeo.rank_curve(run, cache=False, **KW)
    msgs = " | ".join(str(w.message) for w in seen)
    assert "CORRUPT checkpoint" in msgs and "checkpoint-15" in msgs and "checkpoint-30" in msgs
    assert rep.summary["steps"] == [10, 20]
    left = {c["name"]: c for c in rep.meta["skipped"] if c.get("kind") == "checkpoint"}
    assert left["checkpoint-15"]["state"] == "corrupt" and left["checkpoint-15"]["problem"] == "bad_file"
    assert left["checkpoint-30"]["state"] == "in_progress" and left["checkpoint-30"]["problem"] == "empty"
    assert all(c["reason"] for c in left.values())
    assert "CORRUPT checkpoint checkpoint-15" in rep.summary_text()  # in the summary text, not only a warning
    offline = weightgeo.rank_curve([run / f"checkpoint-{t}" for t in (0, 10, 20)], cache=False, **KW)
    assert _rows_json(rep) == _rows_json(offline)

    with pytest.raises(WeightgeoError, match="checkpoint-15 is not completely written.*strict"):
        weightgeo.rank_curve(run, strict=True, cache=False, **KW)
    with pytest.raises(WeightgeoError, match="not completely written"):
        weightgeo.locking_onset(run, strict=True, cache=False, k=2)
    assert main(["trajectory", str(run), "--strict", "--no-progress", "--no-cache", "--k", "2"]) == 2
    assert main(["trajectory", str(run), "--until", "10"]) == 2
    (run / "checkpoint-0" / "model.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(WeightgeoError, match="base .* is not completely written"):
        weightgeo.rank_curve(run, base=run / "checkpoint-0", cache=False, **KW)


def test_a_run_left_with_one_complete_checkpoint_says_what_was_left_out(tmp_path):
    run = _run(tmp_path / "run", [0])
    _truncated(run / "checkpoint-10", 10)
    (run / "checkpoint-20").mkdir()
    with pytest.raises(
        WeightgeoError,
        match=r"one checkpoint \(step 0\) has nothing to compare.*left out "
        r".*checkpoint-10 \(step 10\).*left out .*checkpoint-20 \(step 20\)",
    ):
        weightgeo.rank_curve(run, cache=False, **KW)


# --------------------------------------------------------------------------------------------------------------
# 2. follow mode: a writer process adds checkpoints while `weightgeo trajectory --follow` runs
_WRITER = """
import sys, time
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_live import _trainer_save, _truncated
run = Path({run!r})
time.sleep(0.3)
_trainer_save(run / "checkpoint-20", 20)
time.sleep(0.3)
_truncated(run / "checkpoint-30", 30)   # killed mid-way: stays half written
time.sleep(0.3)
(run / "checkpoint-40").mkdir()         # created, never written
time.sleep(0.3)
_trainer_save(run / "checkpoint-50", 50)
"""


def test_follow_a_run_being_written_equals_offline_rank_curve(tmp_path):
    run = _run(tmp_path / "run", [0, 10])
    out = tmp_path / "out" / "live.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WEIGHTGEO_CACHE": str(tmp_path / "cache")}
    follower = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "weightgeo",
            "trajectory",
            str(run),
            "--follow",
            "--until",
            "50",
            "--poll-s",
            "0.1",
            "--idle-s",
            "120",
            "--k",
            "2",
            "--hill-k",
            "2",
            "--out",
            str(out),
            "--no-progress",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    writer = subprocess.run(
        [sys.executable, "-c", _WRITER.format(tests=str(TESTS), run=str(run))],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert writer.returncode == 0, writer.stderr
    stdout, stderr = follower.communicate(timeout=120)
    assert follower.returncode == 0, stderr
    new_steps = [int(m.group(1)) for m in re.finditer(r"^step (\d+): ", stdout, re.M)]
    assert new_steps[0] == 10 and new_steps[-1] == 50 and 30 not in new_steps and 40 not in new_steps
    assert "CORRUPT checkpoint" in stderr and "checkpoint-30" in stderr

    live = Report.from_json(out)
    offline = weightgeo.rank_curve([run / f"checkpoint-{t}" for t in (0, 10, 20, 50)], cache=False, **KW)
    assert json.loads(live.to_json())["rows"] == _rows_json(offline)
    left = {c["name"]: c for c in live.meta["skipped"] if c.get("kind") == "checkpoint"}
    assert set(left) == {"checkpoint-30", "checkpoint-40"}
    assert left["checkpoint-30"]["problem"] == "bad_file" and left["checkpoint-40"]["problem"] == "empty"
    assert all(c["reason"] for c in left.values())
    assert live.meta["follow"]["final_step"] == 50


def test_follow_stops_on_ctrl_c_with_status_130_and_the_report_intact(tmp_path):
    run = _run(tmp_path / "run", [0, 10])
    out = tmp_path / "live.json"
    follower = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "weightgeo",
            "trajectory",
            str(run),
            "--follow",
            "--poll-s",
            "0.1",
            "--k",
            "2",
            "--hill-k",
            "2",
            "--out",
            str(out),
            "--no-progress",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "WEIGHTGEO_CACHE": str(tmp_path / "cache")},
    )
    try:
        while not follower.stdout.readline().startswith("step 10:"):
            assert follower.poll() is None, follower.stderr.read()
        follower.send_signal(signal.SIGINT)
        _, stderr = follower.communicate(timeout=60)
    finally:
        follower.kill()
    assert follower.returncode == 130 and "interrupted; the report up to step 10" in stderr
    assert Report.from_json(out).summary["steps"] == [10]


def test_follow_iterator_stops_and_reuses_the_spectra_of_earlier_steps(tmp_path):
    run = _run(tmp_path / "run", [0, 10, 20, 30])
    ups = list(weightgeo.follow(run, idle_s=0, poll_s=0, cache=False, **KW))
    assert [u.step for u in ups] == [10, 20, 30]
    assert [u.report.meta["cache"]["spectra_computed"] for u in ups] == [16, 16, 16]
    assert ups[-1].report.meta["cache"]["spectra_reused"] == 32  # steps 10 and 20 of every matrix
    offline = weightgeo.rank_curve(run, cache=False, **KW)
    assert _rows_json(ups[-1].report) == _rows_json(offline)
    assert [u.step for u in weightgeo.follow(run, until=20, idle_s=0, cache=False, **KW)] == [10, 20]
    # base= one of the run's own folders: the base, not a step (the first one: the default stream)
    own = list(weightgeo.follow(run, base=run / "checkpoint-0", idle_s=0, cache=False, **KW))
    assert [u.step for u in own] == [10, 20, 30] and _rows_json(own[-1].report) == _rows_json(offline)
    assert _rows_json(weightgeo.rank_curve(run, base=run / "checkpoint-0", cache=False, **KW)) == _rows_json(offline)
    mid = weightgeo.rank_curve(run, base=run / "checkpoint-10", cache=False, **KW)
    assert mid.summary["steps"] == [0, 20, 30] and mid.meta["base_step"] is None
    assert [u.step for u in weightgeo.follow(run, base=run / "checkpoint-10", idle_s=0, cache=False, **KW)] == [
        0,
        20,
        30,
    ]
    with pytest.raises(WeightgeoError, match="poll_s"):
        next(weightgeo.follow(run, poll_s=-1, cache=False))


# --------------------------------------------------------------------------------------------------------------
# 3. resumable: kill -9 part-way, re-run, identical rows, fewer tensors read
_SLOW = """
import sys, time, json
sys.path.insert(0, {tests!r})
import weightgeo
from weightgeo.cache import store
put = store.ResultCache.put
def slow_put(self, *a, **kw):  # every finished result is written, then this process dawdles
    put(self, *a, **kw)
    print("stored", flush=True)
    time.sleep(0.15)
store.ResultCache.put = slow_put
{call}
print("finished", flush=True)
"""


def _kill_after(call: str, cache: Path, n: int) -> None:
    """Run ``call`` in a child whose every cache write is slow, and SIGKILL it after ``n`` writes."""
    child = subprocess.Popen(
        [sys.executable, "-c", _SLOW.format(tests=str(TESTS), call=call)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "WEIGHTGEO_CACHE": str(cache)},
    )
    seen = 0
    try:
        while seen < n:
            line = child.stdout.readline()
            assert line and line.strip() != "finished", "the child finished before it was killed"
            seen += line.strip() == "stored"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL


def test_compare_killed_part_way_resumes_with_identical_rows(tmp_path, monkeypatch):
    b, f = write_hf_checkpoint(tmp_path / "b", _state(0)), write_hf_checkpoint(tmp_path / "f", _state(40))
    cache = tmp_path / "cache"
    _kill_after(f"weightgeo.compare({str(b)!r}, {str(f)!r}, batch_bytes=0, k=4, rank=2, progress=False)", cache, 6)
    reads = _Reads(monkeypatch)
    full = weightgeo.compare(b, f, batch_bytes=0, cache=False, **PAIR_KW)
    n_full = reads.take()
    resumed = weightgeo.compare(b, f, batch_bytes=0, cache=cache, **PAIR_KW)
    n_resumed = reads.take()
    assert _rows_json(resumed) == _rows_json(full) and len(full.rows) == 21
    c = resumed.meta["cache"]
    assert c["rows_cached"] >= 3 and c["rows_cached"] + c["rows_computed"] == 21
    assert n_full == 42 and n_resumed < n_full
    again = weightgeo.compare(b, f, batch_bytes=0, cache=cache, **PAIR_KW)
    assert _rows_json(again) == _rows_json(full) and reads.take() == 0 and again.meta["cache"]["rows_computed"] == 0


def test_rank_curve_killed_part_way_resumes_with_identical_rows(tmp_path, monkeypatch):
    run = _run(tmp_path / "run", [0, 10, 20, 30])
    cache = tmp_path / "cache"
    _kill_after(f"weightgeo.rank_curve({str(run)!r}, k=2, hill_k=2)", cache, 10)
    reads = _Reads(monkeypatch)
    full = weightgeo.rank_curve(run, cache=False, **KW)
    n_full = reads.take()
    resumed = weightgeo.rank_curve(run, cache=cache, **KW)
    n_resumed = reads.take()
    assert _rows_json(resumed) == _rows_json(full)
    c = resumed.meta["cache"]
    assert c["spectra_reused"] >= 10 and c["spectra_reused"] + c["spectra_computed"] == 16 * 3
    assert n_full == 16 * 4 and n_resumed < n_full
    # one more checkpoint: only its own tensors (and the base's) are read
    _trainer_save(run / "checkpoint-40", 40)
    grown = weightgeo.rank_curve(run, cache=cache, **KW)
    assert reads.take() == 16 * 2 and grown.meta["cache"]["spectra_computed"] == 16
    assert _rows_json(grown) == _rows_json(weightgeo.rank_curve(run, cache=False, **KW))


# --------------------------------------------------------------------------------------------------------------
# 4. the cache: concurrent writers, a truncated entry, another version, other options
_FILL = """
import json, sys
import weightgeo
r = weightgeo.compare({b!r}, {f!r}, k=4, rank=2, progress=False, cache={cache!r})
sys.stdout.write(r.to_json())
"""


def test_two_processes_fill_one_cache_at_once(tmp_path, monkeypatch):
    b, f = write_hf_checkpoint(tmp_path / "b", _state(0)), write_hf_checkpoint(tmp_path / "f", _state(40))
    cache = tmp_path / "cache"
    script = _FILL.format(b=str(b), f=str(f), cache=str(cache))
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    expected = _rows_json(weightgeo.compare(b, f, cache=False, **PAIR_KW))
    assert [json.loads(o)["rows"] for o in outs] == [expected, expected]
    reads = _Reads(monkeypatch)
    served = weightgeo.compare(b, f, cache=cache, **PAIR_KW)
    assert _rows_json(served) == expected and reads.take() == 0
    assert served.meta["cache"]["rows_cached"] == 21 and served.meta["cache"]["corrupt"] == 0
    assert not list(cache.rglob("*.tmp"))


def test_truncated_entries_other_versions_and_other_options_are_not_served(tmp_path):
    b, f = write_hf_checkpoint(tmp_path / "b", _state(0)), write_hf_checkpoint(tmp_path / "f", _state(40))
    root = tmp_path / "cache"
    first = weightgeo.compare(b, f, cache=root, **PAIR_KW)
    expected = _rows_json(first)
    assert first.meta["cache"]["rows_computed"] == 21 and first.meta["cache"]["rows_cached"] == 0
    entry = min(root.rglob("*.safetensors"), key=lambda p: p.stat().st_size)  # a row (decompositions are larger)
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])  # a disk that filled up mid-write
    second = weightgeo.compare(b, f, cache=root, **PAIR_KW)
    assert _rows_json(second) == expected and second.meta["cache"]["corrupt"] == 1
    assert second.meta["cache"]["rows_computed"] == 1
    assert weightgeo.compare(b, f, cache=root, **PAIR_KW).meta["cache"]["corrupt"] == 0  # recomputed, rewritten

    bumped = weightgeo.compare(b, f, cache=ResultCache(root, version="99.0"), **PAIR_KW)
    assert _rows_json(bumped) == expected and bumped.meta["cache"]["rows_cached"] == 0
    other_k = weightgeo.compare(b, f, cache=root, k=8, rank=2, progress=False)
    assert other_k.meta["cache"]["rows_cached"] == 0
    assert _rows_json(other_k) == _rows_json(weightgeo.compare(b, f, cache=False, k=8, rank=2, progress=False))

    run = _run(tmp_path / "run", [0, 10, 20])
    weightgeo.rank_curve(run, cache=root, **KW)
    assert weightgeo.rank_curve(run, cache=root, **KW).meta["cache"]["spectra_computed"] == 0
    k3 = weightgeo.rank_curve(run, cache=root, k=3, hill_k=2)
    assert k3.meta["cache"]["spectra_reused"] == 0
    assert _rows_json(k3) == _rows_json(weightgeo.rank_curve(run, cache=False, k=3, hill_k=2))
    assert weightgeo.rank_curve(run, cache=ResultCache(root, version="99.0"), **KW).meta["cache"]["spectra_reused"] == 0
    # the file changed on disk (same name, new bytes): its old results are not served
    time.sleep(0.01)
    _trainer_save(run / "checkpoint-20", 21)
    (run / "checkpoint-20" / "trainer_state.json").write_text(json.dumps({"global_step": 20}))
    changed = weightgeo.rank_curve(run, cache=root, **KW)
    assert changed.meta["cache"]["spectra_computed"] == 16 and changed.meta["cache"]["spectra_reused"] == 16


# --------------------------------------------------------------------------------------------------------------
# 5. streams of native checkpoint folders: the step from the folder name, trackers honoured
def test_native_stream_folder_names_give_the_rank_curve_of_their_hf_twin(tmp_path):
    steps = [0, 10, 20]
    hf = weightgeo.rank_curve(_run(tmp_path / "hf", steps), cache=False, **KW)
    expected = _rows_json(hf)

    verl = tmp_path / "verl"  # verl: global_step_N/actor/huggingface with full weights
    for t in steps:
        write_hf_checkpoint(verl / f"global_step_{t}" / "actor" / "huggingface", _state(t))
    (verl / "latest_checkpointed_iteration.txt").write_text("20")
    ds = tmp_path / "deepspeed"  # OpenRLHF / DeepSpeed: global_stepN, `latest` names the newest tag
    for t in [*steps, 30]:
        write_hf_checkpoint(ds / f"global_step{t}", _state(t))
    (ds / "latest").write_text("global_step20")
    mega = tmp_path / "megatron"  # Megatron / slime: iter_NNNNNNN (torch_dist), the tracker names the newest
    titan = tmp_path / "torchtitan"  # torchtitan: step-N (DCP)
    for t in [*steps, 30]:
        write_dcp(mega / f"iter_{t:07d}", {k: v.float().to(torch.bfloat16) for k, v in _state(t).items()})
        if t != 30:
            write_dcp(titan / f"step-{t}", dict(_state(t)))
    (mega / "latest_checkpointed_iteration.txt").write_text("20")  # iter_0000030 is being saved
    for run in (verl, ds, mega, titan):
        with pytest.warns(RuntimeWarning) if run in (ds, mega) else _no_warning():
            rep = weightgeo.rank_curve(run, cache=False, **KW)
        assert rep.summary["steps"] == [10, 20] and rep.meta["base_step"] == 0, run.name
        assert _rows_json(rep) == expected, run.name
        if run in (ds, mega):
            left = [c for c in rep.meta["skipped"] if c.get("kind") == "checkpoint"]
            assert [(c["step"], c["problem"]) for c in left] == [(30, "no_marker")], run.name
    (mega / "latest_checkpointed_iteration.txt").write_text("30")  # the save finished
    assert weightgeo.rank_curve(mega, cache=False, **KW).summary["steps"] == [10, 20, 30]


class _no_warning:
    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("error", RuntimeWarning)

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def test_cli_cache_switches(tmp_path, capsys):
    b, f = write_hf_checkpoint(tmp_path / "b", _state(0)), write_hf_checkpoint(tmp_path / "f", _state(40))
    args = ["compare", str(b), str(f), "--k", "4", "--rank", "2", "--summary", "--no-progress"]
    for extra, cached in (
        (["--cache", str(tmp_path / "c")], 0),
        (["--cache", str(tmp_path / "c")], 21),
        (["--no-cache"], 0),
    ):
        assert main([*args, *extra, "--out", str(tmp_path / "r.json")]) == 0
        meta = Report.from_json(tmp_path / "r.json").meta["cache"]
        assert meta["rows_cached"] == cached and meta["enabled"] == (extra[0] == "--cache")
    capsys.readouterr()
    with pytest.raises(SystemExit):  # argparse: not allowed together
        main([*args, "--cache", str(tmp_path / "c"), "--no-cache"])


def test_a_new_fine_tune_of_a_cached_base_gives_the_rows_of_a_fresh_run(tmp_path):
    """The base decomposition served from the cache (values, Gram eigenvalues, basis) must give the rows a fresh
    decomposition gives, bit for bit (a GEMM's rounding depends on its operands' memory layout)."""
    shape = dict(num_layers=2, hidden=16, intermediate=8)
    b = write_hf_checkpoint(tmp_path / "b", _state(0, **shape))
    f1, f2 = (write_hf_checkpoint(tmp_path / f"f{t}", _state(t, **shape)) for t in (20, 40))
    root = tmp_path / "cache"
    weightgeo.compare(b, f1, cache=root, **PAIR_KW)
    second = weightgeo.compare(b, f2, cache=root, **PAIR_KW)
    assert second.meta["cache"]["bases_cached"] == 16 and second.meta["cache"]["bases_computed"] == 0
    assert _rows_json(second) == _rows_json(weightgeo.compare(b, f2, cache=False, **PAIR_KW))
    many = weightgeo.compare_many(b, [f1, f2], cache=root, **PAIR_KW)  # both fine-tunes already cached
    assert [r.meta["cache"]["rows_computed"] for r in many] == [0, 0]
    assert [_rows_json(r) for r in many] == [
        _rows_json(r) for r in weightgeo.compare_many(b, [f1, f2], cache=False, **PAIR_KW)
    ]
