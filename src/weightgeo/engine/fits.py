"""Work that cannot fit is refused from the headers, before anything is read (:func:`~weightgeo.memory.check_fits`).

A shape group holds its members whole: both sides as stored and, per member, the small-side Gram, its basis and
one product in float64 (the least the pair kernel allocates at once; the rest is in the policy's row blocks).
The elementwise stream needs none of that: it reads row chunks of any tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..memory import check_fits, human_bytes
from ..options import PairOptions
from ..validation import either
from .plan import Group, Work

__all__ = ["check_groups_fit", "least_bytes"]


def least_bytes(g: Group, p: int) -> int:
    """The least a shape group allocates at once: its stored inputs and three float64 [p, p] per member."""
    return g.nbytes + len(g.units) * 3 * 8 * p * p


def check_groups_fit(groups: Sequence[Group], work: Work, options: PairOptions) -> None:
    """Raise, naming the tensor, its size and the fix, when a group cannot fit in the memory available (the
    host's for the tensors read, the device's for the linear algebra)."""
    for g in groups:
        job = work.job(*work.units[g.units[0]].users[0])
        p = min(g.rows, job.row_len)
        shape = f"[{g.rows}, {job.row_len}] {str(job.base_dtype).removeprefix('torch.')}"
        if len(g.units) == 1:
            what = f"tensor {job.uid!r} {shape} (both sides whole, for its SVD-family metrics)"
            fix = either(
                f"batch_bytes cannot split one matrix: leave it out with exclude={job.key!r}, or ask only for "
                f"metrics='update_sparsity', which reads any tensor in row chunks",
                f"--batch-mb cannot split one matrix: leave it out with --exclude '{job.key}', or ask only for "
                f"--metrics update_sparsity, which reads any tensor in row chunks",
            )
        else:
            what = f"a shape group of {len(g.units)} matrices {shape}"
            fix = either(
                f"lower batch_bytes (now {human_bytes(options.budget())})",
                f"lower --batch-mb (now {options.budget() >> 20})",
            )
        check_fits(g.nbytes, device=None, what=what, fix=fix)
        check_fits(least_bytes(g, p), device=options.device, what=what, fix=fix)
