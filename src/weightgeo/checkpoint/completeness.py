"""Is a checkpoint folder completely written? Cheap checks only: names, sizes, headers, completion markers.

A run that is still training, or was killed, leaves checkpoints that are half written: a shard cut short, an
index naming a shard not written yet, an empty folder the trainer has just created, a ``tmp-`` folder it
writes into before renaming. :func:`checkpoint_status` tells, for one folder, whether it is complete and if
not why; :func:`scan_run` does it for every checkpoint folder of a run and says which incomplete one is the
newest (probably still being written: a warning) and which are older (corrupt, or abandoned: say so loudly).

>>> import tempfile, torch
>>> from pathlib import Path
>>> from safetensors.torch import save_file
>>> run = Path(tempfile.mkdtemp())
>>> for step in (10, 20):
...     (run / f"checkpoint-{step}").mkdir()
...     save_file({"w": torch.ones(4, 4)}, str(run / f"checkpoint-{step}" / "model.safetensors"))
>>> (run / "checkpoint-30").mkdir()  # the trainer has just created it
>>> scan = scan_run(run)
>>> [s.step for s in scan.complete], [(s.step, s.problem) for s in scan.in_progress], scan.corrupt
([10, 20], [(30, 'empty')], ())

What is checked (no tensor data is read; every check reads names, sizes, headers and small marker files):

- the folder: missing, empty, holding no weight file yet (a trainer writes config files first), or temporary
  (``tmp-*``, ``*.tmp``; transformers 4.36-4.38 staged checkpoints in ``tmp-checkpoint-N``);
- each registered format's own check (:data:`~weightgeo.checkpoint.registry.FORMATS`; ``Format.complete``), run
  on every folder whatever wrote it: :mod:`.hf` (safetensors headers, shard indexes and sets, torch zip files,
  the HF Trainer's ``trainer_state.json``), :mod:`.verl` (a rank file per rank), :mod:`.dcp` (``.metadata``
  and the byte ranges it records), :mod:`.deepspeed` (``latest`` beside a ``global_stepN`` folder);
- the run's tracker files (:data:`~weightgeo.checkpoint.runs.TRACKERS`): Megatron / verl
  ``latest_checkpointed_iteration.txt`` at the run root naming a step >= this one; DeepSpeed ``latest`` at the run
  root naming a tag of a step >= this one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import WeightgeoError
from . import registry
from .format import Findings, FolderFiles, Run
from .runs import TRACKERS, read_tracker, step_of

__all__ = ["CheckpointStatus", "RunScan", "checkpoint_status", "scan_run", "step_of", "PROBLEMS"]

#: machine-readable problem kinds, in the order they are reported when a folder has several
PROBLEMS = ("missing", "temporary", "empty", "missing_files", "bad_file", "no_weights", "no_marker")


@dataclass(frozen=True)
class CheckpointStatus:
    """Whether one checkpoint folder is completely written, and if not why (from :func:`checkpoint_status`).

    Attributes:
        path: the folder.
        step: the training step in its name (``checkpoint-40``, ``global_step_40``, ``iter_0000040``, ...),
            or ``None``.
        complete: every check passed.
        problem: the first problem found (one of :data:`PROBLEMS`), ``None`` when complete.
        reason: that problem in words (file, sizes, what is missing), ``None`` when complete.
        problems: every ``(problem, reason)`` found, in :data:`PROBLEMS` order.
        formats: what the folder was recognised as holding (``"safetensors"``, ``"torch"``, ``"dcp"``,
            ``"hf_trainer"``, ``"megatron_tracker"``, ``"deepspeed"``, ``"verl"``).
        marker: the completion marker that was found and satisfied, ``None`` when none applies.
        files: number of files in the folder (all depths).
        last_modified: newest modification time (``time.time()`` scale) of the folder and its files.
        temporary: the name is a temporary one (``tmp-*``, ``*.tmp``).
        naming: the name pattern matched (``"checkpoint-N"``, ``"global_step_N"``, ...), ``None`` if none.
    """

    path: Path
    step: int | None
    complete: bool
    problem: str | None
    reason: str | None
    problems: tuple[tuple[str, str], ...]
    formats: tuple[str, ...]
    marker: str | None
    files: int
    last_modified: float | None
    temporary: bool
    naming: str | None

    def age_s(self, now: float | None = None) -> float | None:
        """Seconds since anything in the folder last changed (``None`` when it does not exist)."""
        if self.last_modified is None:
            return None
        return max(0.0, (time.time() if now is None else now) - self.last_modified)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form (for ``report.meta``): path as text, problems as lists."""
        d = asdict(self)
        d["path"] = str(self.path)
        d["problems"] = [list(p) for p in self.problems]
        d["formats"] = list(self.formats)
        return d


