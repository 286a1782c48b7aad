"""The Hugging Face layout: ``model.safetensors`` or ``pytorch_model.bin`` (sharded with an index), any
``*.safetensors``, a single weight file; and the HF Trainer's ``checkpoint-N`` folders around them.

Recognised: a folder holding one of :data:`WEIGHT_FILES` (used in that order of preference) or any
``*.safetensors`` (all of them, one checkpoint: ``consolidated.safetensors`` ...); a ``.safetensors``,
``.bin``/``.pt``/``.pth`` or ``*.index.json`` file. ``config.json`` next to the weights becomes
``Checkpoint.config``.

Complete when every safetensors header is valid (a file shorter than its header's data end is truncated), every
index names shards that exist, a ``name-0000k-of-0000N`` shard set is whole and has its index (transformers writes
the index after the shards), every ``torch.save`` zip file ends with its zip directory (torch writes it last; this
covers verl's and DeepSpeed's ``.pt`` files too), and, in an HF Trainer checkpoint, ``trainer_state.json`` is
there and readable (``Trainer._save_checkpoint`` writes it after weights, optimizer, scheduler and RNG state).

>>> import tempfile, torch
>>> from pathlib import Path
>>> from safetensors.torch import save_file
>>> d = Path(tempfile.mkdtemp())
>>> save_file({"w": torch.ones(2, 2)}, str(d / "model.safetensors"))
>>> type(open_folder(d, source=str(d))).__name__, has_weight_files(d)
('SafetensorsCheckpoint', True)
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import WeightgeoError
from ._files import INDEX_SUFFIX, read_config, read_index, read_json_object
from .base import Checkpoint
from .format import Findings, FolderFiles, Format, Source
from .runs import run_folder_message, step_folders, step_of
from .safetensors import SUFFIX, SafetensorsCheckpoint, read_header
from .torch_bin import SUFFIXES, TorchBinCheckpoint, zip_problem

__all__ = [
    "FORMAT",
    "WEIGHT_FILES",
    "SAFETENSORS_FILES",
    "TRAINER_STATE",
    "TRAINER_FILES",
    "SHARD",
    "has_weight_files",
    "open_folder",
    "open_file",
]

#: the weight files of an HF model folder, in the order of preference
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
#: the safetensors ones among them
SAFETENSORS_FILES = WEIGHT_FILES[:2]
#: what the HF Trainer writes last into ``checkpoint-N``: its completion marker
TRAINER_STATE = "trainer_state.json"
#: what the HF Trainer writes into ``checkpoint-N`` besides the model; any of them marks a Trainer checkpoint
TRAINER_FILES = ("training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth")
_RNG_STATE = "rng_state"  # rng_state.pth, and rng_state_<process>.pth in multi-process runs
_RANK_RNG_STATE = re.compile(r"^rng_state_\d+\.pth$")
#: a shard of a set: ``<stem>-0000k-of-0000N.<safetensors|bin>``
SHARD = re.compile(r"^(?P<stem>.+)-(?P<k>\d{5})-of-(?P<n>\d{5})\.(?P<ext>safetensors|bin)$")
_TRAINER_NAMING = "checkpoint-N"  # the HF Trainer's step folders (runs.STEP_NAMINGS)


def has_weight_files(folder: Path, *, safetensors_only: bool = False) -> bool:
    """Whether ``folder`` holds one of :data:`WEIGHT_FILES` (of :data:`SAFETENSORS_FILES` with ``safetensors_only``)."""
    return any((folder / n).is_file() for n in (SAFETENSORS_FILES if safetensors_only else WEIGHT_FILES))


def open_folder(folder: Path, *, source: str) -> Checkpoint:
    """The HF model in ``folder``: the first of :data:`WEIGHT_FILES` present, else all its ``*.safetensors``.

    Raises:
        WeightgeoError: no HF weights in ``folder``, or what the readers raise for bad files.
    """
    own = read_config(folder)
    st, st_index, pt, pt_index = (folder / n for n in WEIGHT_FILES)
    if st.is_file():
        return SafetensorsCheckpoint([st], source=source, config=own)
    if st_index.is_file():
        return SafetensorsCheckpoint.from_index(st_index, source=source, config=own)
    if pt.is_file():
        return TorchBinCheckpoint([pt], source=source, config=own)
    if pt_index.is_file():
        return TorchBinCheckpoint.from_index(pt_index, source=source, config=own)
    others = sorted(folder.glob(f"*{SUFFIX}"))
    steps = step_folders(folder)
    if others and steps:  # a run's output folder (eval.safetensors, ...): its checkpoints are what to compare
        raise WeightgeoError(
            run_folder_message(
                folder,
                steps,
                holds=f"no model at its top ({', '.join(p.name for p in others[:3])} "
                f"are not named as model weights: {', '.join(WEIGHT_FILES[::2])})",
            )
        )
    if others:  # non-standard names (consolidated.safetensors, ...): all of them, one checkpoint
        return SafetensorsCheckpoint(others, source=source, config=own)
    raise WeightgeoError(f"{folder}: no Hugging Face weights ({', '.join(WEIGHT_FILES)} or *{SUFFIX})")


def open_file(path: Path) -> Checkpoint:
    """One weight file (``.safetensors``, ``.bin``/``.pt``/``.pth``) or a shard index (``*.index.json``)."""
    config = read_config(path.parent)
    name = path.name
    if name.endswith(INDEX_SUFFIX):
        _, _, shards = read_index(path)
        if all(s.endswith(SUFFIX) for s in shards):
            return SafetensorsCheckpoint.from_index(path, config=config)
        return TorchBinCheckpoint.from_index(path, config=config)
    if name.endswith(SUFFIX):
        return SafetensorsCheckpoint([path], config=config)
    return TorchBinCheckpoint([path], config=config)


def _recognise(source: Source) -> bool:
    if source.folder is not None:
        return has_weight_files(source.folder) or any(source.folder.glob(f"*{SUFFIX}"))
    return source.file is not None and source.file.name.endswith((INDEX_SUFFIX, SUFFIX, *SUFFIXES))


def _open(source: Source) -> Checkpoint:
    if source.folder is not None:
        return open_folder(source.folder, source=source.text)
    assert source.file is not None  # recognised: a folder or a file
    return open_file(source.file)


# --- completeness -------------------------------------------------------------------------------------------
def _complete(folder: FolderFiles, found: Findings) -> None:
    for p, size in folder.sizes.items():
        if p.name.endswith(SUFFIX):
            found.saw("safetensors")
            try:
                read_header(p)
            except WeightgeoError as e:
                found.add("bad_file", str(e))
        elif p.name.endswith(INDEX_SUFFIX):
            _check_index(p, found)
        elif p.suffix in SUFFIXES:
            found.saw("torch")
            bad = zip_problem(p, size)
            if bad:
                found.add("bad_file", f"{p}: {bad}")
        if p.suffix in (SUFFIX, *SUFFIXES) and p.name not in TRAINER_FILES and not p.name.startswith(_RNG_STATE):
            found.weights = True
    _check_shard_sets(set(folder.sizes), found)
    _check_trainer(folder, found)


def _check_index(path: Path, found: Findings) -> None:
    try:
        read_index(path)
        return
    except WeightgeoError as e:
        error = str(e)
    try:  # which listed shards are absent? (an index is written after its shards)
        wm = read_json_object(path, what="shard index").get("weight_map", {})
        missing = sorted({s for s in wm.values() if isinstance(s, str) and not (path.parent / s).exists()})
    except (WeightgeoError, AttributeError):
        missing = []
    if missing:
        found.add("missing_files", f"{path}: names shard(s) {missing[:4]} that do not exist")
    else:
        found.add("bad_file", error)


def _check_shard_sets(names: set[Path], found: Findings) -> None:
    sets: dict[tuple[Path, str, int, str], set[int]] = {}
    for p in names:
        m = SHARD.match(p.name)
        if m:
            sets.setdefault((p.parent, m["stem"], int(m["n"]), m["ext"]), set()).add(int(m["k"]))
    for (parent, stem, n, ext), have in sorted(sets.items(), key=lambda kv: str(kv[0])):
        missing = sorted(set(range(1, n + 1)) - have)
        if missing:
            found.add(
                "missing_files",
                f"{parent}: shards {[f'{stem}-{k:05d}-of-{n:05d}.{ext}' for k in missing[:3]]} of {n} are missing",
            )
        index = parent / f"{stem}.{ext}{INDEX_SUFFIX}"
        if index not in names and not any(q.parent == parent and q.name.endswith(INDEX_SUFFIX) for q in names):
            found.add(
                "missing_files",
                f"{parent}: {n} {stem}-*-of-{n:05d}.{ext} shards but no index "
                f"({index.name}), which is written after them",
            )


def _trainer_folder(name: str) -> bool:
    """Named as the HF Trainer names its checkpoints; a temporary folder is not held to the Trainer's marker (it is
    reported as temporary)."""
    _, naming, temporary = step_of(name)
    return naming == _TRAINER_NAMING and not temporary


def _trainer_run(root: Path) -> bool:
    """Whether a sibling checkpoint shows that ``root`` is an HF Trainer run (its ``trainer_state.json``)."""
    try:
        return any(_trainer_folder(c.name) and (c / TRAINER_STATE).is_file() for c in root.iterdir())
    except OSError:
        return False


def _check_trainer(folder: FolderFiles, found: Findings) -> None:
    top = folder.top
    trainer_files = any(n in top for n in TRAINER_FILES) or any(_RANK_RNG_STATE.match(n) for n in top)
    trainer_run = _trainer_folder(folder.path.name) and folder.run.fact("hf_trainer", _trainer_run)
    if not (TRAINER_STATE in top or trainer_files or trainer_run):
        return
    found.saw("hf_trainer")
    state = folder.path / TRAINER_STATE
    if TRAINER_STATE not in top:
        found.add(
            "no_marker",
            f"{folder.path}: no {TRAINER_STATE}, which the HF Trainer writes last (after "
            f"weights, optimizer and RNG state): the save has not finished",
        )
        return
    try:
        read_json_object(state, what=TRAINER_STATE)
        found.mark(TRAINER_STATE, override=True)  # written after everything else: it is the marker
    except WeightgeoError as e:
        found.add("no_marker", f"{str(e)[:300]} (a save still being written, or a damaged file)")


FORMAT = Format(
    "hf",
    "Hugging Face weights: model.safetensors / pytorch_model.bin [+ index], any *.safetensors, or one weight file",
    recognise=_recognise,
    open=_open,
    complete=_complete,
)
