"""The on-disk result cache: one safetensors file per entry, written atomically, checked on every read.

An entry holds a JSON row (any :func:`~weightgeo.cache.codec.encode_row`-able value) and optional tensors,
stored bit for bit. Layout::

    <root>/CACHEDIR.TAG
    <root>/v2/<weightgeo version>+<code fingerprint>/<digest[:2]>/<digest>.safetensors

>>> import tempfile, torch
>>> cache = ResultCache(tempfile.mkdtemp(), version="0.1.0", code="c0de")
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
Every read checks, before trusting a byte, that the entry is a regular file with a bounded header; then the
entry's format, weightgeo version, full key text (which holds the code fingerprint), length and sha256
checksum (of the row text and every tensor's name, dtype, shape and bytes), and, where the caller gives one,
that the row and tensors have the structure the caller expects (``validate``): an entry that fails any check,
however it fails (truncated, a hostile or deeply nested header, wrong types), is ignored, counted in
:attr:`ResultCache.stats` and left to be overwritten by the recomputed result. Reading an entry never raises.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..errors import WeightgeoError
from ..jsonfile import loads
from ..outputs import publish
from ..validation import check_amount, check_int
from .codec import decode_row, encode_row
from .fingerprint import code_fingerprint
from .keys import CacheKey, result_key

__all__ = ["ResultCache", "CacheEntry", "CacheStats", "CacheInfo", "PruneResult", "FORMAT", "sum_counts"]

#: entry file format; entries live under ``<root>/v<FORMAT>/`` (2: version folders name the code fingerprint)
FORMAT = 2
_MAGIC = "weightgeo_cache"
_SUFFIX = ".safetensors"
_STALE_TMP_S = 3600.0  # a temporary file this old belongs to a writer that was killed
_MAX_HEADER = 100 << 20  # the safetensors format's own bound on a header
_MAX_ENTRY = 4 << 30  # the largest entry: a base decomposition of a 8192-wide matrix is 0.5 GB
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
    unreadable: int = 0  # folders that could not be listed (their entries are not counted)
    current: str = ""  # the version folder this weightgeo reads and writes (``<version>+<code fingerprint>``)

    def __str__(self) -> str:
        lines = [f"weightgeo cache at {self.root}: {self.entries} entries, {_human(self.bytes)}"]
        for v, d in sorted(self.by_version.items()):
            mine = "  (this weightgeo)" if v == self.current else ""
            lines.append(f"  version {v:<24} {d['entries']:>8} entries  {_human(d['bytes']):>10}{mine}")
        if self.oldest is not None and self.newest is not None:
            lines.append(f"  last used: oldest {_ago(self.oldest)}, newest {_ago(self.newest)}")
        if self.temp_files:
            lines.append(f"  {self.temp_files} temporary file(s) of unfinished writes")
        if self.other_formats:
            lines.append(f"  other cache formats present: {', '.join(self.other_formats)}")
        if self.unreadable:
            lines.append(f"  {self.unreadable} folder(s) could not be read (permissions?): not counted above")
        return "\n".join(lines)


@dataclass(frozen=True)
class PruneResult:
    """What :meth:`ResultCache.prune` removed (or would remove, with ``dry_run``), and what is left.

    ``failed`` files were to be removed but could not be (a read-only cache, another owner's files), and
    ``unreadable`` folders could not be listed: both stay, and :attr:`ok` is false (the command line then
    exits with status 1); ``errors`` names the first few, with the reason."""

    removed: int
    freed_bytes: int
    kept: int
    kept_bytes: int
    reasons: dict[str, int] = field(default_factory=dict)
    dry_run: bool = False
    failed: int = 0
    failed_bytes: int = 0
    unreadable: int = 0
    errors: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """Whether everything asked for was done (nothing failed to be removed, every folder was listed)."""
        return not self.failed and not self.unreadable

    def __str__(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        why = ", ".join(f"{n} {r}" for r, n in sorted(self.reasons.items()) if n)
        text = (
            f"{verb} {self.removed} file(s), {_human(self.freed_bytes)}"
            + (f" ({why})" if why else "")
            + f"; kept {self.kept} entries, {_human(self.kept_bytes)}"
        )
        if self.failed:
            text += f"; FAILED to remove {self.failed} file(s), {_human(self.failed_bytes)}, which remain"
        if self.unreadable:
            text += f"; {self.unreadable} folder(s) could not be read, their entries were not counted"
        if self.errors:
            text += " (" + "; ".join(self.errors) + ")"
        return text


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
        code: the code fingerprint keys and folders are made with (default:
            :func:`~weightgeo.cache.fingerprint.code_fingerprint`, this process's computing modules).

    Attributes:
        stats: a :class:`CacheStats` of this object's lookups and writes (thread-safe counters).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        version: str | None = None,
        fsync: bool = True,
        code: str | None = None,
    ) -> None:
        if version is None:
            from .._version import __version__ as version
        self.root = Path(root).expanduser()
        self.version = str(version)
        self.code = code_fingerprint() if code is None else str(code)
        self.fsync = bool(fsync)
        self.stats = CacheStats()
        self._lock = threading.Lock()
        self._warned: set[str] = set()

    def __repr__(self) -> str:
        return f"ResultCache({str(self.root)!r}, version={self.version!r}, code={self.code!r})"

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
        return result_key(
            kind, inputs=present, metrics=metrics, options=options, policy=policy, version=self.version, code=self.code
        )

    def path(self, key: CacheKey) -> Path:
        """Where the entry of ``key`` lives."""
        return self._version_dir() / key.digest[:2] / f"{key.digest}{_SUFFIX}"

    # --- reading ------------------------------------------------------------------------------------------
    def get(self, key: CacheKey | None, *, validate: Callable[[CacheEntry], object] | None = None) -> CacheEntry | None:
        """The entry of ``key`` if a valid one exists, else ``None`` (counted as a miss, corrupt or foreign).

        ``validate``: checks the entry's row and tensors have the structure the caller uses (raises anything
        when not); an entry it refuses counts as corrupt. Never raises: whatever the file holds, the caller gets
        an entry it can use or ``None`` (and recomputes).
        """
        if key is None:
            return None
        path = self.path(key)
        try:
            data = _read_entry(path)
        except FileNotFoundError:
            self._count(misses=1)
            return None
        except _Corrupt:
            self._count(corrupt=1)
            return None
        except OSError as e:
            self._warn("read", f"weightgeo cache: cannot read {path} ({e}); recomputing")
            self._count(misses=1)
            return None
        try:
            entry = self._decode(key, data)
            if validate is not None:
                validate(entry)
        except _Foreign:
            self._count(foreign=1)
            return None
        except Exception:  # _Corrupt, or anything a hostile entry makes the decoding or the caller's check raise
            self._count(corrupt=1)
            return None
        self._count(hits=1, bytes_read=len(data))
        try:
            os.utime(path)  # age = time since last used, for prune(older_than=...)
        except OSError:
            pass
        return entry

    def _decode(self, key: CacheKey, data: bytes) -> CacheEntry:
        n = int.from_bytes(data[:8], "little")
        header = loads(data[8 : 8 + n], source="cache entry", what="header")
        meta = header.get("__metadata__") if isinstance(header, dict) else None
        if not isinstance(meta, dict) or _MAGIC not in meta:
            raise _Foreign("not a weightgeo cache entry")
        if meta[_MAGIC] != str(FORMAT) or meta.get("weightgeo_version") != self.version or meta.get("key") != key.text:
            raise _Foreign("another format, version or key")
        if not all(isinstance(v, str) for v in meta.values()):
            raise _Corrupt("metadata values must be strings")
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
            publish(tmp)  # private while written; then the mode the umask gives a new file
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
        errors: list[OSError] = []
        for kind, version, _path, size, mtime in self._files(errors):
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
            unreadable=len(errors),
            current=self._version_dir().name,
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
        mine = self._version_dir().name
        remove: list[tuple[Path, int, str]] = []
        keep: list[tuple[Path, int, float]] = []
        walk_errors: list[OSError] = []
        for kind, version, path, size, mtime in self._files(walk_errors):
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
        freed = failed = failed_bytes = 0
        errors = [f"cannot list {e.filename}: {e.strerror or e}" for e in walk_errors[:3]]
        for path, size, why in remove:
            if not dry_run:
                try:
                    path.unlink()
                except FileNotFoundError:
                    continue
                except OSError as e:  # a read-only cache, another user's files: they stay, and the result says so
                    failed += 1
                    failed_bytes += size
                    if len(errors) < 3:
                        errors.append(f"cannot remove {path}: {e.strerror or e}")
                    continue
            reasons[why] = reasons.get(why, 0) + 1
            freed += size
        if not dry_run:
            self._remove_empty_dirs()
        return PruneResult(
            sum(reasons.values()),
            freed,
            len(keep),
            sum(s for _, s, _ in keep),
            reasons,
            dry_run,
            failed=failed,
            failed_bytes=failed_bytes,
            unreadable=len(walk_errors),
            errors=tuple(errors),
        )

    def _version_dir(self) -> Path:
        """This cache's folder of entries: its weightgeo version and code fingerprint (other folders hold entries
        this process can never be served: ``prune`` removes them)."""
        return self.root / f"v{FORMAT}" / re.sub(r"[^A-Za-z0-9._+-]", "_", f"{self.version}+{self.code}")

    def _other_formats(self) -> list[str]:
        try:
            return sorted(
                p.name
                for p in self.root.iterdir()
                if p.is_dir() and re.fullmatch(r"v\d+", p.name) and p.name != f"v{FORMAT}"
            )
        except OSError:
            return []

    def _files(self, errors: list[OSError] | None = None) -> Iterator[tuple[str, str, Path, int, float]]:
        """``(kind, version dir, path, size, mtime)`` of every file: kind ``entry``, ``tmp`` or
        ``other_format``; folders that cannot be listed go to ``errors``."""
        errors = [] if errors is None else errors
        fmt_dir = self.root / f"v{FORMAT}"
        for other in self._other_formats():
            for path, size, mtime in _walk_files(self.root / other, errors):
                yield "other_format", other, path, size, mtime
        try:
            versions = [p for p in fmt_dir.iterdir() if p.is_dir()]
        except FileNotFoundError:
            return
        except OSError as e:
            errors.append(e)
            return
        for vdir in versions:
            for path, size, mtime in _walk_files(vdir, errors):
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


def _read_entry(path: Path) -> bytes:
    """The bytes of an entry file, refusing (``_Corrupt``) what is not a plain file of a plausible size with a
    bounded header, before reading it (a FIFO, a device, a multi-GB file, a header length beyond the file)."""
    if not stat.S_ISREG(os.stat(path).st_mode):  # FileNotFoundError: a miss
        raise _Corrupt(f"{path} is not a regular file")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8 or size > _MAX_ENTRY:
            raise _Corrupt(f"{size} bytes")
        head = f.read(8)
        n = int.from_bytes(head, "little")
        if len(head) < 8 or n > _MAX_HEADER or 8 + n > size:
            raise _Corrupt("header length beyond the file")
        data = head + f.read(size - 8)
    if len(data) != size:
        raise _Corrupt("shorter than its size")
    return data


def _checksum(row_text: str, tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of the row text and of each tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256(row_text.encode("utf-8"))
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.contiguous().view(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _walk_files(top: Path, errors: list[OSError]) -> Iterator[tuple[Path, int, float]]:
    for d, _dirs, files in os.walk(top, onerror=errors.append):
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
