"""The sparsity curves of a stream: which tensors are followed, what each (tensor, step) counts, its cache entries,
its rows and the summary by step (``weightgeo.sparsity_curve``, ``rank_curve(..., sparsity=True)``, ``follow``).

For every floating tensor (norms, biases and embeddings included; an expert stack [E, out, in] per expert) and
every checkpoint W_t of a stream with base W0:

* ``update_sparsity``: the fraction of entries unchanged from W0 to W_t (the bf16 rule; the FP8 rule where both
  are stored FP8), with its count ``update_unchanged``;
* ``step_sparsity``: the fraction unchanged from the previous complete checkpoint W_{t−1} to W_t (the first
  checkpoint against the base), with ``step_unchanged``;
* ``patch_bytes``: the size of a sparse patch carrying the entries that changed from W_{t−1} to W_t
  (:mod:`weightgeo.metrics.stepwise`: per tensor the smallest of int32 indices + values, a bitmask + values, or
  the tensor whole); ``dense_bytes`` the same tensors sent whole.

A tensor may be absent from some checkpoints, appear after the base, or change shape: a row exists where the
checkpoint holds the tensor; a figure that compares two versions of different presence or shape is not
measurable (NaN / ``None``, each listed in ``meta["not_measured"]`` with the reason), and a step whose previous
version is missing or of another shape sends the tensor whole (``patch_bytes`` = ``dense_bytes``).

Reading is the stream pass's (:mod:`weightgeo.trajectory`): each checkpoint's tensor once, in step order, the
base once; this module gets the versions read and keeps, per tensor, the base and the previous version.

>>> import torch
>>> from weightgeo.checkpoint import open_checkpoint
>>> base = open_checkpoint({"layers.0.norm.weight": torch.ones(8)})
>>> later = [open_checkpoint({"layers.0.norm.weight": torch.ones(8)}) for _ in range(2)]
>>> plans, skipped, filtered = plan_tensors(base, later, SparsityOptions().selector())
>>> [(p.uid, p.shape) for p in plans], skipped, filtered
([('layers.0.norm.weight', (8,))], [], 0)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ._version import __version__
from .cache import CacheKey, ResultCache, result_key
from .checkpoint import Checkpoint, Fp8Weight, layer_index, module_type
from .checkpoint.align import canonical_map, natural_key
from .checkpoint.fp8 import fp8_dequantize
from .checkpoint.names import expert_index
from .checkpoint.view import read_expert
from .metrics.catalog import SPARSITY_CURVES
from .metrics.sparsity import FAST_ETA, as_bf16
from .metrics.stepwise import (
    changed_against,
    changed_count,
    checked_bf16,
    fp8_changed,
    patch_bytes,
    scale_bytes,
)
from .options import SparsityOptions
from .report import summarize_rows
from .selection import ByUid, Selector
from .validation import check_finite

__all__ = [
    "Instance",
    "TensorPlan",
    "comparable",
    "plan_tensors",
    "Version",
    "read_version",
    "Changed",
    "CountStore",
    "count_key",
    "TensorFollower",
    "StepCounts",
    "value_bytes",
    "sparsity_row",
    "not_measured",
    "sparsity_summary",
    "merge_rows",
    "dtype_changes",
    "warn_dtype_changes",
    "COUNT_KIND",
    "PATCH_ENCODING",
]

#: the cache entries of the sparsity curves: one per (tensor, pair of checkpoints), the changed-entry count
COUNT_KIND = "changed_count"
#: what ``meta["patch_encoding"]`` says of patch_bytes
PATCH_ENCODING = (
    "per tensor the smallest of: 4-byte indices (8 beyond 2**32 entries) plus the new values of the changed "
    "entries; a bitmask of ceil(n/8) bytes plus those values; the whole tensor's values; values at the new "
    "checkpoint's element size (FP8: 1-byte codes, plus the scale tensor when any scale changed); 0 for a "
    "tensor with no change (weightgeo.metrics.stepwise)"
)
#: counts are exact integers on every device: their keys hold no hardware fingerprint
_POLICY = "exact-count"


# --------------------------------------------------------------------------------------------------------------
# the plan: which tensors, present where
@dataclass(frozen=True)
class Instance:
    """What one checkpoint holds of a followed tensor, from its header: stored name, shape (the stack's for an
    expert), dtype, and the FP8 block when it is stored as scaled FP8 (its codes then meet the FP8 rule)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    fp8: tuple[int, int] | None = None


