"""The one validation module: every check of user input, each with one message.

Options (``k``, ``side``, ``eta``, ``rank``/``alpha``, ``dtype``, ``seed``, thresholds, budgets, choices),
steps, durations and amounts (poll intervals, cache sizes), paths (run directories, report files), tensors and
matrices, and finiteness. Each function returns the checked value (converted where said) or raises
:class:`~weightgeo.errors.WeightgeoError` naming what was given and the fix. Messages name an option as the
interface in use spells it: ``k=0`` from Python, ``--k 0`` inside :func:`cli_syntax` (the command line).

>>> check_k(8), check_side("left"), check_eta(1e-3)
(8, 'left', 0.001)
>>> check_k(0)
Traceback (most recent call last):
...
weightgeo.errors.WeightgeoError: k must be an integer ≥ 1 (subspace dimension), got 0
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .defaults import ALPHA, ETA, RANK
from .errors import WeightgeoError

__all__ = [
    "SIDES",
    "cli_syntax",
    "spell",
    "either",
    "given",
    "check_int",
    "check_k",
    "check_size",
    "resolve_size",
    "Size",
    "check_side",
    "check_sides",
    "check_eta",
    "check_rank_alpha",
    "check_threshold",
    "check_batch_bytes",
    "check_dtype",
    "check_seed",
    "check_choice",
    "check_step",
    "check_steps",
    "check_increasing",
    "check_next_step",
    "check_amount",
    "check_run_dir",
    "check_report_path",
    "is_tensor_like",
    "as_tensor",
    "check_matrix",
    "check_pair",
    "all_finite",
    "check_finite",
]

#: the two singular sides, in the order every API lists them
SIDES = ("right", "left")

_CLI: ContextVar[bool] = ContextVar("weightgeo_cli_syntax", default=False)


# --- how a message names an option ---------------------------------------------------------------------------
@contextlib.contextmanager
def cli_syntax() -> Iterator[None]:
    """Inside this context every message names options as command-line flags (``--hill-k``, not ``hill_k``).

    >>> with cli_syntax():
    ...     spell("hill_k")
    '--hill-k'
    """
    token = _CLI.set(True)
    try:
        yield
    finally:
        _CLI.reset(token)


def spell(name: str) -> str:
    """Option ``name`` as the interface in use writes it: ``hill_k`` in Python, ``--hill-k`` on the command line
    (a name that already is a flag, or a phrase with spaces, stays as it is)."""
    if not _CLI.get() or name.startswith("-") or not name.isidentifier():
        return name
    return "--" + name.replace("_", "-")


def either(python: str, cli: str) -> str:
    """What to tell the user in the syntax of the interface in use: ``python`` from Python, ``cli`` on the
    command line (a verb and its flags there, a function and its keywords here).

    >>> either("weightgeo.rank_curve(run)", "weightgeo trajectory RUN")
    'weightgeo.rank_curve(run)'
    """
    return cli if _CLI.get() else python


def given(name: str, value: Any) -> str:
    """``name=value`` in Python, ``--name value`` on the command line."""
    flag = spell(name)
    return f"{flag} {value}" if flag.startswith("--") else f"{flag}={value!r}"


# --- options -------------------------------------------------------------------------------------------------
def check_int(value: Any, name: str, *, minimum: int = 1, what: str = "") -> int:
    """``value`` as an int ≥ ``minimum`` (integral floats such as ``4.0`` accepted; bools are not).

    >>> check_int(16, "hill_k", minimum=2), check_int(4.0, "k")
    (16, 4)
    """
    ok = isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not ok or int(value) < minimum:
        hint = f" ({what})" if what else ""
        raise WeightgeoError(f"{spell(name)} must be an integer ≥ {minimum}{hint}, got {value!r}")
    return int(value)


def check_k(k: Any, *, name: str = "k") -> int:
    """A subspace dimension: an integer ≥ 1 (capped per matrix later, never here)."""
    return check_int(k, name, minimum=1, what="subspace dimension")


#: a size per matrix: a count ≥ 1, or a fraction in (0, 1) of each matrix's smaller side (:func:`resolve_size`)
Size = int | float


def check_size(value: Any, name: str = "k", *, what: str = "subspace dimension") -> int | float:
    """A size per matrix (the pair metrics' ``k``, localization's ``rank``): an integer ≥ 1, or a fraction in
    (0, 1) of each matrix's smaller side (``0.125``: an eighth of it, the paper's 512 of 4096).

    >>> check_size(512), check_size(0.125), check_size(4.0)
    (512, 0.125, 4)
    >>> check_size(1.5)
    Traceback (most recent call last):
    ...
    weightgeo.errors.WeightgeoError: k must be an integer ≥ 1 or a fraction in (0, 1) of each matrix's smaller side (subspace dimension; 0.125 = an eighth), got 1.5
    """
    if isinstance(value, (float, np.floating)) and not isinstance(value, bool) and 0.0 < float(value) < 1.0:
        return float(value)
    ok = isinstance(value, numbers.Integral) or (isinstance(value, (float, np.floating)) and float(value).is_integer())
    if isinstance(value, bool) or not ok or int(value) < 1:
        raise WeightgeoError(
            f"{spell(name)} must be an integer ≥ 1 or a fraction in (0, 1) of each matrix's smaller side "
            f"({what}; 0.125 = an eighth), got {value!r}"
        )
    return int(value)


def resolve_size(size: int | float, smaller_side: int) -> int:
    """The count a :func:`check_size` value means for a matrix whose smaller side is ``smaller_side``: an integer as
    given; a fraction f, ``max(1, floor(f · smaller_side))``.

    >>> resolve_size(0.125, 896), resolve_size(0.125, 128), resolve_size(0.125, 4), resolve_size(512, 128)
    (112, 16, 1, 512)
    """
    if isinstance(size, float):
        return max(1, math.floor(size * smaller_side + 1e-9))
    return int(size)


def check_side(side: Any) -> str:
    """``"right"`` (V, input side) or ``"left"`` (U, output side)."""
    if side not in SIDES:
        raise WeightgeoError(
            f"{spell('side')} must be 'right' (V, input side) or 'left' (U, output side), got {side!r}"
        )
    return side


def check_sides(sides: Sequence[str]) -> tuple[str, ...]:
    """A (possibly empty) selection of sides, each checked by :func:`check_side`."""
    if isinstance(sides, str):
        raise WeightgeoError(f"sides must be a sequence of sides such as ('right',), got the string {sides!r}")
    return tuple(check_side(s) for s in sides)


def check_eta(eta: Any) -> float:
    """The bf16 rule's relative tolerance η: a finite number ≥ 0."""
    try:
        value = float(eta)
    except (TypeError, ValueError):
        value = math.nan
    if not (0 <= value < math.inf):
        raise WeightgeoError(f"{spell('eta')} must be a finite relative tolerance ≥ 0 (default {ETA:g}), got {eta!r}")
    return value


