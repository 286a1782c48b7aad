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


def test_a_batch_is_cut_in_halves_one_per_lane(monkeypatch, two_threads):
    second = threading.Event()

    def half(s: int, e: int) -> tuple:
        if s:
            second.set()
        else:
            second.wait(10)  # let the second lane start its half (else the first lane takes it back)
        return s, e, threading.current_thread().name, torch.get_num_threads()

    where = hardware.over_lanes(half, 5)
    assert [w[:2] for w in where] == [(0, 3), (3, 5)]  # members in order, the first half the larger
    assert where[0][2] == threading.current_thread().name and where[1][2:] == ("weightgeo-lane", 1)
    assert where[0][3] == 1 and torch.get_num_threads() == 2  # each half with its lane's threads; restored after
    inner = hardware.over_lanes(lambda s, e: hardware.over_lanes(lambda a, b: (a, b), e - s), 4)
    assert inner == [[(0, 2)], [(0, 2)]]  # a half splits nothing again
    assert hardware.over_lanes(lambda s, e: (s, e), 1) == [(0, 1)]  # one member: nothing to cut
    monkeypatch.setattr(hardware, "LANES", 1)
    assert hardware.batch_lanes(4) == 1 and hardware.over_lanes(lambda s, e: (s, e), 4) == [(0, 4)]


def test_a_half_not_started_is_run_by_the_first_lane(two_threads):
    gate = threading.Event()
    with hardware.Lanes("cpu") as ln:
        ln.submit(gate.wait)  # the second lane is busy (the next group's base, say)
        where = hardware.over_lanes(lambda s, e: threading.current_thread().name, 2)
        gate.set()
    assert where == [threading.current_thread().name] * 2


def test_a_failing_half_waits_for_the_other(two_threads):
    started, done = threading.Event(), threading.Event()

    def half(s: int, e: int) -> None:
        if s == 0:
            started.wait(10)
            raise ValueError("first half")
        started.set()
        done.wait(0.2)  # still running when the first half fails
        done.set()

    with pytest.raises(ValueError, match="first half"):
        hardware.over_lanes(half, 2)
    assert done.is_set()  # nothing of the call outlives it


def test_halves_give_what_each_member_gets_alone(gen, two_threads):
    """Bit for bit: the base, and every row of the kernel, of a batch cut across the lanes equal each member's
    alone (one thread, one lane), on both sides and at a k where the whole space is taken."""
    from weightgeo.linalg.pairwise import base_spectrum

    w0 = (0.02 * torch.randn(4, 70, 50, generator=gen)).bfloat16()
    w1 = (w0.float() + 1e-3 * torch.randn(4, 70, 50, generator=gen)).bfloat16()
    kws = [
        dict(metrics=frozenset(PAIR_METRICS), k=k, side=side, rank=8, alpha=0.5, eta=1e-3, angles=True)
        for k, side in ((12, "right"), (12, "left"), (50, "right"))
    ]
    both = base_spectrum(w0), [batched_pair_metrics(w0, w1, **kw) for kw in kws]
    torch.set_num_threads(1)  # one lane: each member alone with the threads a lane has
    alone = [base_spectrum(w0[i : i + 1]) for i in range(4)]
    rows = [[batched_pair_metrics(w0[i : i + 1], w1[i : i + 1], **kw)[0] for i in range(4)] for kw in kws]
    for i, one in enumerate(alone):
        assert torch.equal(both[0].sigma[i], one.sigma[0]) and torch.equal(both[0].V_c[i], one.V_c[0])
        assert torch.equal(both[0].lam[i], one.lam[0])
    assert both[0].A.data_ptr() == w0.data_ptr()  # the stack itself (or its transposed view): no copy of W0
    assert repr(both[1]) == repr(rows)  # every value, NaN and None included


