"""Restricted unpickling for the pickles that native training checkpoints carry beside their tensors.

Two kinds are read, and nothing in either runs code from the file:

* ``.metadata`` of a torch.distributed.checkpoint folder is a plain pickle (torch itself reads it with
  ``pickle.load``). :func:`load_dcp_metadata` allows only the classes that metadata is made of (DCP's
  metadata dataclasses, ``torch.Size``, dtypes, paths); a class of a *stubbed* package (Megatron's, by
  default) becomes an inert placeholder, so Megatron checkpoints open without Megatron installed; any other
  global is refused.
* ``torch.save`` files that pickle a framework's objects next to the weights (Megatron's ``common.pt``,
  DeepSpeed's ``*_model_states.pt``): :func:`load_torch_file` loads them with ``weights_only=True`` and turns
  the globals of the stubbed packages into the same placeholders; any other unsafe global is refused.

>>> blob = b"cmegatron.core.enums\\nModelType\\n(I1\\ntR."  # ModelType(1), protocol 0
>>> obj = _restricted_loads(blob, source="demo")
>>> type(obj).__module__, obj.args
('megatron.core.enums', (1,))
>>> _restricted_loads(b"cos\\nsystem\\n(S'true'\\ntR.", source="demo")
Traceback (most recent call last):
...
weightgeo.errors.WeightgeoError: demo: refused to unpickle os.system: it is not part of checkpoint metadata ...
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ..errors import WeightgeoError

__all__ = ["load_dcp_metadata", "load_torch_file", "Stub", "STUB_PREFIXES"]

#: packages whose pickled classes become :class:`Stub` placeholders instead of being imported
STUB_PREFIXES: tuple[str, ...] = ("megatron",)

_DCP_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.filesystem",
    "torch.distributed.checkpoint._extension",
    "torch.distributed.checkpoint.planner",
)
_PLAIN = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("pathlib", "Path"),
}
_TORCH_ENUMS = (torch.dtype, torch.layout, torch.memory_format)


class Stub:
    """An inert stand-in for a class of a stubbed package: it keeps what it was built from and does nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.__dict__.update(kwargs)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state

    def __reduce__(self):  # pragma: no cover - never pickled back
        raise TypeError(f"{type(self).__qualname__} is a placeholder for an unimported class")

    def __repr__(self) -> str:
        return f"<stub {type(self).__module__}.{type(self).__qualname__}>"


_STUBS: dict[tuple[str, str], type] = {}


def _stub(module: str, qualname: str) -> type:
    key = (module, qualname)
    if key not in _STUBS:
        _STUBS[key] = type(qualname.rsplit(".", 1)[-1], (Stub,), {"__module__": module, "__qualname__": qualname})
    return _STUBS[key]


def _stubbed(module: str, prefixes: Iterable[str]) -> bool:
    return any(module == p or module.startswith(p + ".") or module.startswith(p + "_") for p in prefixes)


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, *, source: str, prefixes: tuple[str, ...]) -> None:
        super().__init__(file)
        self._source = source
        self._prefixes = prefixes

    def find_class(self, module: str, name: str) -> Any:
        if _stubbed(module, self._prefixes):
            return _stub(module, name)
        if module in _DCP_MODULES or (module, name) in _PLAIN:
            obj = super().find_class(module, name)
            if module in _DCP_MODULES and not isinstance(obj, type):
                raise self._refuse(module, name)
            return obj
        if module == "torch" and isinstance(getattr(torch, name, None), _TORCH_ENUMS):
            return getattr(torch, name)
        raise self._refuse(module, name)

    def _refuse(self, module: str, name: str) -> WeightgeoError:
        return WeightgeoError(
            f"{self._source}: refused to unpickle {module}.{name}: it is not part of checkpoint metadata (allowed: "
            f"torch.distributed.checkpoint metadata classes, torch.Size, dtypes, paths; stubbed: "
            f"{', '.join(p + '*' for p in self._prefixes)}); the file is corrupt or not a DCP .metadata"
        )


