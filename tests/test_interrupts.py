"""Ctrl-C is answered within 2 s at any point of ``compare``, ``trajectory`` and ``trajectory --follow``, with a
message that says a re-run resumes from the cache; the reports of an interrupted run resumed equal a fresh run's.

Each test starts the command line in a subprocess, waits until it is busy (inside a long float64 kernel, or
asleep between two scans of a followed run), sends SIGINT and measures the time from the signal to the exit.
The contract is 2 s; the bound asserted adds 1 s of slack for a loaded machine (the watchdog answers after 1 s).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from factories import write_hf_checkpoint

pytestmark = pytest.mark.skipif(os.name != "posix", reason="SIGINT to a subprocess is POSIX")

CONTRACT_S, SLACK_S = 2.0, 1.0
N = 2500  # a 2500x2500 float32 pair: its float64 Gram eigendecomposition takes seconds on 2 cores


def _big(tmp: Path, name: str, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    return write_hf_checkpoint(tmp / name, {"model.layers.0.mlp.up_proj.weight": torch.randn(N, N, generator=g)})


class _Run:
    """The command line in a subprocess, its stderr collected as it comes (the progress bar says where it is)."""

    def __init__(self, args: list[str]) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "120"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "weightgeo", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.err = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for chunk in iter(lambda: self.proc.stderr.read(1), ""):
            self.err += chunk

    def wait_for(self, marker: str, then_s: float) -> None:
        """Wait until ``marker`` shows on stderr (the work is under way), then ``then_s`` more seconds."""
        deadline = time.monotonic() + 180
        while marker not in self.err:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"never saw {marker!r} (rc={self.proc.poll()}): {self.err[-2000:]}")
            time.sleep(0.05)
        time.sleep(then_s)
        assert self.proc.poll() is None, f"finished before the signal: {self.err[-1000:]}"

    def interrupt(self) -> float:
        sent = time.monotonic()
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"no exit 60 s after SIGINT: {self.err[-2000:]}")
        elapsed = time.monotonic() - sent
        self._reader.join(timeout=10)
        return elapsed


def _check(elapsed: float, run: _Run) -> None:
    err = run.err
    assert run.proc.returncode == 130, err[-2000:]
    assert elapsed <= CONTRACT_S + SLACK_S, (
        f"exited {elapsed:.2f} s after SIGINT: the contract is {CONTRACT_S} s (+{SLACK_S} s slack for a loaded "
        f"machine); stderr: {err[-1000:]}"
    )
    assert "interrupted" in err and "re-run" in err and "cache" in err, err[-2000:]
    assert err.count("weightgeo: interrupted") == 1, err[-2000:]


def test_compare_answers_ctrl_c_inside_a_long_kernel(tmp_path):
    base, ft = _big(tmp_path, "b", 0), _big(tmp_path, "f", 1)
    cache = tmp_path / "cache"
    run = _Run(["compare", str(base), str(ft), "--metrics", "spectral_drift", "--cache", str(cache)])
    run.wait_for("0.5/1", 1.0)  # the bar moved when the one matrix was read and checked; the kernel is running
    _check(run.interrupt(), run)
    assert str(cache) in run.err


def test_trajectory_answers_ctrl_c_inside_a_long_kernel(tmp_path):
    run = tmp_path / "run"
    for step in (0, 1, 2):
        _big(run, f"checkpoint-{step}", step)
    cmd = _Run(["trajectory", str(run), "--no-cache", "--k", "2", "--hill-k", "2"])
    cmd.wait_for("weightgeo trajectory:", 1.5)  # the bar is up: checkpoints are being read and decomposed
    _check(cmd.interrupt(), cmd)
    assert "--no-cache" in cmd.err  # nothing was cached: the message says a re-run starts over


def test_follow_answers_ctrl_c_while_waiting(tmp_path):
    run = tmp_path / "run"
    for step in (0, 1):
        w = {"model.layers.0.self_attn.q_proj.weight": torch.full((8, 8), float(step + 1))}
        w["model.layers.0.self_attn.q_proj.weight"][0, 0] += step
        d = write_hf_checkpoint(run / f"checkpoint-{step}", w)
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    out = tmp_path / "r.json"
    cmd = _Run(["trajectory", str(run), "--follow", "--poll-s", "60", "--k", "1", "--hill-k", "2", "--out", str(out)])
    deadline = time.monotonic() + 120
    while not out.exists() and time.monotonic() < deadline and cmd.proc.poll() is None:
        time.sleep(0.2)
    assert out.exists(), "follow never wrote its first report"
    time.sleep(0.5)  # now asleep until the next scan, 60 s away
    _check(cmd.interrupt(), cmd)
    assert "step 1" in cmd.err and json.loads(out.read_text())["rows"]


def test_compare_interrupted_then_resumed_equals_a_fresh_run(tmp_path):
    """Ctrl-C part-way; the re-run serves what was finished from the cache and its report (rows and summary)
    equals an uncached run's bit for bit."""
    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(6)]
    base = {n: torch.randn(900, 900, generator=g) for n in names}
    ft = {n: w + 1e-2 * torch.randn(w.shape, generator=g) for n, w in base.items()}
    b, f = write_hf_checkpoint(tmp_path / "b", base), write_hf_checkpoint(tmp_path / "f", ft)
    cache = tmp_path / "cache"
    args = ["compare", str(b), str(f), "--k", "0.125", "--rank", "8", "--batch-mb", "0"]
    run = _Run([*args, "--cache", str(cache)])
    run.wait_for("2.0/6", 0.0)  # two of the six matrices done (and cached)
    _check(run.interrupt(), run)
    outs = {}
    for name, flag in (("resumed", ["--cache", str(cache)]), ("fresh", ["--no-cache"])):
        done = subprocess.run(
            [sys.executable, "-m", "weightgeo", *args, *flag, "--out", str(tmp_path / f"{name}.json")],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        outs[name] = json.loads((tmp_path / f"{name}.json").read_text())
    resumed, fresh = outs["resumed"], outs["fresh"]
    assert resumed["meta"]["cache"]["rows_cached"] >= 2 and resumed["meta"]["cache"]["rows_computed"] <= 4
    assert resumed["rows"] == fresh["rows"] and resumed["summary"] == fresh["summary"]
