"""What a training run's folder holds besides checkpoints: the one grammar of step-folder names, temporary
names, and the tracker files that name the last step saved.

Opening (:func:`~weightgeo.checkpoint.open_checkpoint`'s run-folder hint), scanning
(:func:`~weightgeo.checkpoint.completeness.scan_run`), streams and follow mode all read folder names with
:func:`step_of`, so a naming added to :data:`STEP_NAMINGS` is known everywhere at once.

>>> step_of("checkpoint-40"), step_of("step_7"), step_of("tmp-iter_0000100"), step_of("logs")
((40, 'checkpoint-N', False), (7, 'step_N', False), (100, 'iter_N', True), (None, None, False))
"""

from __future__ import annotations

import re
from pathlib import Path

from ..validation import either

__all__ = [
    "step_folders",
    "run_folder_message",
    "STEP_NAMINGS",
    "NAMINGS_TEXT",
    "step_of",
    "MEGATRON_TRACKER",
    "DEEPSPEED_LATEST",
    "TRACKERS",
    "read_tracker",
]

#: checkpoint folder names and the step they carry, ``(naming, pattern)``: HF Trainer, verl, DeepSpeed,
#: Megatron / slime, torchtitan, torchtune and others
STEP_NAMINGS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("checkpoint-N", re.compile(r"^checkpoint-(\d+)$")),
    ("global_step_N", re.compile(r"^global_step_(\d+)$")),
    ("global_stepN", re.compile(r"^global_step(\d+)$")),
    ("iter_N", re.compile(r"^iter_(\d+)$")),
    ("step-N", re.compile(r"^step-(\d+)$")),
    ("step_N", re.compile(r"^step_(\d+)$")),
)
#: the namings in words, for messages and help texts
NAMINGS_TEXT = ", ".join(n for n, _ in STEP_NAMINGS[:-1]) + f" or {STEP_NAMINGS[-1][0]}"

# A trainer writes into a temporary folder and renames it when done (transformers 4.36-4.38: tmp-checkpoint-N).
_TEMP_PREFIX = re.compile(r"^(?:tmp|temp)[-_]", re.IGNORECASE)
_TEMP_SUFFIX = re.compile(r"\.(?:tmp|temp|partial|incomplete)$", re.IGNORECASE)
_TRAILING_STEP = re.compile(r"(\d+)$")

#: Megatron's (and verl's) tracker at the run root: the iteration of the last complete save
MEGATRON_TRACKER = "latest_checkpointed_iteration.txt"
#: DeepSpeed's tracker: the tag (``global_stepN``) of the last complete save, at the run root or inside an HF
#: Trainer checkpoint
DEEPSPEED_LATEST = "latest"
#: tracker file -> what wrote it (the name :attr:`CheckpointStatus.formats` reports)
TRACKERS: dict[str, str] = {MEGATRON_TRACKER: "megatron_tracker", DEEPSPEED_LATEST: "deepspeed"}


def step_of(name: str) -> tuple[int | None, str | None, bool]:
    """``(step, naming, temporary)`` of a checkpoint folder name; step and naming are ``None`` if unrecognised.

    >>> step_of("global_step_40"), step_of("step-40.tmp"), step_of("checkpoint-x")
    ((40, 'global_step_N', False), (40, 'step-N', True), (None, None, False))
    """
    bare = _TEMP_SUFFIX.sub("", _TEMP_PREFIX.sub("", name))
    temporary = bare != name
    for naming, pattern in STEP_NAMINGS:
        m = pattern.match(bare)
        if m:
            return int(m.group(1)), naming, temporary
    return None, None, temporary


def step_folders(folder: Path) -> list[Path]:
    """The checkpoint folders directly inside ``folder`` (any naming of :data:`STEP_NAMINGS`, temporary ones left
    out), in step order: what makes ``folder`` a training run's output folder.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> for n in ("checkpoint-20", "checkpoint-3", "tmp-checkpoint-30", "logs"):
    ...     (d / n).mkdir()
    >>> [p.name for p in step_folders(d)]
    ['checkpoint-3', 'checkpoint-20']
    """
    found = []
    try:
        for p in folder.iterdir():
            step, _, temporary = step_of(p.name)
            if step is not None and not temporary and p.is_dir():
                found.append((step, p))
    except OSError:
        return []
    return [p for _, p in sorted(found)]


def run_folder_message(folder: Path, steps: list[Path], *, holds: str) -> str:
    """What to say about a training run's output folder given where one checkpoint was expected: it is one,
    which checkpoints it holds, and the two ways on (one checkpoint, or the run as a stream), in the syntax of
    the interface in use. ``holds``: what the folder holds at its top instead of a model."""
    names = [p.name for p in steps]
    shown = ", ".join(names[:4] + (["..."] if len(names) > 4 else []) + names[-1:] * (len(names) > 4))
    follow = either(f"weightgeo.rank_curve({str(folder)!r})", f"`weightgeo trajectory {folder}`")
    return (
        f"{folder} is a training run folder, not one checkpoint: it holds {len(names)} checkpoint folder(s) "
        f"({shown}) and {holds}; compare one checkpoint, e.g. {steps[-1]} (the newest), or follow the whole run "
        f"with {follow}"
    )


def read_tracker(path: Path) -> tuple[str, int | str | None] | None:
    """A tracker file's ``(name, content)``: the step it names (trailing digits of a tag), else the text itself,
    ``None`` when it is unreadable or empty; ``None`` altogether when there is no such file.

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "latest"
    >>> _ = p.write_text("global_step40\\n")
    >>> read_tracker(p), read_tracker(p.with_name("nope"))
    (('latest', 40), None)
    """
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return path.name, None
    m = _TRAILING_STEP.search(text)
    if m:
        return path.name, int(m.group(1))
    return path.name, (text or None)
