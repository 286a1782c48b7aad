"""A virtual checkpoint: tensors with Hugging Face names, each produced from a region of a stored tensor.

Native name schemes (:mod:`.megatron`, :mod:`.torchtitan`) describe every HF tensor as a :class:`Piece`: which
stored tensor, which box of its leading dims (one layer of a stacked tensor, one expert, the unpadded
vocabulary rows, the gate half of ``linear_fc1``), and an optional reshuffle of the rows (the QKV
un-interleave, the rotary permutation). Reading one HF tensor reads only that box where the format allows
(:func:`read_region`), so memory stays at about the largest tensor group, never the stacked tensor.

>>> import torch
>>> from .base import TensorInfo
>>> from .state_dict import StateDictCheckpoint
>>> stacked = StateDictCheckpoint({"layers.w": torch.arange(12.0).reshape(2, 3, 2)})
>>> view = MappedCheckpoint(stacked, [Piece(TensorInfo("layers.1.w", (3, 2), torch.float32), "layers.w", (1,), (2,), 1)],
...                         scheme="demo")
>>> view.get("layers.1.w").tolist(), view.get_rows("layers.1.w", 2, 3).tolist()
([[6.0, 7.0], [8.0, 9.0], [10.0, 11.0]], [[10.0, 11.0]])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import WeightgeoError
from .base import Checkpoint, TensorInfo

__all__ = ["Piece", "MappedCheckpoint", "read_region", "read_expert"]


@dataclass(frozen=True)
class Piece:
    """How one virtual tensor is made from a stored one.

    ``start``/``stop`` box the stored tensor's leading dims; the first ``squeeze`` of them are indices (a
    layer, an expert) dropped from the result. ``transform`` (when given) reorders or selects rows of the
    boxed tensor; without one the virtual rows are the box's rows, so row ranges are read on their own.
    """

    info: TensorInfo
    stored: str
    start: tuple[int, ...] = ()
    stop: tuple[int, ...] = ()
    squeeze: int = 0
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    #: a short description of the recipe for messages and ``origin()`` (e.g. "q rows of the fused QKV")
    note: str = ""
    #: what ``transform`` does, as JSON-able data with every number it depends on (part of :meth:`identity
    #: <MappedCheckpoint.identity>`); a piece with a transform but no recipe is never cached
    recipe: Any = None


def read_region(ck: Checkpoint, name: str, start: Sequence[int], stop: Sequence[int]) -> torch.Tensor:
    """The box ``[start, stop)`` over the leading dims of ``ck``'s tensor ``name``, read without the rest when the
    format allows (DCP chunks; row ranges of safetensors files)."""
    get_region = getattr(ck, "get_region", None)
    if callable(get_region):
        return get_region(name, start, stop)
    if not start:
        return ck.get(name)
    t = ck.get_rows(name, start[0], stop[0])
    return t[(slice(None),) + tuple(slice(b, e) for b, e in zip(start[1:], stop[1:]))]


def read_expert(ck: Checkpoint, name: str, expert: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Rows ``start:stop`` (default: all) of expert ``expert`` of the stack ``name`` [E, out, in], reading that
    box alone (one expert, not the stack)."""
    stop = ck.info(name).shape[1] if stop is None else stop
    return read_region(ck, name, (expert, start), (expert + 1, stop))[0]


