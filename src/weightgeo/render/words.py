"""Plain sentences and short labels about reports: what a reader should take away, in words.

>>> from weightgeo.report import Report
>>> r = Report(rows=[], summary={"update_sparsity": 0.8054, "low_magnitude_overlap": 0.83},
...            meta={"kind": "compare", "ft": "/runs/opd/checkpoint-300", "params": {"alpha": 0.5}})
>>> default_label(r)
'opd/checkpoint-300'
>>> takeaways({"OPD": r})[0]
'80.5% of the weights kept their bf16 value (19.5% changed).'
>>> short_labels(["/a/run1/checkpoint-10", "/b/run2/checkpoint-10"])
['run1/checkpoint-10', 'run2/checkpoint-10']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any

from ..defaults import THRESHOLD
from .cells import number
from .panels import final_rows, locking_of, report_kind, step_summary
from .vocabulary import NORM_KEYS, describe

__all__ = ["default_label", "short_labels", "takeaways", "source_of"]


def source_of(report: Any) -> str:
    """The input a report describes: the fine-tune of a comparison, the run of a trajectory."""
    meta = report.meta or {}
    return str(meta.get("ft") or meta.get("stream") or meta.get("source") or "run")


def short_labels(sources: Sequence[str]) -> list[str]:
    """Labels for sources: the last path components, as few as keep them distinct (checkpoint folders are
    named alike, so ``checkpoint-300`` alone says little: its parent joins it)."""
    parts = [PurePath(s).parts or (s,) for s in sources]
    for n in range(1, max((len(p) for p in parts), default=1) + 1):
        labels = ["/".join(p[-n:]) for p in parts]
        generic = any(p[-1].split("-")[0] in ("checkpoint", "global_step", "step", "iter") for p in parts if p)
        if len(set(labels)) == len(labels) and not (generic and n == 1 and any(len(p) > 1 for p in parts)):
            return labels
    return [str(s) for s in sources]


def default_label(report: Any) -> str:
    """A short label for one report (its source's last path components)."""
    return short_labels([source_of(report)])[0]


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%" if v < 0.995 or v == 1 else f"{100 * v:.2f}%"


def _one_pair(s: Mapping[str, Any], meta: Mapping[str, Any]) -> list[str]:
    out = []
    params = meta.get("params") or {}
    u = number(s.get("update_sparsity"))
    if u is not None:
        out.append(f"{_pct(u)} of the weights kept their bf16 value ({_pct(1 - u)} changed).")
    ang, top = number(s.get("max_principal_angle")), number(s.get("max_principal_angle_overall"))
    if ang is not None:
        k = params.get("k")
        out.append(
            f"The top-{k or 'k'} singular subspaces turned by {ang:.3g}° per matrix on average"
            + (f" (at most {top:.3g}°)" if top is not None else "")
            + "; random subspaces would sit near 90°."
        )
    d = number(s.get("spectral_drift"))
    if d is not None:
        out.append(f"Singular values moved by {d:.2g} of their size (spectral drift NSS).")
    lm, alpha = number(s.get("low_magnitude_overlap")), params.get("alpha")
    if lm is not None and isinstance(alpha, (int, float)):
        where = "preferentially on" if lm > alpha else "no more than chance on"
        out.append(
            f"Changed entries sit {where} the smallest weights: {_pct(lm)} of them fall in the "
            f"{_pct(alpha)} lowest-magnitude entries (random: {_pct(alpha)})."
        )
    sr = number(s.get("stable_rank"))
    if sr is not None:
        out.append(f"The update spreads over about {sr:.3g} directions per matrix (stable rank of ΔW).")
    return out


def _one_trajectory(report: Any, threshold: float) -> list[str]:
    out = []
    step, rows = final_rows(report)
    by = step_summary(report, step)
    sr = number(by.get("stable_rank"))
    norm = next((number(by.get(k)) for k in NORM_KEYS if number(by.get(k)) is not None), None)
    if sr is not None:
        out.append(
            f"At the last checkpoint (step {step}) ΔW spreads over about {sr:.3g} directions per matrix"
            + (f", with ‖ΔW‖_F {norm:.2g} on average." if norm is not None else ".")
        )
    lock = locking_of(report, threshold)
    if lock is not None:
        if lock.step is None:
            out.append(f"The top-{lock.k} subspace of ΔW_t never locks before the last checkpoint.")
        else:
            out.append(
                f"The top-{lock.k} subspace of ΔW_t locks at step {lock.step} (Sim_{lock.k} ≥ {threshold:g} "
                f"from then on); {_pct(lock.locked_fraction)} of the matrices lock before the end."
            )
    return out


def takeaways(runs: Mapping[str, Any], *, threshold: float = THRESHOLD) -> list[str]:
    """A few plain sentences: one run's numbers in words, or for several runs which is highest and lowest."""
    if len(runs) == 1:
        ((_, rep),) = runs.items()
        if report_kind(rep) == "trajectory":
            return _one_trajectory(rep, threshold)
        return _one_pair(rep.summary or {}, rep.meta or {})
    out = []
    kinds = {report_kind(r) for r in runs.values()}
    if kinds == {"compare"}:
        for key in ("update_sparsity", "max_principal_angle", "spectral_drift", "density", "low_magnitude_overlap"):
            vals = {lb: number((r.summary or {}).get(key)) for lb, r in runs.items()}
            have = {lb: v for lb, v in vals.items() if v is not None}
            if len(have) >= 2:
                hi, lo = max(have, key=lambda x: have[x]), min(have, key=lambda x: have[x])
                out.append(f"{describe(key).label}: highest {hi} ({have[hi]:.3g}), lowest {lo} ({have[lo]:.3g}).")
    else:
        for label, rep in runs.items():
            if report_kind(rep) == "trajectory":
                out += [f"{label}: {t}" for t in _one_trajectory(rep, threshold)]
            else:
                out += [f"{label}: {t}" for t in _one_pair(rep.summary or {}, rep.meta or {})[:2]]
    return out
