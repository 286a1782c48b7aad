"""Lanes (linalg.hardware): a pair's independent steps side by side on a CPU, and the next group's base ahead.

The lanes change where a step runs and with how many threads, never which step runs on which operands: rows
with and without them agree to rounding, and the engine's rows with the next group's base made ahead of its turn
equal those without, bit for bit (both run every step with the lane's threads)."""

from __future__ import annotations

import threading

import pytest
import torch
from factories import tiny_llama_state, write_hf_checkpoint

import weightgeo
from weightgeo.linalg import hardware
from weightgeo.metrics.catalog import PAIR_METRICS
from weightgeo.metrics.pair import batched_pair_metrics


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_lanes_policy(monkeypatch, two_threads):
    assert hardware.lanes("cpu") == 2
    assert hardware.lanes("meta") == 1  # not a CPU: one lane
    torch.set_num_threads(1)
    assert hardware.lanes("cpu") == 1
    monkeypatch.setattr(hardware, "LANES", 1)
    torch.set_num_threads(2)
    assert hardware.lanes("cpu") == 1 and hardware.ahead(lambda: 1) is None


def test_lanes_run_side_by_side_and_restore_the_threads(two_threads):
    seen = []
    with hardware.Lanes("cpu") as ln:
        assert torch.get_num_threads() == 1  # each lane has half
        job = ln.submit(lambda: (threading.current_thread().name, torch.get_num_threads()))
        bad = ln.submit(lambda: 1 / 0)
        with hardware.Lanes("cpu") as inner:  # no third lane inside a lane's block: inline
            seen.append(inner.submit(lambda: threading.current_thread().name).result())
    assert job.result() == ("weightgeo-lane", 1)
    assert seen == [threading.current_thread().name]
    with pytest.raises(ZeroDivisionError):
        bad.result()
    assert torch.get_num_threads() == 2


def test_work_ahead_goes_before_the_pairs_jobs_not_started(two_threads):
    """The next group's base is what the first lane waits for next: the second lane runs it before this pair's
    jobs still queued, and the first lane takes those back when it gets to them."""
    gate, order = threading.Event(), []
    with hardware.Lanes("cpu") as ln:
        ln.submit(gate.wait)  # hold the lane while both are queued
        queued = ln.submit(lambda: order.append("pair"))
        ahead = hardware.ahead(lambda: order.append("ahead"))
        gate.set()
        assert ahead is not None
        ahead.result()
        ln.take(queued)  # run there or taken back here: after the work ahead either way
    assert order == ["ahead", "pair"]
    gate, held = threading.Event(), threading.Event()
    with hardware.Lanes("cpu") as ln:
        ln.submit(gate.wait)  # the lane is busy
        queued = ln.submit(lambda: threading.current_thread().name)
        ahead = hardware.ahead(held.wait)  # in front of it: the lane takes it next and is held there
        gate.set()
        assert ln.take(queued) == threading.current_thread().name  # behind the work ahead: run here
        held.set()
    assert ahead is not None and ahead.result() is True


def test_a_job_not_started_is_taken_back_by_the_first_lane(two_threads):
    gate = threading.Event()
    with hardware.Lanes("cpu") as ln:
        ln.submit(gate.wait)  # the second lane is busy
        job = ln.submit(lambda: threading.current_thread().name)
        assert ln.take(job) == threading.current_thread().name  # run here, not waited for
        gate.set()
        started = ln.submit(lambda: threading.current_thread().name)
        started.result()
        assert ln.take(started) == "weightgeo-lane"  # already done there: its result


def test_one_lane_runs_inline(monkeypatch, two_threads):
    monkeypatch.setattr(hardware, "LANES", 1)
    with hardware.Lanes("cpu") as ln:
        assert torch.get_num_threads() == 2
        job = ln.submit(lambda: threading.current_thread().name)
        failed = ln.submit(lambda: 1 / 0)
    assert job.result() == threading.current_thread().name
    with pytest.raises(ZeroDivisionError):
        failed.result()


@pytest.mark.parametrize("side", ["right", "left"])
def test_kernel_in_lanes_agrees_with_one_lane(monkeypatch, gen, two_threads, side):
    w0 = (0.02 * torch.randn(3, 90, 60, generator=gen)).bfloat16()
    w1 = (w0.float() + 1e-3 * torch.randn(3, 90, 60, generator=gen)).bfloat16()
    kw = dict(metrics=frozenset(PAIR_METRICS), k=16, side=side, rank=8, alpha=0.5, eta=1e-3)
    two = batched_pair_metrics(w0, w1, **kw)
    monkeypatch.setattr(hardware, "LANES", 1)
    one = batched_pair_metrics(w0, w1, **kw)
    for a, b in zip(two, one):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12), key


def test_next_groups_base_made_ahead_gives_the_same_rows(monkeypatch, tmp_path, two_threads):
    import importlib

    run = importlib.import_module("weightgeo.engine.run")  # the module (the package exports a function "run")
    base = tiny_llama_state(num_layers=3, hidden=32, intermediate=48, vocab=40)
    g = torch.Generator().manual_seed(1)
    ft = {k: (v.float() + 1e-3 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base.items()}
    b, f = write_hf_checkpoint(tmp_path / "b", base), write_hf_checkpoint(tmp_path / "f", ft)
    started = []
    real = run.ahead

    def counting(fn, device=None):
        started.append(1)
        return real(fn, device)

    monkeypatch.setattr(run, "ahead", counting)
    kw = dict(k=8, progress=False, cache=False, batch_bytes=0)  # one matrix per group: many groups
    with_ahead = weightgeo.compare(b, f, **kw)
    assert started  # some group's base was made ahead of its turn
    monkeypatch.setattr(run, "ahead", lambda fn, device=None: None)
    without = weightgeo.compare(b, f, **kw)
    assert with_ahead.rows == without.rows