def _restricted_loads(blob: bytes, *, source: str, prefixes: tuple[str, ...] = STUB_PREFIXES) -> Any:
    try:
        return _MetadataUnpickler(io.BytesIO(blob), source=source, prefixes=prefixes).load()
    except WeightgeoError:
        raise
    except (
        pickle.UnpicklingError,
        EOFError,
        AttributeError,
        ImportError,
        IndexError,
        KeyError,
        TypeError,
        ValueError,
        MemoryError,
        RecursionError,
        UnicodeDecodeError,
        OverflowError,
    ) as e:
        raise WeightgeoError(
            f"{source}: corrupt checkpoint metadata, the pickle does not load ({type(e).__name__}: "
            f"{str(e)[:200]}); re-save the checkpoint or copy the file again"
        ) from None


def load_dcp_metadata(path: str | os.PathLike[str], *, prefixes: tuple[str, ...] = STUB_PREFIXES) -> Any:
    """The ``Metadata`` object of a DCP ``.metadata`` file, unpickled with the allow-list above."""
    path = Path(path)
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise WeightgeoError(
            f"{path}: no such file; a torch.distributed.checkpoint folder holds .metadata and __<rank>_<n>.distcp files"
        ) from None
    except OSError as e:
        raise WeightgeoError(f"{path}: cannot read ({e})") from None
    from torch.distributed.checkpoint.metadata import Metadata

    meta = _restricted_loads(blob, source=str(path), prefixes=prefixes)
    if (
        not isinstance(meta, Metadata)
        or not isinstance(getattr(meta, "state_dict_metadata", None), dict)
        or not isinstance(getattr(meta, "storage_data", None), dict)
    ):
        raise WeightgeoError(
            f"{path}: holds a {type(meta).__name__}, not DCP Metadata with state_dict_metadata and "
            f"storage_data; the folder is not a torch.distributed.checkpoint (or it is corrupt)"
        )
    return meta


def load_torch_file(
    path: str | os.PathLike[str],
    *,
    prefixes: tuple[str, ...] = STUB_PREFIXES,
    allowed: Iterable[Any] = (),
    mmap: bool = True,
) -> Any:
    """``torch.load(path, weights_only=True)``, with the globals of the ``prefixes`` packages stubbed.

    ``allowed`` names further safe classes (e.g. ``argparse.Namespace``). Any other global that
    ``weights_only`` would refuse is refused here too, naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightgeoError(f"{path}: no such file")
    extra: list[Any] = list(allowed)
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    try:
        unsafe = finder(path) if finder is not None else []
    except (RuntimeError, zipfile.BadZipFile, OSError, ValueError, pickle.UnpicklingError, EOFError) as e:
        raise WeightgeoError(
            f"{path}: cannot read this torch file ({type(e).__name__}: {str(e)[:200]}); it is "
            f"truncated or corrupt, re-save or copy it again"
        ) from None
    allowed_names = {f"{a.__module__}.{a.__qualname__}" for a in extra if isinstance(a, type)}
    for full in unsafe:
        if full in allowed_names:
            continue
        module, _, name = full.rpartition(".")
        if not _stubbed(module, prefixes):
            raise WeightgeoError(
                f"{path}: refused: it pickles {full}, which weights_only loading does not allow and "
                f"which is not a stubbed framework class ({', '.join(p + '*' for p in prefixes)}); "
                f"the file may run code when loaded, convert it to safetensors"
            )
        extra.append((_stub(module, name), full))
    allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5; before it nothing can be stubbed
    try:
        with allow(extra) if allow is not None else contextlib.nullcontext():
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as e:
                if not mmap or "mmap" not in str(e):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightgeoError(
            f"{path}: refused: weights_only loading failed ({first[:200]}); convert the checkpoint to safetensors"
        ) from None
    except (
        RuntimeError,
        EOFError,
        OSError,
        ValueError,
        zipfile.BadZipFile,
        AttributeError,
        KeyError,
        TypeError,
        IndexError,
        MemoryError,
    ) as e:
        raise WeightgeoError(
            f"{path}: cannot read this torch file ({type(e).__name__}: {str(e)[:200]}); re-save it or copy it again"
        ) from None
