"""The sparsity-only pass against a cold sequential read of the same bytes, and the CLI's fixed start-up cost.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_read.py [--dir /tmp/wg-profile/qwen05]

1. Cold reads. Before every timed run both checkpoint files are evicted from the page cache with
   ``posix_fadvise(POSIX_FADV_DONTNEED)`` (only these files: the machine is shared, so the global
   ``/proc/sys/vm/drop_caches`` is not touched), and ``fincore`` confirms that none of their pages is resident.
   Then, alternating, ``cat BASE FT > /dev/null`` (the sequential read of the same bytes) and
   ``weightgeo.compare(BASE, FT, metrics=["update_sparsity"], cache=False)`` inside this process (imports done:
   the pass itself). The same two again with the files in the page cache (warm). Fastest of ``--repeats``.
2. Start-up: ``python -X importtime -m weightgeo --help`` (total import time and the largest self-times that are
   weightgeo's own), the wall clock of ``python -m weightgeo --help`` and of ``python -c "import torch"`` beside it.

The pair is bench_memory.py's Qwen2.5-0.5B-shaped bf16 pair (written once under ``--dir``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ["WEIGHTGEO_CACHE"] = "off"
SRC = Path(__file__).resolve().parents[1] / "src"


def evict(paths: list[Path]) -> int:
    """Drop ``paths`` from the page cache; returns the pages still resident (0 when it worked)."""
    subprocess.run(["sync"], check=False)
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return resident(paths)


def resident(paths: list[Path]) -> int:
    try:
        out = subprocess.run(["fincore", "-b", "-n", "-o", "RES", *map(str, paths)], capture_output=True, text=True)
        return sum(int(x) for x in out.stdout.split())
    except (OSError, ValueError):
        return -1


def files(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*.safetensors"))


def time_cat(paths: list[Path]) -> float:
    t0 = time.perf_counter()
    subprocess.run(["cat", *map(str, paths)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def time_pass(base: Path, ft: Path) -> float:
    import weightgeo

    t0 = time.perf_counter()
    weightgeo.compare(base, ft, metrics=["update_sparsity"], progress=False, cache=False)
    return time.perf_counter() - t0


def startup(repeats: int) -> list[str]:
    import tempfile

    # as a user runs it: bytecode cached (this image sets PYTHONDONTWRITEBYTECODE; without a cache every import
    # compiles its source, which measured 1.1 s of the package's 2.3 s here), in a folder of its own
    drop = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "PYTHONDONTWRITEBYTECODE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = str(SRC)
    env["PYTHONPYCACHEPREFIX"] = tempfile.mkdtemp(prefix="wg_pycache_")
    subprocess.run([sys.executable, "-c", "import weightgeo.api, weightgeo.cli"], env=env, check=True)

    def wall(cmd: list[str]) -> float:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            subprocess.run(cmd, capture_output=True, env=env, check=True)
            best = min(best, time.perf_counter() - t0)
        return best

    py = sys.executable
    out = [
        f"- `python -m weightgeo --help`: {wall([py, '-m', 'weightgeo', '--help']):.2f} s wall (fastest of {repeats})",
        f"- `python -c 'import torch'`: {wall([py, '-c', 'import torch']):.2f} s",
        f"- `python -c 'import weightgeo'`: {wall([py, '-c', 'import weightgeo']):.2f} s",
        f"- `python -c 'import weightgeo.api'` (everything a command imports): "
        f"{wall([py, '-c', 'import weightgeo.api']):.2f} s",
        f"- `python -c 'pass'`: {wall([py, '-c', 'pass']):.2f} s",
    ]
    proc = subprocess.run(
        [py, "-X", "importtime", "-m", "weightgeo", "--help"], capture_output=True, text=True, env=env
    )
    rows = []
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if m:
            rows.append((int(m.group(1)), int(m.group(2)), len(m.group(3)), m.group(4)))
    total = max((c for _, c, _, _ in rows), default=0)
    torch_cum = max((c for _, c, _, n in rows if n == "torch"), default=0)
    own = sorted(((s, n) for s, _, _, n in rows if n.startswith("weightgeo")), reverse=True)[:8]
    third = sorted(
        ((c, n) for _, c, d, n in rows if d == 1 and not n.startswith(("weightgeo", "torch", "encodings"))),
        reverse=True,
    )[:6]
    out.append(f"- `-X importtime`: {total / 1e6:.2f} s of imports, of which torch {torch_cum / 1e6:.2f} s")
    out.append("- weightgeo's own modules, largest self-times: " + ", ".join(f"{n} {s / 1e3:.0f} ms" for s, n in own))
    out.append("- other top-level imports (cumulative): " + ", ".join(f"{n} {c / 1e3:.0f} ms" for c, n in third))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/wg-profile/qwen05"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-startup", action="store_true")
    args = ap.parse_args(argv)
    from _timing import machine_line
    from bench_memory import write_pair

    base, ft = write_pair(args.dir)
    paths = files(base) + files(ft)
    size = sum(p.stat().st_size for p in paths)
    command = "env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_read.py " + " ".join(
        shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:])
    )
    print(f"- machine: {machine_line()}")
    print(f"- command: `{command.strip()}`")
    print(f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; {len(paths)} files, {size / 1e9:.2f} GB")
    time_pass(base, ft)  # imports and first-touch costs out of the way
    best: dict[str, float] = {}
    left: list[int] = []
    for _ in range(args.repeats):
        for name, fn in (("cat", lambda: time_cat(paths)), ("weightgeo", lambda: time_pass(base, ft))):
            left.append(evict(paths))
            best[f"{name} cold"] = min(best.get(f"{name} cold", float("inf")), fn())
        for name, fn in (("cat", lambda: time_cat(paths)), ("weightgeo", lambda: time_pass(base, ft))):
            fn()  # make sure every page is in the cache
            best[f"{name} warm"] = min(best.get(f"{name} warm", float("inf")), fn())
    print(f"- pages still resident after eviction: {max(left)} (0: every cold run read from the device)")
    print("\n| read | cat (s) | cat GB/s | weightgeo sparsity pass (s) | GB/s | weightgeo / cat throughput (≥ 0.80) |")
    print("|---|---|---|---|---|---|")
    for state in ("cold", "warm"):
        c, w = best[f"cat {state}"], best[f"weightgeo {state}"]
        print(f"| {state} | {c:.2f} | {size / c / 1e9:.2f} | {w:.2f} | {size / w / 1e9:.2f} | {c / w:.2f} |")
    print("\nload average at the end: {:.1f}/{:.1f}/{:.1f}".format(*os.getloadavg()))
    if not args.no_startup:
        print("\nCLI start-up:\n")
        print("\n".join(startup(args.repeats)))


if __name__ == "__main__":
    main()
