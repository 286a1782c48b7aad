"""What the device does fast, and the choices of the numerical policy that depend on it.

Three choices depend on the hardware: the dtype of the randomized SVD's passes over a bf16 stack
(:func:`pass_dtype`), how many steps of one pair run side by side on a CPU (:func:`lanes`), and the LAPACK routes of
the float64 eigenproblems (:func:`tridiagonal_route`, :func:`eigh_lapack`, :func:`eigvalsh_lapack`). bf16 passes (oneDNN on CPU, tensor cores on CUDA) are 2–4× faster than fp32 passes where
the hardware multiplies bf16 natively (CUDA sm_80+, CPUs with AMX-BF16 or AVX512-BF16) and slower where it
does not (AVX2-only CPUs emulate them); their price is a noise floor of about 2⁻⁸·σ₁ (docs/numerics.md). fp32
and fp64 stacks always get passes in their own precision (a bf16 pass over an fp32 stack costs a cast copy
and the same floor), and the pair method's GEMMs always run in the compute dtype: their accuracy relative to
‖ΔW‖ is what the method rests on. Measured per CPU kind: BENCHMARKS.md, "Randomized SVD".

Lanes (:class:`Lanes`). A pair's steps form two chains that need nothing from each other until late: the base's
decomposition (float64 Gram, ``eigh``) and the fine-tune's products (and the stable rank's ``eigvalsh``); after the
base, the localization and the pair eigenproblem are independent again. On a CPU with at least two torch threads
they run in two lanes (the calling thread and one worker), each with half of the threads, instead of one after the
other with all of them. LAPACK's symmetric eigensolvers gain little from a second thread at these sizes and lose a
lot when a core is busy elsewhere (a barrier waits for the slowest thread): on the shared 2-core AMD EPYC, float64
``eigvalsh`` of four 896² matrices took 3.55 s with 2 threads and 0.37 s with one (``eigh``: 1.27 s and 0.77 s),
at load 2.3. Results do not depend on the lanes (every step is the same call with the same operands).

A shape group of several members (same shape) is cut in two halves instead (:func:`over_lanes`), each taken
through every step in its own lane: neither lane then waits for the other's results, as the two chains of one pair
do (the first lane waited 9 of 69 s of the 0.5B pair for W0's decompositions; with halves the pass took 54 s,
BENCHMARKS.md, issue 22). With the default budget on a CPU, the engine puts two members in a group for that.

The GEMM library is torch everywhere. Measured on a 2-core AMD EPYC (AVX512-BF16), where torch's MKL takes its
generic path: NumPy's OpenBLAS ran the whole fp32 subspace iteration in 0.63–1.30× svd_lowrank's time in
isolation (two runs; torch: 0.78–0.96×), but alternating its thread pool with torch's inside a real pass (the
trajectories' residual checks) cost 1.0–2.9× the torch route's time; the product form ``basis @ Aᵀ`` was
0.65–0.89× the time of ``A @ basisᵀ`` per GEMM there, but 0.87–1.28× end to end. Neither is chosen.

>>> hardware("cpu").kind in ("cpu-amx", "cpu-avx512-bf16", "cpu-avx512", "cpu-avx2", "cpu")
True
>>> pass_dtype(torch.float32, "cpu", (4096, 4096))
torch.float32
>>> policy_fingerprint("cpu") == policy_fingerprint(None), len(policy_fingerprint("cpu"))
(True, 16)
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import torch

from . import policy
from .eigen import lapack_fingerprint

__all__ = [
    "Hardware",
    "hardware",
    "pass_dtype",
    "policy_fingerprint",
    "BF16_PASS_MIN_ENTRIES",
    "EIGH_LAPACK",
    "eigh_lapack",
    "EIGVALSH_SCIPY_MAX_N",
    "eigvalsh_lapack",
    "SCIPY_LAPACK_MAX_CORES",
    "tridiagonal_route",
    "LANES",
    "lanes",
    "Lanes",
    "batch_lanes",
    "row_lanes",
    "over_lanes",
    "over_halves",
    "ahead",
]

T = TypeVar("T")

#: bf16 passes pay for their cast and fixed costs from about this many entries per matrix (measured: 896×896
#: and larger gain on AVX512-BF16 and AMX; 128×896 does not).
BF16_PASS_MIN_ENTRIES = 1 << 19


@dataclass(frozen=True)
class Hardware:
    """The device as the policy sees it.

    Attributes:
        kind: ``"cuda"``, ``"cpu-amx"``, ``"cpu-avx512-bf16"``, ``"cpu-avx512"``, ``"cpu-avx2"`` or ``"cpu"``.
        name: CPU model or GPU name.
        capability: torch's CPU capability (``torch.backends.cpu.get_cpu_capability()``) or ``"sm_XY"``.
        bf16_gemm: whether bf16 GEMMs run natively (and so faster than fp32 ones).
    """

    kind: str
    name: str
    capability: str
    bf16_gemm: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cpu_flags() -> dict[str, Any]:
    try:  # torch's own CPUID reading (what its kernels dispatch on)
        return dict(torch._C._cpu._get_cpu_capability())
    except (AttributeError, RuntimeError):
        pass
    flags: dict[str, Any] = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags.update({f: True for f in line.split(":", 1)[1].split()})
                elif line.startswith("model name"):
                    flags.setdefault("cpu_name", line.split(":", 1)[1].strip())
    except OSError:
        pass
    return flags


@functools.cache
def _describe(device: str) -> Hardware:
    dev = torch.device(device)
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        return Hardware("cuda", torch.cuda.get_device_name(dev), f"sm_{major}{minor}", major >= 8)
    if dev.type != "cpu":
        return Hardware(dev.type, dev.type, "unknown", False)
    flags = _cpu_flags()
    capability = torch.backends.cpu.get_cpu_capability()
    name = str(flags.get("cpu_name", "unknown"))
    if flags.get("amx_bf16"):
        return Hardware("cpu-amx", name, capability, True)
    if flags.get("avx512_bf16") or flags.get("avx512bf16"):
        return Hardware("cpu-avx512-bf16", name, capability, True)
    if flags.get("avx512_f") or flags.get("avx512f") or capability == "AVX512":
        return Hardware("cpu-avx512", name, capability, False)
    if flags.get("avx2") or capability == "AVX2":
        return Hardware("cpu-avx2", name, capability, False)
    return Hardware("cpu", name, capability, False)


def hardware(device: str | torch.device | None = None) -> Hardware:
    """The :class:`Hardware` of ``device`` (default CPU), read once per device."""
    return _describe(str(torch.device("cpu") if device is None else torch.device(device)))


def pass_dtype(dtype: torch.dtype, device: str | torch.device | None, shape: tuple[int, int]) -> torch.dtype:
    """The policy's pass dtype for a randomized SVD of [m, n] matrices stored in ``dtype`` on ``device``.

    bf16 for bf16 stacks of at least :data:`BF16_PASS_MIN_ENTRIES` entries per matrix on hardware with native
    bf16 GEMMs (no cast copy: the stack is read as stored); otherwise the compute dtype (float32, or float64 for
    float64).
    """
    if dtype == torch.float64:
        return torch.float64
    if dtype == torch.bfloat16 and shape[0] * shape[1] >= BF16_PASS_MIN_ENTRIES and hardware(device).bf16_gemm:
        return torch.bfloat16
    return torch.float32


#: The LAPACK of the full float64 ``eigh`` (W0's Gram, the pair problem above the top-k route's limit): ``None``
#: lets :func:`eigh_lapack` decide by CPU kind; ``"torch"`` or ``"scipy"`` forces one (tests and benchmarks).
EIGH_LAPACK: str | None = None


#: SciPy's LAPACK routes (:mod:`weightgeo.linalg.eigen`) run one thread per call; they are taken on CPUs with at most
#: this many cores, where a lane has one or two threads (measured on 2 cores). On larger machines torch's LAPACK,
#: which uses a lane's threads, is kept (not measured).
SCIPY_LAPACK_MAX_CORES = 4


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def tridiagonal_route(device: str | torch.device | None = None) -> bool:
    """Whether the pair eigenproblem may take the top-k tridiagonal route (:func:`weightgeo.linalg.eigen.top_eigh`)
    on ``device``: on CPUs of at most :data:`SCIPY_LAPACK_MAX_CORES` cores (its LAPACK runs one thread per call).

    >>> tridiagonal_route("cpu") in (True, False)
    True
    """
    dev = torch.device("cpu") if device is None else torch.device(device)
    return dev.type == "cpu" and _cores() <= SCIPY_LAPACK_MAX_CORES


def eigh_lapack(device: str | torch.device | None = None) -> str:
    """Which LAPACK solves the full float64 symmetric eigenproblems on ``device``
    (:func:`weightgeo.linalg.eigen.eigh`): ``"scipy"`` (SciPy's OpenBLAS) on AMD CPUs of at most
    :data:`SCIPY_LAPACK_MAX_CORES` cores, ``"torch"`` elsewhere.

    torch's pip wheels call MKL, which takes a generic code path on AMD CPUs: on a 2-core AMD EPYC (AVX2)
    OpenBLAS's ``dsyevd`` took 0.79–0.84× of torch's ``eigh`` time, one thread, on W0-like Grams at n = 2048 and
    4096 and on the pair problem's near-diagonal matrices at n = 896 and 2048 (BENCHMARKS.md, issue 22), with the
    same values to 2e-15·λ_max and orthonormal vectors to 6e-15. SciPy's runs one thread per call, so it is used on
    CPUs of at most :data:`SCIPY_LAPACK_MAX_CORES` cores only. On Intel CPUs (MKL's own), larger machines and CUDA it
    is torch's; not measured there. :data:`EIGH_LAPACK` overrides it.

    >>> eigh_lapack("cpu") in ("torch", "scipy")
    True
    """
    if EIGH_LAPACK is not None:
        return EIGH_LAPACK
    dev = torch.device("cpu") if device is None else torch.device(device)
    if tridiagonal_route(dev) and hardware(dev).name.upper().startswith("AMD"):
        return "scipy"
    return "torch"


#: The largest side n of a float64 ``eigvalsh`` that SciPy's LAPACK solves where :func:`eigh_lapack` picks it. Its
#: values-only route (``dsytrd`` + ``dsterf``, one thread) against torch's (MKL), one thread, on Gram-like matrices:
#: 1.6-2.1x faster for n = 512-1024 and 1.3x at 1536, even at 2048, 0.68x at 4096 on a 2-core AMD EPYC (AVX512); 1.45x
#: at 896, 1.03x at 2048, 0.75x at 4096 on one with AVX2 (BENCHMARKS.md, issue 22).
EIGVALSH_SCIPY_MAX_N = 1536


def eigvalsh_lapack(n: int, device: str | torch.device | None = None) -> str:
    """Which LAPACK solves a float64 values-only symmetric eigenproblem of side ``n`` on ``device``
    (:func:`weightgeo.linalg.eigen.eigvalsh`: the stable rank's σ₁, the angles' small problems, the NSS fallback):
    ``"scipy"`` where :func:`eigh_lapack` gives it and ``n ≤`` :data:`EIGVALSH_SCIPY_MAX_N` (where MKL's reduction,
    on its generic path on AMD CPUs, is the slower one), ``"torch"`` elsewhere.

    >>> eigvalsh_lapack(8192, "cpu")
    'torch'
    """
    return "scipy" if n <= EIGVALSH_SCIPY_MAX_N and eigh_lapack(device) == "scipy" else "torch"


#: Lanes of one pair on a CPU: ``None`` lets :func:`lanes` decide; 1 forces one lane (the benchmarks time both).
LANES: int | None = None


def lanes(device: str | torch.device | None = None) -> int:
    """How many independent steps of one pair run side by side on ``device``: 2 on a CPU where torch has at least
    two threads (each lane then gets half of them), else 1 (CUDA orders its own work; one thread has no second
    core). :data:`LANES` overrides it."""
    if LANES is not None:
        return max(1, int(LANES))
    dev = torch.device("cpu") if device is None else torch.device(device)
    return 2 if dev.type == "cpu" and torch.get_num_threads() >= 2 else 1


class _Worker:
    """The second lane: one daemon thread running jobs in order, those of a pair (``now``) before any submitted to
    fill its idle time (``later``: the next shape group's base, :func:`ahead`), each with ``threads`` torch threads."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._now: collections.deque = collections.deque()
        self._later: collections.deque = collections.deque()
        self.threads = 0
        threading.Thread(target=self._loop, name="weightgeo-lane", daemon=True).start()

    def submit(
        self, fn: Callable[..., T], args: tuple, kwargs: dict, *, later: bool = False, first: bool = False
    ) -> Future[T]:
        """Queue ``fn``: after the pair's jobs (``later``), before them (``first``), or in order."""
        job: Future[T] = Future()
        with self._cond:
            if first:
                self._now.appendleft((job, fn, args, kwargs))
            else:
                (self._later if later else self._now).append((job, fn, args, kwargs))
            self._cond.notify()
        return job

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._now or self._later):
                    self._cond.wait()
                job, fn, args, kwargs = (self._now or self._later).popleft()
            if job.set_running_or_notify_cancel():  # else taken back by the first lane
                try:
                    if self.threads:
                        torch.set_num_threads(self.threads)  # thread-local: this lane's share
                    job.set_result(fn(*args, **kwargs))
                except BaseException as e:  # raised by result() in the caller's thread
                    job.set_exception(e)
            # Let go of the job's arguments while idle (a job run or taken back): the last job of an 8B vocabulary
            # pair (its localization) kept both 1.2 GB sides alive while the next pair was read.
            del job, fn, args, kwargs


_worker: _Worker | None = None
_worker_lock = threading.Lock()


class _Open(threading.local):
    """The Lanes block the current thread is in: its lanes and threads per lane (1, 1 outside any), and ``solo``
    while it runs its half of a batch (:func:`over_lanes`), which opens no lanes of its own."""

    n = 1
    per = 1
    solo = False


_open = _Open()


def _second_lane(threads: int) -> _Worker:
    global _worker
    with _worker_lock:
        if _worker is None:
            _worker = _Worker()
        _worker.threads = threads
        return _worker


class Lanes:
    """Run independent steps side by side (:func:`lanes`): ``with Lanes(device) as ln: job = ln.submit(fn, *args)``
    starts ``fn`` in the second lane (a worker thread) and returns a future; the calling thread is the first lane.
    Inside the block each lane runs torch with half of the calling thread's threads; on leaving it every job
    submitted has finished and the calling thread has its threads back. ``take(job)`` is its result, or the job run
    in the calling thread when the second lane has not started it (the first lane, idle, takes it back). With one
    lane, ``submit`` runs ``fn`` at once (its exception is raised by ``result()``, as from the worker)."""

    def __init__(self, device: str | torch.device | None = None) -> None:
        # inside a lane (a job that opens its own Lanes) there is no third lane: run inline
        self.n = 1 if _in_second_lane() or _open.solo else lanes(device)
        self._threads = 0
        self._jobs: list[Future] = []
        self._calls: dict[int, tuple[Callable[..., Any], tuple, dict]] = {}
        self._worker: _Worker | None = None
        self._outer = (1, 1)

    def __enter__(self) -> Lanes:
        if self.n > 1:
            self._threads = torch.get_num_threads()
            per = max(1, self._threads // self.n)
            self._worker = _second_lane(per)
            torch.set_num_threads(per)
            self._outer = (_open.n, _open.per)
            _open.n, _open.per = self.n, per
        return self

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
        if self._worker is None:
            job: Future[T] = Future()
            try:
                job.set_result(fn(*args, **kwargs))
            except Exception as e:  # raised by result(), as a worker's would be
                job.set_exception(e)
            return job
        job = self._worker.submit(fn, args, kwargs)
        self._jobs.append(job)
        self._calls[id(job)] = (fn, args, kwargs)
        return job

    def take(self, job: Future[T]) -> T:
        """``job.result()``, or the job run here when the second lane has not started it yet (then the first
        lane, done with its own steps, does it instead of waiting: the lanes balance themselves)."""
        call = self._calls.pop(id(job), None)
        return job.result() if call is None else _take(job, *call)

    def __exit__(self, *exc: object) -> None:
        for job in self._jobs:  # a job still running must not outlive the block (nor see the threads restored)
            try:
                job.result()
            except Exception:  # the caller already has it, or raises its own exception (or it was taken back)
                pass
        self._calls.clear()
        if self._threads:
            torch.set_num_threads(self._threads)
            _open.n, _open.per = self._outer


def batch_lanes(count: int, device: str | torch.device | None = None) -> int:
    """How many lanes a batch of ``count`` same-shape members is cut across by :func:`over_lanes`: 2 where
    :func:`lanes` gives two and the calling thread is the first lane (not a job in the second, not already running
    a half), with at least two members; else 1.

    >>> batch_lanes(1)
    1
    """
    if count < 2 or _in_second_lane() or _open.solo:
        return 1
    return 2 if (_open.n if _open.n > 1 else lanes(device)) > 1 else 1


def row_lanes(rows: int, row_len: int, device: str | torch.device | None = None) -> int:
    """How many lanes the row passes of one matrix ([rows, row_len], tall) run across: 2 where the policy sums its
    row blocks in two halves (:func:`~weightgeo.linalg.policy.span_halves`: a matrix of several row blocks) and
    :func:`batch_lanes` would cut a batch of two, else 1. A shape group of one such member (a vocabulary matrix)
    then runs its products and its base's Gram on both lanes instead of as two chains.

    >>> row_lanes(4, 2)
    1
    """
    if len(policy.span_halves(list(policy.row_blocks(rows, row_len)))) < 2:
        return 1
    return batch_lanes(2, device)


def over_lanes(fn: Callable[[int, int], T], count: int, device: str | torch.device | None = None) -> list[T]:
    """``fn(s, e)`` over a batch ``0:count`` cut in two halves run side by side, one per lane, each with its lane's
    share of the threads and no lanes of its own; ``[fn(0, count)]`` where :func:`batch_lanes` gives one.

    Members of a shape group are the same shape, so two halves are the most even split of its work there is: every
    step of a member (its Gram, ``eigh``, products, pair eigenproblem) runs in one lane, and neither lane waits for
    the other's results, as a chain of steps split across the lanes does. The second half goes to the second lane
    before anything queued there; if that lane is still busy when the first half is done, the calling thread runs
    the second half itself (:meth:`Lanes.take`). Results do not depend on the split: every member's steps are the
    same calls on the same operands (the policy's row blocks do not depend on the batch size).

    >>> over_lanes(lambda s, e: list(range(s, e)), 5)[-1][-1]
    4
    """
    if batch_lanes(count, device) < 2:
        return [fn(0, count)]
    h = (count + 1) // 2

    def solo(s: int, e: int) -> T:
        _open.solo = True  # this half opens no lanes, and splits nothing again
        try:
            return fn(s, e)
        finally:
            _open.solo = False

    if _open.n < 2:  # not inside a pair's Lanes block: open one for the two halves
        with Lanes(device):
            return over_lanes(fn, count, device)
    job = _second_lane(_open.per).submit(solo, (h, count), {}, first=True)
    try:
        first = solo(0, h)
    except BaseException:
        if not job.cancel():  # a half still running must not outlive the call
            job.exception()
        raise
    return [first, _take(job, solo, (h, count), {})]


def over_halves(
    fn: Callable[[list[tuple[int, int]]], T], spans: list[tuple[int, int]], device: str | torch.device | None = None
) -> list[T]:
    """``fn(half)`` for each of the policy's halves of the row ``spans`` of one matrix
    (:func:`~weightgeo.linalg.policy.span_halves`), in order, the two side by side where two lanes are free
    (:func:`over_lanes`): the caller adds the results, first half then second, which gives the same bits either way.

    >>> over_halves(len, [(0, 2), (2, 4), (4, 5)])
    [2, 1]
    """
    halves = policy.span_halves(spans)
    parts = over_lanes(lambda i, j: [fn(half) for half in halves[i:j]], len(halves), device)
    return [r for part in parts for r in part]


def _take(job: Future[T], fn: Callable[..., T], args: tuple, kwargs: dict) -> T:
    """``job.result()``, or ``fn(*args, **kwargs)`` here when the second lane has not started the job."""
    if job.cancel():
        return fn(*args, **kwargs)
    return job.result()


def ahead(fn: Callable[[], T], device: str | torch.device | None = None) -> Future[T] | None:
    """Start ``fn`` in the second lane next, with the lane's share of the threads; ``None`` (nothing started)
    with one lane. Inside a pair (a Lanes block) it goes before the pair's jobs not started yet, which the first
    lane takes back when it gets to them (:meth:`Lanes.take`); outside one, after every job queued. The engine
    starts the next shape group's base decomposition this way: it is what the first lane will wait for next, so
    it runs beside this group's pair eigenproblem (measured: the first lane waited 15.7 s of a 77.5 s 0.5B pass
    for bases queued behind the localization)."""
    if _in_second_lane():
        return None
    if _open.n > 1:  # inside a Lanes block, whose calling thread runs with its lane's share already
        return _second_lane(_open.per).submit(fn, (), {}, first=True)
    n = lanes(device)
    return None if n < 2 else _second_lane(max(1, torch.get_num_threads() // n)).submit(fn, (), {}, later=True)


def _in_second_lane() -> bool:
    return threading.current_thread().name == "weightgeo-lane"


@functools.cache
def _fingerprint(device: str, eigh_route: str, tridiagonal: bool) -> str:
    hw = _describe(device)
    doc = {
        # the policy's rules (precision, row blocks, conditioning) and what they run on
        "compute": {str(d): str(policy.compute_dtype(d)) for d in (*policy.LOW_PRECISION, torch.float64)},
        "row_block": policy.ROW_BLOCK,
        "col_panel": policy.COL_PANEL,
        "refine_below": policy.REFINE_BELOW,
        "bf16_pass_min": BF16_PASS_MIN_ENTRIES,
        "device": torch.device(device).type,
        "hardware": [hw.kind, hw.name, hw.capability, hw.bf16_gemm],
        # LAPACK / BLAS builds and kernels come with torch: another torch may round differently
        "torch": torch.__version__,
    }
    if doc["device"] == "cpu":  # the pair eigenproblem's tridiagonal route (and eigh_lapack) run SciPy's LAPACK there
        doc["lapack"] = lapack_fingerprint()
        doc["eigh_lapack"] = eigh_route
        doc["eigvalsh_scipy_max_n"] = EIGVALSH_SCIPY_MAX_N if eigh_route == "scipy" else 0
        doc["tridiagonal_route"] = tridiagonal
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def policy_fingerprint(device: str | torch.device | None = None) -> str:
    """A short digest of everything in the numerical policy that can change a result bit: the compute dtypes,
    row blocks and conditioning threshold (:mod:`weightgeo.linalg.policy`), the hardware kind, CPU or GPU
    model and capability of ``device``, the torch version and, on a CPU, SciPy's version and LAPACK and the eigen
    routes taken (:func:`tridiagonal_route`, :func:`eigh_lapack`, :mod:`weightgeo.linalg.eigen`). Result caches key on it
    (docs/caching.md), so a result computed under another policy, on another kind of machine or by another torch is
    never served."""
    dev = str(torch.device("cpu") if device is None else torch.device(device))
    return _fingerprint(dev, eigh_lapack(dev), tridiagonal_route(dev))