@dataclass(frozen=True)
class TensorPlan(ByUid):
    """One tensor (or expert ``expert`` of a stack) followed elementwise: its versions in the base and in each
    checkpoint of the stream (``None`` where absent)."""

    key: str
    base: Instance | None
    instances: tuple[Instance | None, ...]
    expert: int | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """The analysed shape (an expert's [out, in]) of the base's version, else of the first one present."""
        first = self.base or next(i for i in self.instances if i is not None)
        return first.shape[1:] if self.expert is not None else first.shape

    def analysed(self, inst: Instance) -> tuple[int, ...]:
        """The analysed shape of one version (an expert's [out, in] of a stack)."""
        return inst.shape[1:] if self.expert is not None else inst.shape

    def at(self, i: int | None) -> Instance | None:
        """The version in checkpoint ``i`` (``None``: the base)."""
        return self.base if i is None else self.instances[i]


def comparable(a: Instance | None, b: Instance | None) -> str | None:
    """Why two versions cannot be compared entry by entry (absent, another shape), else ``None``."""
    if a is None or b is None:
        return "absent"
    if a.shape != b.shape:
        return f"shape {a.shape} -> {b.shape}"
    return None


def plan_tensors(
    base: Checkpoint, cks: Sequence[Checkpoint], select: Selector
) -> tuple[list[TensorPlan], list[dict[str, Any]], int]:
    """Every tensor of the base and the checkpoints to follow, from headers (canonical names; a key absent from
    some checkpoints is followed where present): the plans, the tensors skipped with the reason (non-floating,
    empty, filtered: counted), and how many the include/exclude filter left out."""
    maps = [canonical_map(base, "base")] + [canonical_map(ck) for ck in cks]
    sides = [base, *cks]
    keys: dict[str, None] = {}
    for m in maps:
        keys.update(dict.fromkeys(m))
    plans: list[TensorPlan] = []
    skipped: list[dict[str, Any]] = []
    filtered = 0
    for key in sorted(keys, key=natural_key):
        infos = [ck.info(m[key]) if key in m else None for ck, m in zip(sides, maps)]
        present = [i for i in infos if i is not None]
        first = present[0]
        other = next((i.dtype for i in present if not i.dtype.is_floating_point), first.dtype)
        choice = select.choose(key, first.shape, first.dtype, other)
        filtered += choice.filtered
        if choice.analyse is None:
            if choice.skipped is not None:
                skipped.append({"name": key, "reason": choice.skipped})
            continue
        versions = [
            None if info is None else Instance(info.name, info.shape, info.dtype, ck.fp8_block(info.name))
            for ck, info in zip(sides, infos)
        ]
        experts: list[int | None] = list(range(choice.experts)) if choice.analyse == "experts" else [None]
        for j in experts:
            at = [
                v if j is None or (v is not None and len(v.shape) == 3 and v.shape[0] > j) else None for v in versions
            ]
            plans.append(TensorPlan(key, at[0], tuple(at[1:]), j))
    return plans, skipped, filtered


