"""The ``weightgeo`` command line: ``weightgeo compare BASE FT``, ``weightgeo trajectory RUN_DIR [--follow]``,
``weightgeo report R1.json [R2.json ...] --out PAGE.html`` and ``weightgeo cache info|prune``.

Bad input exits with status 2 and the error message on stderr; results go to stdout (and ``--out``, whose
missing parent folders are created, and said so on stderr). Ctrl-C exits with status 130; in follow mode the
report and figure written so far stay whole (every rewrite is atomic).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .defaults import ALPHA, ETA, HILL_K, PAIR_K, POLL_S, RANK, SIDE, STREAM_K, TEXT_WIDTH, THRESHOLD
from .errors import WeightgeoError
from .interrupts import answer_interrupts, say_interrupted
from .outputs import check_output_path

if TYPE_CHECKING:
    from .metrics.trajectory import LockingOnset
    from .report import Report

# The checkpoint readers, the engine, the trajectories and the renderers (and so torch) are imported by the
# functions that use them, not here: ``weightgeo --help`` then starts without torch.

__all__ = ["main"]


def size(text: str) -> int | float:
    """A ``--k`` / ``--rank`` value: ``512`` (a count) or ``0.125`` (a fraction of each matrix's smaller side);
    checked with the options."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def _add_filters(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--include",
        action="append",
        metavar="REGEX",
        help="analyse only tensors whose name matches (repeatable); presets: attention, mlp, linear, experts, router",
    )
    p.add_argument("--exclude", action="append", metavar="REGEX", help="skip tensors whose name matches (repeatable)")
    p.add_argument("--device", default=None, help="cpu (default: where the checkpoints are read) or cuda[:N]")
    p.add_argument(
        "--dtype",
        default=None,
        metavar="NAME",
        help="round both sides to this float format first (bfloat16, float16, float32, ...); "
        "default: compare in the stored formats",
    )
    p.add_argument(
        "--config",
        default=None,
        metavar="PATH",
        help="the model's HF config.json (or its folder): architecture numbers for native checkpoints "
        "(Megatron/slime iter_N, torchtitan step-N) that carry none; given to every checkpoint",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="PATH",
        help="also write the report: .json (rows, summary, meta) or .csv (rows); missing folders are created",
    )
    p.add_argument("--summary", action="store_true", help="print only the model summary, not the per-tensor table")
    _add_display(p)
    p.add_argument(
        "--html",
        type=Path,
        default=None,
        metavar="PATH",
        help="also write one self-contained HTML page (heatmaps, curves, the sortable table; opens offline)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--cache",
        type=Path,
        default=None,
        metavar="DIR",
        help="result cache folder (default: $WEIGHTGEO_CACHE, else ~/.cache/weightgeo); results of "
        "checkpoints on disk are reused and a killed run resumes",
    )
    g.add_argument("--no-cache", action="store_true", help="neither read nor write the result cache")


def _add_display(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--columns",
        nargs="+",
        default=None,
        metavar="N|NAME",
        help="--columns N fits tables to N terminal columns (default 120); --columns NAME [NAME ...] shows "
        "these columns of the per-tensor table",
    )
    p.add_argument("--wide", action="store_true", help="print every column at full width, whatever the width")


