"""Running the work: the rows of a shape group, and the row-chunk stream of the elementwise metrics.

Both are functions of the options and the tensors only (no checkpoint, no device state), so that a
per-tensor result cache can sit in front of them. Tensors come as stored and are rounded to ``options.dtype``
here (:meth:`~weightgeo.options.PairOptions.round`; nothing when it is ``None``). Every analysed entry goes
through the finiteness pass (:func:`finite_chunks`) whatever the metrics; update_sparsity then counts on the
chunks it checked.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from ..checkpoint import Fp8Weight, layer_index, module_type
from ..checkpoint.names import expert_index
from ..errors import WeightgeoError
from ..linalg.pairwise import BaseSpectrum, base_spectrum
from ..linalg.policy import compared_format, row_blocks
from ..metrics.pair import batched_pair_metrics
from ..metrics.sparsity import finite_as_bf16, fp8_update_mask, unchanged_count
from ..options import PairOptions
from .plan import Job

__all__ = [
    "job_row",
    "format_rule",
    "pair_options",
    "finite_chunks",
    "chunk_unchanged",
    "fp8_unchanged",
    "fp8_mask",
    "finish_row",
    "SharedBase",
    "matrix_rows",
]

Fp8Pair = tuple[Fp8Weight, Fp8Weight]


def job_row(job: Job) -> dict[str, Any]:
    """The identifying part of a tensor's row: name, shape, numel, module, layer, stored_dtype (and layout notes);
    ``expert`` for one expert of an MoE block (of a stack [E, out, in], whose rows share the stack's name and
    its shape is the expert's; or a per-expert ``experts.{j}.`` name)."""
    row: dict[str, Any] = {
        "name": job.key,
        "shape": job.shape,
        "numel": math.prod(job.shape),
        "module": module_type(job.key),
        "layer": layer_index(job.key),
        "stored_dtype": str(job.base_dtype).replace("torch.", ""),
    }
    expert = job.expert if job.expert is not None else expert_index(job.key)
    if expert is not None:
        row["expert"] = expert
    if job.rows_added:
        row["rows_compared"], row["rows_added"] = job.rows, job.rows_added
    if job.in_out:
        row["layout"] = "in_out"  # stored [in, out] (Conv1D): side="right" is its output side
    if job.fp8:
        row["update_rule"] = "fp8"  # update_sparsity and density compare stored codes and scales
    return row


def format_rule(options: PairOptions, job: Job) -> dict[str, str]:
    """For a tensor stored in two float formats (and no ``dtype=``), the row keys that say so and which rule was
    used (:func:`~weightgeo.linalg.policy.compared_format`): ``ft_stored_dtype`` and ``compared_in``."""
    rule = None if options.dtype is not None or job.fp8 else compared_format(job.base_dtype, job.ft_dtype)
    if rule is None:
        return {}
    return {
        "ft_stored_dtype": str(job.ft_dtype).replace("torch.", ""),
        "compared_in": str(rule[0]).replace("torch.", ""),
    }


def pair_options(options: PairOptions, job: Job) -> PairOptions:
    """The options a job is computed with: ``options``, or, for a tensor stored in two float formats neither of
    which holds the other's values (fp16 and bf16), the same with both sides rounded to the coarser format
    (:func:`~weightgeo.linalg.policy.compared_format`); a ``dtype=`` of the user's wins."""
    rule = None if options.dtype is not None or job.fp8 else compared_format(job.base_dtype, job.ft_dtype)
    return replace(options, dtype=rule[0]) if rule is not None and rule[1] else options


def chunk_unchanged(
    options: PairOptions, key: str, s: int, e: int, c0: torch.Tensor | Fp8Weight, c1: torch.Tensor | Fp8Weight
) -> int:
    """The finiteness pass over rows ``s:e`` of one tensor (NaN/Inf raise, naming the tensor and rows), and the
    count of unchanged entries when update_sparsity is asked for (else 0). Stored FP8 rows (:class:`Fp8Weight`)
    are checked and counted by the FP8 update rule."""
    if isinstance(c0, Fp8Weight):
        assert isinstance(c1, Fp8Weight)
        n = fp8_unchanged(options, key, (c0, c1))  # checks the codes and scales whatever the metrics
        return n if options.sparsity else 0
    assert isinstance(c1, torch.Tensor)
    return _bf16_chunk(options, key, s, e, options.round(c0), options.round(c1), count=options.sparsity)


def _bf16_chunk(
    options: PairOptions, key: str, s: int, e: int, c0: torch.Tensor, c1: torch.Tensor, *, count: bool
) -> int:
    b0, b1 = finite_as_bf16(c0, c1, f"{key} rows {s}:{e}")
    return unchanged_count(b0, b1, options.eta, check=False) if count else 0


def _fp8_rows(pair: Fp8Pair, s: int, e: int) -> Fp8Pair:
    """Rows ``s:e`` (relative to the codes held) of both sides of a stored FP8 pair."""
    return tuple(
        Fp8Weight(
            w.codes[s:e],
            w.scales,
            w.block,
            w.row_start + s,  # type: ignore[return-value]
            w.row_start + w.codes.shape[0] if w.rows is None else w.rows,
        )
        for w in pair
    )


def fp8_unchanged(options: PairOptions, key: str, pair: Fp8Pair) -> int:
    """Unchanged entries of a stored FP8 pair under the FP8 update rule, in the policy's row blocks."""
    w0 = pair[0]
    total = 0
    for s, e in row_blocks(w0.codes.shape[0], w0.codes.shape[1]):
        a, b = _fp8_rows(pair, s, e)
        updated = fp8_mask(options, f"{key} rows {a.row_start}:{a.row_start + e - s}", a, b)
        total += updated.numel() - int(torch.count_nonzero(updated))
    return total


def _fp8_update_rows(options: PairOptions, key: str, pair: Fp8Pair):  # -> Callable[[int, int], torch.Tensor]
    """The FP8 rule's update mask of rows ``s:e``, for the localization kernel's row blocks."""

    def rows(s: int, e: int) -> torch.Tensor:
        return fp8_mask(options, key, *_fp8_rows(pair, s, e))

    return rows


def fp8_mask(options: PairOptions, name: str, a: Fp8Weight, b: Fp8Weight) -> torch.Tensor:
    """The FP8 rule's update mask between two stored FP8 versions of the same rows (True = updated)."""
    return fp8_update_mask(
        a.codes,
        a.scales,
        b.codes,
        b.scales,
        a.block,
        block1=b.block,
        eta=options.eta,
        row_start=a.row_start,
        rows=a.rows,
        name=name,
    )


def finite_chunks(options: PairOptions, job: Job, w0: torch.Tensor, w1: torch.Tensor, *, count: bool = True) -> int:
    """:func:`chunk_unchanged` over the row chunks of one matrix already read (bounded temporaries); ``count=False``:
    the finiteness pass alone (0)."""
    return sum(
        _bf16_chunk(options, job.uid, s, e, w0[s:e], w1[s:e], count=count and options.sparsity)
        for s, e in row_blocks(job.rows, job.row_len)
    )


def finish_row(options: PairOptions, job: Job, unchanged: int) -> dict[str, Any]:
    """The row of a tensor once every chunk was counted (:func:`chunk_unchanged`)."""
    row = job_row(job) | format_rule(options, job)
    if options.sparsity:
        row["update_sparsity"] = unchanged / job.compared
    return row


class SharedBase:
    """A group's base stack on the device and its decomposition, made on first use (after the finiteness pass
    of the first fine-tune that needs them) and reused by every fine-tune of the group."""

    def __init__(self, W0: torch.Tensor, options: PairOptions) -> None:
        self.W0, self.options = options.round(W0), options
        self._device: torch.Tensor | None = None
        self._spectrum: BaseSpectrum | None = None

    def on_device(self) -> torch.Tensor:
        if self._device is None:
            self._device = self.W0.to(self.options.device, non_blocking=True)
        return self._device

    def spectrum(self) -> BaseSpectrum | None:
        """W0's decomposition when the metrics need it (everything but the stable rank), else ``None``."""
        if self._spectrum is None and self.options.needs_base:
            self._spectrum = base_spectrum(self.on_device())
        return self._spectrum


def matrix_rows(
    options: PairOptions,
    jobs: Sequence[Job],
    W0: torch.Tensor,
    W1: torch.Tensor,
    *,
    shared: SharedBase | None = None,
    fp8: Sequence[Fp8Pair | None] | None = None,
    base_ready: Callable[[], object] | None = None,
    progress: Callable[[float], object] | None = None,
) -> list[dict[str, Any]]:
    """The rows of one shape group (``jobs[i]`` ↔ ``W0[i]``, ``W1[i]``, stacked on the host as stored, rounded to
    ``options.dtype`` here, or, stored in two formats neither of which holds the other's values, to the rule's
    format: :func:`pair_options`; a group holds one pair of stored dtypes).

    The finiteness pass and update_sparsity per member, in row chunks of the tensors already read, then one
    batched pair kernel on ``options.device``. ``shared``: the group's base on the device and its
    decomposition, when several fine-tunes of one base share them. ``fp8``: per member, the stored codes and
    scales of both sides when it is an FP8 job (``reading.read_fp8``): its update_sparsity and localization
    update mask then follow the FP8 update rule. ``base_ready``: the kernel's hook once the base is decomposed
    (:func:`~weightgeo.metrics.pair.batched_pair_metrics`). ``progress``: called with 0.5 as each member is read and
    checked, and with 0.5 per member once the kernel is done (a bar moves once per tensor at least).
    """
    said, options = options, pair_options(options, jobs[0])
    advance = progress if progress is not None else (lambda _: None)  # said: what the rows state the rule from
    W0, W1 = options.round(W0), options.round(W1)
    pairs = list(fp8) if fp8 is not None else [None] * len(jobs)
    rows = []
    for job, w0, w1, pair in zip(jobs, W0, W1, pairs):
        unchanged = (
            finite_chunks(options, job, w0, w1)
            if pair is None
            else finite_chunks(options, job, w0, w1, count=False) + fp8_unchanged(options, job.key, pair)
        )
        rows.append(finish_row(options, job, unchanged) | format_rule(said, job))
        advance(0.5)
    if not options.pair_metrics:
        advance(0.5 * len(jobs))
        return rows
    shared = SharedBase(W0, options) if shared is None else shared
    update_rows = (
        [None if p is None else _fp8_update_rows(options, job.key, p) for job, p in zip(jobs, pairs)]
        if any(p is not None for p in pairs)
        else None
    )
    try:
        found = batched_pair_metrics(
            shared.on_device(),
            W1.to(options.device, non_blocking=True),
            base=shared.spectrum,  # made in the kernel's second lane, beside the products (or read from the cache)
            update_rows=update_rows,
            base_ready=base_ready,
            **options.kernel(),
        )
    except WeightgeoError as e:
        names = ", ".join(repr(job.uid) for job in jobs)
        raise WeightgeoError(f"tensor{'s' if len(jobs) > 1 else ''} {names}: {e}") from e
    for row, extra in zip(rows, found):
        row.update(extra)
    advance(0.5 * len(jobs))
    return rows
