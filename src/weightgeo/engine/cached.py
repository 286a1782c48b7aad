"""The result cache of a comparison: rows looked up after planning, stored as each shape group finishes.

It sits between :func:`~weightgeo.engine.plan.plan_work` and :func:`~weightgeo.engine.plan.pack_groups`: a
job whose row is cached leaves the work (its tensors are not read), the rest is grouped and computed as usual,
and every row is written as soon as its group (or row-chunk stream) finishes, so a killed run keeps what it
finished. A row is keyed by the identities of its two stored tensors (``Checkpoint.identity``), the job (names,
shape, rows compared, dtypes), the options object as a whole (every field of
:class:`~weightgeo.options.PairOptions` but those marked as unable to change a result), the weightgeo version and
the numerical-policy fingerprint; in-memory sources have no identity and are never cached. The base's
decomposition (what every fine-tune of that base reuses: values, Gram eigenvalues and the small-side basis) is
cached per base matrix too, keyed by its identity, rows, expert and the option fields marked
:data:`~weightgeo.options.BASE` (the rounding dtype), so a new fine-tune of a known base skips the float64 Gram
and ``eigh``.

Rows equal an uninterrupted run's bit for bit because a member of a shape group gets the same numbers in any
batch (the policy's row blocks are per matrix, :func:`~weightgeo.linalg.policy.batch_row_blocks`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from ..cache import CacheEntry, CacheKey, ResultCache
from ..checkpoint import Checkpoint
from ..linalg.hardware import policy_fingerprint
from ..linalg.pairwise import BaseSpectrum, base_spectrum, restore_base_spectrum
from ..linalg.policy import compute_dtype
from ..metrics.catalog import GLOSSARY, PAIR
from ..options import PairOptions
from .groups import SharedBase, job_row
from .plan import Group, Job, Work

__all__ = [
    "RowCache",
    "CachedBase",
    "row_key",
    "base_key",
    "check_row_entry",
    "check_base_entry",
    "ROW_KIND",
    "BASE_KIND",
]

#: one entry per (base tensor, fine-tune tensor, job, metrics, options): a row's metric values
ROW_KIND = "pair_row"
#: one entry per base matrix (and rows compared): its values, Gram eigenvalues and small-side basis
BASE_KIND = "base_decomposition"

Rows = list[tuple[int, dict[str, Any]]]


def row_key(
    cache: ResultCache, options: PairOptions, job: Job, inputs: Sequence[dict[str, Any] | None], *, policy: str
) -> CacheKey | None:
    """The key of one pair row: the two stored tensors' identities, the job and the options as a whole (every
    field but those marked :func:`~weightgeo.cache.not_in_key`); ``None`` when a tensor has no identity."""
    return cache.key(
        ROW_KIND, inputs=inputs, metrics=options.metrics, options={"options": options, "job": job}, policy=policy
    )


def base_key(
    cache: ResultCache,
    options: PairOptions,
    identity: dict[str, Any] | None,
    rows: int,
    expert: int | None = None,
    *,
    policy: str,
) -> CacheKey | None:
    """The key of one base matrix's decomposition (``expert``: which matrix of an [E, out, in] stack): its
    identity, rows, expert and the option fields marked :data:`~weightgeo.options.BASE`."""
    return cache.key(
        BASE_KIND, inputs=[identity], options={"rows": rows, "expert": expert, **options.base_key()}, policy=policy
    )


class RowCache:
    """The cache of one pass (``cache=None``: nothing is looked up or stored) and its counters for the report."""

    def __init__(
        self, cache: ResultCache | None, b: Checkpoint, fs: Sequence[Checkpoint], options: PairOptions
    ) -> None:
        self.cache, self.b, self.fs, self.options = cache, b, list(fs), options
        self.policy = policy_fingerprint(options.device)
        self.before = cache.stats.as_dict() if cache is not None else {}
        self.counts = {
            "rows_cached": 0,
            "rows_computed": 0,
            "tensors_read": 0,
            "uncacheable": 0,
            "bases_cached": 0,
            "bases_computed": 0,
        }
        self._keys: dict[tuple[int, int], CacheKey | None] = {}

    def row_key(self, i: int, j: int, job: Job) -> CacheKey | None:
        """The key of fine-tune ``i``'s job ``j`` (``None``: no cache, or a tensor without an identity)."""
        if (i, j) not in self._keys:
            key = None
            if self.cache is not None:
                key = row_key(
                    self.cache,
                    self.options,
                    job,
                    [self.b.identity(job.base_name), self.fs[i].identity(job.ft_name)],
                    policy=self.policy,
                )
                self.counts["uncacheable"] += key is None
            self._keys[(i, j)] = key
        return self._keys[(i, j)]

    def lookup(self, work: Work) -> tuple[Work, list[Rows]]:
        """The work left once cached rows are taken out, and those rows (per fine-tune, ``(job index, row)``)."""
        hits: list[Rows] = [[] for _ in self.fs]
        units = []
        for unit in work.units:
            left = []
            for i, j in unit.users:
                job = work.job(i, j)
                key = self.row_key(i, j, job)
                entry = self.cache.get(key, validate=check_row_entry) if self.cache is not None and key else None
                if entry is None:
                    left.append((i, j))
                else:
                    hits[i].append((j, {**job_row(job), **entry.row}))
                    self.counts["rows_cached"] += 1
            if left:
                units.append(replace(unit, users=tuple(left)))
                self.counts["tensors_read"] += 1 + len(left)  # the base once, each fine-tune left once
        return Work(work.plans, tuple(units)), hits

    def store(self, i: int, j: int, job: Job, row: dict[str, Any]) -> None:
        """Write one finished row (its metric values; the identifying part is rebuilt from the job)."""
        self.counts["rows_computed"] += 1
        key = self.row_key(i, j, job)
        if self.cache is not None and key is not None:
            ident = job_row(job)
            self.cache.put(key, {k: v for k, v in row.items() if k not in ident})

    def shared_base(self, W0: torch.Tensor, g: Group, work: Work, options: PairOptions | None = None) -> SharedBase:
        """Shape group ``g``'s shared base, its decomposition read from the cache where it is there (``options``:
        this pass's, or those of the fine-tunes it is rounded for, :func:`~weightgeo.engine.groups.pair_options`)."""
        options = self.options if options is None else options
        if self.cache is None:
            return SharedBase(W0, options)
        experts = g.experts or (None,) * len(g.base_names)
        return CachedBase(W0, options, self, list(zip(g.base_names, experts)), g.rows)

    def base_key(
        self, name: str, rows: int, expert: int | None = None, options: PairOptions | None = None
    ) -> CacheKey | None:
        """The key of one base matrix's decomposition (``expert``: which matrix of an [E, out, in] stack)."""
        assert self.cache is not None
        opts = self.options if options is None else options
        return base_key(self.cache, opts, self.b.identity(name), rows, expert, policy=self.policy)

    def base_spectrum(
        self,
        W0: torch.Tensor,
        members: Sequence[tuple[str, int | None]],
        rows: int,
        options: PairOptions | None = None,
    ) -> BaseSpectrum:
        """W0's decomposition for a stack of ``members`` (base name, expert), member by member from the cache,
        the missing members computed (in one batch) and stored."""
        assert self.cache is not None
        names = [n for n, _ in members]
        keys = [self.base_key(n, rows, e, options) for n, e in members]
        p, vdtype = min(W0.shape[-2:]), compute_dtype(W0.dtype)
        entries = [
            self.cache.get(k, validate=lambda e: check_base_entry(e, p, vdtype)) if k is not None else None
            for k in keys
        ]
        missing = [i for i, e in enumerate(entries) if e is None]
        self.counts["bases_cached"] += len(names) - len(missing)
        self.counts["bases_computed"] += len(missing)
        if len(missing) == len(names):
            fresh = base_spectrum(W0)
            self._store_bases(fresh, keys)
            return fresh
        parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]] = [None] * len(names)  # type: ignore[list-item]
        for i, e in enumerate(entries):
            if e is not None:
                parts[i] = (e.tensors["S"], e.tensors["lam"], e.tensors["V_c"], bool(e.row["refined"]))
        if missing:
            fresh = base_spectrum(W0[missing])
            self._store_bases(fresh, [keys[i] for i in missing])
            for slot, i in enumerate(missing):
                parts[i] = _member(fresh, slot)
        dev = W0.device
        S, lam, V_c = (
            torch.stack([p[0] for p in parts]),
            torch.stack([p[1] for p in parts]),
            torch.stack([p[2] for p in parts]),
        )
        S, lam, V_c = S.to(dev), lam.to(dev), V_c.to(dev)
        refined = [p[3] for p in parts]
        mask = torch.tensor(refined, device=dev) if any(refined) else None
        return restore_base_spectrum(W0, S=S, lam=lam, V_c=V_c, refined_mask=mask)

    def _store_bases(self, spec: BaseSpectrum, keys: Sequence[CacheKey | None]) -> None:
        assert self.cache is not None
        for slot, key in enumerate(keys):
            if key is not None:
                S, lam, V_c, refined = _member(spec, slot)
                self.cache.put(key, {"refined": refined}, {"S": S, "lam": lam, "V_c": V_c})

    def meta(self) -> dict[str, Any]:
        """``report.meta["cache"]``: rows and base decompositions served and computed, tensors read, and this
        pass's lookups and writes (hits, misses, corrupt, foreign, writes, ...)."""
        out: dict[str, Any] = {"enabled": self.cache is not None, **self.counts}
        if self.cache is not None:
            now = self.cache.stats.as_dict()
            out.update({k: v - self.before.get(k, 0) for k, v in now.items()}, root=str(self.cache.root))
        return out