def _add_labels(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--labels",
        nargs="+",
        default=None,
        metavar="LABEL",
        help=f"short names of the {what} in tables, figures and pages, in order (default: their last path parts)",
    )


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose description may be a function, called when the help is printed (the trajectory
    command's names the run-folder namings, which live with the checkpoint readers)."""

    def format_help(self) -> str:
        if callable(self.description):
            self.description = self.description()
        return super().format_help()


def _trajectory_description() -> str:
    from .checkpoint.runs import NAMINGS_TEXT

    return (
        "Follow the cumulative update W_t - W_0 over the checkpoint folders of RUN_DIR "
        f"({NAMINGS_TEXT}): stable rank, "
        "norms, Hill index, Sim_K to the final subspace and the locking onset, and from the same read of each "
        "checkpoint the sparsity curves (entries unchanged since the base and since the previous checkpoint, "
        "the size of a sparse patch of each step). "
        "Checkpoints not completely written are left out (listed with the reason); "
        "--follow analyses new ones as the run writes them."
    )


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="weightgeo", description="The geometry of fine-tuning in parameter space.")
    parser.add_argument("--version", action="version", version=f"weightgeo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser(
        "compare",
        help="pair diagnostics of a fine-tuned checkpoint against its base",
        description="Compare FT against BASE: update sparsity, principal angles, spectral drift, "
        "update localization and stable rank, per tensor and for the whole model.",
    )
    c.add_argument("base", help="base checkpoint: HF dir, .safetensors/.bin file, or hub id")
    c.add_argument(
        "ft",
        nargs="+",
        help="fine-tuned checkpoint (or a PEFT LoRA adapter dir applied to BASE); "
        "several: each compared with BASE, which is read and decomposed once",
    )
    c.add_argument(
        "--metrics",
        nargs="+",
        metavar="NAME",
        default=None,
        help="update_sparsity principal_overlap spectral_drift update_localization stable_rank (default all)",
    )
    c.add_argument(
        "--k",
        type=size,
        default=PAIR_K,
        help=f"top-k subspace size for principal angles: a count, or a fraction in (0, 1) of each matrix's smaller "
        f"side (default {PAIR_K}: an eighth, the paper's 512 of 4096)",
    )
    c.add_argument("--side", choices=("right", "left"), default=SIDE, help=f"singular subspace side (default {SIDE})")
    c.add_argument(
        "--rank",
        type=size,
        default=RANK,
        help=f"localization reconstruction rank: a count or a fraction of the smaller side (default {RANK})",
    )
    c.add_argument("--alpha", type=float, default=ALPHA, help=f"localization mask fraction (default {ALPHA})")
    c.add_argument("--eta", type=float, default=ETA, help=f"bf16 relative tolerance (default {ETA:g})")
    c.add_argument(
        "--mask-overlap",
        action="store_true",
        help="with two or more fine-tunes: instead of the pair metrics, how much their update masks overlap "
        "(Jaccard index and overlap coefficient, each against independent random masks of the same sizes), as "
        "a matrix over the fine-tunes; --out PATH writes one report per pair (PATH-i-j.json)",
    )
    c.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="PNG",
        help="draw the figures: layer x module heatmaps and localization bars (several FTs side by side)",
    )
    _add_labels(c, "fine-tunes")
    c.add_argument(
        "--batch-mb",
        type=int,
        default=None,
        metavar="MB",
        help="memory budget of one shape group in MiB (default 64 on CPU, a quarter of free GPU "
        "memory on CUDA; 0 = one matrix at a time)",
    )
    _add_filters(c)

    t = sub.add_parser(
        "trajectory",
        help="rank curves and subspace locking over a checkpoint stream",
        description=_trajectory_description,  # type: ignore[arg-type]  # _Parser calls it when help is shown
    )
    t.add_argument("run_dir", help="run directory of checkpoint folders")
    t.add_argument("--base", default=None, help="initial model (default: the first complete checkpoint)")
    t.add_argument(
        "--strict",
        action="store_true",
        help="fail on a checkpoint that is not completely written instead of leaving it out",
    )
    t.add_argument(
        "--follow",
        action="store_true",
        help="keep watching RUN_DIR: analyse each checkpoint once it is complete, rewrite --out and "
        "--plot, print a line per new step",
    )
    t.add_argument("--until", type=int, default=None, metavar="STEP", help="--follow: stop after this step")
    t.add_argument(
        "--poll-s",
        type=float,
        default=POLL_S,
        metavar="S",
        help=f"--follow: seconds between scans of RUN_DIR (default {POLL_S:g})",
    )
    t.add_argument(
        "--idle-s",
        type=float,
        default=None,
        metavar="S",
        help="--follow: stop after S seconds without a new complete checkpoint (default: never)",
    )
    t.add_argument("--k", type=int, default=STREAM_K, help=f"subspace size K for Sim_K (default {STREAM_K})")
    t.add_argument(
        "--threshold", type=float, default=THRESHOLD, help=f"locking threshold on Sim_K (default {THRESHOLD})"
    )
    t.add_argument(
        "--hill-k", type=int, default=HILL_K, help=f"top singular values for the Hill index (default {HILL_K})"
    )
    t.add_argument(
        "--eta", type=float, default=ETA, help=f"bf16 relative tolerance of the sparsity curves (default {ETA:g})"
    )
    t.add_argument(
        "--no-sparsity",
        action="store_true",
        help="spectra only: no update/step sparsity curves (then 1-D tensors are not read)",
    )
    t.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="PNG",
        help="draw the trajectory figures: stable rank, ||dW||_F, Hill index, Sim_K with the locking onset, and the "
        "sparsity curves",
    )
    _add_labels(t, "run")
    _add_filters(t)
    _add_report_parser(sub)
    _add_cache_parser(sub)
    return parser


