"""Split work across torch.distributed ranks and gather the rows back (torchrun, gloo on CPU, nccl on GPU).

Under ``torchrun --nproc-per-node N`` every rank runs the same call; each streams only its own share of the
tensors (balanced by size), and the rows are gathered so that every rank returns the same Report as a single
process would. Without torchrun (no ``WORLD_SIZE`` > 1 in the environment and no initialised process group)
everything runs in-process with world size 1.
"""

from __future__ import annotations

import atexit
import heapq
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from .errors import WeightgeoError

__all__ = ["World", "current_world", "balanced_shards"]

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place in the job: ``process_rank`` of ``size``; ``size == 1`` means no communication.
    (``process_rank``, not ``rank``: in weightgeo ``rank`` is the localization's reconstruction rank.)"""

    process_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.process_rank == 0

    def gather(self, item: Any) -> list[Any]:
        """Every rank's ``item`` (any picklable object), in rank order, on every rank."""
        if self.size == 1:
            return [item]
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, item)
        return out


def current_world(device: torch.device | None = None) -> World:
    """The torch.distributed world, initialising the default group from torchrun's environment if needed.

    >>> current_world().size  # a plain process
    1
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_available():
        raise WeightgeoError(f"WORLD_SIZE={size} but this torch build has no torch.distributed; run without torchrun")
    backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend=backend)
    except (RuntimeError, ValueError) as e:
        raise WeightgeoError(
            f"could not join the torch.distributed group (WORLD_SIZE={size}, backend "
            f"{backend}): {e}; launch with torchrun --nproc-per-node N"
        ) from e
    # We created the group, so we tear it down: a gloo group left to interpreter shutdown can abort the
    # process ("terminate called without an active exception") and torchrun then reports a failed rank.
    atexit.register(_shutdown)
    return World(dist.get_rank(), dist.get_world_size())


def _shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def balanced_shards(weights: Sequence[int], size: int) -> list[list[int]]:
    """Indices split into ``size`` shards of nearly equal total weight (largest first, to the lightest shard).

    Deterministic: ties go to the lower rank, so every rank computes the same split without talking.

    >>> balanced_shards([5, 1, 4, 2, 3], 2)
    [[0, 3, 1], [2, 4]]
    """
    shards: list[list[int]] = [[] for _ in range(size)]
    heap = [(0, r) for r in range(size)]
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        load, r = heapq.heappop(heap)
        shards[r].append(i)
        heapq.heappush(heap, (load + weights[i], r))
    return shards