# --------------------------------------------------------------------------------------------------------------
# one version as read
class Version:
    """One version of a followed tensor as read: its values, or its stored FP8 codes and scales; rounded to
    ``options.dtype``, moved to the counting device and checked finite once: where it differs from a version
    already checked (:func:`~weightgeo.metrics.stepwise.changed_checked`), else whole when first used as one."""

    def __init__(
        self, stored: torch.Tensor | Fp8Weight, what: str, options: SparsityOptions, device: torch.device
    ) -> None:
        self.fp8 = stored if isinstance(stored, Fp8Weight) else None
        self._values = None if isinstance(stored, Fp8Weight) else stored
        self.what, self.options, self.device = what, options, device
        self._bf16: torch.Tensor | None = None
        self.checked = False
        #: whether its bf16 values hold a −0, once known (the CPU bit path learns it while checking)
        self.negative_zero: bool | None = None

    def dense(self) -> torch.Tensor:
        """The values as read (an FP8 weight dequantised to float32), rounded to the options' dtype."""
        if self._values is None:
            assert self.fp8 is not None
            w = self.fp8
            self._values = fp8_dequantize(w.codes, w.scales, w.block, row_start=w.row_start, rows=w.rows)
        return self.options.round(self._values)

    def rounded(self) -> torch.Tensor:
        """The values as the bf16 rule sees them (bf16, on the counting device), not yet checked finite."""
        if self._bf16 is None:
            self._bf16 = as_bf16(self.dense().to(self.device))
        return self._bf16

    def bf16(self) -> torch.Tensor:
        """:meth:`rounded`, checked finite (whole, unless a comparison has checked it)."""
        b = self.rounded()
        if not self.checked:
            checked_bf16(b, self.what)
            self.checked = True
        return b

    def fast(self) -> bool:
        """Whether the CPU bit path counts this version (bf16 values on the CPU, η < 2⁻⁹)."""
        return self.device.type == "cpu" and self.options.eta < FAST_ETA

    def keep(self) -> Version:
        """Drop what a later comparison does not need (the values once rounded to bf16)."""
        if self.fp8 is None:
            self.rounded()
            self._values = None
        return self


def read_version(ck: Checkpoint, inst: Instance, expert: int | None, *, fp8: bool) -> torch.Tensor | Fp8Weight:
    """One version as stored: the tensor (an expert of a stack read alone), or, with ``fp8`` and an FP8 weight,
    its codes and scales (not the dequantised values: the FP8 rule compares those)."""
    if fp8 and inst.fp8 is not None and expert is None:
        w = ck.fp8_weight(inst.name)
        if w is not None:
            return w
    return ck.get(inst.name) if expert is None else read_expert(ck, inst.name, expert)


# --------------------------------------------------------------------------------------------------------------
# the counts: cached per (tensor, pair of versions)
@dataclass(frozen=True)
class Changed:
    """Entries changed between two versions of a tensor (``rule``: ``"bf16"`` or ``"fp8"``) and, for FP8, the
    bytes of the new version's scales when any of them changed (a patch sends them)."""

    changed: int
    rule: str = "bf16"
    scale_bytes: int = 0


def count_key(options: SparsityOptions, a: Any, b: Any, uid: str, *, version: str = __version__) -> CacheKey:
    """The key of one count: the identities of the two versions (in order), the tensor (``key[j]`` for an expert:
    the experts of a stack share its identity), the options as a whole (every field of
    :class:`~weightgeo.options.SparsityOptions` but those marked as unable to change a result) and the version.
    Counts are exact integers on any device, so no hardware fingerprint enters."""
    return result_key(
        COUNT_KIND, inputs=[a, b], options={"options": options, "tensor": uid}, policy=_POLICY, version=version
    )