def _add_report_parser(sub: Any) -> None:
    r = sub.add_parser(
        "report",
        help="put saved reports side by side in one HTML page",
        description="Read reports written with --out R.json (compare or trajectory) and write one self-contained "
        "HTML page with them side by side (shared colour scales, the runs' labels in every figure); "
        "print their summaries in one table.",
    )
    r.add_argument("reports", nargs="+", type=Path, metavar="R.json", help="saved reports (Report.to_json)")
    _add_labels(r, "reports")
    r.add_argument("--out", type=Path, default=None, metavar="PAGE.html", help="the HTML page to write")
    r.add_argument("--title", default=None, help="the page title (default: the labels)")
    r.add_argument(
        "--threshold", type=float, default=THRESHOLD, help=f"locking threshold on Sim_K (default {THRESHOLD})"
    )
    r.add_argument("--plot", type=Path, default=None, metavar="PNG", help="also draw the figures into an image")
    _add_display(r)


def _add_cache_parser(sub: Any) -> None:
    k = sub.add_parser(
        "cache",
        help="show or prune the result cache",
        description="The result cache (default ~/.cache/weightgeo, or $WEIGHTGEO_CACHE): "
        "'info' lists entries and bytes per weightgeo version; 'prune' removes entries "
        "of other versions, entries unused for --older-than days, then the least "
        "recently used beyond --max-gb.",
    )
    k.add_argument("action", choices=("info", "prune"))
    k.add_argument(
        "--cache",
        type=Path,
        default=None,
        metavar="DIR",
        help="the cache folder (default: $WEIGHTGEO_CACHE, else $XDG_CACHE_HOME/weightgeo or ~/.cache/weightgeo)",
    )
    k.add_argument(
        "--older-than",
        type=float,
        default=None,
        metavar="DAYS",
        help="prune: remove entries not used for this many days (inf: no age limit)",
    )
    k.add_argument(
        "--max-gb",
        type=float,
        default=None,
        metavar="X",
        help="prune: then remove the least recently used entries until at most X GB remain (inf: no size limit)",
    )
    k.add_argument(
        "--keep-other-versions", action="store_true", help="prune: keep entries written by other weightgeo versions"
    )
    k.add_argument("--dry-run", action="store_true", help="prune: only say what would be removed")


