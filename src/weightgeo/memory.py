"""How much memory a pass may use, and the one refusal of work that cannot fit, made from headers before any read.

The passes bound what they hold: the elementwise metrics stream every tensor in row chunks, shape groups are
packed under ``batch_bytes``, and the policy's row blocks bound every temporary. What no budget can split is one
matrix whose SVD-family metrics need it whole (both sides as stored, and the small-side Gram and basis in
float64): when even that does not fit in the memory available, the pass stops before reading anything, naming the
tensor, the size and what to do (:func:`check_fits`), instead of an allocator's traceback halfway through.

>>> check_fits(1 << 20, device=None, what="a 512x512 matrix", fix="-")  # a MiB always fits
>>> available_bytes(None) is None or available_bytes(None) > 0
True
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import WeightgeoError

__all__ = ["available_bytes", "check_fits", "human_bytes"]

_CGROUP_V2 = Path("/sys/fs/cgroup")
_CGROUP_V1 = Path("/sys/fs/cgroup/memory")


def available_bytes(device: torch.device | str | None = None) -> int | None:
    """Bytes a new allocation can use now: on CUDA the device's free memory; on the CPU ``MemAvailable`` (Linux),
    bounded by the process's cgroup limit; ``None`` where it cannot be told (then nothing is refused)."""
    dev = torch.device("cpu") if device is None else torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free)
    if dev.type != "cpu":
        return None
    found = [v for v in (_meminfo_available(), _cgroup_room()) if v is not None]
    if not found:
        try:
            import psutil  # optional: macOS, Windows
        except ImportError:
            return None
        return int(psutil.virtual_memory().available)
    return min(found)


def check_fits(need: int, *, device: torch.device | str | None, what: str, fix: str) -> None:
    """Raise a WeightgeoError when ``need`` bytes exceed :func:`available_bytes` of ``device``: ``what`` names the
    work (the tensor and its shape), ``fix`` what to do instead, in the syntax of the interface in use."""
    have = available_bytes(device)
    if have is None or need <= have:
        return
    where = "on " + str(device) if device is not None and torch.device(device).type == "cuda" else "in memory"
    raise WeightgeoError(
        f"{what} needs at least {human_bytes(need)} {where} at once, and {human_bytes(have)} is available; {fix}"
    )


def human_bytes(n: float) -> str:
    """``1.5 GiB`` and the like.

    >>> human_bytes(3 << 30), human_bytes(512)
    ('3.0 GiB', '512 B')
    """
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room() -> int | None:
    """The cgroup's limit minus its usage (v2 ``memory.max``, v1 ``memory.limit_in_bytes``), ``None`` unlimited."""
    for limit, usage in (
        (_CGROUP_V2 / "memory.max", _CGROUP_V2 / "memory.current"),
        (_CGROUP_V1 / "memory.limit_in_bytes", _CGROUP_V1 / "memory.usage_in_bytes"),
    ):
        try:
            text = limit.read_text().strip()
            if text == "max" or int(text) >= 1 << 60:  # v1 writes a huge number for "no limit"
                return None
            return max(0, int(text) - int(usage.read_text().strip()))
        except (OSError, ValueError):
            continue
    return None