class CountStore:
    """Where the counts of a pass are found before anything is read (a follow memo, the result cache) and stored
    as they are computed (each at once: a killed run keeps them)."""

    def __init__(
        self, cache: ResultCache | None, memo: MutableMapping[str, Any] | None, options: SparsityOptions
    ) -> None:
        self.cache, self.memo, self.options = cache, memo, options
        self.version = cache.version if cache is not None else __version__
        self.reused = self.computed = self.read = self.uncacheable = 0
        self.used: set[str] = set()

    def key(self, a: Any, b: Any, uid: str) -> CacheKey | None:
        if a is None or b is None:
            self.uncacheable += 1
            return None
        if self.cache is None and self.memo is None:
            return None
        return count_key(self.options, a, b, uid, version=self.version)

    def get(self, key: CacheKey | None) -> Changed | None:
        if key is None:
            return None
        if self.memo is not None and key.digest in self.memo:
            self.used.add(key.digest)
            self.reused += 1
            return self.memo[key.digest]
        entry = self.cache.get(key) if self.cache is not None else None
        if entry is None:
            return None
        row = entry.row
        found = Changed(int(row["changed"]), str(row["rule"]), int(row["scale_bytes"]))
        self._remember(key, found)
        self.reused += 1
        return found

    def put(self, key: CacheKey | None, found: Changed) -> None:
        self.computed += 1
        if key is None:
            return
        self._remember(key, found)
        if self.cache is not None:
            self.cache.put(key, {"changed": found.changed, "rule": found.rule, "scale_bytes": found.scale_bytes})

    def _remember(self, key: CacheKey, found: Changed) -> None:
        if self.memo is not None:
            self.memo[key.digest] = found
            self.used.add(key.digest)

    def forget_unused(self) -> None:
        """Follow mode: keep in the memo only what this pass used (the next update needs no more)."""
        if self.memo is not None:
            for digest in [d for d in self.memo if d not in self.used]:
                del self.memo[digest]

    def meta(self) -> dict[str, Any]:
        """The pass's counters (the cache's own lookups and writes are counted once, by the pass)."""
        return {
            "counts_reused": self.reused,
            "counts_computed": self.computed,
            "tensors_read": self.read,
            "uncacheable": self.uncacheable,
        }


# --------------------------------------------------------------------------------------------------------------
# one tensor along the stream
@dataclass
class StepCounts:
    """What one (tensor, step) row holds: the version's ``instance``, its changed counts against the base
    (``update``) and the previous version (``step``), ``None`` where not measurable (``why``: the reasons)."""

    step: int
    instance: Instance
    numel: int
    update: Changed | None = None
    step_changed: Changed | None = None
    why: dict[str, str] = field(default_factory=dict)


class TensorFollower:
    """The counts of one :class:`TensorPlan` along the stream: it says what must be read (:meth:`reads`), is
    given the versions in step order (:meth:`see_base`, :meth:`see`) and holds the base and the previous version
    only.

    Args:
        plan: the tensor followed.
        steps: the stream's steps (``plan.instances[i]`` is at ``steps[i]``).
        store: the counts already known and where new ones go.
        ids: the cache identities of the base's version and of each checkpoint's (``None``: never cached).
    """

    def __init__(
        self, plan: TensorPlan, steps: Sequence[int], store: CountStore, ids: tuple[Any, Sequence[Any]]
    ) -> None:
        self.plan, self.steps, self.store = plan, list(steps), store
        base_id, ck_ids = ids
        self.eta = store.options.eta
        self.rows: dict[int, StepCounts] = {}
        self._keys: dict[tuple[int | None, int], CacheKey | None] = {}
        self._todo: set[tuple[int | None, int]] = set()
        for i, inst in enumerate(plan.instances):
            if inst is None:
                continue
            rec = self.rows[i] = StepCounts(self.steps[i], inst, math.prod(plan.analysed(inst)))
            # the first checkpoint's step is its update (both against the base): one pair, one count
            pairs = [((None, i), ("update", "step"))] if i == 0 else [((None, i), ("update",)), ((i - 1, i), ("step",))]
            for pair, which in pairs:
                why = comparable(plan.at(pair[0]), inst)
                if why is not None:
                    rec.why.update(dict.fromkeys(which, why))
                    continue
                a_id = base_id if pair[0] is None else ck_ids[pair[0]]
                key = store.key(a_id, ck_ids[i], plan.uid)
                found = store.get(key)
                if found is None:
                    self._keys[pair] = key
                    self._todo.add(pair)
                else:
                    self._set(pair, found)
        self._base: Version | None = None
        self._prev: tuple[int, Version] | None = None

    def reads(self) -> tuple[bool, list[int]]:
        """Whether the base's version must be read, and which checkpoints' (indices, in order)."""
        need = {b for _, b in self._todo} | {a for a, _ in self._todo if a is not None}
        return any(a is None for a, _ in self._todo), sorted(need)

    def see_base(self, version: Version) -> None:
        self._base = version.keep()

    def see(self, i: int, version: Version) -> None:
        """Checkpoint ``i``'s version (read in step order): its counts against the base and the previous one."""
        pairs = []
        for pair in sorted((p for p in self._todo if p[1] == i), key=lambda p: -1 if p[0] is None else p[0]):
            a = self._base if pair[0] is None else (self._prev[1] if self._prev and self._prev[0] == pair[0] else None)
            assert a is not None, (self.plan.uid, pair)  # reads() asked for it, and it came in order
            pairs.append((pair, a))
        # the CPU bit path counts this version against all its references in one blocked pass
        fast = [
            (p, a)
            for p, a in pairs
            if version.fast() and a.fast() and not (a.fp8 is not None and version.fp8 is not None)
        ]
        found = dict(zip([p for p, _ in fast], _count_fast(version, [a for _, a in fast]))) if fast else {}
        for pair, a in pairs:
            got = found[pair] if pair in found else _count(a, version, self.eta, self.plan.uid)
            self.store.put(self._keys[pair], got)
            self._set(pair, got)
            self._todo.discard(pair)
        self._prev = (i, version.keep())

    def _set(self, pair: tuple[int | None, int], found: Changed) -> None:
        rec = self.rows[pair[1]]
        if pair[0] is None:
            rec.update = found
        if pair[0] == pair[1] - 1 or (pair[0] is None and pair[1] == 0):
            rec.step_changed = found

    def records(self) -> list[StepCounts]:
        assert not self._todo, (self.plan.uid, sorted(self._todo, key=str))
        return [self.rows[i] for i in sorted(self.rows)]


