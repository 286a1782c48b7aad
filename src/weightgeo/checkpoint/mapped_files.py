"""Per-rank ``torch.save`` files held memory-mapped, and let go of before their pages pile up.

Training frameworks write one ``torch.save`` state dict per rank (verl's ``model_world_size_W_rank_R.pt``,
DeepSpeed's ``mp_rank_00_model_states.pt``). Loading one with ``mmap=True`` reads no tensor data, but every
page a read touches stays resident while the mapping lives, so a pass over the whole checkpoint would end
with all of it counted in the process's memory. :class:`MappedFiles` therefore drops its mappings after a
byte budget of reads (they are re-mapped on the next read, which costs only the unpickling of names and
shapes): resident memory stays at the budget plus the tensor being read.

>>> import tempfile, torch
>>> from pathlib import Path
>>> p = Path(tempfile.mkdtemp()) / "rank0.pt"
>>> torch.save({"w": torch.ones(3)}, p)
>>> files = MappedFiles([p], lambda path: torch.load(path, mmap=True, weights_only=True))
>>> files.state(0)["w"].sum().item()
3.0
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["MappedFiles", "REMAP_BYTES"]

#: bytes read through the mappings after which they are dropped (and re-mapped on the next read)
REMAP_BYTES = 1 << 30


class MappedFiles:
    """Files loaded on first use with ``load(path)`` (a dict of tensors, memory-mapped), forgotten after
    ``budget`` bytes have been :meth:`touched`."""

    def __init__(self, paths: Sequence[Path], load: Callable[[Path], Any], *, budget: int = REMAP_BYTES) -> None:
        self.paths = list(paths)
        self._load = load
        self._budget = budget
        self._open: dict[int, Any] = {}
        self._touched = 0

    def state(self, i: int) -> Any:
        """What ``load`` returned for file ``i`` (mapped now if it is not)."""
        if i not in self._open:
            self._open[i] = self._load(self.paths[i])
        return self._open[i]

    def touched(self, nbytes: int) -> None:
        """Record ``nbytes`` read through the mappings; past the budget, drop them all."""
        self._touched += nbytes
        if self._touched > self._budget:
            self.release()

    def release(self) -> None:
        """Drop every mapping (tensors returned earlier are copies and stay valid)."""
        self._open = {}
        self._touched = 0
