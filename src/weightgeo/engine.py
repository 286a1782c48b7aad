"""The streaming pass: align two checkpoints, read each tensor once, compute the requested metrics, emit rows.

This is the only module that knows about reading order, chunking and devices; the metric kernels it calls
are the same pure tensor functions the public API exposes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

from . import __version__
from .checkpoint import Checkpoint, align, compile_filter, layer_index, module_type, open_checkpoint
from .distributed import balanced_shards, current_world
from .devices import resolve_device
from .errors import WeightgeoError
from .linalg.pairwise import BaseSpectrum
from .metrics.pair import ALL_METRICS, PAIR_METRICS, batched_pair_metrics
from .metrics.sparsity import _unchanged_count
from .readahead import ReadAhead
from .report import Report, summarize_rows

__all__ = ["compare", "resolve_metrics"]

# Alternative spellings users reach for; each maps to the metric family that computes it.
_ALIASES = {
    "principal_angles": "principal_overlap",
    "max_principal_angle": "principal_overlap",
    "rotation": "principal_overlap",
    "nss": "spectral_drift",
    "drift": "spectral_drift",
    "localization": "update_localization",
    "density": "update_localization",
    "sparsity": "update_sparsity",
}
# Modules whose row count may legitimately differ between base and fine-tuned (added tokens).
_VOCAB_MODULES = frozenset({"embed_tokens", "lm_head", "wte", "word_embeddings", "embed_in", "embed_out",
                            "tok_embeddings", "output"})
# Elementwise work is done in row chunks of at most this many entries: bounded fp32 temporaries.
_CHUNK_ELEMENTS = 1 << 22
_AHEAD_CHUNKS = 2  # row chunks the reader thread may run ahead of the counting


def resolve_metrics(metrics: str | Iterable[str] | None) -> tuple[str, ...]:
    """Validate metric names (aliases allowed) before anything is read; ``None`` means all.

    >>> resolve_metrics(["nss", "update_sparsity"])
    ('update_sparsity', 'spectral_drift')
    >>> resolve_metrics("bogus")
    Traceback (most recent call last):
    ...
    weightgeo.errors.WeightgeoError: unknown metric 'bogus'; choose from update_sparsity, ...
    """
    if metrics is None:
        return ALL_METRICS
    names = [metrics] if isinstance(metrics, str) else list(metrics)
    if not names:
        raise WeightgeoError(f"metrics=[] asks for nothing; pass None for all, or some of {', '.join(ALL_METRICS)}")
    chosen = set()
    for m in names:
        canonical = _ALIASES.get(m, m)
        if canonical not in ALL_METRICS:
            raise WeightgeoError(f"unknown metric {m!r}; choose from {', '.join(ALL_METRICS)} "
                                 f"(aliases: {', '.join(sorted(_ALIASES))})")
        chosen.add(canonical)
    return tuple(m for m in ALL_METRICS if m in chosen)


@dataclass(frozen=True)
class _Job:
    key: str
    base_name: str
    ft_name: str
    shape: tuple[int, ...]
    rows: int  # rows compared (fewer than the tensor's when tokens were added)
    rows_added: int


def compare(base: Any, ft: Any, *, metrics: str | Sequence[str] | None = None,
            include: str | Sequence[str] | None = None, exclude: str | Sequence[str] | None = None,
            k: int = 512, side: str = "right", rank: int = 64, alpha: float = 0.5, eta: float = 1e-3,
            device: str | torch.device | None = None, progress: bool = True,
            batch_bytes: int | None = None) -> Report:
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
            stable_rank`` (aliases such as ``"principal_angles"`` or ``"nss"`` accepted); ``None`` = all.
        include, exclude: regexes on the canonical tensor name, or presets ``"attention"``, ``"mlp"``,
            ``"linear"``. Default: every floating tensor present in both (paper §3.1).
        k, side: top-k subspace size (capped per matrix) and side for the rotation metrics (paper §3.1).
        rank, alpha, eta: localization's reconstruction rank and mask fraction, and the bf16 tolerance
            (paper §3.2, §3.1).
        device: where the linear algebra runs (``"cpu"``, ``"cuda"``); reading is always on CPU.
        progress: show a tqdm bar on stderr.
        batch_bytes: memory budget of one shape group: same-shape matrices (``q_proj`` of every layer, ...)
            are stacked into [B, out, in] batches whose estimated working set fits it, and the next group is
            read in the background while one is computed. Default 64 MiB on CPU, a quarter of the free
            memory on CUDA; ``0`` analyses one matrix at a time (lowest peak memory).

    Returns:
        :class:`~weightgeo.report.Report`: one row per analysed tensor (1-D tensors get only the elementwise
        metrics), the model summary, and ``meta`` with provenance, skipped tensors and unmatched names.
    """
    chosen = resolve_metrics(metrics)
    dev = resolve_device(device)
    _check_options(side, batch_bytes)
    keep = compile_filter(include, exclude)
    t0 = time.perf_counter()
    b = open_checkpoint(base)
    f = open_checkpoint(ft, base=b)
    try:
        pair_metrics = frozenset(m for m in chosen if m in PAIR_METRICS)
        jobs, skipped, partial, alignment = _plan(b, f, keep, elementwise="update_sparsity" in chosen,
                                                  svd=bool(pair_metrics))
        world = current_world(dev)
        shards = balanced_shards([math.prod(j.shape) for j in jobs], world.size)
        mine = shards[world.rank]
        t_rank = time.perf_counter()
        bar = _progress(progress and world.is_main, len(mine))
        try:
            local = _analyse(b, f, jobs, mine, chosen, pair_metrics, batch_bytes=batch_bytes, device=dev, bar=bar,
                             k=k, side=side, rank=rank, alpha=alpha, eta=eta)
        finally:
            if bar is not None:
                bar.close()
        per_rank = world.gather({"rank": world.rank, "tensors": [jobs[i].key for i in mine],
                                  "seconds": round(time.perf_counter() - t_rank, 3), "rows": local})
    finally:
        b.close()
        f.close()
    params = {"k": k, "side": side, "rank": rank, "alpha": alpha, "eta": eta, "include": include,
              "exclude": exclude, "batch_bytes": batch_bytes}
    return _report(b, f, [pair for part in per_rank for pair in part["rows"]], chosen=chosen, params=params,
                   device=dev, world_size=world.size,
                   ranks=[{key: val for key, val in part.items() if key != "rows"} for part in per_rank],
                   seconds=time.perf_counter() - t0, plan=(skipped, partial, alignment))


