"""The lazy :class:`Checkpoint` every input format is turned into."""

from __future__ import annotations

import abc
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import WeightgeoError

__all__ = ["Checkpoint", "TensorInfo", "FactoredDelta", "Fp8Weight"]


@dataclass(frozen=True)
class TensorInfo:
    """What a checkpoint's header says about one tensor; nothing is read to know it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize  # itemsize also covers bool, uint and float8 dtypes


@dataclass(frozen=True)
class Fp8Weight:
    """A stored FP8 weight, or rows of one: ``codes`` [n, in] (float8: rows ``row_start .. row_start + n`` of the
    weight), ``scales`` the whole weight's [ceil(rows/b0), ceil(in/b1)] (multiplicative), ``block`` = (b0, b1),
    ``rows`` the weight's row count (``None``: ``row_start + n``). ``checkpoint.fp8.fp8_dequantize(codes, scales,
    block, row_start=row_start, rows=rows)`` gives the weight's values there."""

    codes: torch.Tensor
    scales: torch.Tensor
    block: tuple[int, int]
    row_start: int = 0
    rows: int | None = None


@dataclass(frozen=True)
class FactoredDelta:
    """A low-rank update ``ΔW = scaling · B @ A`` kept factored (PEFT LoRA).

    ``B`` is [out, r] and ``A`` is [r, in]; ``dense()`` materialises the [out, in] update in float32.
    """

    B: torch.Tensor
    A: torch.Tensor
    scaling: float

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.B.to(dtype) @ self.A.to(dtype)) * self.scaling


class Checkpoint(abc.ABC):
    """A lazy, read-only view of named tensors.

    Names, shapes and dtypes come from headers; tensor data is read only on :meth:`get` or
    :meth:`get_rows`, one tensor at a time, so memory tracks the largest tensor, not the checkpoint.
    Subclasses implement :meth:`_infos`, :meth:`_get` and optionally :meth:`_get_rows`.
    """

    #: a human-readable description of where the tensors come from (path, hub id, "state_dict", ...)
    source: str = "<unknown>"
    #: the parsed ``config.json`` when there is one (tie_word_embeddings etc.), else ``{}``
    config: dict
    #: reads are file I/O only, no torch kernels: the engine may then read ahead in a background thread.
    #: (A torch kernel there starts a second OpenMP team, whose spin-waiting halves the speed of the
    #: linear algebra running in the main thread on a small machine.)
    pure_io: bool = False
    #: stored names of 2-D weights known to be stored [in, out] whatever the config (see :meth:`in_out_layout`)
    in_out_names: frozenset[str] = frozenset()
    #: entries of the source that are not offered as tensors, each ``{"name": stored name, "reason": why}``:
    #: optimizer state, non-tensor entries, TransformerEngine ``_extra_state``, FP8 scales folded into their
    #: weights, ... (the Report lists them in ``meta["skipped"]``)
    skipped: list[dict[str, str]]

    def __init__(self) -> None:
        self.config = {}
        self.skipped = []
        self._info_cache: dict[str, TensorInfo] | None = None

    # --- to implement -----------------------------------------------------------------------
    @abc.abstractmethod
    def _infos(self) -> dict[str, TensorInfo]:
        """All tensors' metadata, keyed by stored name (read headers only)."""

    @abc.abstractmethod
    def _get(self, name: str) -> torch.Tensor:
        """The whole tensor, in its stored dtype, on CPU."""

    def _get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._get(name)[start:stop]

    # --- public -----------------------------------------------------------------------------
    @property
    def infos(self) -> dict[str, TensorInfo]:
        if self._info_cache is None:
            self._info_cache = dict(sorted(self._infos().items()))
        return self._info_cache

    def names(self) -> list[str]:
        """Stored tensor names, sorted."""
        return list(self.infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.infos[name]
        except KeyError:
            raise WeightgeoError(
                f"{self.source}: no tensor named {name!r} ({len(self.infos)} tensors present); "
                f"list them with open_checkpoint(...).names()"
            ) from None

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (stored dtype, CPU)."""
        info = self.info(name)
        t = self._get(name)
        if tuple(t.shape) != info.shape:
            raise WeightgeoError(
                f"{self.source}: tensor {name!r} has shape {tuple(t.shape)} but its header says "
                f"{info.shape}; the file is corrupt, re-save or re-download it"
            )
        return t

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Read rows ``start:stop`` of dim 0 of one tensor without reading the rest when the format allows."""
        info = self.info(name)
        if not info.shape:
            return self.get(name)
        return self._get_rows(name, start, stop)

    def factored_delta(self, name: str) -> FactoredDelta | None:
        """For adapter-backed checkpoints, the update of ``name`` kept factored; else ``None``."""
        return None

    def fp8_weight(self, name: str, start: int | None = None, stop: int | None = None) -> Fp8Weight | None:
        """For a weight stored as scaled FP8 (read dequantised by :meth:`get`), its stored codes (rows
        ``start:stop`` when given) and scales; else ``None``. Update rules that must compare what is stored
        (``weightgeo.metrics.sparsity.fp8_unchanged_count``) use it."""
        return None

    def fp8_block(self, name: str) -> tuple[int, int] | None:
        """The block size of a weight stored as scaled FP8, from headers alone (nothing is read); else ``None``."""
        return None

    def identity(self, name: str) -> dict[str, Any] | None:
        """What determines the stored bytes of tensor ``name``, as a JSON-able dict, for result caches.

        File-backed checkpoints return the file's resolved path, size, ``mtime_ns``, inode and ``ctime_ns`` plus the tensor's
        header entry, so any rewrite of the file changes it. ``None`` (the default: mappings, modules,
        anything with no on-disk identity) means results of this tensor are never cached.
        """
        return None

    def in_out_layout(self, name: str) -> bool:
        """True when the 2-D tensor ``name`` is stored [in, out] (transformers ``Conv1D``, e.g. GPT-2; for an
        expert stack, each expert: gpt-oss), so its stored right singular side is the output side. From ``config.json``'s model_type, or from the module
        classes when the source was an ``nn.Module``."""
        from .names import stored_in_out

        return name in self.in_out_names or stored_in_out(name, self.config)

    def close(self) -> None:  # noqa: B027  # an optional hook: in-memory sources hold no files
        """Release file handles (safe to call twice)."""

    def __contains__(self, name: object) -> bool:
        return name in self.infos

    def __len__(self) -> int:
        return len(self.infos)

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos)

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        n = sum(i.numel for i in self.infos.values())
        return f"{type(self).__name__}({self.source!r}, tensors={len(self)}, params={n:,})"
