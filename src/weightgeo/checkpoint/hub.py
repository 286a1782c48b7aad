"""Hugging Face Hub ids -> a local snapshot folder, with the index validated before shards are fetched.

Online: ``config.json`` and ``model.safetensors.index.json`` are fetched first and the index is checked
(plain shard names); only then ``snapshot_download(..., allow_patterns=["*.safetensors", "*.json"])``
fetches the weights. With ``HF_HUB_OFFLINE=1`` only the local cache is used, and a repo that is not cached
raises :class:`~weightgeo.WeightgeoError` saying how to get it.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

from ..errors import WeightgeoError
from ._files import CONFIG, read_json_object, safe_shard_name
from .format import Format, Source, nothing_to_check
from .hf import SAFETENSORS_FILES
from .safetensors import SUFFIX

__all__ = ["FORMAT", "resolve_hub", "is_hub_id", "hub_offline"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
_ALLOW = [f"*{SUFFIX}", "*.json"]
_INDEX = SAFETENSORS_FILES[1]


def is_hub_id(text: str) -> bool:
    """Whether ``text`` looks like ``org/name`` (optionally ``org/name@revision``).

    >>> is_hub_id("Qwen/Qwen3-8B"), is_hub_id("Qwen/Qwen3-8B@main"), is_hub_id("./runs/x"), is_hub_id("a/b/c")
    (True, True, False, False)
    """
    repo, _, rev = text.partition("@")
    if "@" in text and not rev:
        return False
    return bool(_HUB_ID.match(repo)) and ".." not in repo and not repo.endswith((".", "-"))


def hub_offline() -> bool:
    """Whether huggingface_hub is in offline mode (``HF_HUB_OFFLINE``), read at call time.

    >>> isinstance(hub_offline(), bool)
    True
    """
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE) or env
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return env


def _fix(repo_id: str, revision: str | None) -> str:
    # `hf` is huggingface_hub's command line (>= 0.34; `huggingface-cli` is gone from 1.0); its --include takes
    # one pattern per flag (a second bare pattern would be read as a file name)
    rev = f" --revision {shlex.quote(revision)}" if revision else ""
    return (
        f"run once online (unset HF_HUB_OFFLINE), or `hf download {shlex.quote(repo_id)}{rev} "
        f"--include '*.safetensors' --include '*.json'`, or pass a local checkpoint path"
    )


def resolve_hub(repo_id: str, *, revision: str | None = None, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The local snapshot folder of hub model ``repo_id`` (downloaded unless offline).

    Args:
        repo_id: ``org/name``.
        revision: branch, tag or commit (default ``main``).
        cache_dir: the huggingface_hub cache (default: ``HF_HUB_CACHE``).

    Raises:
        WeightgeoError: bad id, repo/revision not found, an unsafe shard index, or (offline) not cached.
    """
    try:
        import huggingface_hub as hf
        from huggingface_hub import errors as hf_errors
    except ImportError:  # pragma: no cover
        raise WeightgeoError(f"{repo_id}: opening hub ids needs huggingface_hub; pip install huggingface_hub") from None
    if not isinstance(repo_id, str) or not is_hub_id(repo_id) or "@" in repo_id:
        raise WeightgeoError(f"{repo_id!r} is not a hub repo id of the form 'org/name'; pass a hub id or a local path")
    offline = hub_offline()
    where = f"hub repo {repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        if not offline:
            _check_remote_index(hf, hf_errors, repo_id, revision, cache_dir)
        snapshot = hf.snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=None if cache_dir is None else os.fspath(cache_dir),
            allow_patterns=_ALLOW,
            local_files_only=offline,
        )
    except WeightgeoError:
        raise
    except (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError, hf_errors.GatedRepoError) as e:
        raise WeightgeoError(
            f"{where}: {type(e).__name__} (missing, private or gated); check the id and "
            f"revision, log in with `hf auth login`, or pass a local path"
        ) from None
    except (
        hf_errors.LocalEntryNotFoundError,
        hf_errors.OfflineModeIsEnabled,
        getattr(hf_errors, "IncompleteSnapshotError", hf_errors.LocalEntryNotFoundError),
    ) as e:
        mode = "HF_HUB_OFFLINE is set and it is not" if offline else "the Hub is unreachable and it is not"
        raise WeightgeoError(
            f"{where}: {mode} in the local cache ({type(e).__name__}); {_fix(repo_id, revision)}"
        ) from None
    except (hf_errors.HfHubHTTPError, OSError, ValueError) as e:
        raise WeightgeoError(
            f"{where}: download failed ({type(e).__name__}: {str(e)[:200]}); {_fix(repo_id, revision)}"
        ) from None
    folder = Path(snapshot)
    index = folder / _INDEX
    if index.is_file():
        _validate_index_names(index)
    return folder


def _check_remote_index(hf, hf_errors, repo_id: str, revision: str | None, cache_dir) -> None:
    """Fetch config.json and the shard index (small) and validate them before any shard is downloaded."""
    for name in (CONFIG, _INDEX):
        try:
            path = hf.hf_hub_download(repo_id, name, revision=revision, cache_dir=cache_dir)
        except hf_errors.LocalEntryNotFoundError:
            return  # the Hub is unreachable: snapshot_download falls back to the cache (validated after)
        except hf_errors.EntryNotFoundError:
            continue  # adapters have no config.json; unsharded models have no index
        if name == _INDEX:
            _validate_index_names(Path(path))
        else:
            read_json_object(Path(path), what=CONFIG)


def _validate_index_names(index: Path) -> None:
    obj = read_json_object(index, what="shard index")
    wm = obj.get("weight_map")
    if not isinstance(wm, dict) or not wm:
        raise WeightgeoError(
            f"{index}: shard index has no weight_map object; the repo's index is broken, "
            f"pick another revision or report it to the repo owner"
        )
    for shard in set(wm.values()):
        safe_shard_name(index, shard)


# --- the format ---------------------------------------------------------------------------------------------
def _recognise(source: Source) -> bool:
    # the resolver leaves a str as it is only when no such local path exists
    return isinstance(source.value, str) and is_hub_id(source.value)


def _open(source: Source) -> Source:
    repo, _, rev = source.value.partition("@")
    if rev and source.revision and rev != source.revision:
        raise WeightgeoError(
            f"{source.value!r}: revision {rev!r} in the id conflicts with revision={source.revision!r}; give one"
        )
    return source.at(resolve_hub(repo, revision=rev or source.revision))  # opened by the format of its files


FORMAT = Format(
    "hub",
    "a Hugging Face Hub id org/name[@revision] that is no local path: its snapshot folder, opened by its format",
    recognise=_recognise,
    open=_open,
    complete=nothing_to_check,
)
