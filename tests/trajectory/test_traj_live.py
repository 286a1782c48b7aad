"""Live runs in streams (issue 13): incomplete checkpoints left out (loudly when not the newest) or refused with
strict, follow mode on a run being written (and its Ctrl-C), and streams of native checkpoint folders (issue 12
item 5). Interrupted runs resumed from the result cache: tests/cache/test_cache_resume.py."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from factories import write_hf_checkpoint
from live_factories import STREAM_KW as KW
from live_factories import rows_json, run_state, truncated, write_run
from native_factories import write_dcp

import weightgeo
from weightgeo.cli import main
from weightgeo.errors import WeightgeoError
from weightgeo.report import Report

TESTS = Path(__file__).resolve().parents[1]  # tests/: on the path of the subprocesses these tests start


# --------------------------------------------------------------------------------------------------------------
# 1. incomplete checkpoints are left out, loudly when they are not the newest; strict fails fast
def test_incomplete_checkpoints_are_left_out_listed_and_strict_fails(tmp_path):
    run = write_run(tmp_path / "run", [0, 10, 20])
    truncated(run / "checkpoint-15", 15)  # an older save that failed: corrupt
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
    assert rows_json(rep) == rows_json(offline)

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
    run = write_run(tmp_path / "run", [0])
    truncated(run / "checkpoint-10", 10)
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
from live_factories import trainer_save, truncated
run = Path({run!r})
time.sleep(0.3)
trainer_save(run / "checkpoint-20", 20)
time.sleep(0.3)
truncated(run / "checkpoint-30", 30)   # killed mid-way: stays half written
time.sleep(0.3)
(run / "checkpoint-40").mkdir()         # created, never written
time.sleep(0.3)
trainer_save(run / "checkpoint-50", 50)
"""


def test_follow_a_run_being_written_equals_offline_rank_curve(tmp_path):
    run = write_run(tmp_path / "run", [0, 10])
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
    # the command line reports the sparsity curves beside the spectra (rank_curve(sparsity=True))
    offline = weightgeo.rank_curve([run / f"checkpoint-{t}" for t in (0, 10, 20, 50)], cache=False, sparsity=True, **KW)
    assert json.loads(live.to_json())["rows"] == rows_json(offline)
    left = {c["name"]: c for c in live.meta["skipped"] if c.get("kind") == "checkpoint"}
    assert set(left) == {"checkpoint-30", "checkpoint-40"}
    assert left["checkpoint-30"]["problem"] == "bad_file" and left["checkpoint-40"]["problem"] == "empty"
    assert all(c["reason"] for c in left.values())
    assert live.meta["follow"]["final_step"] == 50


def test_follow_stops_on_ctrl_c_with_status_130_and_the_report_intact(tmp_path):
    run = write_run(tmp_path / "run", [0, 10])
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
    run = write_run(tmp_path / "run", [0, 10, 20, 30])
    ups = list(weightgeo.follow(run, idle_s=0, poll_s=0, cache=False, **KW))
    assert [u.step for u in ups] == [10, 20, 30]
    assert [u.report.meta["cache"]["spectra_computed"] for u in ups] == [16, 16, 16]
    assert ups[-1].report.meta["cache"]["spectra_reused"] == 32  # steps 10 and 20 of every matrix
    offline = weightgeo.rank_curve(run, cache=False, **KW)
    assert rows_json(ups[-1].report) == rows_json(offline)
    assert [u.step for u in weightgeo.follow(run, until=20, idle_s=0, cache=False, **KW)] == [10, 20]
    # base= one of the run's own folders: the base, not a step (the first one: the default stream)
    own = list(weightgeo.follow(run, base=run / "checkpoint-0", idle_s=0, cache=False, **KW))
    assert [u.step for u in own] == [10, 20, 30] and rows_json(own[-1].report) == rows_json(offline)
    assert rows_json(weightgeo.rank_curve(run, base=run / "checkpoint-0", cache=False, **KW)) == rows_json(offline)
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
# 3. streams of native checkpoint folders: the step from the folder name, trackers honoured
def test_native_stream_folder_names_give_the_rank_curve_of_their_hf_twin(tmp_path):
    steps = [0, 10, 20]
    hf = weightgeo.rank_curve(write_run(tmp_path / "hf", steps), cache=False, **KW)
    expected = rows_json(hf)

    verl = tmp_path / "verl"  # verl: global_step_N/actor/huggingface with full weights
    for t in steps:
        write_hf_checkpoint(verl / f"global_step_{t}" / "actor" / "huggingface", run_state(t))
    (verl / "latest_checkpointed_iteration.txt").write_text("20")
    ds = tmp_path / "deepspeed"  # OpenRLHF / DeepSpeed: global_stepN, `latest` names the newest tag
    for t in [*steps, 30]:
        write_hf_checkpoint(ds / f"global_step{t}", run_state(t))
    (ds / "latest").write_text("global_step20")
    mega = tmp_path / "megatron"  # Megatron / slime: iter_NNNNNNN (torch_dist), the tracker names the newest
    titan = tmp_path / "torchtitan"  # torchtitan: step-N (DCP)
    for t in [*steps, 30]:
        write_dcp(mega / f"iter_{t:07d}", {k: v.float().to(torch.bfloat16) for k, v in run_state(t).items()})
        if t != 30:
            write_dcp(titan / f"step-{t}", dict(run_state(t)))
    (mega / "latest_checkpointed_iteration.txt").write_text("20")  # iter_0000030 is being saved
    for run in (verl, ds, mega, titan):
        with pytest.warns(RuntimeWarning) if run in (ds, mega) else _no_warning():
            rep = weightgeo.rank_curve(run, cache=False, **KW)
        assert rep.summary["steps"] == [10, 20] and rep.meta["base_step"] == 0, run.name
        assert rows_json(rep) == expected, run.name
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
