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

What is checked (no tensor data is read; every check reads headers, sizes and small marker files):

- files: every ``*.safetensors`` header is validated (:func:`~weightgeo.checkpoint.safetensors.read_header`:
  a file shorter than its header's data end is truncated); every ``*.index.json`` must name shards that exist
  (:func:`~weightgeo.checkpoint._files.read_index`'s rules); a ``name-0000k-of-0000N`` shard set must be
  complete and have its index (transformers writes the index after the shards); torch zip files (``.bin``,
  ``.pt``, ``.pth``) must end with their zip directory (torch writes it last); verl's
  ``model_world_size_W_rank_R.pt`` must exist for every rank; a torch.distributed.checkpoint folder must hold
  ``.metadata`` (DCP renames it into place after every rank's data is written) and every data file it names
  must be as long as the byte ranges it records.
- markers (the file a trainer writes last): HF Trainer ``trainer_state.json`` (``_save_checkpoint`` writes
  it after weights, optimizer, scheduler and RNG state; required when the folder or a sibling checkpoint
  shows it is a Trainer run); Megatron / verl ``latest_checkpointed_iteration.txt`` at the run root naming
  a step ≥ this one; DeepSpeed ``latest`` at the run root naming a tag of a step ≥ this one, or inside an HF
  checkpoint naming its ``global_step*`` folder.
- folders: empty, holding no weights, or temporary (``tmp-*``, ``*.tmp``; transformers 4.36–4.38 staged
  checkpoints in ``tmp-checkpoint-N``).
"""

from __future__ import annotations

import json
import os
import re
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import WeightgeoError
from ._files import read_index
from .pickles import load_dcp_metadata
from .safetensors import read_header

__all__ = ["CheckpointStatus", "RunScan", "checkpoint_status", "scan_run", "step_of", "PROBLEMS"]

#: machine-readable problem kinds, in the order they are reported when a folder has several
PROBLEMS = ("missing", "temporary", "empty", "missing_files", "bad_file", "no_weights", "no_marker")

# Checkpoint folder names and the step they carry: HF Trainer, verl, DeepSpeed, Megatron, torchtitan/torchtune.
_NAMINGS = (
    ("checkpoint-N", re.compile(r"^checkpoint-(\d+)$")),
    ("global_step_N", re.compile(r"^global_step_(\d+)$")),
    ("global_stepN", re.compile(r"^global_step(\d+)$")),
    ("iter_N", re.compile(r"^iter_(\d+)$")),
    ("step-N", re.compile(r"^step-(\d+)$")),
    ("step_N", re.compile(r"^step_(\d+)$")),
)
_TEMP_PREFIX = re.compile(r"^(?:tmp|temp)[-_]", re.IGNORECASE)
_TEMP_SUFFIX = re.compile(r"\.(?:tmp|temp|partial|incomplete)$", re.IGNORECASE)
_SHARD = re.compile(r"^(?P<stem>.+)-(?P<k>\d{5})-of-(?P<n>\d{5})\.(?P<ext>safetensors|bin)$")
_VERL_RANK = re.compile(r"^model_world_size_(\d+)_rank_(\d+)\.pt$")
_TORCH_EXT = (".bin", ".pt", ".pth")
_WEIGHT_EXT = (".safetensors", ".distcp") + _TORCH_EXT
# What the HF Trainer writes into checkpoint-N besides the model; any of them marks a Trainer checkpoint.
_TRAINER_FILES = ("training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth")
_TRAINER_STATE = "trainer_state.json"
_MEGATRON_TRACKER = "latest_checkpointed_iteration.txt"
_DEEPSPEED_LATEST = "latest"
_NOT_WEIGHTS = frozenset(_TRAINER_FILES)


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


def step_of(name: str) -> tuple[int | None, str | None, bool]:
    """``(step, naming, temporary)`` of a checkpoint folder name; step and naming are ``None`` if unrecognised.

    >>> step_of("checkpoint-40"), step_of("tmp-checkpoint-40"), step_of("iter_0000100"), step_of("logs")
    ((40, 'checkpoint-N', False), (40, 'checkpoint-N', True), (100, 'iter_N', False), (None, None, False))
    """
    bare = _TEMP_SUFFIX.sub("", _TEMP_PREFIX.sub("", name))
    temporary = bare != name
    for naming, pattern in _NAMINGS:
        m = pattern.match(bare)
        if m:
            return int(m.group(1)), naming, temporary
    return None, None, temporary


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
    root = Path(run_root) if run_root is not None else folder.parent
    return _status(folder, _RunContext.read(root))


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
    ctx = _RunContext.read(root)
    found = []
    for child in root.iterdir():
        step, naming, _ = step_of(child.name)
        if step is not None and child.is_dir():
            found.append(_status(child, ctx))
    found.sort(key=lambda s: (s.step, not s.temporary, s.path.name))
    return RunScan(root, tuple(found))


# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _RunContext:
    """What the run root says about its checkpoints: tracker files, and whether it is an HF Trainer run."""

    root: Path
    tracker: tuple[str, int | str | None] | None  # (file name, step / "release" / None when unreadable)
    deepspeed_latest: tuple[str, int | str | None] | None  # (file name, step of the tag / tag / None)
    hf_trainer: bool

    @classmethod
    def read(cls, root: Path) -> _RunContext:
        tracker = _tracker(root / _MEGATRON_TRACKER)
        ds = _tracker(root / _DEEPSPEED_LATEST)
        hf = False
        try:
            for child in root.iterdir():
                if child.name.startswith("checkpoint-") and (child / _TRAINER_STATE).is_file():
                    hf = True
                    break
        except OSError:
            pass
        return cls(root, tracker, ds, hf)


def _tracker(path: Path) -> tuple[str, int | str | None] | None:
    """A tracker file's content: the step it names (trailing digits of a tag), ``"release"``, or None."""
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return path.name, None
    m = re.search(r"(\d+)$", text)
    if m:
        return path.name, int(m.group(1))
    return path.name, (text or None)


class _Findings:
    def __init__(self) -> None:
        self.problems: list[tuple[str, str]] = []
        self.formats: list[str] = []
        self.marker: str | None = None

    def add(self, problem: str, reason: str) -> None:
        self.problems.append((problem, reason))

    def fmt(self, name: str) -> None:
        if name not in self.formats:
            self.formats.append(name)


def _status(folder: Path, ctx: _RunContext) -> CheckpointStatus:
    step, naming, temporary = step_of(folder.name)
    found = _Findings()
    files: list[tuple[Path, int]] = []
    last: float | None = None
    if not folder.is_dir():
        found.add("missing", f"{folder} does not exist or is not a directory")
    else:
        last = folder.stat().st_mtime
        for p, size, mtime in _walk(folder):
            files.append((p, size))
            last = max(last, mtime)
        if temporary:
            found.add(
                "temporary",
                f"{folder.name} is a temporary folder (a trainer writes a checkpoint there and renames it when done)",
            )
        if not files:
            found.add("empty", f"{folder} is empty (the trainer has created it and not yet written into it)")
        else:
            _check_files(folder, files, found)
            _check_markers(folder, step, files, ctx, found)
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
        len(files),
        last,
        temporary,
        naming,
    )


def _walk(folder: Path):
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


def _check_files(folder: Path, files: list[tuple[Path, int]], found: _Findings) -> None:
    names = {p for p, _ in files}
    weights = [
        p
        for p, _ in files
        if p.suffix in _WEIGHT_EXT and p.name not in _NOT_WEIGHTS and not p.name.startswith("rng_state")
    ]
    for p, size in files:
        if p.name.endswith(".safetensors"):
            found.fmt("safetensors")
            try:
                read_header(p)
            except WeightgeoError as e:
                found.add("bad_file", str(e))
        elif p.name.endswith(".index.json"):
            _check_index(p, found)
        elif p.suffix in _TORCH_EXT:
            found.fmt("torch")
            bad = _zip_problem(p, size)
            if bad:
                found.add("bad_file", f"{p}: {bad}")
    _check_shard_sets(names, found)
    _check_verl_ranks(names, found)
    if any(p.name == ".metadata" or p.suffix == ".distcp" or p.name == ".metadata.tmp" for p in names):
        _check_dcp(folder, dict(files), found)
    if not weights and not any(p.name == ".metadata" for p in names):
        shown = sorted(str(p.relative_to(folder)) for p in names)[:8]
        found.add(
            "no_weights", f"{folder} holds no weight files yet (found {shown}); a trainer writes config files first"
        )


def _check_index(path: Path, found: _Findings) -> None:
    try:
        read_index(path)
        return
    except WeightgeoError as e:
        error = str(e)
    try:  # which listed shards are absent? (an index is written after its shards)
        wm = json.loads(path.read_text(encoding="utf-8")).get("weight_map", {})
        missing = sorted({s for s in wm.values() if isinstance(s, str) and not (path.parent / s).exists()})
    except (OSError, ValueError, AttributeError):
        missing = []
    if missing:
        found.add("missing_files", f"{path}: names shard(s) {missing[:4]} that do not exist")
    else:
        found.add("bad_file", error)


def _check_shard_sets(names: set[Path], found: _Findings) -> None:
    sets: dict[tuple[Path, str, int, str], set[int]] = {}
    for p in names:
        m = _SHARD.match(p.name)
        if m:
            sets.setdefault((p.parent, m["stem"], int(m["n"]), m["ext"]), set()).add(int(m["k"]))
    for (parent, stem, n, ext), have in sorted(sets.items(), key=lambda kv: str(kv[0])):
        missing = sorted(set(range(1, n + 1)) - have)
        if missing:
            found.add(
                "missing_files",
                f"{parent}: shards {[f'{stem}-{k:05d}-of-{n:05d}.{ext}' for k in missing[:3]]} of {n} are missing",
            )
        index = parent / f"{stem}.{ext}.index.json"
        if index not in names and not any(q.parent == parent and q.name.endswith(".index.json") for q in names):
            found.add(
                "missing_files",
                f"{parent}: {n} {stem}-*-of-{n:05d}.{ext} shards but no index "
                f"({index.name}), which is written after them",
            )


def _check_verl_ranks(names: set[Path], found: _Findings) -> None:
    by_dir: dict[tuple[Path, int], set[int]] = {}
    for p in names:
        m = _VERL_RANK.match(p.name)
        if m:
            by_dir.setdefault((p.parent, int(m.group(1))), set()).add(int(m.group(2)))
    for (parent, world), ranks in sorted(by_dir.items(), key=lambda kv: str(kv[0])):
        found.fmt("verl")
        missing = sorted(set(range(world)) - ranks)
        if missing:
            found.add(
                "missing_files",
                f"{parent}: model_world_size_{world}_rank_R.pt missing for ranks {missing[:8]} of {world}",
            )


def _zip_problem(path: Path, size: int) -> str | None:
    """Why a torch zip file is unreadable, or None. Legacy (pre-zip) pickles cannot be checked cheaply."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        return f"cannot read ({e})"
    if magic != b"PK\x03\x04":
        return None if size > 0 else "empty file"
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        return (
            f"truncated or corrupt torch zip file ({size} bytes; {e}); torch writes the zip directory last, "
            f"so the save did not finish"
        )
    end = max((i.header_offset + len(i.FileHeader()) + i.compress_size for i in infos), default=0)
    if end > size:
        return f"truncated torch zip file: records end at byte {end} but the file has {size} bytes"
    return None


def _check_dcp(folder: Path, sizes: dict[Path, int], found: _Findings) -> None:
    """torch.distributed.checkpoint: ``.metadata`` is renamed into place once every rank's data is written."""
    found.fmt("dcp")
    names = set(sizes)
    for d in sorted({p.parent for p in names if p.suffix == ".distcp" or p.name.startswith(".metadata")}):
        meta = d / ".metadata"
        if meta not in names:
            pending = " (.metadata.tmp present: being written)" if (d / ".metadata.tmp") in names else ""
            found.add("no_marker", f"{d}: DCP data files but no .metadata, which DCP writes last{pending}")
            continue
        try:
            ranges = _dcp_ranges(meta)
        except Exception as e:
            found.add("bad_file", f"{meta}: unreadable DCP metadata ({type(e).__name__}: {str(e)[:120]})")
            continue
        found.marker = found.marker or ".metadata"
        need: dict[str, int] = {}
        for rel, end in ranges:
            need[rel] = max(need.get(rel, 0), end)
        for rel, end in sorted(need.items()):
            if os.path.basename(rel) != rel or rel in ("", ".", ".."):
                found.add("bad_file", f"{meta}: data file {rel!r} is not a plain file name")
                continue
            p = d / rel
            if p not in sizes:
                found.add("missing_files", f"{meta}: names data file {rel} that does not exist")
            elif sizes[p] < end:
                found.add("bad_file", f"{p}: truncated: {sizes[p]} bytes, but .metadata records data up to byte {end}")


def _dcp_ranges(meta: Path) -> list[tuple[str, int]]:
    """``(relative data file, end byte)`` of every stored item recorded in a DCP ``.metadata`` (read with the
    checkpoint layer's restricted unpickler: nothing is imported or run beyond DCP's own metadata classes)."""
    storage = load_dcp_metadata(meta).storage_data
    return [(info.relative_path, int(info.offset) + int(info.length)) for info in storage.values()]


def _check_markers(
    folder: Path, step: int | None, files: list[tuple[Path, int]], ctx: _RunContext, found: _Findings
) -> None:
    top = {p.name for p, _ in files if p.parent == folder}
    trainer_files = any(n in top for n in _TRAINER_FILES) or any(
        n.startswith("rng_state_") and n.endswith(".pth") for n in top
    )
    if _TRAINER_STATE in top or trainer_files or (ctx.hf_trainer and folder.name.startswith("checkpoint-")):
        found.fmt("hf_trainer")
        state = folder / _TRAINER_STATE
        if _TRAINER_STATE not in top:
            found.add(
                "no_marker",
                f"{folder}: no {_TRAINER_STATE}, which the HF Trainer writes last (after "
                f"weights, optimizer and RNG state): the save has not finished",
            )
        else:
            try:
                obj = json.loads(state.read_text(encoding="utf-8"))
                if not isinstance(obj, dict):
                    raise ValueError(f"a JSON {type(obj).__name__}, not an object")
                found.marker = _TRAINER_STATE
            except (OSError, ValueError) as e:
                found.add("no_marker", f"{state}: not readable JSON ({str(e)[:100]}): still being written?")
    for ctx_marker, what in ((ctx.tracker, "megatron_tracker"), (ctx.deepspeed_latest, "deepspeed")):
        if ctx_marker is None or ctx.root.resolve() != folder.parent.resolve():
            continue
        name, value = ctx_marker
        found.fmt(what)
        if value is None:
            found.add(
                "no_marker",
                f"{ctx.root / name}: unreadable or empty (being rewritten?); cannot confirm {folder.name} is complete",
            )
        elif isinstance(value, int) and step is not None:
            if value < step:
                found.add(
                    "no_marker",
                    f"{ctx.root / name} names step {value}; {folder.name} (step {step}) is newer: "
                    f"still being written, or its save failed",
                )
            else:
                found.marker = found.marker or f"{name} (step {value})"
        elif isinstance(value, str) and value == folder.name:
            found.marker = found.marker or name
    inner = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("global_step")] if folder.is_dir() else []
    if inner:  # DeepSpeed under the HF Trainer: checkpoint-N/global_stepN/ and checkpoint-N/latest
        found.fmt("deepspeed")
        latest = folder / _DEEPSPEED_LATEST
        if not latest.is_file():
            found.add(
                "no_marker",
                f"{folder}: DeepSpeed folder(s) {[p.name for p in inner]} but no "
                f"'{_DEEPSPEED_LATEST}' file, which DeepSpeed writes after them",
            )
            return
        tag = latest.read_text(encoding="utf-8", errors="replace").strip()
        if not tag or os.path.basename(tag) != tag or not (folder / tag).is_dir():
            found.add("no_marker", f"{latest} names {tag!r}, which is not a folder here")
        else:
            found.marker = found.marker or _DEEPSPEED_LATEST
