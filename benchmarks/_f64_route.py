"""The float64 CPU route the GPU suite checks the device against (benchmarks/gpu_suite.py): LAPACK SVD of both
sides in float64 and SciPy's angles, run smallest shape first in a background process beside the GPU (or inline
on CPU), each shape skipped with its reason when it cannot finish by its deadline.

Run as a script, it is that background worker: ``python benchmarks/_f64_route.py DIR``."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _gpu_record import Suite, child_env


def f64_route(W0: torch.Tensor, W1: torch.Tensor, k: int) -> dict[str, Any]:
    """The float64 route: LAPACK SVD of both sides (tall orientation), right-side angles (SciPy when present), NSS."""

    def right(W):
        A = W.double()
        if A.shape[0] >= A.shape[1]:
            _, S, Vh = torch.linalg.svd(A, full_matrices=False)
            return Vh.mT, S
        U, S, _ = torch.linalg.svd(A.mT, full_matrices=False)
        return U, S

    t = time.perf_counter()
    V0, S0 = right(W0)
    V1, S1 = right(W1)
    kk = min(k, *W0.shape)
    try:
        from scipy.linalg import subspace_angles

        ang = torch.from_numpy(subspace_angles(V0[:, :kk].numpy(), V1[:, :kk].numpy())).rad2deg().sort().values
        how = "scipy.linalg.subspace_angles"
    except ImportError:
        from weightgeo.linalg.angles import subspace_angles as wg_angles

        ang = torch.rad2deg(wg_angles(V0[:, :kk], V1[:, :kk])).sort().values
        how = "weightgeo.linalg.angles.subspace_angles (no SciPy)"
    nss = float((S1 - S0).norm() / S0.norm())
    return {
        "angles": ang,
        "nss": nss,
        "seconds": time.perf_counter() - t,
        "threads": torch.get_num_threads(),
        "angles_by": how,
    }


def route_flops(m: int, n: int) -> float:
    """LAPACK gesdd with vectors of both sides, tall orientation (≈ 4·M·N² + 8·N³ each): the estimate that
    decides whether a shape fits the worker's time box."""
    M, N = max(m, n), min(m, n)
    return 2 * (4 * M * N * N + 8 * N**3)


def ref_worker(folder: str) -> None:
    """The float64 route over the saved pairs, smallest first, one result file per shape; a shape whose estimate
    (from the rate measured on the shapes before it) overruns the deadline is skipped with its reason."""
    d = Path(folder)
    spec = json.loads((d / "spec.json").read_text())
    threads = torch.get_num_threads()  # restored: inline (on CPU) this runs in the suite's own process
    torch.set_num_threads(spec["threads"])
    try:
        _route_shapes(d, spec)
    finally:
        torch.set_num_threads(threads)
    (d / "done").write_text("done")


def _route_shapes(d: Path, spec: dict[str, Any]) -> None:
    pairs = torch.load(d / "pairs.pt")
    with contextlib.suppress(ImportError):  # imported before the first shape's clock starts
        import scipy.linalg  # noqa: F401
    rate = 5e9 * spec["threads"]  # flop/s until one shape is measured (conservative)
    for name in spec["order"]:
        W0, W1 = pairs[name]
        left = spec["deadline"] - time.time()
        est = route_flops(*W0.shape) / rate
        if est > left:
            (d / f"skip_{name}.json").write_text(
                json.dumps(
                    {
                        "reason": f"time box: estimated {est:.0f} s at {rate / 1e9:.0f} GFLOP/s, {max(left, 0):.0f} s left"
                    }
                )
            )
            continue
        res = f64_route(W0, W1, spec["k"])
        rate = route_flops(*W0.shape) / res["seconds"]
        res["gflops"] = rate / 1e9
        torch.save(res, d / f"ref_{name}.tmp")
        os.replace(d / f"ref_{name}.tmp", d / f"ref_{name}.pt")


class References:
    """The float64 route for the layer shapes: a background process on CUDA, inline (after the device timings,
    so the two never share the cores) on CPU."""

    def __init__(self, s: Suite, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], k: int, deadline_s: float):
        self.s, self.pairs, self.k = s, pairs, k
        self.mode = s.args.ref if s.args.ref != "auto" else ("background" if s.cuda else "inline")
        self.dir = Path(tempfile.mkdtemp(prefix="wg_gpu_ref_"))
        self.proc: subprocess.Popen | None = None
        self.order = sorted(pairs, key=lambda nm: route_flops(*pairs[nm][0].shape))
        self.threads = s.args.ref_threads or (
            max(1, (os.cpu_count() or 2) - 4) if self.mode == "background" else torch.get_num_threads()
        )
        spec = {"order": self.order, "k": k, "threads": self.threads, "deadline": time.time() + deadline_s}
        (self.dir / "spec.json").write_text(json.dumps(spec))
        if self.mode == "off":
            return
        torch.save({nm: (w0.cpu(), w1.cpu()) for nm, (w0, w1) in pairs.items()}, self.dir / "pairs.pt")
        if self.mode == "background":
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), str(self.dir)],
                env=child_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )

    def run_inline(self, deadline_s: float) -> None:
        if self.mode != "inline":
            return
        spec = json.loads((self.dir / "spec.json").read_text())
        spec["deadline"] = time.time() + deadline_s
        (self.dir / "spec.json").write_text(json.dumps(spec))
        ref_worker(str(self.dir))

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def finish(self, wait_s: float) -> None:
        """Wait for the background worker at most ``wait_s``, then stop it (its unfinished shapes are skipped)."""
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout=max(0.0, wait_s))
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        out = self.proc.stdout.read().decode(errors="replace") if self.proc.stdout else ""
        if self.proc.returncode not in (0, None):
            self.s.record["parts"].setdefault("pair", {})["ref_worker_output"] = out[-3000:]

    def result(self, name: str) -> tuple[dict[str, Any] | None, str]:
        f = self.dir / f"ref_{name}.pt"
        if f.exists():
            return torch.load(f), ""
        skip = self.dir / f"skip_{name}.json"
        if skip.exists():
            return None, json.loads(skip.read_text())["reason"]
        if self.mode == "off":
            return None, "--ref off"
        return None, "time box: the float64 route was still running or stopped before this shape"

    def rate(self) -> float | None:
        rates = [r["gflops"] for nm in self.order if (r := self.result(nm)[0]) is not None]
        return max(rates) * 1e9 if rates else None

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


if __name__ == "__main__":
    ref_worker(sys.argv[1])