def _check_options(side: str, batch_bytes: int | None) -> None:
    if side not in ("right", "left"):
        raise WeightgeoError(f"side={side!r}; use 'right' (input side, V) or 'left' (output side, U)")
    if batch_bytes is not None and (isinstance(batch_bytes, bool) or int(batch_bytes) != batch_bytes
                                    or batch_bytes < 0):
        raise WeightgeoError(f"batch_bytes={batch_bytes!r}: give a memory budget in bytes (≥ 0; 0 = one matrix "
                             f"at a time), or None for the default")


def _report(b: Checkpoint, f: Checkpoint, indexed_rows: list[tuple[int, dict[str, Any]]], *,
            chosen: tuple[str, ...], params: dict[str, Any], device: torch.device, world_size: int,
            ranks: list[dict[str, Any]], seconds: float, plan: tuple[Any, Any, Any], **extra: Any) -> Report:
    """The Report of one (base, ft) comparison from its ``(job index, row)`` pairs and its plan."""
    skipped, partial, alignment = plan
    rows = [row for _, row in sorted(indexed_rows, key=lambda p: p[0])]
    meta = {
        "weightgeo_version": __version__,
        "kind": "compare",
        "base": b.source,
        "ft": f.source,
        "metrics": list(chosen),
        "params": params,
        "device": str(device),
        "world_size": world_size,
        "ranks": ranks,
        "torch_version": torch.__version__,
        "seconds": round(seconds, 3),
        "skipped": skipped,
        "partial": partial,
        "unmatched": {"only_base": alignment.only_base, "only_ft": alignment.only_ft},
        "tied": alignment.tied,
        **extra,
    }
    return Report(rows=rows, summary=summarize_rows(rows), meta=meta)