def check_rank_alpha(rank: Any, alpha: Any) -> tuple[int | float, float]:
    """Localization's reconstruction rank r (an integer ≥ 1, or a fraction of each matrix's smaller side, see
    :func:`check_size`) and mask fraction α in [0, 1]."""
    r = check_size(rank, "rank", what=f"reconstruction rank r, default {RANK}")
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        a = math.nan
    if not 0.0 <= a <= 1.0:
        raise WeightgeoError(
            f"{spell('alpha')} must be a fraction in [0, 1] (default {ALPHA}; Fig. 3 needs 0.3), got {alpha!r}"
        )
    return r, a


def check_threshold(threshold: Any) -> float:
    """A similarity threshold in (0, 1] (Sim_K lies in [0, 1])."""
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        t = math.nan
    if not 0.0 < t <= 1.0:
        raise WeightgeoError(f"{given('threshold', threshold)} must be in (0, 1]: Sim_K lies in [0, 1]")
    return t


def check_batch_bytes(batch_bytes: Any) -> int | None:
    """A memory budget in bytes (≥ 0; 0 = one matrix at a time) or ``None`` for the default."""
    if batch_bytes is None:
        return None
    ok = isinstance(batch_bytes, numbers.Integral) or (isinstance(batch_bytes, float) and batch_bytes.is_integer())
    if isinstance(batch_bytes, bool) or not ok or batch_bytes < 0:
        raise WeightgeoError(
            f"{given('batch_bytes', batch_bytes)}: give a memory budget in bytes (≥ 0; 0 = one matrix "
            f"at a time), or None for the default"
        )
    return int(batch_bytes)


def check_dtype(dtype: Any, *, name: str = "dtype") -> torch.dtype | None:
    """A floating torch dtype (or its name: ``"bfloat16"``) that inputs are rounded to, or ``None`` (the stored
    formats, nothing rounded).

    >>> check_dtype("bfloat16"), check_dtype(None)
    (torch.bfloat16, None)
    """
    if dtype is None:
        return None
    value = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise WeightgeoError(
            f"{given(name, dtype)}: give a floating torch dtype to round both sides to (bfloat16, float16, "
            f"float32, float64, float8_e4m3fn, ...), or leave it out to compare in the stored formats"
        )
    return value