def _cache_command(args: argparse.Namespace) -> int:
    from .cache import ResultCache, default_cache_dir, resolve_cache
    from .validation import check_amount

    if args.cache is not None:
        cache = resolve_cache(args.cache)
    else:
        cache = resolve_cache(None) or ResultCache(default_cache_dir())  # WEIGHTGEO_CACHE=off: still inspectable
    assert cache is not None
    if args.action == "info":
        print(cache.info())
        return 0
    # inf is "no limit" (as leaving the flag out); a finite amount too large for the machine is no limit either
    days = None if args.older_than is None else check_amount(args.older_than, "older_than", unit="days", finite=False)
    gb = None if args.max_gb is None else check_amount(args.max_gb, "max_gb", unit="GB", finite=False)
    seconds = None if days is None or not math.isfinite(days * 86400.0) else days * 86400.0
    max_bytes = None if gb is None or not math.isfinite(gb * 1e9) else int(gb * 1e9)
    result = cache.prune(
        older_than=seconds, max_bytes=max_bytes, other_versions=not args.keep_other_versions, dry_run=args.dry_run
    )
    print(f"weightgeo cache at {cache.root}: {result}")
    if not result.ok:
        print(
            f"weightgeo: error: the cache at {cache.root} could not be pruned as asked ("
            + "; ".join(result.errors)
            + "): make it writable by you (e.g. chmod -R u+w on it), or run as its owner",
            file=sys.stderr,
        )
        return 1
    return 0