def _plan(b: Checkpoint, f: Checkpoint, keep, *, elementwise: bool, svd: bool
          ) -> tuple[list[_Job], list[dict[str, str]], list[dict[str, str]], Any]:
    """Decide what to analyse from headers alone, so bad inputs fail before any tensor is read.

    Returns the jobs, the tensors skipped entirely (with reasons), the tensors that get only the elementwise
    metrics (not matrices, with reasons) and the alignment.
    """
    alignment = align(b, f)
    if not alignment.pairs:
        raise WeightgeoError(
            f"no tensors in common between {b.source} ({len(b)} tensors, e.g. {b.names()[:3]}) and "
            f"{f.source} ({len(f)} tensors, e.g. {f.names()[:3]}); are they the same architecture?")
    jobs: list[_Job] = []
    skipped: list[dict[str, str]] = []
    partial: list[dict[str, str]] = []
    filtered_out = 0
    for pair in alignment.pairs:
        ib, i_f = b.info(pair.base_name), f.info(pair.ft_name)
        if not keep(pair.key, ib.shape):
            filtered_out += 1
            continue
        if not (ib.dtype.is_floating_point and i_f.dtype.is_floating_point):
            skipped.append({"name": pair.key, "reason": f"non-floating dtype ({ib.dtype} / {i_f.dtype})"})
            continue
        if ib.numel == 0:
            skipped.append({"name": pair.key, "reason": "empty tensor"})
            continue
        if len(ib.shape) != 2:
            reason = f"{len(ib.shape)}-D tensor: SVD metrics need a matrix"
            if not elementwise:
                skipped.append({"name": pair.key, "reason": reason})
                continue
            if svd:
                partial.append({"name": pair.key, "reason": reason})
        rows, added = _common_rows(pair.key, ib.shape, i_f.shape, b.source, f.source)
        jobs.append(_Job(pair.key, pair.base_name, pair.ft_name, ib.shape, rows, added))
    if not jobs:
        why = (f"{filtered_out} excluded by include/exclude" if filtered_out else "") + (
            f"{', ' if filtered_out else ''}{len(skipped)} skipped: {skipped[:3]}" if skipped else "")
        raise WeightgeoError(f"nothing to analyse between {b.source} and {f.source}: {len(alignment.pairs)} "
                             f"tensors in common, {why}; widen include/exclude or check the dtypes")
    return jobs, skipped, partial, alignment


def _common_rows(key: str, sb: tuple[int, ...], sf: tuple[int, ...], src_b: str, src_f: str) -> tuple[int, int]:
    if sb == sf:
        return (sb[0] if sb else 1), 0
    if len(sb) == len(sf) == 2 and sb[1:] == sf[1:] and module_type(key) in _VOCAB_MODULES:
        # Added tokens: compare the rows both share; the new rows have no base to compare with.
        return min(sb[0], sf[0]), sf[0] - sb[0]
    raise WeightgeoError(f"tensor {key!r}: shape {sb} in {src_b} but {sf} in {src_f}; compare checkpoints of "
                         f"one architecture, or exclude it with exclude={key!r}")


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(desc="weightgeo compare", unit="tensor", total=total, leave=False, dynamic_ncols=True)


def _read(ck: Checkpoint, name: str, rows: int) -> torch.Tensor:
    shape = ck.info(name).shape
    if shape and rows < shape[0]:
        return ck.get_rows(name, 0, rows)
    return ck.get(name)


@dataclass(frozen=True)
class _Group:
    """Same-shape matrix jobs analysed as one [B, rows, cols] batch (indices into the plan's jobs)."""

    members: tuple[int, ...]
    nbytes: int  # bytes of both sides' stacked inputs, as stored


def _member_cost(job: _Job, b: Checkpoint, f: Checkpoint) -> tuple[int, int]:
    """(input bytes, working-set estimate) of one matrix in a batch: the stored inputs of both sides plus
    about a dozen float64 small-side square matrices (Grams, eigenvectors, products); row-block temporaries
    are bounded separately (linalg.pairwise)."""
    cols = job.shape[1]
    item = b.info(job.base_name).dtype.itemsize + f.info(job.ft_name).dtype.itemsize
    inputs = job.rows * cols * item
    return inputs, inputs + _small_problem_bytes(job.rows, cols)


def _small_problem_bytes(rows: int, cols: int) -> int:
    """Working set of one matrix's small problems: about a dozen float64 small-side square matrices."""
    return 12 * 8 * min(rows, cols) ** 2


def _ahead_bytes(largest: int, budget: int) -> int:
    """Read-ahead budget: room for the group being computed plus about one budget's worth read ahead (not a
    second copy of the largest group: behind a 545 MB embedding that would double the peak), or a few row
    chunks for the elementwise stream (the sparsity pass stays at a few tens of MB however large the
    checkpoint)."""
    return largest + min(largest, budget) + _AHEAD_CHUNKS * 2 * 4 * _CHUNK_ELEMENTS