def _count(a: Version, b: Version, eta: float, uid: str) -> Changed:
    if a.fp8 is not None and b.fp8 is not None:
        changed, moved = fp8_changed(a.fp8, b.fp8, eta, name=uid)
        scales = scale_bytes(b.fp8) if moved else 0
        return Changed(changed, "fp8", scales)
    return Changed(changed_count(a.bf16(), b.bf16(), eta))


def _count_fast(version: Version, refs: Sequence[Version]) -> list[Changed]:
    """The CPU bit path: ``version`` against each of ``refs`` in one blocked pass, which also checks each of them
    finite that was not yet (:func:`~weightgeo.metrics.stepwise.changed_against`)."""
    tensors = [version, *refs]
    counts, bits = changed_against(
        version.rounded(),
        [a.rounded() for a in refs],
        check=[not v.checked for v in tensors],
        negative_zero=[v.negative_zero for v in tensors],
    )
    for v, b in zip(tensors, bits):
        if b is not None:
            if not b[0]:
                check_finite(v.rounded(), v.what)  # raises, naming the version, with the count
            v.checked, v.negative_zero = True, b[1]
    return [Changed(c) for c in counts]


# --------------------------------------------------------------------------------------------------------------
# rows and the summary
def value_bytes(plan: TensorPlan, inst: Instance, options: SparsityOptions) -> int:
    """Bytes of one value of a version as a patch sends it: an FP8 weight's code (1 byte, read as stored), else
    the element size of the options' dtype or of the stored dtype."""
    if inst.fp8 is not None and options.dtype is None and plan.expert is None:
        return 1
    return (options.dtype or inst.dtype).itemsize


def sparsity_row(plan: TensorPlan, rec: StepCounts, options: SparsityOptions) -> dict[str, Any]:
    """The report row of one (tensor, step)."""
    inst, n = rec.instance, rec.numel
    expert = plan.expert if plan.expert is not None else expert_index(plan.key)
    up, st = rec.update, rec.step_changed
    vb = value_bytes(plan, inst, options)
    row: dict[str, Any] = {
        "step": int(rec.step),
        "name": plan.key,
        **({} if expert is None else {"expert": expert}),
        "shape": tuple(plan.analysed(inst)),
        "numel": n,
        "module": module_type(plan.key),
        "layer": layer_index(plan.key),
        "stored_dtype": str(options.dtype or inst.dtype).replace("torch.", ""),
        "update_sparsity": (n - up.changed) / n if up is not None else math.nan,
        "update_unchanged": n - up.changed if up is not None else None,
        "step_sparsity": (n - st.changed) / n if st is not None else math.nan,
        "step_unchanged": n - st.changed if st is not None else None,
        "patch_bytes": patch_bytes(st.changed, n, vb, scales=st.scale_bytes) if st is not None else n * vb,
        "dense_bytes": n * vb,
    }
    if any(c is not None and c.rule == "fp8" for c in (up, st)):
        row["update_rule"] = "fp8"  # a figure of the row compared stored FP8 codes and scales
    return row


