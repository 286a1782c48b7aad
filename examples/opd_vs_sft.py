"""OPD vs SFT vs RLVR on a miniature in the paper's regime: train real checkpoint streams, check the regime,
measure the geometry, and give each of the paper's seven claims a verdict with a confidence interval.

    python examples/opd_vs_sft.py --quick            # <= 3 min on 2 idle cores, one seed -> runs/opd_vs_sft/quick/
    python examples/opd_vs_sft.py                    # full, 3 seeds, <= 30 min on 2 idle cores -> runs/opd_vs_sft/full/
    python examples/opd_vs_sft.py --controls         # then the controls (projection, head-only, sparsification,
                                                     #   off-policy, mixes), reusing the full run: <= 30 min
    python examples/opd_vs_sft.py --smoke --out DIR  # seconds-long end-to-end check (tests, CI); numbers mean nothing

Options: ``--jobs N`` parallel training / measurement processes (default 2, one per core), ``--threads T``
torch threads per process (default 1), ``--out DIR`` output folder (default runs/opd_vs_sft/<mode>).

Starting from the shipped bf16 student base and teacher (examples/assets, made by
``python -m weightgeo.train.pretrain --out examples/assets``), it runs SFT from the base (seed 0's final
checkpoint is the anchor), then the regime checks R1-R3 (printed before any geometry is measured), then OPD,
the null (OPD with its advantages permuted across the batch's tokens) and one 1000-step RLVR run per seed
from the anchor, read at step 300 (matched steps) and 1000 (the paper's ratio), each a ``checkpoint-<step>``
stream with fp32 masters beside it. It measures the streams with weightgeo's public API (``compare``,
``rank_curve``, a live ``Tracker`` on OPD checked against the offline results), decides every claim by the
rule fixed in docs/reproduction.md before the first run, and writes ``report.html`` (open it first: the
conclusion, every link's verdict, layer x module heatmaps), ``report.md``, ``report.json``, ``geometry.html``
(weightgeo's page of the pair comparisons) and the figures into the output folder. Runs already in the output
folder with the same configuration are reused.

Nothing here is tuned on geometry: the task, the assets and the regime thresholds were fixed on accuracy, KL
and lengths only; the criteria and the primary-K rule were committed before the first full run.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:  # the miniature/ package beside this file, however this file is run or imported
    sys.path.insert(0, HERE)

from miniature.claims import Data, evaluate_claims  # noqa: E402
from miniature.figures import captions, write_figures  # noqa: E402
from miniature.jobs import run_all  # noqa: E402
from miniature.plan import ASSETS, FULL, QUICK, SMOKE, build_jobs  # noqa: E402
from miniature.report import regime_line, write_report  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one seed, OPD 100 / RLVR 333 steps, no controls (<= 3 min)")
    ap.add_argument("--smoke", action="store_true", help="seconds-long run of the whole pipeline (meaningless numbers)")
    ap.add_argument("--controls", action="store_true", help="add the controls (claims 6-7); reuses the runs in --out")
    ap.add_argument("--out", default=None, help="output folder (default runs/opd_vs_sft/<full|quick|smoke>)")
    ap.add_argument("--jobs", type=int, default=2, help="parallel processes (default 2; 1 = in this process)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    ap.add_argument("--assets", default=str(ASSETS), help="folder with base/ and teacher/ (default: shipped)")
    ap.add_argument("--train-only", action="store_true", help="train and check the regime; measure no geometry")
    args = ap.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    plan = copy.deepcopy(SMOKE if args.smoke else QUICK if args.quick else FULL)
    plan.controls = plan.controls or args.controls
    assets = Path(args.assets)
    out = Path(args.out) if args.out else Path("runs") / "opd_vs_sft" / mode
    if not all((assets / n / "model.safetensors").is_file() for n in ("base", "teacher")):
        print(f"missing {assets}/base or teacher: run `python -m weightgeo.train.pretrain --out {assets}` (~3 min)")
        return 1
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    machine = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "jobs": args.jobs,
        "threads": args.threads,
        "load_start": [round(x, 2) for x in os.getloadavg()],
    }
    label = mode + (" + controls" if plan.controls and mode != "smoke" else "")
    print(f"[{label}] {out.resolve()}: {args.jobs} job(s) x {args.threads} thread(s)", flush=True)
    jobs = build_jobs(plan, assets)
    if args.train_only:
        jobs = {n: j for n, j in jobs.items() if not j["kind"].startswith("measure")}
    regime_box: dict = {}

    def on_done(name, res):
        if name == "regime":
            regime_box.update(res)
            print("  " + regime_line(res) + ("" if res["passed"] else "  => every claim is untestable"), flush=True)
            print("  measuring geometry only from here on", flush=True)

    results = run_all(jobs, out, assets, n_workers=args.jobs, threads=args.threads, on_done=on_done)
    if args.train_only:
        print(f"trained in {time.perf_counter() - t0:.0f} s wall (no geometry measured): {out.resolve()}")
        return 0
    torch.set_num_threads(args.threads)
    D = Data(plan, results, out)
    ev = evaluate_claims(D, regime_box)
    K = (ev["primary_k"] or {"k": 4})["k"]
    figures = write_figures(D, out, K, ev["details"])
    figure_captions = captions(D, figures)
    machine["load_end"] = [round(x, 2) for x in os.getloadavg()]
    wall = time.perf_counter() - t0
    R = write_report(out, label, plan, results, regime_box, ev, D, figures, wall, machine, figure_captions)
    t = R.get("tracker_opd")
    if t:
        print(
            f"tracker vs offline rank_curve (OPD seed 0): {t['rows_matched']}/{t['rows_tracker']} rows, max rel diff "
            + ", ".join(f"{k} {v:.1e}" for k, v in t["max_rel_diff"].items())
        )
    print(
        f"\nwrote {out.resolve()}/report.html, report.md, report.json, geometry.html"
        + (f", {', '.join(figures)}" if figures else "")
        + f"; wall {wall:.0f} s"
    )
    print("\n" + regime_line(regime_box))
    for c in R["claims"]:
        d = next(x for x in R["claim_details"] if x["id"] == c["id"])
        ci = "" if c["ci95"] is None else f"  CI [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]"
        st = "" if c["statistic"] is None else f"  statistic {c['statistic']:+.4f}"
        print(
            f"  {c['id']}. {c['verdict'].upper():<12} {c['text']}{st}{ci}"
            + ("  (not run in this mode)" if d.get("not_run") else "")
        )
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
