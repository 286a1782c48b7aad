"""The full suite beside its peers on one pair, back to back in one run: weightgeo (this tree, and optionally an
older tree for a before/after), OPD-Param-Analysis and modeldelta.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_peers.py \\
        --opd /tmp/peers/OPD-Param-Analysis --modeldelta /tmp/peers/modeldelta [--baseline-src /tmp/wg-before/src]

The pair is bench_memory.py's Qwen2.5-0.5B-shaped bf16 pair (written once under ``--dir``). Every tool runs as a
fresh process under ``/usr/bin/time -v`` (wall clock with interpreter start and imports, peak RSS), in the order
given by ``--order``, ``--repeats`` times; the table keeps each tool's fastest run and gives every ratio against
weightgeo's. The peers are public repositories that this project does not vendor: pass the path of a local
checkout (``git clone https://github.com/SydCS/OPD-Param-Analysis``, ``git clone
https://github.com/nick-yudin/modeldelta``); a peer without a path, or whose checkout is missing, is skipped with
that reason. What each computes:

* weightgeo: ``python -m weightgeo compare BASE FT --no-cache`` (all metrics, k = 512: update sparsity by the bf16
  rule, principal angles at k = 512 and NSS float64-accurate, localization, stable rank; every tensor).
* OPD-Param-Analysis: ``scripts/analyze_opd_delta.py --dtype float32 --device cpu --max_exact_svd_dim 4096
  --approx_svd_max_numel 3000000`` (its README's options): float32 LAPACK SVDs of both matrices and of ΔW,
  top-k subspace overlaps, mask overlaps, coordinate statistics.
* modeldelta: ``python -m modeldelta BASE FT -o out.json``: float32 ``svdvals`` of ΔW (effective rank,
  top-20 concentration), cosine similarity, |Δ| < 1e-5 sparsity; tensors under 1000 entries skipped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
SRC = Path(__file__).resolve().parents[1] / "src"


def timed(cmd: list[str], env: dict[str, str], cwd: str | None = None) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env, cwd=cwd)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr[-1500:]}"}
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    cpu = re.search(r"Percent of CPU this job got: (\d+)%", proc.stderr)
    return {
        "wall_s": wall,
        "peak_rss_gb": int(rss.group(1)) / 1e6 if rss else float("nan"),
        "cpu_percent": float(cpu.group(1)) if cpu else float("nan"),
        "stdout": proc.stdout[-2000:],
    }


def tools(args: argparse.Namespace, base: Path, ft: Path, out: Path) -> dict[str, tuple[list[str], dict, str]]:
    """name -> (command, environment, why skipped or '')."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    env.update(WEIGHTGEO_CACHE="off", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    wg = [sys.executable, "-m", "weightgeo", "compare", str(base), str(ft), "--summary", "--no-progress"]
    wg += ["--no-cache", "--k", str(args.k)]
    found: dict[str, tuple[list[str], dict, str]] = {"weightgeo": (wg, {**env, "PYTHONPATH": str(SRC)}, "")}
    if args.baseline_src:
        why = "" if (args.baseline_src / "weightgeo").is_dir() else f"no weightgeo package under {args.baseline_src}"
        found["weightgeo (baseline)"] = (wg, {**env, "PYTHONPATH": str(args.baseline_src)}, why)
    script = args.opd / "scripts" / "analyze_opd_delta.py" if args.opd else None
    opd = [sys.executable, str(script), "--src_model", str(base), "--opd_model", str(ft)]
    opd += ["--out_dir", str(out / "opd"), "--dtype", "float32", "--device", "cpu"]
    opd += ["--max_exact_svd_dim", "4096", "--approx_svd_max_numel", "3000000"]
    why = "no --opd checkout given" if script is None else ("" if script.exists() else f"{script} not found")
    found["OPD-Param-Analysis"] = (opd, env, why)
    pkg = args.modeldelta / "modeldelta" if args.modeldelta else None
    md = [sys.executable, "-m", "modeldelta", str(base), str(ft), "-o", str(out / "modeldelta.json"), "-q"]
    why = "no --modeldelta checkout given" if pkg is None else ("" if pkg.is_dir() else f"{pkg} not found")
    found["modeldelta"] = (md, {**env, "PYTHONPATH": str(args.modeldelta)} if args.modeldelta else env, why)
    return found


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/wg-profile/qwen05"), help="where the pair is written")
    ap.add_argument("--opd", type=Path, help="a checkout of github.com/SydCS/OPD-Param-Analysis")
    ap.add_argument("--modeldelta", type=Path, help="a checkout of github.com/nick-yudin/modeldelta")
    ap.add_argument("--baseline-src", type=Path, help="the src/ folder of an older weightgeo, timed beside this one")
    ap.add_argument("--k", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=1, help="runs per tool (the fastest is kept)")
    ap.add_argument("--order", default="weightgeo,weightgeo (baseline),modeldelta,OPD-Param-Analysis")
    ap.add_argument("--json", type=Path, help="also write every figure here")
    args = ap.parse_args(argv)
    from _timing import machine_line
    from bench_memory import write_pair

    base, ft = write_pair(args.dir)
    command = "env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_peers.py " + " ".join(
        shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:])
    )
    print(f"- machine: {machine_line()}")
    print(f"- command: `{command.strip()}`")
    print(f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; pair: {base}, {ft}", flush=True)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="wg_peers_") as tmp:
        found = tools(args, base, ft, Path(tmp))
        names = [n for n in args.order.split(",") if n in found]
        for _ in range(args.repeats):
            for name in names:
                cmd, env, why = found[name]
                if why:
                    results[name] = {"skipped": why}
                    continue
                load = os.getloadavg()[0]
                r = timed(cmd, env)
                r["load"] = load
                print(f"  {name}: {json.dumps({k: v for k, v in r.items() if k != 'stdout'})}", flush=True)
                best = results.get(name)
                if "error" in r or best is None or r["wall_s"] < best.get("wall_s", float("inf")):
                    results[name] = r
    ref = results.get("weightgeo", {}).get("wall_s")
    print("\n| tool | wall (s) | peak RSS (GB) | CPU % | load at start | wall / weightgeo's |")
    print("|---|---|---|---|---|---|")
    for name in names:
        r = results[name]
        if "skipped" in r or "error" in r:
            print(f"| {name} | {r.get('skipped') or r.get('error', '')[:200]} | | | | |")
            continue
        ratio = f"{r['wall_s'] / ref:.2f}" if ref else ""
        print(
            f"| {name} | {r['wall_s']:.1f} | {r['peak_rss_gb']:.2f} | {r['cpu_percent']:.0f} | {r['load']:.1f} | "
            f"{ratio} |"
        )
    print("\nload average at the end: {:.1f}/{:.1f}/{:.1f}".format(*os.getloadavg()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