def _groups(jobs: Sequence[_Job], mine: Sequence[int], b: Checkpoint, f: Checkpoint, budget: int
            ) -> list[_Group]:
    """Pack this rank's matrix jobs into same-shape, same-dtype batches whose working set fits ``budget``."""
    by_key: dict[tuple, list[int]] = {}
    for i in mine:
        j = jobs[i]
        key = (j.rows, j.shape[1], b.info(j.base_name).dtype, f.info(j.ft_name).dtype)
        by_key.setdefault(key, []).append(i)
    groups: list[_Group] = []
    for members in by_key.values():
        inputs, cost = _member_cost(jobs[members[0]], b, f)
        size = max(1, budget // max(cost, 1))
        for s in range(0, len(members), size):
            part = tuple(members[s:s + size])
            groups.append(_Group(part, inputs * len(part)))
    return sorted(groups, key=lambda g: g.members[0])


def _default_batch_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(256 << 20, free // 4)
    # On CPU, LAPACK loops over a batch anyway: larger groups measured no faster and only raise the peak
    # (all metrics on Qwen2.5-0.5B: 0 -> 47.9 s / 1.12 GB, 64 MiB -> 45.5 s / 1.23 GB, 256 MiB -> 49 s / 1.64 GB).
    return 64 << 20


def _analyse(b: Checkpoint, f: Checkpoint, jobs: Sequence[_Job], mine: Sequence[int], chosen: tuple[str, ...],
             pair_metrics: frozenset[str], *, batch_bytes: int | None, device: torch.device, bar,
             **opts: Any) -> list[tuple[int, dict[str, Any]]]:
    """Rows for this rank's jobs. Same-shape matrices are analysed in batches (shape groups); everything
    else streams in row chunks. A background thread reads the next group or chunk while this one is
    computed (:class:`~weightgeo.readahead.ReadAhead`)."""
    budget = _default_batch_bytes(device) if batch_bytes is None else int(batch_bytes)
    matrices = [i for i in mine if len(jobs[i].shape) == 2] if pair_metrics else []
    groups = _groups(jobs, matrices, b, f, budget)
    grouped = {i for g in groups for i in g.members}
    units = sorted([(g.members[0], g) for g in groups] + [(i, i) for i in mine if i not in grouped],
                   key=lambda u: u[0])
    pin = device.type == "cuda"

    def reads():  # (bytes, read) per group or row chunk, in processing order; run by the reader thread
        for _, unit in units:
            if isinstance(unit, _Group):
                yield unit.nbytes, (lambda g=unit: (g, _read_group(b, f, jobs, g, pin)))
            else:
                for s, e, nbytes in _chunk_spans(jobs[unit]):
                    yield nbytes, (lambda i=unit, s=s, e=e: (i, (s, e, *_read_chunk(b, f, jobs[i], s, e))))

    out: list[tuple[int, dict[str, Any]]] = []
    counts: dict[int, int] = {}
    ahead_bytes = _ahead_bytes(max((g.nbytes for g in groups), default=0), budget)
    with ReadAhead(reads(), budget=ahead_bytes, background=b.pure_io and f.pure_io) as ahead:
        for unit, data in ahead:
            if isinstance(unit, _Group):
                done = _group_rows(b, jobs, unit.members, *data, chosen, pair_metrics, device=device, **opts)
            else:
                s, e, c0, c1 = data
                job = jobs[unit]
                counts[unit] = counts.get(unit, 0) + _unchanged_count(c0, c1, opts["eta"],
                                                                      name=f"{job.key} rows {s}:{e}")
                if e < job.rows:
                    continue
                row = _base_row(b, job)
                _finish_sparsity(row, job, counts.pop(unit), chosen)
                done = [(unit, row)]
            out.extend(done)
            if bar is not None:
                bar.update(len(done))
    return out


def _group_rows(b: Checkpoint, jobs: Sequence[_Job], members: Sequence[int], W0: torch.Tensor, W1: torch.Tensor,
                chosen: tuple[str, ...], pair_metrics: frozenset[str], *, device: torch.device,
                base: BaseSpectrum | None = None, W0_device: torch.Tensor | None = None, **opts: Any
                ) -> list[tuple[int, dict[str, Any]]]:
    """Rows of one shape group (``members``: job indices, stacked in ``W0``/``W1`` on the host): the
    elementwise pass per member (row chunks of the tensors already read, which also checks finiteness), then
    one batched pair kernel on ``device``. ``base`` and ``W0_device``: W0's decomposition and its copy on
    ``device`` when the caller already has them (several fine-tunes of one base)."""
    rows = [_base_row(b, jobs[i]) for i in members]
    for row, i, w0, w1 in zip(rows, members, W0, W1):
        unchanged = _chunked_unchanged(jobs[i].key, lambda s, e: (w0[s:e], w1[s:e]), jobs[i].rows, jobs[i].shape,
                                       opts["eta"])
        _finish_sparsity(row, jobs[i], unchanged, chosen)
    try:
        W0d = W0.to(device, non_blocking=True) if W0_device is None else W0_device
        found = batched_pair_metrics(W0d, W1.to(device, non_blocking=True), metrics=pair_metrics, base=base, **opts)
    except WeightgeoError as e:
        names = ", ".join(repr(jobs[i].key) for i in members)
        raise WeightgeoError(f"tensor{'s' if len(members) > 1 else ''} {names}: {e}") from e
    for row, extra in zip(rows, found):
        row.update(extra)
    return list(zip(members, rows))


def _read_chunk(b: Checkpoint, f: Checkpoint, job: _Job, s: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not job.shape:  # a 0-d tensor has no rows
        return b.get(job.base_name), f.get(job.ft_name)
    return b.get_rows(job.base_name, s, e), f.get_rows(job.ft_name, s, e)


def _read_group(b: Checkpoint, f: Checkpoint, jobs: Sequence[_Job], g: _Group, pin: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sides of a group stacked as stored ([B, rows, cols])."""
    members = [jobs[i] for i in g.members]
    return (_read_stack(b, [j.base_name for j in members], members[0].rows, pin),
            _read_stack(f, [j.ft_name for j in members], members[0].rows, pin))


def _read_stack(ck: Checkpoint, names: Sequence[str], rows: int, pin: bool) -> torch.Tensor:
    """Same-shape tensors ``names`` (first ``rows`` rows each) stacked as stored, filled one at a time."""
    if len(names) == 1 and not pin:  # no stacking copy (an embedding is the largest single read)
        return _read(ck, names[0], rows)[None]
    info = ck.info(names[0])
    W = torch.empty((len(names), rows, *info.shape[1:]), dtype=info.dtype, pin_memory=pin)
    for slot, name in enumerate(names):
        # A NumPy byte copy, not Tensor.copy_: no torch kernel (and no OpenMP team) in the reader thread.
        W[slot].view(torch.uint8).numpy()[...] = _read(ck, name, rows).view(torch.uint8).numpy()
    return W


def _chunk_spans(job: _Job) -> list[tuple[int, int, int]]:
    """Row spans ``(start, stop, bytes of both sides)`` of at most ``_CHUNK_ELEMENTS`` entries each."""
    if not job.shape:
        return [(0, 1, 16)]
    row_len = math.prod(job.shape[1:])
    step = max(1, _CHUNK_ELEMENTS // max(row_len, 1))
    return [(s, min(job.rows, s + step), 2 * 4 * (min(job.rows, s + step) - s) * row_len)
            for s in range(0, job.rows, step)] or [(0, 0, 0)]


def _base_row(b: Checkpoint, job: _Job) -> dict[str, Any]:
    row: dict[str, Any] = {
        "name": job.key, "shape": job.shape, "numel": math.prod(job.shape), "module": module_type(job.key),
        "layer": layer_index(job.key), "dtype": str(b.info(job.base_name).dtype).replace("torch.", ""),
    }
    if job.rows_added:
        row["rows_compared"], row["rows_added"] = job.rows, job.rows_added
    if len(job.shape) == 2 and b.in_out_layout(job.base_name):
        row["layout"] = "in_out"  # stored [in, out] (Conv1D): side="right" is its output side
    return row


def _finish_sparsity(row: dict[str, Any], job: _Job, unchanged: int, chosen: tuple[str, ...]) -> None:
    compared = job.rows * (math.prod(job.shape[1:]) if len(job.shape) > 1 else 1) if job.shape else 1
    if "update_sparsity" in chosen:
        row["update_sparsity"] = unchanged / compared


def _chunked_unchanged(key: str, read, rows: int, shape: tuple[int, ...], eta: float) -> int:
    """Count unchanged entries in row chunks (bounded temporaries); non-finite values are an error here."""
    row_len = math.prod(shape[1:]) if len(shape) > 1 else 1
    step = max(1, _CHUNK_ELEMENTS // max(row_len, 1))
    if not shape:
        step = rows = 1
    total = 0
    for s in range(0, rows, step):
        e = min(rows, s + step)
        c0, c1 = read(s, e)
        # Also the finiteness check of every analysed entry: NaN/Inf raise, naming the tensor and rows.
        total += _unchanged_count(c0, c1, eta, name=f"{key} rows {s}:{e}")
    return total