class MappedCheckpoint(Checkpoint):
    """``inner``'s tensors under other names: each virtual tensor is a :class:`Piece` of a stored one.

    Stored tensors that no piece uses are offered under their own names (``passthrough``), so nothing
    disappears: in a pair with an HF checkpoint they show up as unmatched.
    """

    def __init__(
        self,
        inner: Checkpoint,
        pieces: Iterable[Piece],
        *,
        scheme: str,
        source: str | None = None,
        config: dict | None = None,
        passthrough: Iterable[str] = (),
    ) -> None:
        super().__init__()
        self.inner = inner
        self.scheme = scheme
        self.source = source or inner.source
        self.config = dict(inner.config if config is None else config)
        self.skipped = list(inner.skipped)
        self._pieces: dict[str, Piece] = {}
        for p in pieces:
            if p.info.name in self._pieces:
                raise WeightgeoError(
                    f"{self.source}: {scheme} names map two stored tensors to {p.info.name!r} "
                    f"({self._pieces[p.info.name].stored!r}, {p.stored!r}); the checkpoint mixes "
                    f"layouts, open one of them"
                )
            self._pieces[p.info.name] = p
        for name in passthrough:
            if name not in self._pieces:
                self._pieces[name] = Piece(inner.info(name), name)
        self.pure_io = inner.pure_io and all(p.transform is None for p in self._pieces.values())

    def origin(self, name: str) -> Piece:
        """Where virtual tensor ``name`` comes from (stored name, box, recipe)."""
        self.info(name)
        return self._pieces[name]

    def _infos(self) -> dict[str, TensorInfo]:
        return {n: p.info for n, p in self._pieces.items()}

    def _box(self, p: Piece) -> torch.Tensor:
        t = read_region(self.inner, p.stored, p.start, p.stop) if p.start else self.inner.get(p.stored)
        t = t.reshape(t.shape[p.squeeze :]) if p.squeeze else t
        return t

    def _get(self, name: str) -> torch.Tensor:
        p = self._pieces[name]
        t = self._box(p)
        if p.transform is not None:
            t = p.transform(t).contiguous()
        if tuple(t.shape) != p.info.shape:
            raise WeightgeoError(
                f"{self.source}: {self.scheme} tensor {name!r} built from {p.stored!r} has shape "
                f"{tuple(t.shape)}, expected {p.info.shape}; the checkpoint does not match the "
                f"architecture numbers given (config=)"
            )
        return t

    def _get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        p = self._pieces[name]
        if p.transform is not None or not p.info.shape:
            return self._get(name)[start:stop]
        n = p.info.shape[0]
        lo, hi, _ = slice(start, stop).indices(n)
        hi = max(lo, hi)
        k = p.squeeze
        begin = list(p.start) + [0] * (k + 1 - len(p.start))
        end = list(p.stop) + [n] * (k + 1 - len(p.stop))
        first = begin[k]
        begin[k], end[k] = first + lo, first + hi
        t = read_region(self.inner, p.stored, tuple(begin), tuple(end))
        return t.reshape(t.shape[k:]) if k else t

    def identity(self, name: str) -> dict[str, Any] | None:
        """The stored tensor's identity (``inner.identity``) plus this tensor's recipe: the name scheme, the box,
        the squeezed dims and the transform's recipe; a stored tensor offered under its own name keeps the
        stored identity. ``None`` when the stored tensor has none, or a transform has no recipe."""
        p = self.origin(name)
        stored = self.inner.identity(p.stored)
        if stored is None or (p.transform is not None and p.recipe is None):
            return None
        if self._as_stored(name) is not None:
            return stored
        return {
            "format": "view",
            "scheme": self.scheme,
            "stored": stored,
            "start": list(p.start),
            "stop": list(p.stop),
            "squeeze": p.squeeze,
            "transform": p.recipe,
            "shape": list(p.info.shape),
            "dtype": str(p.info.dtype),
        }

    def in_out_layout(self, name: str) -> bool:
        """A stored tensor offered as it is keeps its stored layout; a mapped one is [out, in] (or as ``config``
        says)."""
        stored = self._as_stored(name)
        return self.inner.in_out_layout(stored) if stored is not None else super().in_out_layout(name)

    def factored_delta(self, name: str):
        stored = self._as_stored(name)
        return None if stored is None else self.inner.factored_delta(stored)

    def _as_stored(self, name: str) -> str | None:
        """The stored name when virtual tensor ``name`` is a stored tensor offered whole, as it is; else None."""
        p = self.origin(name)
        same = not p.start and p.transform is None and p.info.shape == self.inner.info(p.stored).shape
        return p.stored if same else None

    def fp8_weight(self, name: str, start: int | None = None, stop: int | None = None):
        stored = self._as_stored(name)
        return None if stored is None else self.inner.fp8_weight(stored, start, stop)

    def fp8_block(self, name: str) -> tuple[int, int] | None:
        stored = self._as_stored(name)
        return None if stored is None else self.inner.fp8_block(stored)

    def close(self) -> None:
        self.inner.close()