def _filters(values: list[str] | None) -> str | list[str] | None:
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse a bad --out / --plot before the analysis runs, not after."""
    from .validation import check_report_path

    if args.command == "report":
        if args.out is not None:
            _check_html(args.out, "--out")
        if args.plot is not None:
            check_output_path(args.plot, what="--plot")
        return
    if getattr(args, "out", None) is not None:
        check_report_path(args.out)
        check_output_path(args.out)
    if getattr(args, "plot", None) is not None:
        check_output_path(args.plot, what="--plot")
    if getattr(args, "html", None) is not None:
        _check_html(args.html, "--html")


def _check_html(path: Path, flag: str) -> None:
    if path.suffix.lower() not in (".html", ".htm"):
        raise WeightgeoError(f"{flag} {path}: an HTML page needs a .html path, e.g. {path.with_suffix('.html')}")
    check_output_path(path, what=f"{flag} page")


def _width(args: argparse.Namespace) -> tuple[int | None, list[str] | None]:
    """(table width, chosen columns) from --wide and --columns N | NAME ..."""
    cols = getattr(args, "columns", None)
    if getattr(args, "wide", False):
        return None, (cols if cols and not (len(cols) == 1 and cols[0].isdigit()) else None)
    if cols and len(cols) == 1 and cols[0].isdigit():
        n = int(cols[0])
        if n < 40:
            raise WeightgeoError(f"--columns {n}: tables need at least 40 columns; give e.g. --columns 80 or --wide")
        return n, None
    return TEXT_WIDTH, cols or None


def _labels(args: argparse.Namespace, sources: list[str]) -> list[str]:
    from .render.words import short_labels

    labels = getattr(args, "labels", None)
    if labels is None:
        return short_labels([str(x) for x in sources])
    if len(labels) != len(sources):
        raise WeightgeoError(
            f"--labels: {len(labels)} label(s) for {len(sources)} input(s); give one per input, in order"
        )
    if len(set(labels)) != len(labels):
        raise WeightgeoError(f"--labels {' '.join(labels)}: labels must differ")
    return list(labels)


def _print_report(report, args: argparse.Namespace) -> None:
    from .render.text import rows_table, summary_block

    width, cols = _width(args)
    if not args.summary:
        print(rows_table(report.rows, columns=cols, width=width, hint=_CLI_HINT))
        print()
    print(summary_block(report, width=width, hint=_CLI_HINT))


_CLI_HINT = "--wide shows all, --columns NAME ... picks"


def _created(path: Path) -> str:
    """The outermost missing folder above ``path``, for a 'created folder' line; '' when none is missing."""
    missing = ""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        missing, parent = str(parent), parent.parent
    return missing


def _emit(report: Report, args: argparse.Namespace, out: Path | None = None, *, show: bool = True) -> None:
    from .validation import check_report_path

    if show:
        _print_report(report, args)
    out = args.out if out is None else out
    if out is not None:
        created = _created(check_report_path(out))
        _write(report, out)
        if created:
            print(f"created folder {created}", file=sys.stderr)
        print(f"wrote {out}", file=sys.stderr)


def _write(report: Report, out: Path) -> None:
    """``--out``: the report as CSV (rows) or JSON (rows, summary, meta), by the suffix (checked before the pass)."""
    (report.to_csv if out.suffix.lower() == ".csv" else report.to_json)(out)


def _cache_arg(args: argparse.Namespace) -> Any:
    return False if args.no_cache else args.cache


def _open_with_config(base: str, fts: list[str], config: str | None) -> tuple[Any, list[Any]]:
    """With ``--config``, the checkpoints opened with it (``open_checkpoint(config=)``); else the paths as given."""
    from .checkpoint import open_checkpoint

    if config is None:
        return base, list(fts)
    b = open_checkpoint(base, config=config)
    try:
        return b, [open_checkpoint(ft, base=b, config=config) for ft in fts]
    except BaseException:
        b.close()
        raise


def _run(args: argparse.Namespace) -> int:
    from .engine import compare, compare_many
    from .trajectory import rank_curve
    from .validation import check_int

    if args.command == "cache":
        return _cache_command(args)
    _check_outputs(args)
    if args.command == "compare":
        opts = dict(
            metrics=args.metrics,
            include=_filters(args.include),
            exclude=_filters(args.exclude),
            k=args.k,
            side=args.side,
            rank=args.rank,
            alpha=args.alpha,
            eta=args.eta,
            dtype=args.dtype,
            device=args.device,
            batch_bytes=None if args.batch_mb is None else check_int(args.batch_mb, "batch_mb", minimum=0) << 20,
            progress=not args.no_progress,
            cache=_cache_arg(args),
        )
        if args.mask_overlap:
            return _mask_overlap(args, opts)
        labels = _labels(args, list(args.ft))
        base, fts = _open_with_config(args.base, args.ft, args.config)
        if len(fts) == 1:
            report = compare(base, fts[0], **opts)
            _emit(report, args)
            _pages({labels[0]: report}, args)
            return 0
        # Several fine-tunes: one report each, in order; --out PATH becomes PATH-1.json, PATH-2.json, ...
        reports = {}
        for i, (label, report) in enumerate(zip(labels, compare_many(base, fts, **opts)), start=1):
            if not args.summary:
                print(_run_header(label, report))
            out = None if args.out is None else args.out.with_name(f"{args.out.stem}-{i}{args.out.suffix}")
            _emit(report, args, out, show=not args.summary)
            reports[label] = report
        _print_side_by_side(reports, args, legend=args.summary)
        _pages(reports, args)
        return 0
    if args.command == "trajectory":
        opts = dict(
            base=args.base,
            include=_filters(args.include),
            exclude=_filters(args.exclude),
            hill_k=args.hill_k,
            k=args.k,
            dtype=args.dtype,
            device=args.device,
            strict=args.strict,
            cache=_cache_arg(args),
            config=args.config,
            sparsity=not args.no_sparsity,
            eta=args.eta,
        )
        if args.follow:
            return _follow(args, opts)
        for flag, v in (("--until", args.until), ("--idle-s", args.idle_s)):
            if v is not None:
                raise WeightgeoError(f"{flag} applies to --follow only")
        report = rank_curve(args.run_dir, progress=not args.no_progress, **opts)
        onset = _with_onset(report, args)
        _emit(report, args)
        for line in _sparsity_lines(report):
            print(line)
        print(f"locking onset (Sim_{args.k} >= {args.threshold} from then on): step {onset.step}")
        _pages({_labels(args, [args.run_dir])[0]: report}, args)
        return 0
    if args.command == "report":
        return _report_command(args)
    raise AssertionError(args.command)  # argparse rejects unknown commands


def _bytes(n: float) -> str:
    """A byte count for people: 1.2 MB, 340 kB, 12 B (decimal units, as patch sizes are quoted)."""
    if n != n:  # NaN: no figure at that step
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def _sparsity_lines(report: Report) -> list[str]:
    """The sparsity curves as a small table: per step, entries unchanged since the base and since the previous
    checkpoint (parameter-weighted over the model) and the sparse patch of the step against the dense size."""
    curves = report.summary.get("curves", {})
    if "update_sparsity" not in curves:
        return []
    lines = ["sparsity curves (fraction of entries unchanged; patch = the changed entries of the step):"]
    lines.append(f"  {'step':>8}  {'since base':>10}  {'since prev':>10}  {'patch':>10}  {'dense':>10}")
    for step in report.summary["steps"]:
        by = report.summary["by_step"][step]
        lines.append(
            f"  {step:>8}  {by.get('update_sparsity', float('nan')):>10.4f}  "
            f"{by.get('step_sparsity', float('nan')):>10.4f}  {_bytes(by.get('patch_bytes', float('nan'))):>10}  "
            f"{_bytes(by.get('dense_bytes', float('nan'))):>10}"
        )
    return lines


def _mask_overlap(args: argparse.Namespace, opts: dict[str, Any]) -> int:
    """``compare BASE FT1 FT2 ... --mask-overlap``: the pairwise overlap matrices of the fine-tunes' update masks."""
    from .engine.overlap import mask_overlaps, pairwise_matrix
    from .options import PairOptions
    from .validation import check_report_path

    if len(args.ft) < 2:
        raise WeightgeoError("--mask-overlap compares the update masks of two or more fine-tunes: give FT1 FT2 [...]")
    if args.metrics is not None:
        raise WeightgeoError("--mask-overlap computes the masks' overlap only; drop --metrics")
    options = PairOptions.create(
        metrics="update_sparsity",
        include=opts["include"],
        exclude=opts["exclude"],
        eta=opts["eta"],
        dtype=opts["dtype"],
        device=opts["device"],
        progress=opts["progress"],
    )
    base, fts = _open_with_config(args.base, args.ft, args.config)
    reports = mask_overlaps(base, fts, options)
    n = len(args.ft)
    labels = [f"[{i + 1}]" for i in range(n)]
    for i, ft in enumerate(args.ft):
        print(f"{labels[i]} {ft}")
    for key, what in (
        ("mask_jaccard", "Jaccard index |A ∩ B| / |A ∪ B|"),
        ("mask_overlap", "overlap coefficient |A ∩ B| / min(|A|, |B|)"),
    ):
        seen = pairwise_matrix(reports, n, key)
        chance = pairwise_matrix(reports, n, f"random_{key}")
        print(
            f"\n{what} of the update masks, all tensors pooled (in parentheses: independent random masks of "
            f"the same sizes)"
        )
        width = 18
        print(" " * 6 + "".join(lab.rjust(width) for lab in labels))
        for i in range(n):
            cells = ["-" if i == j else f"{seen[i][j]:.4f} ({chance[i][j]:.4f})" for j in range(n)]
            print(labels[i].ljust(6) + "".join(c.rjust(width) for c in cells))
    any_report = next(iter(reports.values()))
    skipped = any_report.meta.get("skipped", [])
    if skipped:
        print(f"\nnot compared: {len(skipped)} tensor(s), e.g. {skipped[0]['name']} ({skipped[0]['reason']})")
    if args.out is not None:
        for (i, j), report in reports.items():
            out = args.out.with_name(f"{args.out.stem}-{i + 1}-{j + 1}{args.out.suffix}")
            created = _created(check_report_path(out))
            _write(report, out)
            if created:
                print(f"created folder {created}", file=sys.stderr)
            print(f"wrote {out}", file=sys.stderr)
    return 0


