"""Running the work: the rows of a shape group, and the row-chunk stream of the elementwise metrics.

Both are functions of the options and the tensors only (no checkpoint, no device state), so that a
per-tensor result cache can sit in front of them. Every analysed entry goes through the finiteness pass
(:func:`finite_chunks`) whatever the metrics; update_sparsity then counts on the chunks it checked.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from ..errors import WeightgeoError
from ..linalg.pairwise import BaseSpectrum, base_spectrum
from ..linalg.policy import row_blocks
from ..metrics.pair import batched_pair_metrics
from ..metrics.sparsity import finite_as_bf16, unchanged_count
from ..checkpoint import layer_index, module_type
from .options import Options
from .plan import Job

__all__ = ["job_row", "finite_chunks", "chunk_unchanged", "finish_row", "SharedBase", "matrix_rows"]


def job_row(job: Job) -> dict[str, Any]:
    """The identifying part of a tensor's row: name, shape, numel, module, layer, dtype (and layout notes)."""
    row: dict[str, Any] = {
        "name": job.key, "shape": job.shape, "numel": math.prod(job.shape), "module": module_type(job.key),
        "layer": layer_index(job.key), "dtype": str(job.base_dtype).replace("torch.", ""),
    }
    if job.rows_added:
        row["rows_compared"], row["rows_added"] = job.rows, job.rows_added
    if job.in_out:
        row["layout"] = "in_out"  # stored [in, out] (Conv1D): side="right" is its output side
    return row


def chunk_unchanged(options: Options, key: str, s: int, e: int, c0: torch.Tensor, c1: torch.Tensor) -> int:
    """The finiteness pass over rows ``s:e`` of one tensor (NaN/Inf raise, naming the tensor and rows), and the
    count of unchanged entries when update_sparsity is asked for (else 0)."""
    b0, b1 = finite_as_bf16(c0, c1, f"{key} rows {s}:{e}")
    return unchanged_count(b0, b1, options.eta, check=False) if options.sparsity else 0


def finite_chunks(options: Options, job: Job, w0: torch.Tensor, w1: torch.Tensor) -> int:
    """:func:`chunk_unchanged` over the row chunks of one matrix already read (bounded temporaries)."""
    return sum(chunk_unchanged(options, job.key, s, e, w0[s:e], w1[s:e]) for s, e in row_blocks(job.rows, job.row_len))


def finish_row(options: Options, job: Job, unchanged: int) -> dict[str, Any]:
    """The row of a tensor once every chunk was counted (:func:`chunk_unchanged`)."""
    row = job_row(job)
    if options.sparsity:
        row["update_sparsity"] = unchanged / job.compared
    return row


class SharedBase:
    """A group's base stack on the device and its decomposition, made on first use (after the finiteness pass
    of the first fine-tune that needs them) and reused by every fine-tune of the group."""

    def __init__(self, W0: torch.Tensor, options: Options) -> None:
        self.W0, self.options = W0, options
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


def matrix_rows(options: Options, jobs: Sequence[Job], W0: torch.Tensor, W1: torch.Tensor, *,
                shared: SharedBase | None = None) -> list[dict[str, Any]]:
    """The rows of one shape group (``jobs[i]`` ↔ ``W0[i]``, ``W1[i]``, stacked on the host as stored).

    The finiteness pass and update_sparsity per member, in row chunks of the tensors already read, then one
    batched pair kernel on ``options.device``. ``shared``: the group's base on the device and its
    decomposition, when several fine-tunes of one base share them.
    """
    rows = [finish_row(options, job, finite_chunks(options, job, w0, w1)) for job, w0, w1 in zip(jobs, W0, W1)]
    if not options.pair_metrics:
        return rows
    shared = SharedBase(W0, options) if shared is None else shared
    try:
        found = batched_pair_metrics(shared.on_device(), W1.to(options.device, non_blocking=True),
                                     base=shared.spectrum(), **options.kernel())
    except WeightgeoError as e:
        names = ", ".join(repr(job.key) for job in jobs)
        raise WeightgeoError(f"tensor{'s' if len(jobs) > 1 else ''} {names}: {e}") from e
    for row, extra in zip(rows, found):
        row.update(extra)
    return rows
