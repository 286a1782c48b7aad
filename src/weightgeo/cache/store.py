"""The on-disk result cache: one safetensors file per entry, written atomically, checked on every read.

An entry holds a JSON row (any :func:`~weightgeo.cache.codec.encode_row`-able value) and optional tensors,
stored bit for bit. Layout::

    <root>/CACHEDIR.TAG
    <root>/v1/<weightgeo version>/<digest[:2]>/<digest>.safetensors

>>> import tempfile, torch
>>> cache = ResultCache(tempfile.mkdtemp(), version="0.1.0")
>>> key = cache.key("pair_row", inputs=[{"file": "a", "tensor": "w"}], options={"k": 4}, policy="p1")
>>> cache.get(key) is None
True
>>> cache.put(key, {"name": "w", "nss": 0.25}, {"S": torch.tensor([2.0, 1.0], dtype=torch.float64)})
True
>>> e = cache.get(key)
>>> e.row, e.tensors["S"].tolist(), (cache.stats.hits, cache.stats.misses)
({'name': 'w', 'nss': 0.25}, [2.0, 1.0], (1, 1))

Writes go to a unique temporary file in the entry's folder, are flushed (and fsynced unless ``fsync=False``),
then renamed over the entry with ``os.replace``: readers see the old entry or the new one, never a part, and
several processes may fill one cache at once (the last writer of a key wins; both wrote the same result).
Every read checks the entry's format, weightgeo version, full key text, length and sha256 checksum (of the
row text and every tensor's name, dtype, shape and bytes): a truncated, corrupt or foreign entry is ignored,
counted in :attr:`ResultCache.stats` and left to be overwritten by the recomputed result.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..errors import WeightgeoError
from ..validation import check_amount, check_int
from .codec import decode_row, encode_row
from .keys import CacheKey, result_key

__all__ = ["ResultCache", "CacheEntry", "CacheStats", "CacheInfo", "PruneResult", "FORMAT", "sum_counts"]

#: entry file format; entries live under ``<root>/v<FORMAT>/``
FORMAT = 1
_MAGIC = "weightgeo_cache"
_SUFFIX = ".safetensors"
_STALE_TMP_S = 3600.0  # a temporary file this old belongs to a writer that was killed
_CACHEDIR_TAG = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# This file is a cache directory tag created by weightgeo (result cache).\n"
    "# For information about cache directory tags see https://bford.info/cachedir/\n"
)


@dataclass
class CacheStats:
    """What one :class:`ResultCache` object did: every :meth:`~ResultCache.get` counts once in exactly one of
    ``hits``, ``misses`` (no entry), ``corrupt`` (truncated / unreadable / checksum mismatch) and ``foreign``
    (another format, weightgeo version or key); every :meth:`~ResultCache.put` in ``writes`` or
    ``write_errors``."""

    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    foreign: int = 0
    writes: int = 0
    write_errors: int = 0
    bytes_read: int = 0
    bytes_written: int = 0

    @property
    def lookups(self) -> int:
        return self.hits + self.misses + self.corrupt + self.foreign

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class CacheEntry:
    """One entry read back: ``row`` and ``tensors`` exactly as stored (tensors on CPU), plus provenance."""

    key: str
    kind: str
    row: Any
    tensors: dict[str, torch.Tensor]
    created: float
    version: str


@dataclass(frozen=True)
class CacheInfo:
    """What a cache folder holds (from :meth:`ResultCache.info`)."""

    root: Path
    entries: int
    bytes: int
    by_version: dict[str, dict[str, int]]
    temp_files: int
    other_formats: tuple[str, ...]
    oldest: float | None
    newest: float | None

    def __str__(self) -> str:
        lines = [f"weightgeo cache at {self.root}: {self.entries} entries, {_human(self.bytes)}"]
        for v, d in sorted(self.by_version.items()):
            lines.append(f"  version {v:<16} {d['entries']:>8} entries  {_human(d['bytes']):>10}")
        if self.oldest is not None and self.newest is not None:
            lines.append(f"  last used: oldest {_ago(self.oldest)}, newest {_ago(self.newest)}")
        if self.temp_files:
            lines.append(f"  {self.temp_files} temporary file(s) of unfinished writes")
        if self.other_formats:
            lines.append(f"  other cache formats present: {', '.join(self.other_formats)}")
        return "\n".join(lines)


@dataclass(frozen=True)
class PruneResult:
    """What :meth:`ResultCache.prune` removed (or would remove, with ``dry_run``), and what is left."""

    removed: int
    freed_bytes: int
    kept: int
    kept_bytes: int
    reasons: dict[str, int] = field(default_factory=dict)
    dry_run: bool = False

    def __str__(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        why = ", ".join(f"{n} {r}" for r, n in sorted(self.reasons.items()) if n)
        return (
            f"{verb} {self.removed} file(s), {_human(self.freed_bytes)}"
            + (f" ({why})" if why else "")
            + f"; kept {self.kept} entries, {_human(self.kept_bytes)}"
        )


class _Corrupt(Exception):
    pass


class _Foreign(Exception):
    pass


class ResultCache:
    """Per-tensor results and reusable decompositions on disk, keyed by what determines them.

    Args:
        root: the cache folder (created on first write).
        version: the weightgeo version entries are written and accepted for (default: this weightgeo's).
        fsync: flush each entry to disk before renaming it into place (default). Without it a power loss may
            leave a truncated entry, which reads detect and ignore; a killed process never can.

    Attributes:
        stats: a :class:`CacheStats` of this object's lookups and writes (thread-safe counters).
    """

    def __init__(self, root: str | os.PathLike[str], *, version: str | None = None, fsync: bool = True) -> None:
        if version is None:
            from .._version import __version__ as version
        self.root = Path(root).expanduser()
        self.version = str(version)
        self.fsync = bool(fsync)
        self.stats = CacheStats()
        self._lock = threading.Lock()
        self._warned: set[str] = set()

    def __repr__(self) -> str:
        return f"ResultCache({str(self.root)!r}, version={self.version!r})"

    # --- keys ---------------------------------------------------------------------------------------------
    def key(
        self,
        kind: str,
        *,
        inputs: Sequence[Mapping[str, Any] | None],
        metrics: Iterable[str] = (),
        options: Any = None,
        policy: str,
    ) -> CacheKey | None:
        """The key of a result (see :func:`~weightgeo.cache.keys.result_key`), or ``None`` when an input has no
        identity (``Checkpoint.identity`` returned ``None``: in-memory sources are never cached)."""
        present = [i for i in inputs if i is not None]
        if len(present) < len(inputs):
            return None
        return result_key(kind, inputs=present, metrics=metrics, options=options, policy=policy, version=self.version)

    def path(self, key: CacheKey) -> Path:
        """Where the entry of ``key`` lives."""
        return self._version_dir(self.version) / key.digest[:2] / f"{key.digest}{_SUFFIX}"

    # --- reading ------------------------------------------------------------------------------------------
    def get(self, key: CacheKey | None) -> CacheEntry | None:
        """The entry of ``key`` if a valid one exists, else ``None`` (counted as a miss, corrupt or foreign)."""
        if key is None:
            return None
        path = self.path(key)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            self._count(misses=1)
            return None
        except OSError as e:
            self._warn("read", f"weightgeo cache: cannot read {path} ({e}); recomputing")
            self._count(misses=1)
            return None
        try:
            entry = self._decode(key, data)
        except _Foreign:
            self._count(foreign=1)
            return None
        except _Corrupt:
            self._count(corrupt=1)
            return None
        self._count(hits=1, bytes_read=len(data))
        try:
            os.utime(path)  # age = time since last used, for prune(older_than=...)
        except OSError:
            pass
        return entry

    def _decode(self, key: CacheKey, data: bytes) -> CacheEntry:
        if len(data) < 8:
            raise _Corrupt("shorter than the 8-byte header length")
        n = int.from_bytes(data[:8], "little")
        if n > len(data) - 8:
            raise _Corrupt("header cut short")
        try:
            header = json.loads(data[8 : 8 + n])
        except (UnicodeDecodeError, ValueError) as e:
            raise _Corrupt(f"header is not JSON ({e})") from None
        meta = header.get("__metadata__") if isinstance(header, dict) else None
        if not isinstance(meta, dict) or _MAGIC not in meta:
            raise _Foreign("not a weightgeo cache entry")
        if meta[_MAGIC] != str(FORMAT) or meta.get("weightgeo_version") != self.version or meta.get("key") != key.text:
            raise _Foreign("another format, version or key")
        try:
            if len(data) != 8 + n + int(meta["data_bytes"]):
                raise _Corrupt("length differs from the recorded one (truncated)")
            tensors = st_load(data)
            row_text = meta["row"]
            if _checksum(row_text, tensors) != meta["sha256"]:
                raise _Corrupt("checksum mismatch")
            return CacheEntry(
                key.digest,
                str(meta.get("kind", "")),
                decode_row(row_text),
                tensors,
                float(meta.get("created", "nan")),
                self.version,
            )
        except _Corrupt:
            raise
        except Exception as e:
            raise _Corrupt(f"{type(e).__name__}: {e}") from None

    # --- writing ------------------------------------------------------------------------------------------
    def put(self, key: CacheKey | None, row: Any = None, tensors: Mapping[str, torch.Tensor] | None = None) -> bool:
        """Store ``row`` (JSON-able, see :func:`~weightgeo.cache.codec.encode_row`) and ``tensors`` under ``key``.

        Returns ``True`` when written; ``False`` (with one warning per cause) when the cache cannot be written
        (read-only or full disk): a cache never makes an analysis fail. Bad rows or tensors raise.
        """
        if key is None:
            return False
        row_text = encode_row(row)
        payload = _cpu_tensors(tensors or {})
        meta = {
            _MAGIC: str(FORMAT),
            "weightgeo_version": self.version,
            "kind": key.kind,
            "key": key.text,
            "row": row_text,
            "sha256": _checksum(row_text, payload),
            "created": repr(time.time()),
            "data_bytes": str(sum(t.numel() * t.element_size() for t in payload.values())),
        }
        data = st_save(payload, metadata=meta)
        path = self.path(key)
        try:
            try:
                self._write(path, key, data)
            except FileNotFoundError:  # a concurrent prune removed the empty folder between mkdir and mkstemp
                self._write(path, key, data)
        except OSError as e:
            self._warn(
                f"write:{type(e).__name__}",
                f"weightgeo cache: cannot write under {self.root} ({e}); results are computed but not cached",
            )
            self._count(write_errors=1)
            return False
        self._count(writes=1, bytes_written=len(data))
        return True

    def _write(self, path: Path, key: CacheKey, data: bytes) -> None:
        tmp: str | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._tag_root()
            fd, tmp = tempfile.mkstemp(prefix=f".{key.digest[:16]}.", suffix=".tmp", dir=path.parent)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            raise

    def _tag_root(self) -> None:
        tag = self.root / "CACHEDIR.TAG"
        if tag.exists():
            return
        try:
            with open(tag, "x", encoding="ascii") as f:
                f.write(_CACHEDIR_TAG)
        except OSError:
            pass  # another process made it, or the root is not writable (the entry write will say so)

    # --- maintenance --------------------------------------------------------------------------------------
    def info(self) -> CacheInfo:
        """Entries and bytes, per weightgeo version, of this cache folder (a directory walk; nothing is read)."""
        by_version: dict[str, dict[str, int]] = {}
        temp = 0
        mtimes = []
        for kind, version, _path, size, mtime in self._files():
            if kind == "tmp":
                temp += 1
            elif kind == "entry":
                d = by_version.setdefault(version, {"entries": 0, "bytes": 0})
                d["entries"] += 1
                d["bytes"] += size
                mtimes.append(mtime)
        return CacheInfo(
            self.root,
            sum(d["entries"] for d in by_version.values()),
            sum(d["bytes"] for d in by_version.values()),
            by_version,
            temp,
            tuple(self._other_formats()),
            min(mtimes, default=None),
            max(mtimes, default=None),
        )

    def prune(
        self,
        *,
        older_than: float | timedelta | None = None,
        max_bytes: int | None = None,
        other_versions: bool = True,
        dry_run: bool = False,
    ) -> PruneResult:
        """Remove entries: of other weightgeo versions and cache formats (``other_versions``), not used for
        ``older_than`` (seconds or a ``timedelta``), then the least recently used until at most ``max_bytes``
        remain. Temporary files of writers killed over an hour ago always go.

        Safe while other processes use the cache: a removed entry is just a miss for them.
        """
        age = older_than.total_seconds() if isinstance(older_than, timedelta) else older_than
        if age is not None:
            age = check_amount(age, "prune: older_than", unit="seconds (or a timedelta)", finite=False)
        if max_bytes is not None:
            max_bytes = check_int(max_bytes, "prune: max_bytes", minimum=0, what="bytes")
        now = time.time()
        mine = self._version_dir(self.version).name
        remove: list[tuple[Path, int, str]] = []
        keep: list[tuple[Path, int, float]] = []
        for kind, version, path, size, mtime in self._files():
            if kind == "tmp":
                if now - mtime > _STALE_TMP_S:
                    remove.append((path, size, "stale temporary"))
            elif other_versions and (kind == "other_format" or version != mine):
                remove.append((path, size, "other version"))
            elif kind == "entry" and age is not None and now - mtime > age:
                remove.append((path, size, "older than"))
            elif kind == "entry":
                keep.append((path, size, mtime))
        if max_bytes is not None:
            keep.sort(key=lambda e: e[2])  # least recently used first
            total = sum(s for _, s, _ in keep)
            while keep and total > max_bytes:
                path, size, _ = keep.pop(0)
                remove.append((path, size, "over max_bytes"))
                total -= size
        reasons: dict[str, int] = {}
        freed = 0
        for path, size, why in remove:
            if not dry_run:
                try:
                    path.unlink()
                except FileNotFoundError:
                    continue
                except OSError as e:
                    self._warn("prune", f"weightgeo cache: cannot remove {path} ({e})")
                    continue
            reasons[why] = reasons.get(why, 0) + 1
            freed += size
        if not dry_run:
            self._remove_empty_dirs()
        return PruneResult(sum(reasons.values()), freed, len(keep), sum(s for _, s, _ in keep), reasons, dry_run)

    def _version_dir(self, version: str) -> Path:
        return self.root / f"v{FORMAT}" / re.sub(r"[^A-Za-z0-9._+-]", "_", version)

    def _other_formats(self) -> list[str]:
        try:
            return sorted(
                p.name
                for p in self.root.iterdir()
                if p.is_dir() and re.fullmatch(r"v\d+", p.name) and p.name != f"v{FORMAT}"
            )
        except OSError:
            return []

    def _files(self) -> Iterator[tuple[str, str, Path, int, float]]:
        """``(kind, version dir, path, size, mtime)`` of every file: kind ``entry``, ``tmp`` or
        ``other_format``."""
        fmt_dir = self.root / f"v{FORMAT}"
        for other in self._other_formats():
            for path, size, mtime in _walk_files(self.root / other):
                yield "other_format", other, path, size, mtime
        try:
            versions = [p for p in fmt_dir.iterdir() if p.is_dir()]
        except OSError:
            return
        for vdir in versions:
            for path, size, mtime in _walk_files(vdir):
                if path.name.endswith(".tmp"):
                    yield "tmp", vdir.name, path, size, mtime
                elif path.name.endswith(_SUFFIX):
                    yield "entry", vdir.name, path, size, mtime

    def _remove_empty_dirs(self) -> None:
        keep = self.root / f"v{FORMAT}"
        for top in [keep, *(self.root / o for o in self._other_formats())]:
            for d, _subdirs, _files in os.walk(top, topdown=False):  # children before their parents
                if Path(d) != keep:
                    try:
                        os.rmdir(d)  # only empty folders go; a concurrent writer re-creates its own
                    except OSError:
                        pass

    # --- bookkeeping --------------------------------------------------------------------------------------
    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, d in deltas.items():
                setattr(self.stats, name, getattr(self.stats, name) + d)

    def _warn(self, cause: str, message: str) -> None:
        with self._lock:
            if cause in self._warned:
                return
            self._warned.add(cause)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def sum_counts(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Counters of several passes (every rank's ``meta["cache"]``) added up: integers summed, the rest from the
    first.

    >>> sum_counts([{"hits": 2, "root": "/c"}, {"hits": 3, "root": "/c"}])
    {'hits': 5, 'root': '/c'}
    """
    out = dict(parts[0])
    for p in parts[1:]:
        for key, v in p.items():
            if isinstance(v, int) and not isinstance(v, bool):
                out[key] = out.get(key, 0) + v
    return out


def _cpu_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors with storages of their own (safetensors refuses shared storage)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(name, str) or not name:
            raise WeightgeoError(f"cache entry: tensor names must be non-empty strings, got {name!r}")
        if not isinstance(t, torch.Tensor) or t.is_sparse:
            raise WeightgeoError(f"cache entry: {name!r} must be a dense torch.Tensor, got {type(t).__name__}")
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _checksum(row_text: str, tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of the row text and of each tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256(row_text.encode("utf-8"))
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.contiguous().view(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _walk_files(top: Path) -> Iterator[tuple[Path, int, float]]:
    for d, _dirs, files in os.walk(top):
        for name in files:
            p = Path(d) / name
            try:
                st = p.stat()
            except OSError:
                continue
            yield p, st.st_size, st.st_mtime


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def _ago(t: float) -> str:
    s = max(0.0, time.time() - t)
    if s < 120:
        return f"{s:.0f} s ago"
    if s < 7200:
        return f"{s / 60:.0f} min ago"
    if s < 172800:
        return f"{s / 3600:.0f} h ago"
    return f"{s / 86400:.0f} days ago"
