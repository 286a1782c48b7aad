"""Where the linear algebra runs: one rule for every entry point (``None`` → CPU, no silent fallback)."""

from __future__ import annotations

import torch

from .errors import WeightgeoError

__all__ = ["resolve_device"]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` → CPU; a CUDA device that is not available is an error, not a silent fallback.

    >>> resolve_device(None)
    device(type='cpu')
    >>> resolve_device("tpu")
    Traceback (most recent call last):
    ...
    weightgeo.errors.WeightgeoError: device='tpu' is not a torch device; use 'cpu', 'cuda' or 'cuda:N'
    """
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise WeightgeoError(f"device={device!r} is not a torch device; use 'cpu', 'cuda' or 'cuda:N'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise WeightgeoError(
            f"device={device!r} but CUDA is not available in this torch build ({torch.__version__}); use device='cpu'"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        # Checked here: otherwise the first use (the group budget's mem_get_info) fails with a raw CUDA error.
        raise WeightgeoError(
            f"device={device!r} but this machine has {torch.cuda.device_count()} CUDA "
            f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}"
        )
    return dev