@dataclass(frozen=True)
class RunScan:
    """Every checkpoint folder of a run with its status (from :func:`scan_run`), in step order.

    Only the newest checkpoint can legitimately be in the middle of being written; an incomplete one that is
    not the newest is corrupt (a killed save, a partial copy) and should be reported loudly.
    """

    root: Path
    checkpoints: tuple[CheckpointStatus, ...]

    @property
    def complete(self) -> tuple[CheckpointStatus, ...]:
        return tuple(s for s in self.checkpoints if s.complete)

    @property
    def newest(self) -> CheckpointStatus | None:
        """The checkpoint with the highest step (a real folder before a temporary one of the same step)."""
        return self.checkpoints[-1] if self.checkpoints else None

    @property
    def in_progress(self) -> tuple[CheckpointStatus, ...]:
        """Incomplete checkpoints at the newest step: probably still being written (warn, skip, retry later)."""
        top = self.newest
        return tuple(s for s in self.checkpoints if not s.complete and top is not None and s.step == top.step)

    @property
    def corrupt(self) -> tuple[CheckpointStatus, ...]:
        """Incomplete checkpoints older than the newest that are not temporary folders: report loudly."""
        return tuple(s for s in self._older_incomplete() if not s.temporary)

    @property
    def abandoned(self) -> tuple[CheckpointStatus, ...]:
        """Temporary folders older than the newest checkpoint: left behind by a save that never finished."""
        return tuple(s for s in self._older_incomplete() if s.temporary)

    def _older_incomplete(self) -> list[CheckpointStatus]:
        top = self.newest
        return [s for s in self.checkpoints if not s.complete and top is not None and s.step != top.step]


def checkpoint_status(
    folder: str | os.PathLike[str], *, run_root: str | os.PathLike[str] | None = None
) -> CheckpointStatus:
    """Whether ``folder`` is a completely written checkpoint, from names, sizes, headers and markers only.

    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from safetensors.torch import save_file
    >>> d = Path(tempfile.mkdtemp()) / "checkpoint-10"
    >>> d.mkdir()
    >>> save_file({"w": torch.ones(64, 64)}, str(d / "model.safetensors"))
    >>> checkpoint_status(d).complete
    True
    >>> with open(d / "model.safetensors", "r+b") as f:
    ...     _ = f.truncate(1000)  # cut short, as by a killed writer
    >>> s = checkpoint_status(d)
    >>> s.complete, s.problem
    (False, 'bad_file')

    Args:
        folder: the checkpoint folder (``checkpoint-N``, ``global_step_N``, ``iter_N``, a DCP folder, ...).
        run_root: the run directory holding it, where Megatron / verl / DeepSpeed write their tracker files and
            whose sibling checkpoints show whether this is an HF Trainer run. Default: ``folder``'s parent.

    Returns:
        a :class:`CheckpointStatus`. Nothing raises for a bad checkpoint: problems are returned.
    """
    folder = Path(folder)
    return _status(folder, Run(Path(run_root) if run_root is not None else folder.parent))


