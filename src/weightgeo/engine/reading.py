"""Reading for the pass: stacks of same-shape tensors, row chunks, and the read-ahead schedule.

Every tensor is read once per fine-tune (the base once for all of them), in the order the pass consumes it;
:class:`~weightgeo.readahead.ReadAhead` reads the next group or chunk in a background thread while the current
one is computed, for sources whose reads are pure file I/O (``Checkpoint.pure_io``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..checkpoint import Checkpoint, Fp8Weight
from ..checkpoint.view import read_expert
from ..linalg.policy import ROW_BLOCK, row_blocks
from .plan import Job

__all__ = ["read_rows", "read_stack", "chunk_spans", "read_chunk", "read_fp8", "ahead_bytes", "AHEAD_CHUNKS", "Chunk"]

#: row chunks the reader thread may run ahead of the elementwise counting
AHEAD_CHUNKS = 2


def read_rows(ck: Checkpoint, name: str, rows: int, expert: int | None = None) -> torch.Tensor:
    """The first ``rows`` rows of tensor ``name`` (the whole tensor when that is all of it), as stored; of its
    expert ``expert`` when ``name`` is an [E, out, in] stack (reading that expert alone)."""
    if expert is not None:
        return read_expert(ck, name, expert, 0, rows)
    shape = ck.info(name).shape
    if shape and rows < shape[0]:
        return ck.get_rows(name, 0, rows)
    return ck.get(name)


def read_stack(
    ck: Checkpoint, names: Sequence[str], rows: int, pin: bool, experts: Sequence[int | None] | None = None
) -> torch.Tensor:
    """Same-shape tensors ``names`` (first ``rows`` rows each) stacked as stored ([B, rows, ...]), filled one at
    a time; ``pin``: in pinned memory (for a non-blocking copy to CUDA); ``experts``: per name, the expert to
    take when it is an expert stack (``None``: the tensor itself)."""
    which = list(experts) if experts else [None] * len(names)
    if len(names) == 1 and not pin:  # no stacking copy (an embedding is the largest single read)
        return read_rows(ck, names[0], rows, which[0])[None]
    shape = ck.info(names[0]).shape[1:] if which[0] is None else ck.info(names[0]).shape[2:]
    W = torch.empty((len(names), rows, *shape), dtype=ck.info(names[0]).dtype, pin_memory=pin)
    for slot, (name, expert) in enumerate(zip(names, which)):
        # A NumPy byte copy, not Tensor.copy_: no torch kernel (and no OpenMP team) in the reader thread.
        W[slot].view(torch.uint8).numpy()[...] = read_rows(ck, name, rows, expert).view(torch.uint8).numpy()
    return W


def chunk_spans(job: Job) -> list[tuple[int, int, int]]:
    """Row spans ``(start, stop, bytes of both sides as float32)`` of at most ``ROW_BLOCK`` entries each."""
    if not job.shape:
        return [(0, 1, 16)]
    return [(s, e, 2 * 4 * (e - s) * job.row_len) for s, e in row_blocks(job.rows, job.row_len)] or [(0, 0, 0)]


Chunk = tuple[torch.Tensor, torch.Tensor] | tuple[Fp8Weight, Fp8Weight]


def read_chunk(b: Checkpoint, f: Checkpoint, job: Job, s: int, e: int) -> Chunk:
    """Rows ``s:e`` of both sides of ``job`` (a 0-d tensor, which has no rows, whole); of an FP8 job (both sides
    scaled FP8), the stored codes of those rows and the scales, which the FP8 update rule compares."""
    if not job.shape:
        return b.get(job.base_name), f.get(job.ft_name)
    if job.fp8:
        return _fp8_pair(b, f, job, s, e)
    if job.expert is not None:
        return read_expert(b, job.base_name, job.expert, s, e), read_expert(f, job.ft_name, job.expert, s, e)
    return b.get_rows(job.base_name, s, e), f.get_rows(job.ft_name, s, e)


def read_fp8(b: Checkpoint, f: Checkpoint, jobs: Sequence[Job], rows: int) -> list[tuple[Fp8Weight, Fp8Weight] | None]:
    """For each job of a shape group, the stored codes (first ``rows`` rows) and scales of both sides when it is
    an FP8 job, else ``None`` (its update mask is then the bf16 rule's on the values read)."""
    return [_fp8_pair(b, f, job, 0, rows) if job.fp8 else None for job in jobs]


def _fp8_pair(b: Checkpoint, f: Checkpoint, job: Job, s: int, e: int) -> tuple[Fp8Weight, Fp8Weight]:
    w0, w1 = b.fp8_weight(job.base_name, s, e), f.fp8_weight(job.ft_name, s, e)
    assert w0 is not None and w1 is not None, job.key  # the plan marked it FP8 from the headers of both
    return w0, w1


def ahead_bytes(largest: int, budget: int) -> tuple[int, int]:
    """Read-ahead budgets ``(held, ahead)``: room for the group being computed plus about one budget's worth read
    ahead of it (not a second copy of the largest group: behind a 545 MB embedding that would double the peak), or
    a few row chunks for the elementwise stream (the sparsity pass stays at a few tens of MB however large the
    checkpoint); and that budget's worth alone, what may be read ahead of whichever group is being computed (behind
    a 35 MB group the first bound alone let 600 MB of the next groups be read: the 0.5B pair's peak)."""
    ahead = min(largest, budget) + AHEAD_CHUNKS * 2 * 4 * ROW_BLOCK
    return largest + ahead, ahead