def check_row_entry(entry: CacheEntry) -> None:
    """Raise unless a cached pair row is what :meth:`RowCache.store` writes: an object of pair-row keys holding
    numbers, nulls, text, number lists or text maps (a damaged or hostile entry is then recomputed)."""
    row = entry.row
    if not isinstance(row, dict):
        raise TypeError("row is not an object")
    for key, v in row.items():
        if key not in GLOSSARY or PAIR not in GLOSSARY[key].where:
            raise TypeError(f"{key!r} is not a pair row key")
        if v is None or isinstance(v, str) or (isinstance(v, (int, float)) and not isinstance(v, bool)):
            continue
        if isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            continue
        if isinstance(v, dict) and all(isinstance(a, str) and isinstance(b, str) for a, b in v.items()):
            continue
        raise TypeError(f"{key!r} holds a {type(v).__name__}")


def check_base_entry(entry: CacheEntry, p: int, vdtype: torch.dtype) -> None:
    """Raise unless a cached base decomposition of a matrix with smaller side ``p`` holds what
    :func:`~weightgeo.linalg.pairwise.restore_base_spectrum` needs: finite float64 ``S`` and ``lam`` [p] and a
    finite [p, p] ``V_c`` in the compute dtype ``vdtype``."""
    t = entry.tensors
    if not isinstance(entry.row, dict) or set(entry.row) != {"refined"} or not isinstance(entry.row["refined"], bool):
        raise TypeError("row")
    if set(t) != {"S", "lam", "V_c"}:
        raise TypeError("tensors")
    for name, shape, dtype in (("S", (p,), torch.float64), ("lam", (p,), torch.float64), ("V_c", (p, p), vdtype)):
        if tuple(t[name].shape) != shape or t[name].dtype != dtype or not bool(torch.isfinite(t[name]).all()):
            raise TypeError(name)


def _member(spec: BaseSpectrum, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    mask = spec.decomposition.refined_mask
    return spec.sigma[i], spec.lam[i], spec.V_c[i], bool(mask[i]) if mask is not None else False


class CachedBase(SharedBase):
    """A :class:`~weightgeo.engine.groups.SharedBase` whose decomposition comes from the result cache when the
    cache holds it (made on first use, like its parent's)."""

    def __init__(
        self, W0: torch.Tensor, options: PairOptions, rc: RowCache, members: Sequence[tuple[str, int | None]], rows: int
    ) -> None:
        super().__init__(W0, options)
        self.rc, self.members, self.rows = rc, list(members), rows
        self._restored: BaseSpectrum | None = None

    def spectrum(self) -> BaseSpectrum | None:
        if self._restored is None and self.options.needs_base:
            self._restored = self.rc.base_spectrum(self.on_device(), self.members, self.rows, self.options)
        return self._restored
