"""The one pass runner: ``compare`` (one fine-tune) and ``compare_many`` (several of one base) are one pass.

Open the checkpoints, plan from headers, shard the work across ranks, take the cached rows out
(:mod:`.cached`), read each remaining tensor once (the base once for every fine-tune) with read-ahead, run the
shape groups and the row-chunk streams (each row cached as its group finishes), gather the rows, and build one
Report per fine-tune. With several fine-tunes each base matrix is also decomposed once for all of them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..cache import ResultCache, resolve_cache, sum_counts
from ..checkpoint import Checkpoint, open_checkpoint
from ..defaults import ALPHA, ETA, PAIR_K, PROGRESS, RANK, SIDE
from ..distributed import current_world
from ..errors import WeightgeoError
from ..linalg.hardware import ahead, batch_lanes, lanes, row_lanes
from ..options import Filter, PairOptions
from ..progress import fraction_bar
from ..readahead import ReadAhead
from ..report import Report
from .cached import RowCache
from .fits import check_groups_fit
from .groups import SharedBase, chunk_unchanged, finish_row, matrix_rows, pair_options
from .plan import Group, Plan, Work, pack_groups, plan_pair, plan_work
from .reading import ahead_bytes, chunk_spans, read_chunk, read_fp8, read_stack
from .report import comparison_report

__all__ = ["compare", "compare_many", "run", "open_plans"]

Rows = list[tuple[int, dict[str, Any]]]
CacheArg = bool | str | os.PathLike[str] | ResultCache | None


def compare(
    base: Any,
    ft: Any,
    *,
    metrics: str | Sequence[str] | None = None,
    include: Filter = None,
    exclude: Filter = None,
    k: int | float = PAIR_K,
    side: str = SIDE,
    rank: int | float = RANK,
    alpha: float = ALPHA,
    eta: float = ETA,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    progress: bool = PROGRESS,
    batch_bytes: int | None = None,
    cache: CacheArg = None,
) -> Report:
    """Compare a fine-tuned checkpoint with its base in one streaming pass, tensor by tensor.

    >>> import torch, weightgeo
    >>> g = torch.Generator().manual_seed(0)
    >>> base = {"layers.0.q_proj.weight": torch.randn(8, 8, generator=g)}
    >>> ft = {"layers.0.q_proj.weight": base["layers.0.q_proj.weight"] * 1.01}
    >>> r = weightgeo.compare(base, ft, k=4, progress=False)
    >>> r.rows[0]["module"], r.rows[0]["layer"], round(r.summary["principal_overlap"], 4)
    ('q_proj', 0, 1.0)

    Args:
        base, ft: checkpoint sources: a local HF directory, a ``.safetensors``/``.bin`` file, a hub id, a
            ``Mapping[str, Tensor]``, an ``nn.Module``, a :class:`~weightgeo.checkpoint.Checkpoint`; ``ft`` may
            also be a PEFT LoRA adapter directory (applied to ``base``).
        metrics: names from ``update_sparsity, principal_overlap, spectral_drift, update_localization,
            stable_rank`` (aliases such as ``"nss"`` accepted; ``"principal_angles"`` also keeps each matrix's
            angle vector in its row); ``None`` = all.
        include, exclude: regexes on the canonical tensor name, or presets ``"attention"``, ``"mlp"``,
            ``"linear"``, ``"experts"``, ``"router"``. Default: every floating tensor present in both (paper
            §3.1); an [E, out, in] expert stack is analysed as E matrices (one row per ``expert``).
        k, side: top-k subspace size (capped per matrix; default 512) and side for the rotation metrics
            (default ``"right"``, the input side; paper §3.1).
        rank, alpha, eta: localization's reconstruction rank and mask fraction (default 64 and 0.5), and the bf16
            tolerance (default 1e-3) (paper §3.2, §3.1).
        dtype: ``None`` (default): compare the tensors in their stored formats. A floating dtype
            (``torch.bfloat16``, ``"float16"``, ...): both sides are rounded to it before the update rule and the
            geometry (the FP8 update rule on stored codes then does not apply).
        device: where the linear algebra runs (``"cpu"``, ``"cuda"``); ``None``: where the checkpoints are read,
            the CPU.
        progress: show a tqdm bar on stderr (default False; the command line shows one).
        batch_bytes: memory budget of one shape group: same-shape matrices (``q_proj`` of every layer, ...)
            are stacked into [B, out, in] batches whose estimated working set fits it, and the next group is
            read in the background while one is computed. Default 64 MiB on CPU, a quarter of the free
            memory on CUDA; ``0`` analyses one matrix at a time (lowest peak memory).
        cache: the result cache for checkpoints on disk (``None``: ``WEIGHTGEO_CACHE`` decides, on by default
            in ``~/.cache/weightgeo``; ``False``: off; a folder; a :class:`~weightgeo.cache.ResultCache`).
            Rows are looked up before anything is read and written as each shape group finishes, so a re-run is
            served from the cache and a killed run resumes where it stopped, with identical rows
            (docs/caching.md).

    Returns:
        :class:`~weightgeo.report.Report`: one row per analysed tensor (1-D tensors get only the elementwise
        metrics), the model summary, and ``meta`` with provenance, skipped tensors, unmatched names and
        ``meta["cache"]`` (rows served and computed, tensors read, cache lookups and writes).
    """
    options = PairOptions.create(
        metrics=metrics,
        include=include,
        exclude=exclude,
        k=k,
        side=side,
        rank=rank,
        alpha=alpha,
        eta=eta,
        dtype=dtype,
        device=device,
        progress=progress,
        batch_bytes=batch_bytes,
    )
    return run(base, [ft], options, cache=cache)[0]


def compare_many(
    base: Any,
    fts: Sequence[Any],
    *,
    metrics: str | Sequence[str] | None = None,
    include: Filter = None,
    exclude: Filter = None,
    k: int | float = PAIR_K,
    side: str = SIDE,
    rank: int | float = RANK,
    alpha: float = ALPHA,
    eta: float = ETA,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    progress: bool = PROGRESS,
    batch_bytes: int | None = None,
    cache: CacheArg = None,
) -> list[Report]:
    """Compare several fine-tunes with one base, reading and decomposing the base once: ``compare`` for each.

    >>> import torch, weightgeo
    >>> g = torch.Generator().manual_seed(0)
    >>> base = {"layers.0.q_proj.weight": torch.randn(8, 8, generator=g)}
    >>> fts = [{"layers.0.q_proj.weight": base["layers.0.q_proj.weight"] * s} for s in (1.01, 1.1)]
    >>> [round(r.rows[0]["spectral_drift"], 4) for r in weightgeo.compare_many(base, fts, k=4, progress=False)]
    [0.01, 0.1]

    The paper's comparisons are this shape: SFT, OPD and RLVR checkpoints against one anchor. What is shared is
    the base's reading and its decomposition (the float64 Gram and ``eigh`` of W0, reused by the angles, NSS
    and localization of every fine-tune); each fine-tune still pays its own products, eigenproblem, stable rank
    and localization passes. Measured on 4 Qwen2.5-0.5B-shaped layers, all metrics (BENCHMARKS.md): 2
    fine-tunes in 0.85× the time of two ``compare`` calls, 3 in 0.79×.

    Args:
        base: the shared base checkpoint (any source :func:`~weightgeo.compare` accepts).
        fts: a list of fine-tuned checkpoints (each any source ``compare`` accepts, LoRA adapters included).
        metrics, include, exclude, k, side, rank, alpha, eta, dtype, device, progress, batch_bytes, cache: as in
            :func:`~weightgeo.compare`, applied to every fine-tune.

    Returns:
        one :class:`~weightgeo.report.Report` per fine-tune, in order, each equal to ``compare(base, ft, ...)``
        up to float rounding (``meta["shared_base"]`` is True).
    """
    if isinstance(fts, (str, bytes, os.PathLike)) or not isinstance(fts, Sequence):
        raise WeightgeoError(
            f"compare_many: fts must be a list of fine-tuned checkpoints, got "
            f"{type(fts).__name__}; for one fine-tune use weightgeo.compare(base, ft)"
        )
    if not fts:
        raise WeightgeoError("compare_many: fts is empty; give at least one fine-tuned checkpoint")
    options = PairOptions.create(
        metrics=metrics,
        include=include,
        exclude=exclude,
        k=k,
        side=side,
        rank=rank,
        alpha=alpha,
        eta=eta,
        dtype=dtype,
        device=device,
        progress=progress,
        batch_bytes=batch_bytes,
    )
    return run(base, list(fts), options, shared_meta=True, cache=cache)


def run(
    base: Any, fts: Sequence[Any], options: PairOptions, *, shared_meta: bool = False, cache: CacheArg = None
) -> list[Report]:
    """The pass: one Report per fine-tune in ``fts`` (each as ``compare(base, ft)`` would give it)."""
    t0 = time.perf_counter()
    b, fs, plans = open_plans(base, fts, options)
    try:
        world = current_world(options.device)
        work = plan_work(plans, pair=bool(options.pair_metrics)).shard(world)
        store = RowCache(resolve_cache(cache), b, fs, options)
        todo, local = store.lookup(work)
        t_rank = time.perf_counter()
        bar = _progress(options.progress and world.is_main, work.n_rows())
        try:
            if bar is not None:
                bar.update(work.n_rows() - todo.n_rows())
            for i, rows in enumerate(_run_units(b, fs, todo, options, bar, store)):
                local[i].extend(rows)
        finally:
            if bar is not None:
                bar.close()
        per_rank = world.gather(
            {
                "process_rank": world.process_rank,
                "seconds": round(time.perf_counter() - t_rank, 3),
                "tensors": [[work.job(i, j).uid for i, j in _users(work, i)] for i in range(len(fs))],
                "rows": local,
                "cache": store.meta(),
            }
        )
    finally:
        b.close()
        for f in fs:
            f.close()
    seconds = time.perf_counter() - t0
    extra: dict[str, Any] = {"shared_base": True, "fine_tunes": len(fs)} if shared_meta else {}
    extra["cache"] = sum_counts([p["cache"] for p in per_rank])
    return [
        comparison_report(
            plans[i],
            [pair for part in per_rank for pair in part["rows"][i]],
            options,
            world_size=world.size,
            seconds=seconds,
            **extra,
            processes=[
                {"process_rank": p["process_rank"], "tensors": p["tensors"][i], "seconds": p["seconds"]}
                for p in per_rank
            ],
        )
        for i in range(len(fs))
    ]


def open_plans(base: Any, fts: Sequence[Any], options: PairOptions) -> tuple[Checkpoint, list[Checkpoint], list[Plan]]:
    """Open the base and each fine-tune (headers only) and plan each pair (:func:`~.plan.plan_pair`); every
    checkpoint is closed again when that fails. The caller closes them when done."""
    b = open_checkpoint(base)
    fs: list[Checkpoint] = []
    try:
        for ft in fts:
            fs.append(open_checkpoint(ft, base=b))
        select = options.selector()
        return b, fs, [plan_pair(b, f, select, fp8=options.dtype is None) for f in fs]
    except BaseException:
        for c in [b, *fs]:
            c.close()
        raise


def _users(work: Work, ft: int) -> list[tuple[int, int]]:
    return sorted((i, j) for u in work.units for i, j in u.users if i == ft)


def _progress(enabled: bool, total: int):
    """A bar over the rows; it moves in fractions of a tensor (each row chunk, each member read and checked, each
    kernel done), so a large tensor or shape group never leaves it standing still."""
    return fraction_bar(enabled, desc="weightgeo compare", total=total, unit="tensors")


def _run_units(
    b: Checkpoint, fs: Sequence[Checkpoint], work: Work, options: PairOptions, bar, store: RowCache | None = None
) -> list[Rows]:
    """Rows of this rank's units, per fine-tune: shape groups through the batched pair kernel, the other tensors
    streamed in row chunks, in plan order; a background thread reads the next group or chunk meanwhile. Each
    row goes to ``store`` (the result cache) as soon as it is finished."""
    budget = options.budget()
    # the default budget holds one 896-wide pair on a CPU: with two lanes, a group holds two (one per lane)
    least = lanes(options.device) if options.batch_bytes is None else 1
    groups = pack_groups(work, len(fs), budget, least=least)
    check_groups_fit(groups, work, options)  # from the headers, before anything is read
    first = {g.units[0]: g for g in groups}
    in_group = {u for g in groups for u in g.units}
    pin = options.device.type == "cuda"

    def read_group(g: Group):
        W0 = read_stack(b, g.base_names, g.rows, pin, g.experts)
        W1s = [
            read_stack(fs[i], [work.job(i, j).ft_name for j in js], g.rows, pin, g.experts) if js else None
            for i, js in enumerate(g.jobs)
        ]
        fp8 = [read_fp8(b, fs[i], [work.job(i, j) for j in js], g.rows) if js else None for i, js in enumerate(g.jobs)]
        return g, (W0, W1s, fp8)

    def reads():  # (bytes, read) per group or row chunk, in processing order; run by the reader thread
        for u, unit in enumerate(work.units):
            if u in first:
                yield first[u].nbytes, (lambda g=first[u]: read_group(g))
            elif u not in in_group:
                i, j = unit.users[0]
                job = work.job(i, j)
                for s, e, nbytes in chunk_spans(job):
                    yield nbytes, (lambda i=i, job=job, s=s, e=e: ((i, job), (s, e, *read_chunk(b, fs[i], job, s, e))))

    out: list[Rows] = [[] for _ in fs]
    counts: dict[tuple[int, str], int] = {}
    index = {(i, plan.jobs[j].uid): j for i, plan in enumerate(work.plans) for j in range(len(plan.jobs))}
    held_budget, ahead_budget = ahead_bytes(max((g.nbytes for g in groups), default=0), budget)
    background = b.pure_io and all(f.pure_io for f in fs)
    early: dict[int, SharedBase] = {}  # a shape group's shared base, made before its turn (by id of the group)

    def next_base(stream: ReadAhead) -> Callable[[], object] | None:
        """A hook that starts the next shape group's base decomposition in the second lane, if that group has been
        read already (linalg.hardware.ahead: beside this group's pair eigenproblem)."""
        # the next shape group already read, past the elementwise chunks (norms, biases) read between groups
        nxt = stream.peek(lambda item: isinstance(item[0], Group))
        if nxt is None or not options.needs_base or id(nxt[0]) in early:
            return None
        g2, (W0_2, _, _) = nxt
        if batch_lanes(len(g2.units), options.device) > 1:
            return None  # its members are cut across both lanes, its base too (linalg.hardware.over_lanes)
        if row_lanes(max(W0_2.shape[-2:]), min(W0_2.shape[-2:]), options.device) > 1:
            return None  # its rows are: its base's Gram runs on both lanes in its turn (a vocabulary matrix)
        shared = store.shared_base(W0_2, g2, work, options) if store is not None else SharedBase(W0_2, options)
        early[id(g2)] = shared
        started: list[object] = []

        def start() -> None:  # once, however many fine-tunes of this group call it
            if not started:
                started.append(ahead(shared.spectrum, options.device))

        return start

    with ReadAhead(reads(), budget=held_budget, ahead=ahead_budget, background=background) as stream:
        for what, data in stream:
            if isinstance(what, Group):
                hook = next_base(stream)
                W0, W1s, fp8 = data
                base = early.pop(id(what), None)
                _group(what, W0, W1s, fp8, work, options, out, store, base, hook, None if bar is None else bar.update)
                # let go of this group's tensors before the next is read (the read-ahead counts them as done)
                del data, W0, W1s, fp8, base
            else:
                (i, job), (s, e, c0, c1) = what, data
                key = (i, job.uid)
                counts[key] = counts.get(key, 0) + chunk_unchanged(options, job.uid, s, e, c0, c1)
                if bar is not None:  # each row chunk moves the bar
                    bar.update((e - s) / job.rows if job.rows else 1.0)
                if e < job.rows:
                    continue
                row = finish_row(options, job, counts.pop(key))
                out[i].append((index[key], row))
                if store is not None:
                    store.store(i, index[key], job, row)
    return out


def _group(
    g: Group,
    W0: torch.Tensor,
    W1s: list[torch.Tensor | None],
    fp8: list,
    work: Work,
    options: PairOptions,
    out: list[Rows],
    store: RowCache | None = None,
    early: SharedBase | None = None,
    base_ready: Callable[[], object] | None = None,
    progress: Callable[[float], object] | None = None,
) -> int:
    """Rows of one shape group for every fine-tune that holds it; the base is moved and decomposed once per
    rounding (or its decomposition read from the cache), and the rows are cached as soon as they are computed.
    ``early``: the group's base made ahead of its turn (in the pass's rounding); ``base_ready``: the kernel's hook
    once the base is decomposed (it starts the next group's base); ``progress``: the bar's advance."""
    shared: dict[torch.dtype | None, SharedBase] = {}  # one per rounding: fine-tunes stored in another format
    if early is not None:
        shared[options.dtype] = early
    done = 0
    for i, (W1, js) in enumerate(zip(W1s, g.jobs)):
        if W1 is None:
            continue
        jobs = [work.job(i, j) for j in js]
        use = pair_options(options, jobs[0])
        if use.dtype not in shared:
            shared[use.dtype] = store.shared_base(W0, g, work, use) if store is not None else SharedBase(W0, use)
        rows = matrix_rows(
            options, jobs, W0, W1, shared=shared[use.dtype], fp8=fp8[i], base_ready=base_ready, progress=progress
        )
        out[i].extend(zip(js, rows))
        if store is not None:
            for j, job, row in zip(js, jobs, rows):
                store.store(i, j, job, row)
        done += len(rows)
    return done
