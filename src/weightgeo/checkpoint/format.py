"""What a checkpoint format is: how to recognise it, open it and judge a folder of it complete.

Each format module (:mod:`.hf`, :mod:`.lora`, :mod:`.verl`, ...) defines one :class:`Format`; :mod:`.registry`
lists them in the order they are tried. :func:`~weightgeo.checkpoint.open_checkpoint` opens a source with the
first format that recognises it, and :func:`~weightgeo.checkpoint.completeness.checkpoint_status` runs every
format's completeness check on a folder. A format reads only from modules below it (its reader classes, other
formats' lower-level openers); none calls back into the resolver.

>>> import torch
>>> from weightgeo.checkpoint.state_dict import StateDictCheckpoint
>>> fmt = Format(
...     "demo",
...     "a {name: Tensor} dict",
...     recognise=lambda s: isinstance(s.value, dict),
...     open=lambda s: StateDictCheckpoint(s.value),
...     complete=nothing_to_check,
... )
>>> fmt.recognise(Source({"w": torch.ones(2)}, "demo")), fmt.recognise(Source([1], "demo"))
(True, False)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from ._files import read_config
from .base import Checkpoint

__all__ = ["Format", "Source", "FolderFiles", "Findings", "Run", "nothing_to_check"]

T = TypeVar("T")


@dataclass(frozen=True)
class Source:
    """What is being opened, with :func:`~weightgeo.checkpoint.open_checkpoint`'s keyword arguments.

    Attributes:
        value: the object given (a mapping, a module, a hub id ``str``), a :class:`~pathlib.Path` once it is an
            existing local file or folder, or an opened :class:`Checkpoint` (for formats that wrap one).
        text: how messages and ``Checkpoint.source`` name it (the path, or the hub id as given).
        base: ``base=`` (for a format with ``needs_base``, the base already opened as a :class:`Checkpoint`).
        revision: ``revision=`` (hub ids).
        config: the explicit ``config=``, parsed (``None`` when not given).
    """

    value: Any
    text: str
    base: Any = None
    revision: str | None = None
    config: dict[str, Any] | None = None

    @property
    def folder(self) -> Path | None:
        """The local folder being opened, else ``None``."""
        return self.value if isinstance(self.value, Path) and self.value.is_dir() else None

    @property
    def file(self) -> Path | None:
        """The local file being opened (anything at an existing path that is not a folder), else ``None``."""
        return self.value if isinstance(self.value, Path) and not self.value.is_dir() else None

    @property
    def checkpoint(self) -> Checkpoint | None:
        """The opened checkpoint a wrapping format looks at, else ``None``."""
        return self.value if isinstance(self.value, Checkpoint) else None

    def at(self, value: Any) -> Source:
        """The same request, named as before, for another object (a hub id's snapshot folder)."""
        return replace(self, value=value)

    def base_config(self) -> dict[str, Any]:
        """The paired base's config (architecture numbers for a native fine-tune), when it is at hand."""
        if isinstance(self.base, Checkpoint):
            return dict(self.base.config)
        if isinstance(self.base, (str, os.PathLike)) and Path(self.base).is_dir():
            return read_config(Path(self.base))
        return {}


class Run:
    """The run directory a checkpoint folder sits in; facts about it (is it an HF Trainer run? what do its
    tracker files say?) are computed on first use and shared by the checks of all its folders in one scan."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._facts: dict[str, Any] = {}

    def fact(self, key: str, compute: Callable[[Path], T]) -> T:
        """``compute(root)``, once per run and ``key``."""
        if key not in self._facts:
            self._facts[key] = compute(self.root)
        value: T = self._facts[key]
        return value


@dataclass(frozen=True)
class FolderFiles:
    """A checkpoint folder as completeness checks see it: every regular file under it (all depths) with its
    size, walked once, and the run it belongs to. Checks read names, sizes, headers and small marker files only."""

    path: Path
    sizes: dict[Path, int]
    step: int | None
    run: Run

    @property
    def top(self) -> set[str]:
        """Names of the files directly in the folder."""
        return {p.name for p in self.sizes if p.parent == self.path}


@dataclass
class Findings:
    """What the checks of one folder found: problems ``(kind, reason)`` in the order found, the formats seen, the
    completion marker satisfied, and whether any weight file was seen."""

    problems: list[tuple[str, str]] = field(default_factory=list)
    formats: list[str] = field(default_factory=list)
    marker: str | None = None
    weights: bool = False

    def add(self, problem: str, reason: str) -> None:
        self.problems.append((problem, reason))

    def saw(self, fmt: str) -> None:
        if fmt not in self.formats:
            self.formats.append(fmt)

    def mark(self, marker: str, *, override: bool = False) -> None:
        """Record a satisfied completion marker; the first one stays unless ``override`` (the marker written
        after all the others, e.g. the HF Trainer's ``trainer_state.json``)."""
        if override or self.marker is None:
            self.marker = marker


def nothing_to_check(folder: FolderFiles, found: Findings) -> None:
    """The completeness check of a format with nothing of its own to check: in-memory sources and hub ids (no
    run folder holds them), wrappers (they read another format's files), formats whose files are safetensors or
    ``torch.save`` files only (:mod:`.hf` checks every such file, whoever wrote it)."""


@dataclass(frozen=True)
class Format:
    """One checkpoint format.

    Attributes:
        name: short name (``"hf"``, ``"dcp"``, ...), unique in the registry.
        summary: what it reads and how it is recognised, in one line (docs/checkpoints.md has the long form).
        recognise: ``recognise(source) -> bool``: cheap (file names, types, small JSON files; no tensor data).
        open: ``open(source) -> Checkpoint``, or a :class:`Source` to be opened in its place (a hub id's snapshot
            folder), by the first format that recognises that.
        complete: ``complete(folder, found)``: add the problems of ``folder`` that this format can see (its file
            sets, headers, markers) to ``found``; run on every folder a scan looks at, whatever wrote it.
        needs_base: ``open`` gets ``source.base`` opened as a :class:`Checkpoint` (adapters apply to a base).
        wraps: recognises and opens an opened checkpoint (``source.checkpoint``), applied after the format that
            opened it (FP8 dequantisation).
    """

    name: str
    summary: str
    recognise: Callable[[Source], bool]
    open: Callable[[Source], Checkpoint | Source]
    complete: Callable[[FolderFiles, Findings], None]
    needs_base: bool = False
    wraps: bool = False
