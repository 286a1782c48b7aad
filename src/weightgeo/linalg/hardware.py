"""What the device does fast, and the choices of the numerical policy that depend on it.

Only one choice depends on the hardware: the dtype of the randomized SVD's passes over a bf16 stack
(:func:`pass_dtype`). bf16 passes (oneDNN on CPU, tensor cores on CUDA) are 2–4× faster than fp32 passes where
the hardware multiplies bf16 natively (CUDA sm_80+, CPUs with AMX-BF16 or AVX512-BF16) and slower where it
does not (AVX2-only CPUs emulate them); their price is a noise floor of about 2⁻⁸·σ₁ (docs/numerics.md). fp32
and fp64 stacks always get passes in their own precision (a bf16 pass over an fp32 stack costs a cast copy
and the same floor), and the pair method's GEMMs always run in the compute dtype: their accuracy relative to
‖ΔW‖ is what the method rests on. Measured per CPU kind: BENCHMARKS.md, "Randomized SVD".

The GEMM library is torch everywhere. Measured on a 2-core AMD EPYC (AVX512-BF16), where torch's MKL takes its
generic path: NumPy's OpenBLAS ran the whole fp32 subspace iteration in 0.63–1.30× svd_lowrank's time in
isolation (two runs; torch: 0.78–0.96×), but alternating its thread pool with torch's inside a real pass (the
trajectories' residual checks) cost 1.0–2.9× the torch route's time; the product form ``basis @ Aᵀ`` was
0.65–0.89× the time of ``A @ basisᵀ`` per GEMM there, but 0.87–1.28× end to end. Neither is chosen.

>>> hardware("cpu").kind in ("cpu-amx", "cpu-avx512-bf16", "cpu-avx512", "cpu-avx2", "cpu")
True
>>> pass_dtype(torch.float32, "cpu", (4096, 4096))
torch.float32
>>> policy_fingerprint("cpu") == policy_fingerprint(None), len(policy_fingerprint("cpu"))
(True, 16)
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

import torch

from . import policy

__all__ = ["Hardware", "hardware", "pass_dtype", "policy_fingerprint", "BF16_PASS_MIN_ENTRIES"]

#: bf16 passes pay for their cast and fixed costs from about this many entries per matrix (measured: 896×896
#: and larger gain on AVX512-BF16 and AMX; 128×896 does not).
BF16_PASS_MIN_ENTRIES = 1 << 19


@dataclass(frozen=True)
class Hardware:
    """The device as the policy sees it.

    Attributes:
        kind: ``"cuda"``, ``"cpu-amx"``, ``"cpu-avx512-bf16"``, ``"cpu-avx512"``, ``"cpu-avx2"`` or ``"cpu"``.
        name: CPU model or GPU name.
        capability: torch's CPU capability (``torch.backends.cpu.get_cpu_capability()``) or ``"sm_XY"``.
        bf16_gemm: whether bf16 GEMMs run natively (and so faster than fp32 ones).
    """

    kind: str
    name: str
    capability: str
    bf16_gemm: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cpu_flags() -> dict[str, Any]:
    try:  # torch's own CPUID reading (what its kernels dispatch on)
        return dict(torch._C._cpu._get_cpu_capability())
    except (AttributeError, RuntimeError):
        pass
    flags: dict[str, Any] = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags.update({f: True for f in line.split(":", 1)[1].split()})
                elif line.startswith("model name"):
                    flags.setdefault("cpu_name", line.split(":", 1)[1].strip())
    except OSError:
        pass
    return flags


@functools.cache
def _describe(device: str) -> Hardware:
    dev = torch.device(device)
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        return Hardware("cuda", torch.cuda.get_device_name(dev), f"sm_{major}{minor}", major >= 8)
    if dev.type != "cpu":
        return Hardware(dev.type, dev.type, "unknown", False)
    flags = _cpu_flags()
    capability = torch.backends.cpu.get_cpu_capability()
    name = str(flags.get("cpu_name", "unknown"))
    if flags.get("amx_bf16"):
        return Hardware("cpu-amx", name, capability, True)
    if flags.get("avx512_bf16") or flags.get("avx512bf16"):
        return Hardware("cpu-avx512-bf16", name, capability, True)
    if flags.get("avx512_f") or flags.get("avx512f") or capability == "AVX512":
        return Hardware("cpu-avx512", name, capability, False)
    if flags.get("avx2") or capability == "AVX2":
        return Hardware("cpu-avx2", name, capability, False)
    return Hardware("cpu", name, capability, False)


def hardware(device: str | torch.device | None = None) -> Hardware:
    """The :class:`Hardware` of ``device`` (default CPU), read once per device."""
    return _describe(str(torch.device("cpu") if device is None else torch.device(device)))


def pass_dtype(dtype: torch.dtype, device: str | torch.device | None, shape: tuple[int, int]) -> torch.dtype:
    """The policy's pass dtype for a randomized SVD of [m, n] matrices stored in ``dtype`` on ``device``.

    bf16 for bf16 stacks of at least :data:`BF16_PASS_MIN_ENTRIES` entries per matrix on hardware with native
    bf16 GEMMs (no cast copy: the stack is read as stored); otherwise the compute dtype (float32, or float64 for
    float64).
    """
    if dtype == torch.float64:
        return torch.float64
    if dtype == torch.bfloat16 and shape[0] * shape[1] >= BF16_PASS_MIN_ENTRIES and hardware(device).bf16_gemm:
        return torch.bfloat16
    return torch.float32


@functools.cache
def _fingerprint(device: str) -> str:
    hw = _describe(device)
    doc = {
        # the policy's rules (precision, row blocks, conditioning) and what they run on
        "compute": {str(d): str(policy.compute_dtype(d)) for d in (*policy.LOW_PRECISION, torch.float64)},
        "row_block": policy.ROW_BLOCK,
        "refine_below": policy.REFINE_BELOW,
        "bf16_pass_min": BF16_PASS_MIN_ENTRIES,
        "device": torch.device(device).type,
        "hardware": [hw.kind, hw.name, hw.capability, hw.bf16_gemm],
        # LAPACK / BLAS builds and kernels come with torch: another torch may round differently
        "torch": torch.__version__,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def policy_fingerprint(device: str | torch.device | None = None) -> str:
    """A short digest of everything in the numerical policy that can change a result bit: the compute dtypes,
    row blocks and conditioning threshold (:mod:`weightgeo.linalg.policy`), the hardware kind, CPU or GPU
    model and capability of ``device``, and the torch version. Result caches key on it (docs/caching.md), so a
    result computed under another policy, on another kind of machine or by another torch is never served."""
    return _fingerprint(str(torch.device("cpu") if device is None else torch.device(device)))
