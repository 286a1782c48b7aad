"""The code fingerprint: a digest of the source of every module that computes a cached result.

A cache key names its inputs (file identities), its options (the option object as a whole), the numerical
policy and the weightgeo version; none of those changes when the code that computes a row does (a ``git pull``,
a reinstall from a branch, a release that forgets its version bump). So every key also holds this fingerprint:
the sha256 of the normalised source of the modules in :data:`COMPUTING`, as ``joblib.Memory`` keys a cached
function on its source. Normalised means parsed and dumped without docstrings, comments and layout (the AST):
editing a comment, a docstring or a doctest, or re-formatting, keeps every entry; changing a statement, a
constant or a signature in any of these modules makes every entry a miss, recomputed and overwritten.

It is computed once per process (0.2–0.8 s on 2 shared cores: parsing some 60 files), the first time a cache is
used.

>>> fp = code_fingerprint()
>>> len(fp), fp == code_fingerprint()
(16, True)
"""

from __future__ import annotations

import ast
import functools
import hashlib
import sys
import uuid
import warnings
from pathlib import Path

__all__ = ["COMPUTING", "code_fingerprint", "normalised_source", "computing_files", "PACKAGE_ROOT"]

#: the package folder whose modules are fingerprinted
PACKAGE_ROOT = Path(__file__).resolve().parents[1]

#: what computes a cached result, relative to the package folder (a folder: every ``.py`` in it):
#: the kernels and the numerical policy (``linalg/``, ``metrics/``); how stored bytes become tensor values
#: (``checkpoint/``: formats, FP8 dequantisation, LoRA merges, native name maps and their transforms); the
#: paths that shape a row or a spectrum (``engine/``: plan, reading, rounding, the finiteness pass, the kernel
#: call, rows rebuilt from the cache; ``stream.py``, ``stream_sparsity.py`` and ``trajectory.py``: ΔW_t, its spectra
#: and the sparsity counts); what reaches
#: the kernels (``options.py``, ``defaults.py``, ``selection.py``: which matrix, which expert); how a result is
#: keyed and stored (``cache/keys.py``, ``cache/codec.py``). Left out, because they only present, orchestrate or
#: train and never change a cached number: the CLI, reports and plots, outputs, follow, the Tracker (uncached),
#: the api verbs (they post-process rows computed fresh or served), integrations, train/, the cache's store and
#: location, and the small utilities (errors, jsonfile, means, devices, distributed, readahead, validation).
COMPUTING: tuple[str, ...] = (
    "linalg",
    "metrics",
    "checkpoint",
    "engine",
    "stream.py",
    "stream_sparsity.py",
    "trajectory.py",
    "options.py",
    "defaults.py",
    "selection.py",
    "cache/keys.py",
    "cache/codec.py",
)

#: bumped when the normalisation below changes
_RECIPE = 1


def computing_files(root: Path = PACKAGE_ROOT) -> list[Path]:
    """The source files :data:`COMPUTING` names under ``root``, sorted (a missing one is left to the caller)."""
    files: list[Path] = []
    for part in COMPUTING:
        p = root / part
        files.extend(sorted(p.rglob("*.py")) if p.is_dir() else [p])
    return sorted(files)


def normalised_source(text: str, name: str = "<source>") -> str:
    """The source ``text`` without docstrings, comments or layout: its AST, dumped.

    >>> a = normalised_source('def f(x):\\n    "doc"\\n    return x + 1  # why\\n')
    >>> a == normalised_source("def f(x):\\n    return (x +\\n            1)\\n")
    True
    >>> a == normalised_source("def f(x):\\n    return x + 2\\n")
    False
    """
    tree = ast.parse(text, name)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                if isinstance(body[0].value.value, str):
                    node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, include_attributes=False)


def code_fingerprint(root: Path | None = None) -> str:
    """16 hex digits of sha256 over the normalised source of :data:`COMPUTING` (and the Python version, whose
    AST dump it is); the package's own modules unless ``root`` names another copy of the package (tests).

    Where a computing module cannot be read as source (an install without ``.py`` files), the fingerprint is
    a random token of this process, with a warning: entries are then written but never served to another
    process, which is slow but never stale.
    """
    return _this_process() if root is None else _fingerprint(str(Path(root).resolve()))


@functools.cache
def _this_process() -> str:
    return _fingerprint(str(PACKAGE_ROOT))


def _fingerprint(root: str) -> str:
    h = hashlib.sha256(f"recipe {_RECIPE}; python {sys.version_info[0]}.{sys.version_info[1]}\n".encode())
    base = Path(root)
    try:
        for path in computing_files(base):
            h.update(f"\0{path.relative_to(base).as_posix()}\0".encode())
            h.update(normalised_source(path.read_text(encoding="utf-8"), str(path)).encode())
    except (OSError, SyntaxError, ValueError) as e:
        warnings.warn(
            f"weightgeo cache: cannot read the source of {base} ({e}); cached results of this process will not be "
            f"served to another (install weightgeo with its .py files to share them)",
            RuntimeWarning,
            stacklevel=3,
        )
        return uuid.uuid4().hex[:16]
    return h.hexdigest()[:16]