def check_seed(seed: Any, *, name: str = "seed") -> int:
    """A random seed: any integer (bools are not)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise WeightgeoError(f"{given(name, seed)}: a seed is an integer")
    return int(seed)


def check_choice(value: Any, name: str, choices: dict[str, str]) -> str:
    """One of ``choices`` (name -> what it means, said in the message).

    >>> check_choice("sketch", "mode", {"exact": "a copy of W0", "sketch": "random sketches"})
    'sketch'
    """
    if not isinstance(value, str) or value not in choices:
        options = " or ".join(f"{c!r} ({what})" for c, what in choices.items())
        raise WeightgeoError(f"{given(name, value)}; use {options}")
    return value


# --- steps ---------------------------------------------------------------------------------------------------
def check_step(step: Any, *, name: str = "step") -> int:
    """A training step: an integer (anything with ``__index__``; bools are not)."""
    if isinstance(step, bool) or not (isinstance(step, numbers.Integral) or hasattr(step, "__index__")):
        raise WeightgeoError(f"{spell(name)} must be an integer, got {step!r} ({type(step).__name__})")
    return int(step)


def check_steps(steps: Sequence[Any], n: int, *, name: str = "steps") -> list[int]:
    """One integer step per checkpoint (``n`` of them), strictly increasing."""
    out = [check_step(s, name=f"every entry of {spell(name)}") for s in steps]
    if len(out) != n:
        raise WeightgeoError(f"{spell(name)} has {len(out)} entries for {n} checkpoints; give one step per checkpoint")
    check_increasing(out, spell(name))
    return out


def check_increasing(steps: Sequence[int], what: str, sources: Sequence[Any] | None = None) -> None:
    """Steps strictly increasing: no duplicate (``sources[i]`` named when given), no step before an earlier one.

    >>> check_increasing([10, 10], "steps", ["a", "b"])
    Traceback (most recent call last):
    ...
    weightgeo.errors.WeightgeoError: duplicate step 10 in steps (a and b); every checkpoint needs its own step
    """
    seen: dict[int, int] = {}
    for i, s in enumerate(steps):
        if s in seen:
            where = "" if sources is None else f" ({sources[seen[s]]!s} and {sources[i]!s})"
            raise WeightgeoError(f"duplicate step {s} in {what}{where}; every checkpoint needs its own step")
        seen[s] = i
    for a, b in zip(steps, steps[1:]):
        if b < a:
            raise WeightgeoError(
                f"{what} are not increasing ({a} then {b}): {list(steps)}; pass the checkpoints in training order"
            )


def check_next_step(step: Any, last: int | None, *, what: str) -> int:
    """A step that comes after ``last`` (the previous one recorded by ``what``, ``None`` for none)."""
    step = check_step(step)
    if last is not None and step <= last:
        raise WeightgeoError(
            f"{what}(step={step}) after step {last}: steps must increase (one update per optimizer step)"
        )
    return step


# --- amounts and paths ---------------------------------------------------------------------------------------
def check_amount(value: Any, name: str, *, unit: str, finite: bool = True) -> float:
    """A number ≥ 0 of ``unit`` (seconds, days, GB, ...); infinity only when not ``finite`` (= no limit).

    >>> check_amount(2, "poll_s", unit="seconds")
    2.0
    >>> check_amount(float("inf"), "max_gb", unit="GB")
    Traceback (most recent call last):
    ...
    weightgeo.errors.WeightgeoError: max_gb=inf: give a number of GB ≥ 0 (finite)
    """
    ok = isinstance(value, (numbers.Real, np.floating)) and not isinstance(value, bool)
    v = float(value) if ok else math.nan
    if not (v >= 0) or (finite and math.isinf(v)):
        raise WeightgeoError(f"{given(name, value)}: give a number of {unit} ≥ 0{' (finite)' if finite else ''}")
    return v


def check_run_dir(root: str | os.PathLike[str], *, what: str, fix: str) -> Path:
    """A run directory that exists and is a folder; ``what`` names it in the message (``"stream directory"``),
    ``fix`` says what to pass instead."""
    path = Path(root)
    if not path.exists():
        raise WeightgeoError(f"{what} {path} does not exist; {fix}")
    if not path.is_dir():
        raise WeightgeoError(f"{what} {path} is a file, not a directory of checkpoint folders; {fix}")
    return path


def check_report_path(path: str | os.PathLike[str], *, name: str = "out") -> Path:
    """A report file: ``.json`` (rows, summary, meta) or ``.csv`` (rows)."""
    p = Path(path)
    if p.suffix.lower() not in (".json", ".csv"):
        raise WeightgeoError(f"{given(name, str(p))}: unknown format {p.suffix!r}; use a .json or .csv path")
    return p


# --- tensors and matrices ------------------------------------------------------------------------------------
def is_tensor_like(x: Any) -> bool:
    """True for torch tensors and NumPy arrays (what the tensor-level metrics compute on)."""
    return isinstance(x, (torch.Tensor, np.ndarray))


def as_tensor(x: Any, name: str) -> torch.Tensor:
    """``x`` as a detached floating torch tensor (NumPy arrays are wrapped without a copy).

    >>> as_tensor(np.ones(2), "w").dtype
    torch.float64
    """
    if isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.floating):
            raise WeightgeoError(
                f"{name}: expected a floating-point array, got NumPy dtype {x.dtype} with shape {x.shape}; "
                "weightgeo analyses floating weights only"
            )
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise WeightgeoError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise WeightgeoError(
            f"{name}: expected a floating-point tensor, got dtype {x.dtype} with shape {tuple(x.shape)}; "
            "weightgeo analyses floating weights only (cast it, or leave it out)"
        )
    return x.detach()


def check_matrix(
    x: Any, name: str, *, batched: bool = False, allow_empty: bool = False, finite: bool = False
) -> torch.Tensor:
    """``x`` as a floating matrix [out, in] (``batched``: a stack ``(*, m, n)`` of them), non-empty unless
    ``allow_empty``, finite when ``finite``.

    >>> tuple(check_matrix(np.ones((2, 3)), "w").shape)
    (2, 3)
    >>> check_matrix(torch.ones(3), "w")
    Traceback (most recent call last):
    ...
    weightgeo.errors.WeightgeoError: w: SVD metrics need matrices [out, in], got shape (3,), not a matrix; ...
    """
    t = as_tensor(x, name)
    if not (t.ndim >= 2 if batched else t.ndim == 2):
        want = "(*, m, n)" if batched else "[out, in]"
        stack = " or a stack of them" if batched else ""
        raise WeightgeoError(
            f"{name}: SVD metrics need matrices {want}, got shape {tuple(t.shape)}, not a matrix; "
            f"pass a 2-D [out, in] weight{stack} (update_sparsity works on any shape)"
        )
    if not allow_empty and min(t.shape[-2:]) == 0:
        raise WeightgeoError(f"{name}: empty matrix of shape {tuple(t.shape)}; nothing to measure")
    if finite:
        check_finite(t, name)
    return t


def check_pair(
    base: Any, ft: Any, *, matrix: bool, what: str, finite: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """A (base, ft) pair: floating, same shape, non-empty, finite (when ``finite``), 2-D (when ``matrix``)."""
    if not (is_tensor_like(base) and is_tensor_like(ft)):
        raise WeightgeoError(
            f"{what}: expected two tensors (torch or NumPy), got {type(base).__name__} and {type(ft).__name__}; "
            f"checkpoint sources (paths, hub ids, mappings, modules) go to weightgeo.{what}(base, ft) or "
            "weightgeo.compare, which return a Report"
        )
    b, f = as_tensor(base, "base"), as_tensor(ft, "ft")
    if b.shape != f.shape:
        raise WeightgeoError(
            f"{what}: base and ft differ in shape: {tuple(b.shape)} vs {tuple(f.shape)}; compare the same "
            "tensor of two checkpoints of one architecture (transpose or slice one of them if that is intended)"
        )
    if matrix:
        check_matrix(b, what)
    if b.numel() == 0:
        raise WeightgeoError(f"{what}: empty tensors (shape {tuple(b.shape)}); nothing to measure")
    if finite:
        check_finite(b, "base")
        check_finite(f, "ft")
    return b, f


# --- finiteness ----------------------------------------------------------------------------------------------
# Exponent bits of the 16-bit floats: all ones means Inf or NaN. Testing bits is several times faster than
# torch.isfinite on bf16 (which converts), and NumPy's int16 kernels several times faster again on CPU; this
# check runs over every entry of a checkpoint.
_EXPONENT_MASK = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}


def all_finite(x: torch.Tensor) -> bool:
    """True when ``x`` has no NaN/Inf (an exponent-bit test for bf16/fp16, ``torch.isfinite`` otherwise).

    >>> all_finite(torch.tensor([1.0, float("inf")]).bfloat16()), all_finite(torch.ones(3))
    (False, True)
    """
    mask = _EXPONENT_MASK.get(x.dtype)
    if mask is None:
        if x.dtype.is_floating_point and x.dtype.itemsize == 1:  # float8: torch.isfinite has no kernel for it
            x = x.to(torch.float32)
        return bool(torch.isfinite(x).all())
    if x.numel() == 0:
        return True
    bits = x.contiguous().view(torch.int16)
    if bits.device.type == "cpu":
        return int((bits.numpy() & mask).max()) < mask
    return int((bits & mask).max()) < mask


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise WeightgeoError naming ``name``, the shape, the dtype and the count of NaN/Inf entries, if any."""
    if all_finite(x):
        return
    bad = x.numel() - int(torch.isfinite(x.to(torch.float32) if x.dtype.itemsize == 1 else x).sum())
    raise WeightgeoError(
        f"tensor {name!r} (shape {tuple(x.shape)}, {x.dtype}) has {bad} non-finite value(s) (NaN/Inf); "
        "metrics are undefined there: fix the checkpoint or exclude this tensor"
    )
