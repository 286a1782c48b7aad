"""Output files: a path checked before anything is computed, and written whole or not at all.

Reports, figures and tracker states are rewritten while a user (or a follow-mode loop) may be reading them, so
every writer goes through :func:`atomic_output`: the content goes to a unique temporary file in the target's
folder, which is renamed over the target only once it is complete. Readers see the old file or the new one.
The temporary file is private while it is written (``mkstemp``: 0600); before the rename it gets the mode a new
file gets under the process's umask (:func:`publish`), as ``open()`` would give it: a colleague can read what
the umask lets them read. The result cache's entries go through :func:`publish` too.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> atomic_write_text(d / "new" / "r.json", "{}").read_text()
'{}'
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from .errors import WeightgeoError

__all__ = ["check_output_path", "atomic_output", "atomic_write_text", "publish", "current_umask"]

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux ``/proc/self/status``);
    elsewhere set and restored under a lock (the only way POSIX offers).

    >>> 0 <= current_umask() <= 0o777
    True
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def publish(path: str | os.PathLike[str]) -> None:
    """Give a file written under a private temporary name the mode a new file gets from ``open()``:
    ``0o666 & ~umask`` (what the user asked their files to be)."""
    os.chmod(path, 0o666 & ~current_umask())


def check_output_path(path: str | os.PathLike[str], *, what: str = "report") -> Path:
    """Check, before anything is computed or written, that ``path`` can receive an output file.

    Missing parent folders are fine (the writers create them); an existing directory at ``path``, a file
    where a parent folder should be, or a parent that cannot be written are refused.

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> check_output_path(f"{d}/new/sub/r.json").name
    'r.json'
    >>> check_output_path(d)
    Traceback (most recent call last):
    ...
    weightgeo.errors.WeightgeoError: report path /... is an existing directory; give a file name inside it, e.g. /.../report.json

    Raises:
        WeightgeoError: naming the path and the fix.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        raise WeightgeoError(
            f"{what} path {p} is an existing directory; give a file name inside it, e.g. "
            f"{p / ('report' + (p.suffix or '.json'))}"
        )
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise WeightgeoError(f"{what} path {p}: {parent} is a file, not a folder; choose another location")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise WeightgeoError(
            f"{what} path {p}: cannot create files in {parent} (permission denied); choose a writable location"
        )
    return p


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], *, what: str = "report") -> Iterator[Path]:
    """Yield a unique temporary path beside ``path`` (same suffix, so writers that go by it still work);
    on a clean exit it replaces ``path``, on an error it is removed and ``path`` is left as it was.

    Missing parent folders are created; OS errors become a WeightgeoError naming the path.
    """
    target = check_output_path(path, what=what)
    tmp: str | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}", dir=target.parent)
        os.close(fd)
        yield Path(tmp)
        publish(tmp)
        os.replace(tmp, target)
        tmp = None
    except OSError as e:
        raise WeightgeoError(
            f"cannot write {what} {target} ({e.strerror or e}); check the path and free space"
        ) from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, what: str = "report") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_output`); returns the path written."""
    with atomic_output(path, what=what) as tmp:
        with open(tmp, "w", newline="") as fh:
            fh.write(text)
    return Path(path).expanduser()
