"""Shared file helpers: JSON reading, HF shard indexes and shard path safety (private)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .. import jsonfile
from ..errors import WeightgeoError

_FIX = "re-download or re-save the file"
#: the HF model config file next to the weights
CONFIG = "config.json"
#: the suffix of HF shard indexes (``model.safetensors.index.json``, ``pytorch_model.bin.index.json``)
INDEX_SUFFIX = ".index.json"


def read_json_object(path: Path, *, what: str = "JSON file") -> dict[str, Any]:
    """Parse ``path`` as a JSON object (size- and depth-bounded, :mod:`weightgeo.jsonfile`), or raise
    WeightgeoError naming the file."""
    return jsonfile.read_json_object(path, what=what, fix=_FIX)


def read_config(folder: Path) -> dict[str, Any]:
    """``folder/config.json`` parsed, or ``{}`` when there is none."""
    p = Path(folder) / CONFIG
    return read_json_object(p, what=CONFIG) if p.is_file() else {}


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def safe_shard_name(index_path: Path | str, shard: object) -> str:
    """Check that an index's shard entry is a plain file name (no folders, ``..`` or absolute paths)."""
    if not isinstance(shard, str) or not shard:
        raise WeightgeoError(f"{index_path}: weight_map values must be shard file names, found {shard!r}; {_FIX}")
    if (
        shard in (".", "..")
        or "/" in shard
        or "\\" in shard
        or os.path.isabs(shard)
        or "\x00" in shard
        or (len(shard) > 1 and shard[1] == ":")
    ):
        raise WeightgeoError(
            f"{index_path}: shard {shard!r} is not a plain file name inside the checkpoint folder; "
            f"refusing to read outside it. Fix the index so that it names files next to it"
        )
    return shard


def shard_path(index_path: Path, shard: str) -> Path:
    """The validated path of shard ``shard`` of the index at ``index_path``.

    The shard must exist in the index's folder, and if it is a symlink, resolve inside that folder, or, in a
    huggingface_hub cache snapshot (``.../snapshots/<rev>/``), inside that repo's ``blobs/``.
    """
    safe_shard_name(index_path, shard)
    folder = index_path.parent
    p = folder / shard
    if not p.exists():
        present = sorted(x.name for x in folder.iterdir()) if folder.is_dir() else []
        raise WeightgeoError(
            f"{index_path}: shard {shard!r} is listed in weight_map but {p} does not exist "
            f"(folder holds {present[:12]}); re-download the missing shard or fix the index"
        )
    check_link(p, folder)
    if not p.is_file():
        raise WeightgeoError(f"{p}: shard is not a regular file; {_FIX}")
    return p


def check_link(p: Path, folder: Path) -> None:
    """Refuse a symlink that escapes ``folder`` (allowing an HF cache snapshot's ``../../blobs``)."""
    if not p.is_symlink():
        return
    real = p.resolve()
    root = folder.resolve()
    if _inside(real, root):
        return
    snap = folder.absolute()
    if snap.parent.name == "snapshots":
        blobs = (snap.parent.parent / "blobs").resolve()
        if _inside(real, blobs):
            return
    raise WeightgeoError(
        f"{p}: is a symlink to {real}, outside the checkpoint folder {folder}; refusing to follow it. "
        f"Copy the file into the folder or open the target directly"
    )


def read_index(index_path: Path) -> tuple[dict[str, str], dict[str, Any], dict[str, Path]]:
    """Parse and validate an HF ``*.index.json``: (weight_map, metadata, shard name -> path).

    Every shard is checked (plain name, exists, no escaping symlink) before any shard is read.
    """
    index_path = Path(index_path)
    obj = read_json_object(index_path, what="shard index")
    wm = obj.get("weight_map")
    if not isinstance(wm, dict) or not wm:
        raise WeightgeoError(
            f'{index_path}: shard index needs a non-empty "weight_map" object {{tensor name: shard file}}, '
            f"found {type(wm).__name__}; {_FIX}"
        )
    meta = obj.get("metadata", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise WeightgeoError(f'{index_path}: "metadata" must be an object, found {type(meta).__name__}; {_FIX}')
    for name in wm:
        if not isinstance(name, str) or not name:
            raise WeightgeoError(f"{index_path}: bad tensor name {name!r} in weight_map; {_FIX}")
    names = [safe_shard_name(index_path, s) for s in wm.values()]  # type-checks before hashing (lists, None)
    shards = {s: shard_path(index_path, s) for s in dict.fromkeys(names)}
    return dict(wm), meta, shards


def file_identity(path: Path | str) -> dict[str, Any]:
    """What identifies a file's current content without reading it: resolved path, size, ``mtime_ns``, and what
    user space cannot set back: the inode and the inode's change time ``ctime_ns``.

    ``cp -p``, ``rsync -t`` and ``tar -x`` copy a file's modification time onto new content of the same size,
    but the copy is a new inode (or, written in place, gets a new ``ctime``: every write, ``utime``, ``chmod`` or
    rename sets it to now, and nothing short of changing the clock sets it back). A moved or copied file gets a
    new identity. On Windows ``ctime`` is the creation time and the inode the file index.
    """
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError as e:
        raise WeightgeoError(f"{path}: cannot stat ({e})") from None
    return {
        "path": real,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "inode": st.st_ino,
        "ctime_ns": st.st_ctime_ns,
    }


def file_list(files: Any, what: str) -> tuple[list[Path], str]:
    """The weight files a checkpoint class was given (one path or several) and the default source text."""
    paths = [Path(files)] if isinstance(files, (str, os.PathLike)) else [Path(f) for f in files]
    if not paths:
        raise WeightgeoError(f"{what} needs at least one weight file")
    return paths, str(paths[0]) if len(paths) == 1 else str(paths[0].parent)
