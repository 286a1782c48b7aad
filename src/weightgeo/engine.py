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
from .metrics.pair import ALL_METRICS, PAIR_METRICS, matrix_pair_metrics
from .metrics.sparsity import _unchanged_count
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
            device: str | torch.device | None = None, progress: bool = True) -> Report:
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

    Returns:
        :class:`~weightgeo.report.Report`: one row per analysed tensor (1-D tensors get only the elementwise
        metrics), the model summary, and ``meta`` with provenance, skipped tensors and unmatched names.
    """
    chosen = resolve_metrics(metrics)
    dev = resolve_device(device)
    if side not in ("right", "left"):
        raise WeightgeoError(f"side={side!r}; use 'right' (input side, V) or 'left' (output side, U)")
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
        local = [(i, _run_job(b, f, jobs[i], chosen, pair_metrics, k=k, side=side, rank=rank, alpha=alpha,
                              eta=eta, device=dev))
                 for i in _progress(mine, progress and world.is_main, len(mine))]
        per_rank = world.gather({"rank": world.rank, "tensors": [jobs[i].key for i in mine],
                                  "seconds": round(time.perf_counter() - t_rank, 3), "rows": local})
    finally:
        b.close()
        f.close()
    indexed = sorted((pair for part in per_rank for pair in part["rows"]), key=lambda p: p[0])
    rows = [row for _, row in indexed]
    meta = {
        "weightgeo_version": __version__,
        "kind": "compare",
        "base": b.source,
        "ft": f.source,
        "metrics": list(chosen),
        "params": {"k": k, "side": side, "rank": rank, "alpha": alpha, "eta": eta,
                   "include": include, "exclude": exclude},
        "device": str(dev),
        "world_size": world.size,
        "ranks": [{key: val for key, val in part.items() if key != "rows"} for part in per_rank],
        "torch_version": torch.__version__,
        "seconds": round(time.perf_counter() - t0, 3),
        "skipped": skipped,
        "partial": partial,
        "unmatched": {"only_base": alignment.only_base, "only_ft": alignment.only_ft},
        "tied": alignment.tied,
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


def _progress(items: list[int], enabled: bool, total: int):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc="weightgeo compare", unit="tensor", total=total, leave=False, dynamic_ncols=True)


def _read(ck: Checkpoint, name: str, rows: int) -> torch.Tensor:
    shape = ck.info(name).shape
    if shape and rows < shape[0]:
        return ck.get_rows(name, 0, rows)
    return ck.get(name)


def _run_job(b: Checkpoint, f: Checkpoint, job: _Job, chosen: tuple[str, ...], pair_metrics: frozenset[str], *,
             k: int, side: str, rank: int, alpha: float, eta: float, device: torch.device) -> dict[str, Any]:
    row: dict[str, Any] = {
        "name": job.key, "shape": job.shape, "numel": math.prod(job.shape), "module": module_type(job.key),
        "layer": layer_index(job.key), "dtype": str(b.info(job.base_name).dtype).replace("torch.", ""),
    }
    if job.rows_added:
        row["rows_compared"], row["rows_added"] = job.rows, job.rows_added
    is_matrix = len(job.shape) == 2
    need_full = is_matrix and bool(pair_metrics)
    if need_full:
        w0 = _read(b, job.base_name, job.rows)
        w1 = _read(f, job.ft_name, job.rows)
        unchanged = _chunked_unchanged(job.key, lambda s, e: (w0[s:e], w1[s:e]), job.rows, job.shape, eta)
    else:
        unchanged = _chunked_unchanged(
            job.key, lambda s, e: (b.get_rows(job.base_name, s, e), f.get_rows(job.ft_name, s, e)),
            job.rows, job.shape, eta)
    compared = job.rows * (math.prod(job.shape[1:]) if len(job.shape) > 1 else 1) if job.shape else 1
    if "update_sparsity" in chosen:
        row["update_sparsity"] = unchanged / compared
    if need_full:
        try:
            row.update(matrix_pair_metrics(w0.to(device), w1.to(device), metrics=pair_metrics, k=k, side=side,
                                           rank=rank, alpha=alpha, eta=eta))
        except WeightgeoError as e:
            raise WeightgeoError(f"tensor {job.key!r}: {e}") from e
    return row


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
