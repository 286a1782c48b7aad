"""Shared input validation for the tensor-level metrics (one set of rules, one set of messages)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import WeightgeoError

__all__ = ["is_tensor_like", "as_tensor", "check_pair", "check_finite", "dispatch_compare", "same_compute_dtype"]


def is_tensor_like(x: Any) -> bool:
    """True for torch tensors and NumPy arrays (the inputs tensor-level metrics compute on directly)."""
    return isinstance(x, (torch.Tensor, np.ndarray))


def as_tensor(x: Any, name: str) -> torch.Tensor:
    """``x`` as a torch tensor (NumPy arrays are wrapped without copy); non-floating → WeightgeoError."""
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


# Exponent bits of the 16-bit floats: all ones means Inf or NaN. Testing bits is several times faster than
# torch.isfinite on bf16 (which converts), and this check runs over every entry of a checkpoint.
_EXPONENT_MASK = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}


def all_finite(x: torch.Tensor) -> bool:
    """True when ``x`` has no NaN/Inf (bit test for bf16/fp16, ``torch.isfinite`` otherwise)."""
    mask = _EXPONENT_MASK.get(x.dtype)
    if mask is None:
        return bool(torch.isfinite(x).all())
    return x.numel() == 0 or int((x.view(torch.int16) & mask).max()) < mask


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise WeightgeoError naming ``name`` and the count of NaN/Inf entries, if there are any."""
    if all_finite(x):
        return
    bad = x.numel() - int(torch.isfinite(x).sum())
    if bad:
        raise WeightgeoError(
            f"tensor {name!r} (shape {tuple(x.shape)}, {x.dtype}) has {bad} non-finite value(s) (NaN/Inf); "
            "metrics are undefined there: fix the checkpoint or exclude this tensor"
        )


def check_pair(
    base: Any, ft: Any, *, matrix: bool, what: str, finite: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a (base, ft) pair: floating, same shape, non-empty, finite, 2-D when ``matrix``."""
    b, f = as_tensor(base, "base"), as_tensor(ft, "ft")
    if b.shape != f.shape:
        raise WeightgeoError(
            f"{what}: base and ft differ in shape: {tuple(b.shape)} vs {tuple(f.shape)}; compare the same "
            "tensor of two checkpoints of one architecture (transpose or slice one of them if that is intended)"
        )
    if matrix and b.ndim != 2:
        raise WeightgeoError(
            f"{what}: SVD metrics need matrices [out, in], got shape {tuple(b.shape)}; pass a 2-D weight "
            "(update_sparsity works on any shape)"
        )
    if b.numel() == 0:
        raise WeightgeoError(f"{what}: empty tensors (shape {tuple(b.shape)}); nothing to measure")
    if finite:
        check_finite(b, "base")
        check_finite(f, "ft")
    return b, f


def same_compute_dtype(b: torch.Tensor, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(b, f)`` unchanged when their compute dtypes agree (bf16/fp16/fp32 → fp32); else both as float64.

    The pair kernels work in one compute dtype; a mixed fp64/≤fp32 pair is analysed in float64 so the
    fp64 side keeps its precision.
    """
    from ..linalg.svd import compute_dtype

    if compute_dtype(b.dtype) == compute_dtype(f.dtype):
        return b, f
    return b.to(torch.float64), f.to(torch.float64)


def dispatch_compare(base: Any, ft: Any, metrics: list[str], **kwargs: Any) -> Any:
    """Checkpoint-level call: ``weightgeo.engine.compare(base, ft, metrics=..., progress=False, **kwargs)``."""
    from ..engine import compare  # lazy: the engine imports the metrics

    return compare(base, ft, metrics=metrics, progress=False, **kwargs)


def wants_dispatch(base: Any, ft: Any) -> bool:
    """True when either side is a checkpoint source (path, Mapping, nn.Module, Checkpoint), not a tensor."""
    return not (is_tensor_like(base) and is_tensor_like(ft))