def scan_run(root: str | os.PathLike[str]) -> RunScan:
    """The status of every checkpoint folder directly under ``root`` (names as :func:`step_of` knows them).

    Args:
        root: the run directory (Trainer ``output_dir``, verl ``default_local_dir``, Megatron ``--save``, ...).

    Returns:
        a :class:`RunScan`, checkpoints sorted by step (a real folder after a temporary one of the same step,
        so that it is the newest).

    Raises:
        WeightgeoError: ``root`` is not a directory.
    """
    root = Path(root)
    if not root.is_dir():
        raise WeightgeoError(
            f"run directory {root} does not exist or is not a directory; pass the folder that "
            f"holds the checkpoint folders"
        )
    run = Run(root)
    found = []
    for child in root.iterdir():
        step, naming, _ = step_of(child.name)
        if step is not None and child.is_dir():
            found.append(_status(child, run))
    found.sort(key=lambda s: (s.step, not s.temporary, s.path.name))
    return RunScan(root, tuple(found))


# ----------------------------------------------------------------------------------------------------------------
def _status(folder: Path, run: Run) -> CheckpointStatus:
    step, naming, temporary = step_of(folder.name)
    found = Findings()
    sizes: dict[Path, int] = {}
    last: float | None = None
    if not folder.is_dir():
        found.add("missing", f"{folder} does not exist or is not a directory")
    else:
        last = folder.stat().st_mtime
        for p, size, mtime in _walk(folder):
            sizes[p] = size
            last = max(last, mtime)
        if temporary:
            found.add(
                "temporary",
                f"{folder.name} is a temporary folder (a trainer writes a checkpoint there and renames it when done)",
            )
        if not sizes:
            found.add("empty", f"{folder} is empty (the trainer has created it and not yet written into it)")
        else:
            files = FolderFiles(folder, sizes, step, run)
            for fmt in registry.FORMATS:
                fmt.complete(files, found)
            if not found.weights:
                shown = sorted(str(p.relative_to(folder)) for p in sizes)[:8]
                found.add(
                    "no_weights",
                    f"{folder} holds no weight files yet (found {shown}); a trainer writes config files first",
                )
            _check_trackers(folder, step, run, found)
    found.problems.sort(key=lambda p: PROBLEMS.index(p[0]))
    first = found.problems[0] if found.problems else (None, None)
    return CheckpointStatus(
        folder,
        step,
        not found.problems,
        first[0],
        first[1],
        tuple(found.problems),
        tuple(found.formats),
        found.marker,
        len(sizes),
        last,
        temporary,
        naming,
    )


def _walk(folder: Path) -> Iterator[tuple[Path, int, float]]:
    """``(path, size, mtime)`` of every regular file under ``folder`` (symlinks followed for files only)."""
    stack = [folder]
    while stack:
        d = stack.pop()
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    stack.append(Path(e.path))
                elif e.is_file():
                    st = e.stat()
                    yield Path(e.path), st.st_size, st.st_mtime
            except OSError:
                continue


def _trackers(root: Path) -> list[tuple[str, tuple[str, int | str | None]]]:
    """``(what wrote it, (file, content))`` of every tracker file at the run root (:func:`read_tracker`)."""
    found = [(what, read_tracker(root / name)) for name, what in TRACKERS.items()]
    return [(what, t) for what, t in found if t is not None]


def _check_trackers(folder: Path, step: int | None, run: Run, found: Findings) -> None:
    """The run root's tracker files name a step at least this folder's (for folders directly in the root)."""
    if run.root.resolve() != folder.parent.resolve():
        return
    for what, (name, value) in run.fact("trackers", _trackers):
        found.saw(what)
        if value is None:
            found.add(
                "no_marker",
                f"{run.root / name}: unreadable or empty (being rewritten?); cannot confirm {folder.name} is complete",
            )
        elif isinstance(value, int) and step is not None:
            if value < step:
                found.add(
                    "no_marker",
                    f"{run.root / name} names step {value}; {folder.name} (step {step}) is newer: "
                    f"still being written, or its save failed",
                )
            else:
                found.mark(f"{name} (step {value})")
        elif isinstance(value, str) and value == folder.name:
            found.mark(name)