def not_measured(plan: TensorPlan, rec: StepCounts, steps: Sequence[int], i: int) -> list[dict[str, Any]]:
    """``meta["not_measured"]`` entries of one row: which figure, and why."""
    out = []
    for which, why in rec.why.items():
        against = "the base" if which == "update" or i == 0 else f"step {steps[i - 1]}"
        at = {"name": plan.key, **({} if plan.expert is None else {"expert": plan.expert}), "step": int(rec.step)}
        out.append(
            {
                **at,
                "metric": f"{which}_sparsity",
                "reason": f"not comparable with {against} ({why})"
                + ("; the patch sends it whole" if which == "step" else ""),
            }
        )
    return out


def sparsity_summary(rows: Sequence[Mapping[str, Any]], steps: Sequence[int]) -> dict[str, Any]:
    """``steps``, ``final_step``, ``by_step`` ({step: the rows' summary: update_sparsity and step_sparsity
    weighted by entries, the counts and byte sizes summed, ``by_module`` and ``experts`` alike}) and ``curves``
    ({update_sparsity, step_sparsity, patch_bytes: lists over ``steps``})."""
    by_step: dict[int, Any] = {}
    for s in steps:
        rs = [r for r in rows if r["step"] == s]
        by_step[int(s)] = summarize_rows(rs) if rs else {"n_tensors": 0}
    return {
        "steps": [int(s) for s in steps],
        "final_step": int(steps[-1]),
        "by_step": by_step,
        "curves": {m: [by_step[int(s)].get(m, math.nan) for s in steps] for m in SPARSITY_CURVES},
    }


def merge_rows(*parts: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of one (step, tensor, expert) from several passes (the spectra's and the sparsity's) merged into one,
    sorted by step, name and expert."""
    merged: dict[tuple[int, str, int], dict[str, Any]] = {}
    for rows in parts:
        for r in rows:
            key = (int(r["step"]), str(r["name"]), int(r.get("expert", -1)))
            merged.setdefault(key, {}).update(r)
    return [merged[k] for k in sorted(merged)]


def warn_dtype_changes(changes: Sequence[Mapping[str, Any]], *, stacklevel: int = 3) -> None:
    """One warning for the tensors whose stored dtype changes along the stream (compared under the bf16 rule)."""
    if changes:
        first = changes[0]
        warnings.warn(
            f"{len(changes)} tensor version(s) change stored dtype along the stream (e.g. {first['name']} at step "
            f"{first['step']}: {first['from']} -> {first['to']}); they are compared under the bf16 rule, and a "
            f"patch sends the new dtype's values (meta['dtype_changes'])",
            RuntimeWarning,
            stacklevel=stacklevel,
        )


def dtype_changes(plans: Sequence[TensorPlan], steps: Sequence[int]) -> list[dict[str, Any]]:
    """Where a tensor's stored dtype differs from its previous version's (``meta["dtype_changes"]``)."""
    out = []
    for p in plans:
        if p.expert not in (None, 0):
            continue
        prev = p.base
        for i, inst in enumerate(p.instances):
            if inst is not None and prev is not None and inst.dtype != prev.dtype:
                out.append(
                    {
                        "name": p.key,
                        "step": int(steps[i]),
                        "from": str(prev.dtype).removeprefix("torch."),
                        "to": str(inst.dtype).removeprefix("torch."),
                    }
                )
            prev = inst
    return out