def _run_header(label: str, report: Report) -> str:
    src = _source(report)
    return f"== {src} ==" + ("" if label == src else f"  ({label})")


def _print_side_by_side(reports: dict[str, Report], args: argparse.Namespace, *, legend: bool = True) -> None:
    """One table of the runs' summaries; ``legend``: first a line per run tying its label to its input."""
    from .render.text import accounting_lines, side_by_side

    width, _ = _width(args)
    if legend:
        for lb, r in reports.items():
            print(_run_header(lb, r))
    print("side by side:")
    print(side_by_side(reports, width=width, threshold=getattr(args, "threshold", THRESHOLD)))
    for lb, r in reports.items():
        notes = accounting_lines(r, width=width)
        if notes:
            print(f"{lb}:")
            print("\n".join("  " + n for n in notes))


def _source(report: Report) -> str:
    return str(report.meta.get("ft") or report.meta.get("stream") or report.meta.get("source") or "?")


def _pages(reports: dict[str, Report], args: argparse.Namespace, *, quiet: bool = False) -> None:
    """--html and --plot of one run or several side by side (written atomically)."""
    from .render.html import write_html

    threshold = getattr(args, "threshold", THRESHOLD)
    html = getattr(args, "html", None) if args.command != "report" else args.out
    if html is not None:
        created = _created(html)
        write_html(reports, html, title=getattr(args, "title", None), threshold=threshold)
        if not quiet:
            if created:
                print(f"created folder {created}", file=sys.stderr)
            print(f"wrote {html}", file=sys.stderr)
    if args.plot is not None:
        from .plot import plot_runs

        plot_runs(reports, args.plot, threshold=threshold)
        if not quiet:
            print(f"wrote {args.plot}", file=sys.stderr)


