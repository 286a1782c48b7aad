"""Several fine-tunes of one base in one pass (:func:`compare_many`): every base tensor is read once, and every
base matrix decomposed once, for all of them.

The paper's comparisons are exactly this shape: SFT, OPD and RLVR checkpoints against one anchor. What is
shared is the base's reading and its decomposition (the float64 Gram and ``eigh`` of W0, reused by the angles,
NSS and localization of every fine-tune); each fine-tune still pays its own products, eigenproblem, stable
rank and localization passes. Measured on 4 Qwen2.5-0.5B-shaped layers, all metrics (BENCHMARKS.md): 2
fine-tunes in 0.85× the time of two ``compare`` calls, 3 in 0.79×.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .checkpoint import Checkpoint, compile_filter, open_checkpoint
from .devices import resolve_device
from .distributed import balanced_shards, current_world
from .engine import (_ahead_bytes, _analyse, _check_options, _default_batch_bytes, _group_rows, _Job, _plan,
                     _progress, _read_stack, _report, _small_problem_bytes, resolve_metrics)
from .errors import WeightgeoError
from .linalg.pairwise import base_spectrum
from .metrics.pair import PAIR_METRICS
from .readahead import ReadAhead
from .report import Report

__all__ = ["compare_many"]


@dataclass(frozen=True)
class _SharedGroup:
    """Same-shape base matrices (``names``) and, per fine-tune, its jobs for them: ``present[i]`` lists
    (position in ``names``, job index in fine-tune i's plan) for every name, or is empty when fine-tune i
    has none of them (groups are keyed by which fine-tunes hold a matrix, and in which dtype)."""

    names: tuple[str, ...]
    rows: int
    present: tuple[tuple[tuple[int, int], ...], ...]
    nbytes: int


def compare_many(base: Any, fts: Sequence[Any], *, metrics: str | Sequence[str] | None = None,
                 include: str | Sequence[str] | None = None, exclude: str | Sequence[str] | None = None,
                 k: int = 512, side: str = "right", rank: int = 64, alpha: float = 0.5, eta: float = 1e-3,
                 device: str | torch.device | None = None, progress: bool = True,
                 batch_bytes: int | None = None) -> list[Report]:
    """Compare several fine-tunes with one base, reading and decomposing the base once: ``compare`` for each.

    >>> import torch, weightgeo
    >>> g = torch.Generator().manual_seed(0)
    >>> base = {"layers.0.q_proj.weight": torch.randn(8, 8, generator=g)}
    >>> fts = [{"layers.0.q_proj.weight": base["layers.0.q_proj.weight"] * s} for s in (1.01, 1.1)]
    >>> [round(r.rows[0]["spectral_drift"], 4) for r in weightgeo.compare_many(base, fts, k=4, progress=False)]
    [0.01, 0.1]

    Args:
        base: the shared base checkpoint (any source :func:`~weightgeo.compare` accepts).
        fts: a list of fine-tuned checkpoints (each any source ``compare`` accepts, LoRA adapters included).
        metrics, include, exclude, k, side, rank, alpha, eta, device, progress, batch_bytes: as in
            :func:`~weightgeo.compare`, applied to every fine-tune.

    Returns:
        one :class:`~weightgeo.report.Report` per fine-tune, in order, each equal to ``compare(base, ft, ...)``
        up to float rounding (``meta["shared_base"]`` is True). Matrices whose rows differ from the base's
        (added tokens) and tensors without pair metrics are analysed per fine-tune, as ``compare`` does.
    """
    if isinstance(fts, (str, bytes, os.PathLike)) or not isinstance(fts, Sequence):
        raise WeightgeoError(f"compare_many: fts must be a list of fine-tuned checkpoints, got "
                             f"{type(fts).__name__}; for one fine-tune use weightgeo.compare(base, ft)")
    if not fts:
        raise WeightgeoError("compare_many: fts is empty; give at least one fine-tuned checkpoint")
    chosen = resolve_metrics(metrics)
    dev = resolve_device(device)
    _check_options(side, batch_bytes)
    keep = compile_filter(include, exclude)
    opts = dict(k=k, side=side, rank=rank, alpha=alpha, eta=eta)
    t0 = time.perf_counter()
    b = open_checkpoint(base)
    fs: list[Checkpoint] = []
    try:
        for ft in fts:
            fs.append(open_checkpoint(ft, base=b))
        pair_metrics = frozenset(m for m in chosen if m in PAIR_METRICS)
        plans = [_plan(b, f, keep, elementwise="update_sparsity" in chosen, svd=bool(pair_metrics)) for f in fs]
        shared, own = _split(b, [p[0] for p in plans], bool(pair_metrics))
        world = current_world(dev)
        items = [("shared", name) for name in shared] + [("own", i, j) for i, js in enumerate(own) for j in js]
        sizes = [math.prod(b.info(name).shape) * (1 + len(shared[name])) for name in shared] + [
            math.prod(plans[i][0][j].shape) for i, js in enumerate(own) for j in js]
        mine = [items[x] for x in balanced_shards(sizes, world.size)[world.rank]]
        t_rank = time.perf_counter()
        local: list[list[tuple[int, dict[str, Any]]]] = [[] for _ in fs]
        total = sum(len(shared[it[1]]) if it[0] == "shared" else 1 for it in mine)
        bar = _progress(progress and world.is_main, total)
        try:
            budget = _default_batch_bytes(dev) if batch_bytes is None else int(batch_bytes)
            groups = _shared_groups(b, fs, [p[0] for p in plans], {it[1]: shared[it[1]] for it in mine
                                                                     if it[0] == "shared"}, budget)
            _analyse_shared(b, fs, [p[0] for p in plans], groups, local, chosen, pair_metrics, budget=budget,
                            device=dev, bar=bar, **opts)
            for i, f in enumerate(fs):
                js = [it[2] for it in mine if it[0] == "own" and it[1] == i]
                if js:
                    local[i].extend(_analyse(b, f, plans[i][0], js, chosen, pair_metrics, batch_bytes=batch_bytes,
                                             device=dev, bar=bar, **opts))
        finally:
            if bar is not None:
                bar.close()
        per_rank = world.gather({"rank": world.rank, "seconds": round(time.perf_counter() - t_rank, 3),
                                 "rows": local})
    finally:
        b.close()
        for f in fs:
            f.close()
    params = {**opts, "include": include, "exclude": exclude, "batch_bytes": batch_bytes}
    ranks = [{key: val for key, val in part.items() if key != "rows"} for part in per_rank]
    seconds = time.perf_counter() - t0
    return [_report(b, f, [pair for part in per_rank for pair in part["rows"][i]], chosen=chosen, params=params,
                    device=dev, world_size=world.size, ranks=ranks, seconds=seconds, plan=plans[i][1:],
                    shared_base=True, fine_tunes=len(fs))
            for i, f in enumerate(fs)]


def _split(b: Checkpoint, jobs: Sequence[Sequence[_Job]], pair: bool
           ) -> tuple[dict[str, list[tuple[int, int]]], list[list[int]]]:
    """Which jobs share the base: matrices with pair metrics compared on all the base's rows. Returns
    ``{base name: [(fine-tune, job index), ...]}`` and, per fine-tune, the job indices it analyses alone."""
    shared: dict[str, list[tuple[int, int]]] = {}
    own: list[list[int]] = [[] for _ in jobs]
    for i, js in enumerate(jobs):
        for j, job in enumerate(js):
            if pair and len(job.shape) == 2 and job.rows == b.info(job.base_name).shape[0]:
                shared.setdefault(job.base_name, []).append((i, j))
            else:
                own[i].append(j)
    return shared, own


def _shared_groups(b: Checkpoint, fs: Sequence[Checkpoint], jobs: Sequence[Sequence[_Job]],
                   shared: dict[str, list[tuple[int, int]]], budget: int) -> list[_SharedGroup]:
    """Pack shared base matrices into same-shape groups: one base stack, and one stack per fine-tune holding
    every member in one dtype (the key includes which fine-tunes hold the matrix, and as what), sized so that
    the estimated working set fits ``budget``."""
    by_key: dict[tuple, list[str]] = {}
    for name, users in shared.items():
        info = b.info(name)
        ft_dtypes = {i: fs[i].info(jobs[i][j].ft_name).dtype for i, j in users}
        key = (info.shape, info.dtype, tuple(ft_dtypes.get(i) for i in range(len(fs))))
        by_key.setdefault(key, []).append(name)
    groups = []
    for (shape, dtype, ft_dtypes), names in by_key.items():
        rows, cols = shape
        inputs = rows * cols * (dtype.itemsize + sum(d.itemsize for d in ft_dtypes if d is not None))
        cost = inputs + 2 * _small_problem_bytes(rows, cols)  # the base's and one fine-tune's at a time
        size = max(1, budget // max(cost, 1))
        for s in range(0, len(names), size):
            part = tuple(names[s:s + size])
            present = tuple(tuple((pos, j) for pos, name in enumerate(part) for i2, j in shared[name] if i2 == i)
                            for i in range(len(fs)))
            groups.append(_SharedGroup(part, rows, present, inputs * len(part)))
    return groups


def _analyse_shared(b: Checkpoint, fs: Sequence[Checkpoint], jobs: Sequence[Sequence[_Job]],
                    groups: Sequence[_SharedGroup], local: list[list[tuple[int, dict[str, Any]]]],
                    chosen: tuple[str, ...], pair_metrics: frozenset[str], *, budget: int, device: torch.device,
                    bar, **opts: Any) -> None:
    """Rows of the shared groups into ``local[i]``: per group, the base stack is read and decomposed once,
    then each fine-tune's stack goes through the batched pair kernel with that decomposition."""
    pin = device.type == "cuda"

    def read(g: _SharedGroup):
        W0 = _read_stack(b, g.names, g.rows, pin)
        W1s = [_read_stack(fs[i], [jobs[i][j].ft_name for _, j in g.present[i]], g.rows, pin)
               if g.present[i] else None for i in range(len(fs))]
        return g, W0, W1s

    needs_base = bool(pair_metrics & {"principal_overlap", "spectral_drift", "update_localization"})
    ahead = _ahead_bytes(max((g.nbytes for g in groups), default=0), budget)
    background = b.pure_io and all(f.pure_io for f in fs)
    with ReadAhead(((g.nbytes, (lambda g=g: read(g))) for g in groups), budget=ahead,
                   background=background) as stream:
        for g, W0, W1s in stream:
            W0d = W0.to(device, non_blocking=True)
            spec = base_spectrum(W0d) if needs_base else None
            for i, W1 in enumerate(W1s):
                if W1 is None:
                    continue
                done = _group_rows(b, jobs[i], [j for _, j in g.present[i]], W0, W1, chosen, pair_metrics,
                                   device=device, base=spec, W0_device=W0d, **opts)
                local[i].extend(done)
                if bar is not None:
                    bar.update(len(done))
