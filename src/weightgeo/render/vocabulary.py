"""What each row key means to a reader: a short label, a unit, one plain sentence and a random baseline.

The list of metrics comes from :mod:`weightgeo.metrics.catalog` (the catalogue names them once); this module only
adds words. A key the catalogue gains later, or one renamed, still renders: it gets its own name as label and no
sentence (:func:`describe` never fails), so a report of a newer weightgeo opens in an older page writer.

>>> describe("update_sparsity").label
'unchanged fraction'
>>> describe("some_future_metric").label
'some future metric'
>>> metric_keys([{"name": "w", "update_sparsity": 0.5, "spectral_drift": 1e-4, "k_effective": 8}])
['update_sparsity', 'spectral_drift']
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..metrics.catalog import COUNTS, OUTPUTS, TRAJECTORY_OUTPUTS
from .cells import measured

__all__ = [
    "Meaning",
    "describe",
    "metric_keys",
    "PAIR_PRIMARY",
    "TRAJECTORY_PRIMARY",
    "IDENTITY_FIELDS",
    "NORM_KEYS",
    "first_key",
    "random_baseline",
]

#: row fields that identify a tensor or record how it was measured: never drawn as a metric
IDENTITY_FIELDS = frozenset(
    {
        "group",
        "run",
        "step",
        "name",
        "expert",
        "base_name",
        "ft_name",
        "shape",
        "rows",
        "cols",
        "numel",
        "module",
        "layer",
        "dtype",
        "stored_dtype",
        "rows_compared",
        "rows_added",
        "method",
        "layout",
        "reason",
        "not_measurable",
    }
)
#: the per-matrix metrics a comparison page shows first (the paper's §3 figures)
PAIR_PRIMARY = ("update_sparsity", "max_principal_angle", "spectral_drift", "density", "low_magnitude_overlap")
#: the per-matrix quantities a trajectory page shows first (paper §4)
TRAJECTORY_PRIMARY = ("stable_rank", "final_subspace_similarity")
#: ‖ΔW‖_F under either name (trajectory rows may adopt the pair rows' name)
NORM_KEYS = ("delta_frobenius", "frobenius_norm")


@dataclass(frozen=True)
class Meaning:
    """Words for one row key: ``label`` (short, for axes and legends), ``unit`` ('' when none), ``sentence``
    (what the number says, one line), ``baseline`` (what random would give, '' when nothing sensible) and
    ``log`` (drawn on a log scale when it spans decades)."""

    key: str
    label: str
    unit: str = ""
    sentence: str = ""
    baseline: str = ""
    log: bool = False


_WORDS: dict[str, Meaning] = {
    m.key: m
    for m in (
        Meaning(
            "update_sparsity",
            "unchanged fraction",
            sentence="fraction of the weights whose bf16 value did not change (1 = untouched; §3.1)",
        ),
        Meaning(
            "principal_overlap",
            "principal overlap",
            sentence="mean cos² of the angles between the top-k singular subspaces of base and fine-tune "
            "(1 = same subspace)",
            baseline="k / n for a random subspace",
        ),
        Meaning(
            "max_principal_angle",
            "max principal angle",
            "°",
            "largest angle between the top-k singular subspaces: how far the most-turned direction rotated (§3.1)",
            "about 90° for a random subspace",
            log=True,
        ),
        Meaning(
            "mean_principal_angle",
            "mean principal angle",
            "°",
            "mean angle between the top-k singular subspaces",
            "about 90° for a random subspace",
            log=True,
        ),
        Meaning(
            "spectral_gap",
            "spectral gap σ_k/σ_k+1",
            sentence="σ_k/σ_{k+1}: near 1 the top-k subspace is not well defined and its angles mean little",
            log=True,
        ),
        Meaning(
            "spectral_drift",
            "spectral drift (NSS)",
            sentence="relative change of the singular values, ‖σ(W+) − σ(W0)‖ / ‖σ(W0)‖ (App. C.3)",
            log=True,
        ),
        Meaning(
            "density",
            "update density",
            sentence="fraction of the entries whose bf16 value changed (§3.2)",
        ),
        Meaning(
            "principal_mask_overlap",
            "principal-mask overlap",
            sentence="share of the changed entries that sit on the weights of the low-rank reconstruction (§3.2)",
            baseline="α (the mask fraction) for updates placed at random",
        ),
        Meaning(
            "low_magnitude_overlap",
            "low-magnitude overlap",
            sentence="share of the changed entries that sit on the smallest-magnitude weights (§3.2)",
            baseline="α (the mask fraction) for updates placed at random",
        ),
        Meaning(
            "stable_rank",
            "stable rank of ΔW",
            sentence="‖ΔW‖²_F / ‖ΔW‖²₂: how many directions the update spreads over (1 = a single direction; §4)",
        ),
        Meaning("delta_frobenius", "‖ΔW‖_F", sentence="size of the update, Frobenius norm", log=True),
        Meaning("frobenius_norm", "‖ΔW‖_F", sentence="size of the update, Frobenius norm", log=True),
        Meaning("spectral_norm", "‖ΔW‖₂", sentence="largest singular value of the update", log=True),
        Meaning("hill_alpha", "Hill tail index α̂", sentence="heavy-tailedness of ΔW's top singular values (§4)"),
        Meaning(
            "final_subspace_similarity",
            "Sim_K(t, t_end)",
            sentence="mean cos² between the top-K input subspace of ΔW_t and of the final update (1 = locked; §4)",
            baseline="K / n for a random subspace",
        ),
        Meaning(
            "locking_onset",
            "locking onset",
            sentence="first checkpoint after which Sim_K stays above the threshold (our definition)",
        ),
    )
}


def describe(key: str) -> Meaning:
    """The words for ``key``; an unknown key gets its own name (underscores as spaces) and nothing else."""
    return _WORDS.get(key) or Meaning(key, key.replace("_", " "))


def _catalogue_order() -> list[str]:
    order = [k for keys in OUTPUTS.values() for k in keys]
    order += [k for k in TRAJECTORY_OUTPUTS if k not in order]
    return [k for k in order if k not in COUNTS]


def metric_keys(rows: Iterable[Mapping[str, Any]], extra: Sequence[str] = ()) -> list[str]:
    """The scalar metrics of ``rows`` in the catalogue's order: every catalogue key that some row carries (even
    when no row could measure it), then any other key with a measured number (``extra`` first)."""
    rows = list(rows)
    present: set[str] = set()
    numeric: list[str] = []
    for r in rows:
        for k, v in r.items():
            present.add(k)
            if k not in numeric and measured(v) and k not in IDENTITY_FIELDS and k not in COUNTS:
                numeric.append(k)
    known = [k for k in _catalogue_order() if k in present]
    rest = [k for k in [*extra, *numeric] if k not in known and k in present and not k.startswith("n_")]
    return known + [k for i, k in enumerate(rest) if k not in rest[:i]]


def first_key(rows: Iterable[Mapping[str, Any]], keys: Sequence[str]) -> str | None:
    """The first of ``keys`` that some row carries (a quantity known under more than one name)."""
    rows = list(rows)
    return next((k for k in keys if any(k in r for r in rows)), None)


def random_baseline(key: str, meta: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> float | None:
    """The value ``key`` takes for a random update, where one exists: α for the localization overlaps; the mean
    over matrices of k / n (n = the subspace's dimension) for the principal overlap and Sim_K."""
    params = meta.get("params", {}) or {}
    if key in ("principal_mask_overlap", "low_magnitude_overlap"):
        a = params.get("alpha")
        return float(a) if isinstance(a, (int, float)) else None
    if key in ("principal_overlap", "final_subspace_similarity"):
        k = params.get("k")
        side = params.get("side", "right")
        if not isinstance(k, (int, float)):
            return None
        fracs = []
        for r in rows:
            shape = r.get("shape")
            if measured(r.get(key)) and isinstance(shape, (tuple, list)) and len(shape) >= 2:
                n = int(shape[-1] if side == "right" else shape[-2])
                ke = r.get("k_effective")
                kk = float(ke) if isinstance(ke, (int, float)) and measured(ke) else min(float(k), *shape[-2:])
                if n:
                    fracs.append(min(kk, n) / n)
        return sum(fracs) / len(fracs) if fracs else None
    return None