def _report_command(args: argparse.Namespace) -> int:
    from .report import Report

    if not 0 < args.threshold <= 1:
        raise WeightgeoError(f"--threshold {args.threshold}: give a number in (0, 1]")
    reports = [Report.from_json(p) for p in args.reports]
    labels = _labels(args, [_source(r) for r in reports])
    runs = dict(zip(labels, reports))
    _print_side_by_side(runs, args)
    if args.out is None and args.plot is None:
        print("(give --out PAGE.html to write the page, --plot FIG.png for the figures)", file=sys.stderr)
    _pages(runs, args)
    return 0


def _with_onset(report: Report, args: argparse.Namespace) -> LockingOnset:
    from .trajectory import locking_onset

    onset = locking_onset(report, threshold=args.threshold)  # reuses the report's Sim_K curves
    report.summary["locking_onset"] = onset.step
    report.summary["mean_similarity"] = onset.mean_similarity
    return onset


def _follow(args: argparse.Namespace, opts: dict[str, Any]) -> int:
    """--follow: one line per new step; --out and --plot rewritten (atomically) after each."""
    from .follow import follow
    from .validation import check_amount

    opts.pop("strict")
    check_amount(args.poll_s, "poll_s", unit="seconds")
    if args.idle_s is not None:
        check_amount(args.idle_s, "idle_s", unit="seconds", finite=False)
    print(
        f"following {args.run_dir} (every {args.poll_s:g} s"
        + (f", until step {args.until}" if args.until is not None else "")
        + (f", stopping after {args.idle_s:g} s without a new checkpoint" if args.idle_s is not None else "")
        + "; Ctrl-C to stop)",
        flush=True,
    )
    last: tuple[Any, LockingOnset] | None = None
    _FOLLOWED.clear()
    try:
        for update in follow(
            args.run_dir,
            until=args.until,
            poll_s=args.poll_s,
            idle_s=args.idle_s,
            strict=args.strict,
            progress=False,
            **opts,
        ):
            report = update.report
            onset = _with_onset(report, args)
            by = report.summary["by_step"][update.step]
            c = report.meta.get("cache", {})
            nan = float("nan")
            # outputs first: once a step's line is printed, --out and --plot hold it (Ctrl-C keeps them whole)
            if args.out is not None:
                _write(report, args.out)
            _pages({_labels(args, [args.run_dir])[0]: report}, args, quiet=True)
            last = (update, onset)
            _FOLLOWED[:] = [update.step]
            sparse = (
                f"; unchanged {by['update_sparsity']:.4f} since the base, {by.get('step_sparsity', nan):.4f} "
                f"since the previous, patch {_bytes(by.get('patch_bytes', nan))}"
                if "update_sparsity" in by
                else ""
            )
            print(
                f"step {update.step}: {by.get('n_stable_rank', by.get('n_tensors', 0))} matrices, stable rank "
                f"{by.get('stable_rank', nan):.4g}, ||dW||_F {by.get('delta_frobenius', nan):.4g}{sparse}; "
                f"{len(report.summary['steps'])} step(s), "
                f"locking onset {onset.step}; {c.get('spectra_computed', 0)} spectra computed, "
                f"{c.get('spectra_reused', 0)} reused"
                + (f"; left out: {', '.join(s['name'] for s in update.skipped)}" if update.skipped else ""),
                flush=True,
            )
    except KeyboardInterrupt:
        say_interrupted(_interrupted(args))
        return 130
    if last is None:
        print(f"no complete checkpoint to analyse in {args.run_dir}", file=sys.stderr)
        return 0
    update, onset = last
    _print_report(update.report, args)
    for line in _sparsity_lines(update.report):
        print(line)
    print(f"locking onset (Sim_{args.k} >= {args.threshold} from then on): step {onset.step}")
    for p in (args.out, args.plot, args.html):
        if p is not None:
            print(f"wrote {p}", file=sys.stderr)
    return 0


