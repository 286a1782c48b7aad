"""Where the cache lives and whether it is on: the ``cache=`` argument, ``WEIGHTGEO_CACHE`` and XDG defaults.

>>> resolve_cache(False) is None, resolve_cache("/tmp/wg-cache").root.name
(True, 'wg-cache')
>>> default_cache_dir().name
'weightgeo'
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import WeightgeoError
from .store import ResultCache

__all__ = ["resolve_cache", "default_cache_dir", "cacheable", "ENV_VAR"]

#: the environment variable: a folder, or one of ``0 off false no none`` to turn the cache off
ENV_VAR = "WEIGHTGEO_CACHE"
_OFF = frozenset({"0", "off", "false", "no", "none"})


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/weightgeo`` when ``XDG_CACHE_HOME`` is an absolute path, else ``~/.cache/weightgeo``."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "weightgeo"


def resolve_cache(cache: bool | str | os.PathLike[str] | ResultCache | None = None) -> ResultCache | None:
    """The cache a call should use, or ``None`` for none.

    Args:
        cache: ``None`` (the default): ``WEIGHTGEO_CACHE`` decides: a folder, or off (``0``, ``off``, ``false``,
            ``no``, ``none``); unset or empty: the default folder (:func:`default_cache_dir`). ``True``: on, in
            ``WEIGHTGEO_CACHE``'s folder if it names one, else the default folder (an explicit ``True`` wins
            over ``WEIGHTGEO_CACHE=off``). ``False``: off. A path: that folder. A :class:`ResultCache`: itself
            (share one object to share its counters).
    """
    if isinstance(cache, ResultCache):
        return cache
    if cache is False:
        return None
    if cache is None or cache is True:
        env = os.environ.get(ENV_VAR, "").strip()
        if env.lower() in _OFF:
            return ResultCache(default_cache_dir()) if cache is True else None
        return ResultCache(Path(env).expanduser() if env else default_cache_dir())
    if isinstance(cache, (str, os.PathLike)):
        if not os.fspath(cache):
            raise WeightgeoError("cache='' names no folder; pass a folder, True (default folder) or False (off)")
        p = Path(cache).expanduser()
        if p.exists() and not p.is_dir():
            raise WeightgeoError(
                f"cache={os.fspath(cache)!r} is a file, not a folder; pass a folder for the cache "
                f"(it is created if missing) or cache=False"
            )
        return ResultCache(p)
    raise WeightgeoError(
        f"cache={cache!r}: pass None (default: WEIGHTGEO_CACHE or ~/.cache/weightgeo), True, False, "
        f"a folder path or a ResultCache"
    )


def cacheable(source: Any) -> bool:
    """Whether results computed from ``source`` may be cached: checkpoints on disk yes, in-memory ones never.

    >>> import torch
    >>> cacheable("runs/sft/checkpoint-100"), cacheable({"w": torch.ones(2, 2)}), cacheable(torch.nn.Linear(2, 2))
    (True, False, False)

    Paths and hub ids are cacheable; mappings, modules and tensors are not (nothing identifies their content
    short of hashing it); an opened :class:`~weightgeo.checkpoint.Checkpoint` is when its first tensor has an
    :meth:`~weightgeo.checkpoint.Checkpoint.identity`. The per-tensor rule is ``identity(name) is not None``.
    """
    from ..checkpoint import Checkpoint

    if isinstance(source, (str, os.PathLike)):
        return True
    if isinstance(source, Checkpoint):
        names = source.names()
        return bool(names) and source.identity(names[0]) is not None
    return False  # Mapping, nn.Module, Tensor and anything else held in memory
