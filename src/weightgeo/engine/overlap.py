"""Subnetwork overlap of several fine-tunes of one base (``update_mask_overlap``, ``weightgeo compare --mask-overlap``):
one pass, one tensor at a time, in row chunks; the base's rows are read once for all fine-tunes and each
fine-tune's once, and every pair of update masks is counted from them (:mod:`weightgeo.metrics.mask_overlap`).

A tensor is compared where every fine-tune holds it (the rows all of them share, when a vocabulary grew); the FP8
rule decides where the base and a fine-tune both store it as scaled FP8, the bf16 rule elsewhere.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch

from .._version import __version__
from ..checkpoint import Checkpoint, Fp8Weight
from ..checkpoint.fp8 import fp8_dequantize
from ..checkpoint.view import read_expert
from ..linalg.policy import row_blocks
from ..metrics.mask_overlap import MaskOverlap, overlap_from_counts, pairwise_counts, pooled_overlap
from ..metrics.sparsity import unchanged_mask
from ..options import PairOptions
from ..report import Report
from .groups import fp8_mask, job_row
from .plan import Job
from .run import open_plans

__all__ = ["mask_overlaps", "overlap_summary", "pairwise_matrix"]


def overlap_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The model figure of pairwise overlap rows: every tensor's masks pooled (:func:`pooled_overlap`), and the
    same per module type (``by_module``)."""
    parts = [_part(r) for r in rows]
    out: dict[str, Any] = {
        "n_tensors": len(rows),
        "numel": sum(p.numel for p in parts),
        **pooled_overlap(parts).as_row(),
    }
    groups: dict[str, list[MaskOverlap]] = {}
    for r, p in zip(rows, parts):
        groups.setdefault(str(r.get("module")), []).append(p)
    out["by_module"] = {
        m: {"n_tensors": len(ps), "numel": sum(p.numel for p in ps), **pooled_overlap(ps).as_row()}
        for m, ps in sorted(groups.items())
    }
    return out


def _part(row: dict[str, Any]) -> MaskOverlap:
    return MaskOverlap(
        row["numel"],
        row["updated_a"],
        row["updated_b"],
        row["updated_both"],
        row["mask_jaccard"],
        row["mask_overlap"],
        row["random_mask_jaccard"],
        row["random_mask_overlap"],
    )


def mask_overlaps(base: Any, fts: Sequence[Any], options: PairOptions) -> dict[tuple[int, int], Report]:
    """The :class:`~weightgeo.report.Report` of every pair ``(i, j)``, i < j, of the fine-tunes ``fts`` of ``base``
    (``options``: the filter, ``eta``, ``dtype``, ``device``, ``progress``)."""
    t0 = time.perf_counter()
    b, fs, plans = open_plans(base, fts, options)
    try:
        by_uid = [{j.uid: j for j in p.jobs} for p in plans]
        common = [j.uid for j in plans[0].jobs if all(j.uid in m for m in by_uid)]
        rows: dict[tuple[int, int], list[dict[str, Any]]] = {
            (i, j): [] for i in range(len(fs)) for j in range(i + 1, len(fs))
        }
        todo: Any = common
        if options.progress:
            from tqdm.auto import tqdm

            todo = tqdm(common, desc="weightgeo mask overlap", unit="tensor", leave=False, dynamic_ncols=True)
        for uid in todo:
            jobs = [m[uid] for m in by_uid]
            n, counts = _count(b, fs, jobs, options)
            head = job_row(jobs[0])
            head["numel"] = n
            for (i, j), out in rows.items():
                found = overlap_from_counts(n, int(counts[i, i]), int(counts[j, j]), int(counts[i, j]))
                out.append({**head, **found.as_row()})
        only = sorted({j.uid for p in plans for j in p.jobs} - set(common))
        skipped = [{"name": u, "reason": "not in every fine-tune"} for u in only]
        meta_base = {
            "weightgeo_version": __version__,
            "kind": "update_mask_overlap",
            "base": b.source,
            "params": options.params(),
            "device": str(options.device),
            "torch_version": torch.__version__,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        reports = {}
        for (i, j), rs in rows.items():
            meta = {
                **meta_base,
                "ft_a": fs[i].source,
                "ft_b": fs[j].source,
                "skipped": [*plans[i].skipped, *plans[j].skipped, *skipped],
                "partial": [*plans[i].partial],
                "filtered_out": plans[i].filtered_out,
                "unmatched": {"only_ft_a": plans[i].alignment.only_ft, "only_ft_b": plans[j].alignment.only_ft},
            }
            reports[(i, j)] = Report(rows=rs, summary=overlap_summary(rs) if rs else {"n_tensors": 0}, meta=meta)
        return reports
    finally:
        b.close()
        for f in fs:
            f.close()


def _count(
    b: Checkpoint, fs: Sequence[Checkpoint], jobs: Sequence[Job], options: PairOptions
) -> tuple[int, torch.Tensor]:
    """Entries compared and C[i, j] = |M_i ∩ M_j| of the fine-tunes' update masks of one tensor, in row chunks."""
    job0 = jobs[0]
    rows = min(j.rows for j in jobs)
    row_len = job0.row_len
    spans = list(row_blocks(rows, row_len)) if job0.shape else [(0, 1)]
    counts = torch.zeros(len(fs), len(fs), dtype=torch.int64)
    fp8 = any(j.fp8 for j in jobs)
    for s, e in spans:
        c0 = _read(b, job0.base_name, job0, s, e, fp8=fp8)
        dense0 = None
        masks = []
        for f, job in zip(fs, jobs):
            where = f"{job.uid} rows {s}:{e}"
            if job.fp8 and isinstance(c0, Fp8Weight):
                c1 = _read(f, job.ft_name, job, s, e, fp8=True)
                assert isinstance(c1, Fp8Weight)
                m = fp8_mask(options, where, c0, c1)
            else:
                if dense0 is None:
                    dense0 = options.round(_dense(c0))
                c1 = _read(f, job.ft_name, job, s, e, fp8=False)
                m = ~unchanged_mask(dense0, options.round(_dense(c1)), options.eta, name=where)
            masks.append(m.reshape(-1).to(options.device))
        counts += pairwise_counts(torch.stack(masks))
    return (rows * row_len if job0.shape else 1), counts


def _read(ck: Checkpoint, name: str, job: Job, s: int, e: int, *, fp8: bool) -> torch.Tensor | Fp8Weight:
    """Rows ``s:e`` of one side as stored (its FP8 codes and scales with ``fp8``, where it has them)."""
    if not job.shape:
        return ck.get(name)
    if fp8 and job.expert is None:
        w = ck.fp8_weight(name, s, e)
        if w is not None:
            return w
    if job.expert is not None:
        return read_expert(ck, name, job.expert, s, e)
    return ck.get_rows(name, s, e)


def _dense(c: torch.Tensor | Fp8Weight) -> torch.Tensor:
    if isinstance(c, Fp8Weight):
        return fp8_dequantize(c.codes, c.scales, c.block, row_start=c.row_start, rows=c.rows)
    return c


def pairwise_matrix(reports: dict[tuple[int, int], Report], n: int, key: str) -> list[list[float]]:
    """The symmetric n × n matrix of a summary figure (``mask_jaccard``, ...) over the pairs; 1 on the diagonal."""
    out = [[1.0 if i == j else math.nan for j in range(n)] for i in range(n)]
    for (i, j), r in reports.items():
        out[i][j] = out[j][i] = float(r.summary.get(key, math.nan))
    return out