#: the steps a --follow run has written out so far (what the interrupt message says is kept)
_FOLLOWED: list[int] = []


def _interrupted(args: argparse.Namespace) -> str:
    """What Ctrl-C leaves: the outputs written whole (--follow), or none; and what a re-run does (the cache)."""
    if getattr(args, "follow", False):
        outs = [str(p) for p in (args.out, args.plot, getattr(args, "html", None)) if p is not None]
        kept = (
            f"the report up to step {_FOLLOWED[-1]}" + (f" in {', '.join(outs)}" if outs else "") + " (written whole)"
        )
        done = kept if _FOLLOWED else "nothing written yet"
    else:
        done = "no report was written"
    if getattr(args, "no_cache", False):
        return f"{done}; no result cache was used (--no-cache), so a re-run starts over"
    try:
        from .cache import resolve_cache

        cache = resolve_cache(args.cache) if args.cache is not None else resolve_cache(None)
    except WeightgeoError:
        cache = None
    if cache is None:
        return f"{done}; the result cache is off (WEIGHTGEO_CACHE), so a re-run starts over"
    return (
        f"{done}; what was finished is kept in the result cache at {cache.root}: re-run the same command to resume "
        f"from there"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``weightgeo`` console script; returns the exit status. Ctrl-C exits with 130 within a
    second or two wherever it lands (:mod:`weightgeo.interrupts`)."""

    args = _parser().parse_args(argv)  # --help and bad flags end here, before torch is imported
    from .validation import cli_syntax

    shown = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        # messages name options as flags (--hill-k 1), not as keywords (hill_k=1)
        with cli_syntax(), answer_interrupts(lambda: _interrupted(args)):
            return _run(args)
    except WeightgeoError as e:
        print(f"weightgeo: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        say_interrupted(_interrupted(args))
        return 130
    finally:
        warnings.showwarning = shown


def console() -> None:
    """The ``weightgeo`` console script and ``python -m weightgeo``: :func:`main`, then exit with its status. After
    Ctrl-C the process ends at once (its outputs are whole, its messages flushed): finalising the interpreter (the
    garbage collection of torch's objects) can take seconds, and the user asked to stop."""
    status = main()
    if status == 130:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(status)
    sys.exit(status)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line on stderr (a command-line user needs the message, not our source line)."""
    print(f"weightgeo: warning: {message}", file=sys.stderr if file is None else file)


if __name__ == "__main__":  # pragma: no cover
    console()
