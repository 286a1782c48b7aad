"""The GPU suite's bookkeeping (benchmarks/gpu_suite.py): the rows of its one table, the JSON record rewritten
after each part, the time box, CUDA-event timing, and the machine's environment and measured ceilings (copy
rate, GEMM rates, the HBM bandwidth the floor uses)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _timing import machine_line, markdown_table

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"

#: share of --budget per part (unused time carries to the next part); the rest is start-up and the final phase
SHARES = {"tests": 0.17, "rsvd": 0.24, "pair": 0.24, "profile": 0.14, "engine": 0.12}
RESERVE = 0.04  # of --budget, for the float64 route's results, the host-side profile rows and the output

#: HBM bandwidth by device name (vendor datasheets, TB/s), first match wins
DATASHEET_TBS = (
    ("H200", 4.8),
    ("GH200", 4.0),
    ("H100 NVL", 3.9),
    ("H100 PCIe", 2.0),
    ("H100", 3.35),
    ("H800", 3.35),
    ("A100-SXM4-80GB", 2.039),
    ("A100 80GB", 1.935),
    ("A100", 1.555),
    ("L40S", 0.864),
)


class Suite:
    """Rows of the table, the JSON record and the time box of one run."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.args, self.device = args, device
        self.cuda = device.type == "cuda"
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + args.budget
        self.reserve = RESERVE * args.budget
        self.carry = 0.0
        self.rows: list[dict[str, Any]] = []
        self.record: dict[str, Any] = {
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name] + sys.argv),
            "args": vars(args),
            "env": {},
            "parts": {},
        }
        self.part_end = self.deadline

    # --- time box ---
    def now(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        """Seconds left in the current part."""
        return self.part_end - time.perf_counter()

    def start_part(self, name: str) -> float:
        share = SHARES[name] * self.args.budget + self.carry
        room = self.deadline - self.reserve - time.perf_counter()
        allowed = max(0.0, min(share, room))
        self.part_end = time.perf_counter() + allowed
        return allowed

    def end_part(self) -> None:
        self.carry = max(0.0, self.left())

    # --- rows ---
    def row(
        self,
        part: str,
        case: str,
        status: str,
        *,
        ms: float | None = None,
        against: str = "",
        ratio: float | None = None,
        accuracy: str = "",
        peak: float | None = None,
        note: str = "",
        **data: Any,
    ) -> dict[str, Any]:
        r = dict(
            part=part,
            case=case,
            status=status,
            ms=ms,
            against=against,
            ratio=ratio,
            accuracy=accuracy,
            peak_gib=peak,
            note=note,
            **data,
        )
        self.rows.append(r)
        print(
            f"[{self.now():6.1f}s] {part:8s} {case}: {status}"
            + (f", {ms:.3g} ms" if ms is not None else "")
            + (f", {against}" if against else "")
            + (f", ratio {ratio:.3g}" if ratio is not None else "")
            + (f", {accuracy}" if accuracy else "")
            + (f" ({note})" if note else ""),
            flush=True,
        )
        return r

    def skip(self, part: str, case: str, why: str) -> None:
        self.row(part, case, "skipped", note=why)

    # --- GPU memory ---
    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.cuda else None

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def free(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()

    # --- output ---
    def table(self) -> str:
        def f(x: float | None, digits: int = 3) -> str:
            return "" if x is None else "–" if x != x else f"{x:.{digits}g}"

        body = [
            (
                r["part"],
                r["case"],
                r["status"],
                f(r["ms"]),
                r["against"],
                f(r["ratio"]),
                r["accuracy"],
                f(r["peak_gib"]),
                r["note"],
            )
            for r in self.rows
        ]
        return markdown_table(
            ["part", "case", "status", "time (ms)", "against", "ratio", "accuracy", "peak GPU (GiB)", "note"], body
        )

    def write(self) -> None:
        if not self.args.out:
            return
        self.record["rows"] = self.rows
        self.record["elapsed_s"] = round(self.now(), 2)
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(self.record, indent=1, default=_jsonable))
        tmp.replace(out)


def _jsonable(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, (torch.dtype, torch.device, Path)):
        return str(x)
    return repr(x)


def timed(s: Suite, fn: Callable[[], Any], *, reps: int, warmup: int = 1) -> tuple[float, list[float], Any]:
    """Median seconds of ``fn`` over ``reps`` runs after ``warmup`` runs: CUDA events on a GPU (recorded around the
    call on the current stream, then synchronised), ``perf_counter`` on CPU."""
    out = None
    for _ in range(warmup):
        out = fn()
    s.sync()
    times = []
    for _ in range(reps):
        if s.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times), times, out


def ms(seconds: float) -> str:
    """Milliseconds to three significant digits, for the 'against' column."""
    return f"{seconds * 1e3:.3g} ms"


def once(s: Suite, fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall seconds of one synchronised call (for steps that sync on the host anyway)."""
    s.sync()
    t = time.perf_counter()
    out = fn()
    s.sync()
    return time.perf_counter() - t, out


def environment(s: Suite) -> dict[str, Any]:
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "machine": machine_line(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    import weightgeo

    env["weightgeo"] = f"{weightgeo.__version__} from {Path(weightgeo.__file__).parent}"
    from weightgeo.linalg.hardware import hardware

    env["hardware"] = hardware(s.device).as_dict()
    if s.cuda:
        p = torch.cuda.get_device_properties(s.device)
        env.update(
            device=p.name,
            gpu_memory_gib=round(p.total_memory / 2**30, 1),
            sms=p.multi_processor_count,
            capability=f"sm_{p.major}{p.minor}",
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
            linalg_library=str(torch.backends.cuda.preferred_linalg_library()),
            magma=bool(getattr(torch.cuda, "has_magma", False)),
        )
        env["driver"] = _driver_version()
    else:
        env.update(device="cpu: " + str(env["hardware"]["name"]), driver=None, gpu_memory_gib=None)
    return env


def _driver_version() -> str | None:
    try:
        q = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        if q.returncode == 0 and q.stdout.strip():
            return q.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import pynvml

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:  # the driver version is informative only
        return None


def ceilings(s: Suite) -> dict[str, float]:
    """Measured device-to-device copy rate (bytes read + written) and GEMM rates (bf16, fp32)."""
    dev, small = s.device, s.args.small or not s.cuda
    nbytes = (64 << 20) if small else (2 << 30)
    x = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    t, _, _ = timed(s, lambda: y.copy_(x), reps=5 if small else 10, warmup=2)
    out = {"copy_TBs": 2 * nbytes / t / 1e12}
    del x, y
    n = 512 if small else 8192
    g = torch.Generator(device=dev).manual_seed(0)
    for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a = torch.randn(n, n, generator=g, device=dev).to(dt)
        b = torch.randn(n, n, generator=g, device=dev).to(dt)
        t, _, _ = timed(s, lambda: a @ b, reps=3 if small else 10, warmup=2)
        out[f"gemm_{name}_TFLOPs"] = 2 * n**3 / t / 1e12
    s.free()
    return out


def bandwidth_used(s: Suite, measured_tbs: float) -> tuple[float, str]:
    if s.args.bandwidth:
        return s.args.bandwidth, f"{s.args.bandwidth:g} TB/s (--bandwidth)"
    if s.cuda:
        name = torch.cuda.get_device_name(s.device)
        for key, tbs in DATASHEET_TBS:
            if key in name:
                return tbs, f"{tbs:g} TB/s ({key} datasheet)"
    return measured_tbs, f"{measured_tbs:.3g} TB/s (measured copy rate: no datasheet value for this device)"


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env
