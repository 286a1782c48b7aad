"""The result cache under live and interrupted runs (issue 13): compare and rank_curve killed part-way (kill -9)
resume with identical rows reading fewer tensors; concurrent writers; truncated entries, other versions and other
options never served; the CLI's cache switches; a new fine-tune of a cached base. Streams being written:
tests/trajectory/test_traj_live.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from factories import write_hf_checkpoint
from live_factories import PAIR_KW, Reads, report_json, rows_json, run_state, trainer_save, write_run
from live_factories import STREAM_KW as KW

import weightgeo
from weightgeo.cache import ResultCache
from weightgeo.cli import main
from weightgeo.report import Report

TESTS = Path(__file__).resolve().parents[1]  # tests/: on the path of the subprocesses these tests start


# --------------------------------------------------------------------------------------------------------------
# 1. resumable: kill -9 part-way, re-run, identical rows, fewer tensors read
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
    b, f = write_hf_checkpoint(tmp_path / "b", run_state(0)), write_hf_checkpoint(tmp_path / "f", run_state(40))
    cache = tmp_path / "cache"
    _kill_after(f"weightgeo.compare({str(b)!r}, {str(f)!r}, batch_bytes=0, k=4, rank=2, progress=False)", cache, 6)
    reads = Reads(monkeypatch)
    full = weightgeo.compare(b, f, batch_bytes=0, cache=False, **PAIR_KW)
    n_full = reads.take()
    resumed = weightgeo.compare(b, f, batch_bytes=0, cache=cache, **PAIR_KW)
    n_resumed = reads.take()
    assert report_json(resumed) == report_json(full) and len(full.rows) == 21  # rows and summary
    c = resumed.meta["cache"]
    assert c["rows_cached"] >= 3 and c["rows_cached"] + c["rows_computed"] == 21
    assert n_full == 42 and n_resumed < n_full
    again = weightgeo.compare(b, f, batch_bytes=0, cache=cache, **PAIR_KW)
    assert rows_json(again) == rows_json(full) and reads.take() == 0 and again.meta["cache"]["rows_computed"] == 0


def test_rank_curve_killed_part_way_resumes_with_identical_rows(tmp_path, monkeypatch):
    run = write_run(tmp_path / "run", [0, 10, 20, 30])
    cache = tmp_path / "cache"
    _kill_after(f"weightgeo.rank_curve({str(run)!r}, k=2, hill_k=2)", cache, 10)
    reads = Reads(monkeypatch)
    full = weightgeo.rank_curve(run, cache=False, **KW)
    n_full = reads.take()
    resumed = weightgeo.rank_curve(run, cache=cache, **KW)
    n_resumed = reads.take()
    assert report_json(resumed) == report_json(full)  # rows and summary
    c = resumed.meta["cache"]
    assert c["spectra_reused"] >= 10 and c["spectra_reused"] + c["spectra_computed"] == 16 * 3
    assert n_full == 16 * 4 and n_resumed < n_full
    # one more checkpoint: only its own tensors (and the base's) are read
    trainer_save(run / "checkpoint-40", 40)
    grown = weightgeo.rank_curve(run, cache=cache, **KW)
    assert reads.take() == 16 * 2 and grown.meta["cache"]["spectra_computed"] == 16
    assert rows_json(grown) == rows_json(weightgeo.rank_curve(run, cache=False, **KW))


# --------------------------------------------------------------------------------------------------------------
# 2. the cache: concurrent writers, a truncated entry, another version, other options
_FILL = """
import json, sys
import weightgeo
r = weightgeo.compare({b!r}, {f!r}, k=4, rank=2, progress=False, cache={cache!r})
sys.stdout.write(r.to_json())
"""


def test_two_processes_fill_one_cache_at_once(tmp_path, monkeypatch):
    b, f = write_hf_checkpoint(tmp_path / "b", run_state(0)), write_hf_checkpoint(tmp_path / "f", run_state(40))
    cache = tmp_path / "cache"
    script = _FILL.format(b=str(b), f=str(f), cache=str(cache))
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    expected = rows_json(weightgeo.compare(b, f, cache=False, **PAIR_KW))
    assert [json.loads(o)["rows"] for o in outs] == [expected, expected]
    reads = Reads(monkeypatch)
    served = weightgeo.compare(b, f, cache=cache, **PAIR_KW)
    assert rows_json(served) == expected and reads.take() == 0
    assert served.meta["cache"]["rows_cached"] == 21 and served.meta["cache"]["corrupt"] == 0
    assert not list(cache.rglob("*.tmp"))


def test_truncated_entries_other_versions_and_other_options_are_not_served(tmp_path):
    b, f = write_hf_checkpoint(tmp_path / "b", run_state(0)), write_hf_checkpoint(tmp_path / "f", run_state(40))
    root = tmp_path / "cache"
    first = weightgeo.compare(b, f, cache=root, **PAIR_KW)
    expected = rows_json(first)
    assert first.meta["cache"]["rows_computed"] == 21 and first.meta["cache"]["rows_cached"] == 0
    entry = min(root.rglob("*.safetensors"), key=lambda p: p.stat().st_size)  # a row (decompositions are larger)
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])  # a disk that filled up mid-write
    second = weightgeo.compare(b, f, cache=root, **PAIR_KW)
    assert rows_json(second) == expected and second.meta["cache"]["corrupt"] == 1
    assert second.meta["cache"]["rows_computed"] == 1
    assert weightgeo.compare(b, f, cache=root, **PAIR_KW).meta["cache"]["corrupt"] == 0  # recomputed, rewritten

    bumped = weightgeo.compare(b, f, cache=ResultCache(root, version="99.0"), **PAIR_KW)
    assert rows_json(bumped) == expected and bumped.meta["cache"]["rows_cached"] == 0
    other_k = weightgeo.compare(b, f, cache=root, k=8, rank=2, progress=False)
    assert other_k.meta["cache"]["rows_cached"] == 0
    assert rows_json(other_k) == rows_json(weightgeo.compare(b, f, cache=False, k=8, rank=2, progress=False))

    run = write_run(tmp_path / "run", [0, 10, 20])
    weightgeo.rank_curve(run, cache=root, **KW)
    assert weightgeo.rank_curve(run, cache=root, **KW).meta["cache"]["spectra_computed"] == 0
    k3 = weightgeo.rank_curve(run, cache=root, k=3, hill_k=2)
    assert k3.meta["cache"]["spectra_reused"] == 0
    assert rows_json(k3) == rows_json(weightgeo.rank_curve(run, cache=False, k=3, hill_k=2))
    assert weightgeo.rank_curve(run, cache=ResultCache(root, version="99.0"), **KW).meta["cache"]["spectra_reused"] == 0
    # the file changed on disk (same name, new bytes): its old results are not served
    time.sleep(0.01)
    trainer_save(run / "checkpoint-20", 21)
    (run / "checkpoint-20" / "trainer_state.json").write_text(json.dumps({"global_step": 20}))
    changed = weightgeo.rank_curve(run, cache=root, **KW)
    assert changed.meta["cache"]["spectra_computed"] == 16 and changed.meta["cache"]["spectra_reused"] == 16


def test_cli_cache_switches(tmp_path, capsys):
    b, f = write_hf_checkpoint(tmp_path / "b", run_state(0)), write_hf_checkpoint(tmp_path / "f", run_state(40))
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
    b = write_hf_checkpoint(tmp_path / "b", run_state(0, **shape))
    f1, f2 = (write_hf_checkpoint(tmp_path / f"f{t}", run_state(t, **shape)) for t in (20, 40))
    root = tmp_path / "cache"
    weightgeo.compare(b, f1, cache=root, **PAIR_KW)
    second = weightgeo.compare(b, f2, cache=root, **PAIR_KW)
    assert second.meta["cache"]["bases_cached"] == 16 and second.meta["cache"]["bases_computed"] == 0
    assert rows_json(second) == rows_json(weightgeo.compare(b, f2, cache=False, **PAIR_KW))
    many = weightgeo.compare_many(b, [f1, f2], cache=root, **PAIR_KW)  # both fine-tunes already cached
    assert [r.meta["cache"]["rows_computed"] for r in many] == [0, 0]
    assert [rows_json(r) for r in many] == [
        rows_json(r) for r in weightgeo.compare_many(b, [f1, f2], cache=False, **PAIR_KW)
    ]