def test_groups_of_two_cut_across_the_lanes_give_the_same_rows(monkeypatch, tmp_path, two_threads):
    """The default budget holds one pair of these on a CPU; with two lanes each shape group holds two members, one
    per lane. Rows equal those of one member per group (its steps chained across the lanes), bit for bit."""
    import importlib

    run = importlib.import_module("weightgeo.engine.run")
    base = tiny_llama_state(num_layers=3, hidden=32, intermediate=48, vocab=40)
    g = torch.Generator().manual_seed(2)
    ft = {k: (v.float() + 1e-3 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base.items()}
    b, f = write_hf_checkpoint(tmp_path / "b", base), write_hf_checkpoint(tmp_path / "f", ft)
    sizes, real = [], run.pack_groups

    def packing(*args, **kwargs):
        groups = real(*args, **kwargs)
        sizes.append([len(gr.units) for gr in groups])
        return groups

    monkeypatch.setattr(run, "pack_groups", packing)
    monkeypatch.setattr(weightgeo.options, "default_batch_bytes", lambda device: 1)  # one 32-wide pair over it
    halves = weightgeo.compare(b, f, k=8, progress=False, cache=False)
    assert max(sizes[-1]) == 2  # two members per group, not the budget's one
    chained = weightgeo.compare(b, f, k=8, progress=False, cache=False, batch_bytes=0)
    assert max(sizes[-1]) == 1
    assert repr(halves.rows) == repr(chained.rows)


def test_pack_groups_holds_one_member_per_lane_where_it_fits():
    from types import SimpleNamespace

    from weightgeo.engine import plan

    for shape, want in (((64, 64), [2, 2, 1]), ((151936, 4096), [1] * 5)):
        jobs = tuple(
            plan.Job(f"m{i}", f"m{i}", f"m{i}", shape, shape[0], 0, torch.bfloat16, torch.bfloat16) for i in range(5)
        )
        units = tuple(plan.Unit(f"m{i}", shape[0], ((0, i),), True, 2 * shape[0] * shape[1]) for i in range(5))
        work = plan.Work((SimpleNamespace(jobs=jobs),), units)  # type: ignore[arg-type]
        assert [len(g.units) for g in plan.pack_groups(work, 1, 1, least=2)] == want  # the vocabulary: one each
        assert [len(g.units) for g in plan.pack_groups(work, 1, 1)] == [1] * 5


def test_the_second_lane_lets_go_of_a_jobs_arguments(two_threads):
    """Idle, the second lane holds nothing of its last job (an 8B vocabulary pair's sides stayed alive while the
    next pair was read)."""
    import weakref

    class Side:
        pass

    side = Side()
    ref = weakref.ref(side)
    with hardware.Lanes("cpu") as ln:
        job = ln.submit(lambda s: 1, side)
        job.result()
        assert ln.take(job) == 1  # done there: its result (and the block drops its record of the call)
    del side, job
    for _ in range(100):  # the lane drops them just after setting the result
        if ref() is None:
            break
        threading.Event().wait(0.01)
    assert ref() is None
    side, gate = Side(), threading.Event()
    ref = weakref.ref(side)
    with hardware.Lanes("cpu") as ln:
        ln.submit(gate.wait)  # the lane is busy: the next job is taken back by the first lane
        job = ln.submit(lambda s: 2, side)
        assert ln.take(job) == 2
        gate.set()
    del side, job
    for _ in range(100):  # the lane pops the cancelled job after the gate, and drops it too
        if ref() is None:
            break
        threading.Event().wait(0.01)
    assert ref() is None


def test_the_row_halves_of_one_matrix_run_side_by_side_with_the_same_bits(monkeypatch, gen, two_threads):
    """A matrix of several row blocks (a vocabulary matrix, alone in its shape group) sums its blocks in the policy's
    two halves, one per lane: its Gram and products equal those of one thread summing both halves, bit for bit, and
    the float64 reference to rounding."""
    from weightgeo.linalg import pairwise, policy, svd

    monkeypatch.setattr(policy, "ROW_BLOCK", 40 * 50)  # 40 rows of 50 per block: 8 blocks of a 300×50 matrix
    assert policy.span_halves(list(policy.row_blocks(300, 50))) == [
        [(0, 40), (40, 80), (80, 120), (120, 160)],
        [(160, 200), (200, 240), (240, 280), (280, 300)],
    ]
    assert hardware.row_lanes(300, 50) == 2 and hardware.row_lanes(40, 50) == 1
    w0 = (0.02 * torch.randn(1, 300, 50, generator=gen)).bfloat16()
    w1 = (w0.float() + 1e-3 * torch.randn(1, 300, 50, generator=gen)).bfloat16()
    threads, real = [], hardware.over_lanes

    def recording(fn, count, device=None):
        def where(s, e):
            threads.append(threading.current_thread().name)
            return fn(s, e)

        return real(where, count, device)

    monkeypatch.setattr(hardware, "over_lanes", recording)  # what over_halves cuts the halves with
    both = svd.gram(w0), pairwise.products(w0, w1, P=True, C0=True, J=True, fro=True)
    assert "weightgeo-lane" in threads  # a half ran in the second lane (unless the first took it back: rare)
    torch.set_num_threads(1)  # one lane, one thread: both halves in this thread
    threads.clear()
    one = svd.gram(w0), pairwise.products(w0, w1, P=True, C0=True, J=True, fro=True)
    assert set(threads) == {threading.current_thread().name}
    assert torch.equal(both[0], one[0])
    for a, b in zip((both[1].P, both[1].C0, both[1].J, both[1].fro_sq), (one[1].P, one[1].C0, one[1].J, one[1].fro_sq)):
        assert torch.equal(a, b)
    A0, d = w0.double(), (w1.double() - w0.double())
    torch.testing.assert_close(one[0], A0.mT @ A0, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(one[1].J.double(), d.mT @ d, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(one[1].C0.double(), A0.mT @ d, rtol=1e-5, atol=1e-9)


def test_a_group_of_one_member_of_several_row_blocks_gives_the_rows_of_one_lane(monkeypatch, gen, two_threads):
    """The kernel of one member of several row blocks: the products, then the base (its Gram on both lanes), not the
    chain; every row equals one lane's, bit for bit, on both sides."""
    from weightgeo.linalg import policy

    monkeypatch.setattr(policy, "ROW_BLOCK", 40 * 50)
    w0 = (0.02 * torch.randn(1, 300, 50, generator=gen)).bfloat16()
    w1 = (w0.float() + 1e-3 * torch.randn(1, 300, 50, generator=gen)).bfloat16()
    kws = [
        dict(metrics=frozenset(PAIR_METRICS), k=12, side=side, rank=8, alpha=0.5, eta=1e-3, angles=True)
        for side in ("right", "left")
    ]
    both = [batched_pair_metrics(w0, w1, **kw) for kw in kws] + [batched_pair_metrics(w0.mT, w1.mT, **kws[0])]
    torch.set_num_threads(1)
    one = [batched_pair_metrics(w0, w1, **kw) for kw in kws] + [batched_pair_metrics(w0.mT, w1.mT, **kws[0])]
    assert repr(both) == repr(one)


def test_the_engine_does_not_start_a_row_split_groups_base_ahead(monkeypatch, tmp_path, two_threads):
    """The next group's base is started ahead in the second lane only where that lane would not split its rows:
    a group of one member of several row blocks makes its base in its turn (the Gram on both lanes), and the rows
    equal those of a pass where no base is started ahead."""
    import importlib

    from weightgeo.linalg import policy

    run = importlib.import_module("weightgeo.engine.run")
    base = tiny_llama_state(num_layers=2, hidden=32, intermediate=48, vocab=400)
    g = torch.Generator().manual_seed(3)
    ft = {k: (v.float() + 1e-3 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base.items()}
    b, f = write_hf_checkpoint(tmp_path / "b", base), write_hf_checkpoint(tmp_path / "f", ft)
    monkeypatch.setattr(policy, "ROW_BLOCK", 64 * 32)  # the 400×32 vocabulary matrices: 7 blocks; the rest: one
    started, real = [], run.ahead

    def counting(fn, device=None):
        started.append(fn.__self__.W0.shape if hasattr(fn, "__self__") else None)
        return real(fn, device)

    monkeypatch.setattr(run, "ahead", counting)
    kw = dict(k=8, progress=False, cache=False, batch_bytes=0)  # one matrix per group
    with_ahead = weightgeo.compare(b, f, **kw)
    assert started and all(shape is None or 400 not in shape for shape in started)
    monkeypatch.setattr(run, "ahead", lambda fn, device=None: None)
    without = weightgeo.compare(b, f, **kw)
    assert repr(with_ahead.rows) == repr(without.rows)
