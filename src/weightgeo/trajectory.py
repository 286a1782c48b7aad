"""The stream pass: ``rank_curve`` and ``locking_onset`` over a stream of checkpoints (paper §4, Figs. 4–5).

Reading is :mod:`weightgeo.stream` (each checkpoint's tensor once, the base once); the per-ΔW spectra, Sim_K and
the onset rule are the kernels of :mod:`weightgeo.metrics.trajectory`; this module turns them into rows,
summaries and reports (shared with :class:`~weightgeo.track.Tracker`).

>>> import torch
>>> g = torch.Generator().manual_seed(0)
>>> w0 = {"layers.0.self_attn.q_proj.weight": torch.randn(24, 32, generator=g)}
>>> u = torch.randn(24, 2, generator=g) @ torch.randn(2, 32, generator=g)
>>> r = rank_curve([w0, {n: w + 0.01 * u for n, w in w0.items()}], steps=[0, 10], k=2, hill_k=2)
>>> r.rows[0]["step"], round(r.rows[0]["stable_rank"], 3)
(10, 1.382)
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ._version import __version__
from .cache import CacheEntry, CacheKey, ResultCache, pack, resolve_cache, result_key, sum_counts, unpack
from .checkpoint import layer_index, module_type
from .defaults import ETA, HILL_K, PROGRESS, SEED, STREAM_K, THRESHOLD
from .distributed import balanced_shards, current_world
from .errors import WeightgeoError
from .linalg.hardware import hardware, pass_dtype, policy_fingerprint
from .linalg.policy import compared_format
from .linalg.spectra import hill_tail_index
from .memory import check_fits
from .metrics.catalog import SPARSITY_CURVES, TRAJECTORY_CURVES
from .metrics.trajectory import (
    EXACT_MAX_DIM,
    RTOL,
    UPDATE_BATCH_BYTES,
    LockingOnset,
    Spectrum,
    build_locking,
    matrix_seed,
    subspace_sim,
    update_spectra,
)
from .options import Filter, SparsityOptions, StreamOptions
from .progress import fraction_bar
from .readahead import ReadAhead
from .report import Report, summarize_rows
from .stream import CheckpointStream, MatrixPlan, StreamReader, open_stream
from .stream_sparsity import (
    PATCH_ENCODING,
    CountStore,
    TensorFollower,
    TensorPlan,
    Version,
    dtype_changes,
    merge_rows,
    not_measured,
    plan_tensors,
    read_version,
    sparsity_row,
    sparsity_summary,
    warn_dtype_changes,
)
from .validation import check_finite, either, spell

__all__ = [
    "rank_curve",
    "sparsity_curve",
    "locking_onset",
    "stream_report",
    "sparsity_report",
    "spectrum_row",
    "assemble",
    "trajectory_summary",
    "warn_skipped",
    "spectrum_key",
    "SPECTRUM_KIND",
]

#: the cache entries of the stream pass: one per (matrix, step), the :class:`Spectrum` of ΔW_t (or a zero update)
SPECTRUM_KIND = "update_spectrum"
CacheArg = bool | str | os.PathLike[str] | ResultCache | None


# --------------------------------------------------------------------------------------------------------------
# rows: one per (step, matrix), from Spectrum records
def spectrum_row(
    key: str, shape: tuple[int, int], step: int, sp: Spectrum, *, hill_k: int, k: int, expert: int | None = None
) -> dict[str, Any]:
    """The report row of one (step, matrix) from its :class:`Spectrum` (``expert``: its number in the expert
    stack ``key``, a field of the row as in the pair engine's rows)."""
    S = sp.S
    s1 = float(S[0])
    fro = sp.frobenius
    kh = min(hill_k, S.shape[0])
    row: dict[str, Any] = {
        "step": int(step),
        "name": key,
        **({} if expert is None else {"expert": expert}),
        "shape": tuple(shape),
        "numel": shape[0] * shape[1],
        "module": module_type(key),
        "layer": layer_index(key),
        "delta_frobenius": fro,
        "spectral_norm": s1,
        "stable_rank": fro * fro / (s1 * s1) if s1 > 0 else math.nan,
        "hill_alpha": float(hill_tail_index(S, kh)) if kh >= 2 else math.nan,
    }
    row["delta_spectral_gap"] = _gap(S, min(k, min(shape)), min(shape))
    row["method"] = sp.method
    if k >= min(shape):
        row["delta_spectral_gap"] = None
        row["not_measurable"] = dict.fromkeys(_K_KEYS, whole_space(k, shape))
    return row


#: the stream row keys that say nothing when K reaches the matrix's smaller side
_K_KEYS = ("delta_spectral_gap", "final_subspace_similarity")


def whole_space(k: int, shape: tuple[int, int]) -> str:
    """Why a subspace metric of an [m, n] matrix is not measurable at K = ``k``."""
    p = min(shape)
    return (
        f"K {k} ≥ {p}, the smaller side of {shape[0]}x{shape[1]}: the top-K subspace of ΔW holds every singular "
        f"direction (there is no σ_K+1), so it is no principal subspace (Sim_K is 1 for a square or tall matrix)"
    )


def _gap(S: torch.Tensor, k: int, p: int) -> float:
    """``delta_spectral_gap``: σ_K/σ_{K+1} of ΔW (pair rows' ``spectral_gap`` is that ratio of W0); inf when
    K = min(m, n) (or σ_{K+1} = 0), NaN when σ_K = 0 (ΔW of rank below K: no top-K subspace)."""
    if k >= p:
        return math.inf
    top, nxt = float(S[k - 1]), float(S[k])
    if not top > 0:
        return math.nan
    return top / nxt if nxt > 0 else math.inf


def assemble(
    records: Mapping[str, tuple[tuple[int, int], Mapping[int, Spectrum]]],
    steps: Sequence[int],
    *,
    hill_k: int,
    k: int,
    experts: Mapping[str, tuple[str, int]] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, dict[int, float]], list[dict[str, Any]]]:
    """Rows (sorted by step, name, expert), similarity curves to the final step (keyed as ``records``), and
    zero-update skips. ``experts``: for the records of expert stacks, their key ``stack[j]`` -> (stack, j)."""
    rows: list[dict[str, Any]] = []
    sims: dict[str, dict[int, float]] = {}
    skipped: list[dict[str, Any]] = []
    t_end = steps[-1]
    for key, (shape, per_step) in records.items():
        name, expert = (experts or {}).get(key, (key, None))
        at = {"name": name} if expert is None else {"name": name, "expert": expert}
        final = per_step.get(t_end)
        curve: dict[int, float] = {}
        for s in steps:
            sp = per_step.get(s)
            if sp is None:
                skipped.append({**at, "step": int(s), "reason": "ΔW is exactly zero at this step"})
                curve[s] = math.nan
                continue
            row = spectrum_row(name, shape, s, sp, hill_k=hill_k, k=k, expert=expert)
            if k >= min(shape):  # not measurable: no curve point (the onset rule skips NaN), a null in the row
                curve[s] = math.nan
                row["final_subspace_similarity"] = None
            elif final is not None and final.Vh is not None and sp.Vh is not None:
                curve[s] = subspace_sim(sp.Vh, final.Vh)
                row["final_subspace_similarity"] = curve[s]
            else:
                curve[s] = math.nan
            rows.append(row)
        sims[key] = curve
    rows.sort(key=lambda r: (r["step"], r["name"], r.get("expert", -1)))
    return rows, sims, skipped


def trajectory_summary(
    rows: list[dict[str, Any]], steps: Sequence[int], sims: dict[str, dict[int, float]], *, k: int
) -> dict[str, Any]:
    """``steps``, ``by_step`` ({step: unweighted means over matrices, with ``by_module``}) and the curves (with the
    sparsity curves, their figures too: weighted sparsities, summed bytes; :func:`sparsity_report`)."""
    by_step: dict[int, Any] = {}
    for s in steps:
        rs = [r for r in rows if r["step"] == s]
        by_step[int(s)] = summarize_rows(rs) if rs else {"n_tensors": 0}
    curve = {m: [by_step[int(s)].get(m, math.nan) for s in steps] for m in TRAJECTORY_CURVES}
    if any("update_sparsity" in r for r in rows):  # a pass that also counted the sparsity curves
        curve.update({m: [by_step[int(s)].get(m, math.nan) for s in steps] for m in SPARSITY_CURVES})
    return {
        "steps": [int(s) for s in steps],
        "final_step": int(steps[-1]),
        "k": int(k),
        "by_step": by_step,
        "curves": curve,
    }


# --------------------------------------------------------------------------------------------------------------
# stream-level verbs
def spectrum_key(
    options: StreamOptions,
    r: int,
    base_id: Any,
    ck_id: Any,
    matrix: str,
    *,
    policy: str,
    version: str = __version__,
    code: str | None = None,
) -> CacheKey:
    """The key of one (matrix, step) spectrum: the identities of the base and checkpoint tensors, the matrix (its
    name seeds the randomized passes), the options as a whole (every field of
    :class:`~weightgeo.options.StreamOptions` but those marked as unable to change a result), ``r`` (the values
    kept), the verification rule, the numerical policy and the code fingerprint (``None``: this process's)."""
    return result_key(
        SPECTRUM_KIND,
        inputs=[base_id, ck_id],
        options={
            "options": options,
            "r": r,
            "matrix": matrix,
            "formed_in": "float32",  # ΔW_t = W_t − W0 in float32 (StreamReader.updates)
            "rtol": RTOL,
            "exact_max_dim": EXACT_MAX_DIM,
        },
        policy=policy,
        version=version,
        code=code,
    )


def check_spectrum_entry(entry: CacheEntry, shape: tuple[int, int], *, r: int, k: int) -> None:
    """Raise unless a cached spectrum of an [m, n] ΔW has the structure the stream pass uses (a hostile or
    damaged entry is then counted as corrupt and recomputed, see :meth:`~weightgeo.cache.ResultCache.get`)."""
    row, t = entry.row, entry.tensors
    if not isinstance(row, dict):
        raise TypeError("row is not an object")
    if row.get("zero") is True and not t:
        return
    S, Vh = t.get("S"), t.get("Vh")
    if set(row) - {"Vh"} != {"frobenius", "method"} or row.get("Vh", None) is not None:
        raise TypeError("not a Spectrum row")
    if not isinstance(row["method"], str) or ("Vh" in row) == ("Vh" in t):
        raise TypeError("method, Vh")
    fro = row["frobenius"]
    if not isinstance(fro, float) or not math.isfinite(fro) or fro < 0:
        raise TypeError("frobenius")
    p = min(shape)
    if S is None or S.dtype != torch.float64 or S.ndim != 1 or not 1 <= S.shape[0] <= min(r + 1, p):
        raise TypeError("S")
    if set(t) - {"S", "Vh"} or (Vh is not None and (Vh.ndim != 2 or Vh.shape[1] != shape[1] or Vh.shape[0] > k)):
        raise TypeError("Vh")


class _Spectra:
    """Where the stream pass finds a (matrix, step) spectrum it need not compute: the previous update's (follow
    mode), then the result cache; and where it stores the ones it computes (each as soon as it is computed).

    A spectrum is keyed by :func:`spectrum_key`; ``update_spectra`` with a per-matrix ``seed`` makes it a function
    of exactly what that key holds (not of the batch or of earlier flushes)."""

    def __init__(
        self,
        cache: ResultCache | None,
        memo: MutableMapping[str, Any] | None,
        options: StreamOptions,
        *,
        device: torch.device,
        r: int,
    ) -> None:
        self.cache, self.memo, self.options, self.r = cache, memo, options, r
        self.policy = policy_fingerprint(device)
        self.version = cache.version if cache is not None else __version__
        self.code = cache.code if cache is not None else None
        self.reused = self.computed = self.read = self.uncacheable = 0
        self.used: set[str] = set()

    def key(self, base_id: Any, ck_id: Any, matrix: str) -> CacheKey | None:
        if base_id is None or ck_id is None:
            self.uncacheable += 1
            return None
        if self.cache is None and self.memo is None:
            return None
        return spectrum_key(
            self.options, self.r, base_id, ck_id, matrix, policy=self.policy, version=self.version, code=self.code
        )

    def get(self, key: CacheKey | None, shape: tuple[int, int]) -> tuple[bool, Spectrum | None]:
        """``(found, spectrum)`` of an [m, n] matrix's ΔW; a found ``None`` is a zero update (ΔW_t = 0 exactly:
        no spectrum)."""
        if key is None:
            return False, None
        if self.memo is not None and key.digest in self.memo:
            self.used.add(key.digest)
            self.reused += 1
            return True, self.memo[key.digest]
        entry = None
        if self.cache is not None:
            entry = self.cache.get(key, validate=lambda e: check_spectrum_entry(e, shape, r=self.r, k=self.options.k))
        if entry is None:
            return False, None
        sp = None if entry.row.get("zero") else unpack(Spectrum, entry.row, entry.tensors)
        self._remember(key, sp)
        self.reused += 1
        return True, sp

    def put(self, key: CacheKey | None, sp: Spectrum | None) -> None:
        self.computed += 1
        if key is None:
            return
        self._remember(key, sp)
        if self.cache is not None:
            row, tensors = pack(sp) if sp is not None else ({"zero": True}, {})
            self.cache.put(key, row, tensors)

    def _remember(self, key: CacheKey, sp: Spectrum | None) -> None:
        if self.memo is not None:
            self.memo[key.digest] = sp
            self.used.add(key.digest)

    def meta(self) -> dict[str, Any]:
        """The pass's counters (the cache's own lookups and writes are counted once, by the pass)."""
        return {
            "spectra_reused": self.reused,
            "spectra_computed": self.computed,
            "tensors_read": self.read,
            "uncacheable": self.uncacheable,
        }


def warn_skipped(skipped: Sequence[Mapping[str, Any]], *, stacklevel: int = 3) -> None:
    """One warning per checkpoint left out of a stream; a corrupt one (not the newest) is named loudly.
    ``stacklevel`` 3 points at the caller of the function that calls this one."""
    for c in skipped:
        if c.get("kind") != "checkpoint":
            continue
        if c.get("state") == "corrupt":
            msg = (
                f"CORRUPT checkpoint {c['path']} (step {c['step']}) left out: {c['reason']}. It is not the newest "
                f"checkpoint, so its save failed or the copy is damaged: re-save or remove it"
            )
        elif c.get("state") == "in_progress":
            msg = f"left out {c['path']} (step {c['step']}, the newest: probably still being written): {c['reason']}"
        else:
            msg = f"left out the temporary folder {c['path']} of an unfinished save: {c['reason']}"
        warnings.warn(msg, RuntimeWarning, stacklevel=stacklevel)


@dataclass
class _Passed:
    """What a stream pass found: the spectra per followed matrix, the experts among them, the sparsity rows and
    what was not measurable (when the sparsity curves were asked for), and the provenance."""

    records: dict[str, tuple[tuple[int, int], dict[int, Spectrum]]]
    experts: dict[str, tuple[str, int]]
    meta: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    not_measured: list[dict[str, Any]] = field(default_factory=list)


def _stream_pass(
    s: CheckpointStream,
    options: StreamOptions | None,
    *,
    r: int,
    cache: CacheArg,
    config: Any = None,
    memo: MutableMapping[str, Any] | None = None,
    sparsity: SparsityOptions | None = None,
) -> _Passed:
    """Read every followed tensor of the stream once (the base once): the spectra of ΔW_t of each matrix
    (``options``) and the sparsity counts of each floating tensor (``sparsity``), both from the same read.
    Results already known (``memo``, the result cache) are not recomputed, and a tensor whose every result is
    known is not read at all."""
    where = options if options is not None else sparsity
    assert where is not None
    dev = where.where()  # checkpoints are read into CPU memory: that is where their data is
    t0 = time.perf_counter()
    store = resolve_cache(cache)
    spectra = _Spectra(store, memo, options, device=dev, r=r) if options is not None else None
    counts = CountStore(store, memo, sparsity) if sparsity is not None else None
    before = store.stats.as_dict() if store is not None else {}
    records: dict[str, tuple[tuple[int, int], dict[int, Spectrum]]] = {}
    rows: list[dict[str, Any]] = []
    missing: list[dict[str, Any]] = []
    select = options.selector() if options is not None else None
    with StreamReader.open(s, select, config=config, matrices=options is not None) as reader:
        tplans: list[TensorPlan] = []
        tskipped: list[dict[str, Any]] = []
        tfiltered = 0
        if sparsity is not None:
            tplans, tskipped, tfiltered = plan_tensors(reader.base, reader.checkpoints, sparsity.selector())
            if not tplans and options is None:
                raise WeightgeoError(
                    f"{s.origin}: no tensor to follow ({tfiltered} left out by include/exclude, {len(tskipped)} "
                    f"skipped, e.g. {tskipped[:3]}); widen include=/exclude= (default: every floating tensor)"
                )
        # Under torchrun each rank follows its own share of the tensors (balanced by size); results are
        # gathered below so every rank returns the single-process result.
        world = current_world(dev)
        units = _units(reader.plan, tplans)
        sizes = [(len(reader.checkpoints) + 1) * math.prod((t or m).shape) for _, m, t in units]  # type: ignore[union-attr]
        shards = balanced_shards(sizes, world.size)
        mine = [units[i] for i in sorted(shards[world.process_rank])]
        for _, m, _t in mine:  # from the headers, before anything is read
            if m is not None:
                _check_fits(reader, m)
        what = "weightgeo trajectory" if options is not None else "weightgeo sparsity"
        bar = fraction_bar(where.progress and world.is_main, desc=what, total=len(mine), unit="tensors")
        advance = (lambda x: None) if bar is None else bar.update
        steps = reader.stream.steps
        passes: list[_TensorPass] = []
        for uid, m, t in mine:
            if t is None:  # a matrix followed for its spectra only
                assert m is not None and options is not None and spectra is not None
                records[uid] = (m.shape, _follow(reader, m, dev, options, r=r, spectra=spectra, advance=advance))
                continue
            assert sparsity is not None and counts is not None
            passes.append(_TensorPass(reader, m, t, dev, options, sparsity, r=r, spectra=spectra, counts=counts))
        passes.sort(key=_TensorPass.where_stored)  # read each file front to back: the OS reads ahead for us
        try:
            for tp in _read_ahead(reader, passes):
                if tp.entry is not None:
                    records[tp.entry.uid] = (tp.entry.shape, tp.spectra_found())
                assert sparsity is not None
                for rec in tp.follower.records():
                    rows.append(sparsity_row(tp.plan, rec, sparsity))
                    missing += not_measured(tp.plan, rec, steps, steps.index(rec.step))
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        tally: dict[str, Any] = {"tensors_read": 0, "uncacheable": 0}
        for part in (spectra, counts):
            if part is not None:
                for k, v in part.meta().items():
                    tally[k] = tally.get(k, 0) + v
        if store is not None:
            now = store.stats.as_dict()
            tally.update({k: v - before.get(k, 0) for k, v in now.items()})
        parts = world.gather(
            {
                "process_rank": world.process_rank,
                "matrices": list(records),
                "tensors": sorted({r["name"] for r in rows}),
                "records": records,
                "rows": rows,
                "not_measured": missing,
                "cache": tally,
            }
        )
        merged = {key: rec for part in parts for key, rec in part["records"].items()}
        full_plan = list(reader.plan)
        records = {e.uid: merged[e.uid] for e in full_plan if e.uid in merged}
        experts = {e.uid: (e.key, e.expert) for e in full_plan if e.expert is not None}
        params: dict[str, Any] = {"include": where.include, "exclude": where.exclude}
        if options is not None:
            params = {"seed": options.seed, **params}
        meta = _stream_meta(s, reader, dev, world.size, parts, matrices=options is not None, **params)
        if sparsity is not None:
            followed = {t.key for t in tplans}
            partial = [x for x in meta["skipped"] if "kind" not in x and "side" not in x and x["name"] in followed]
            meta["skipped"] = [x for x in meta["skipped"] if x not in partial] + [
                x for x in tskipped if all(x["name"] != y["name"] for y in meta["skipped"])
            ]
            if partial:  # analysed elementwise only: no spectra (a matrix's metrics need a matrix)
                meta["partial"] = partial
            meta["filtered_out"] = max(meta["filtered_out"], tfiltered)
            meta["unmatched"] = {"only_base": [], "only_ft": []} if options is None else meta["unmatched"]
            meta["dtype_changes"] = dtype_changes(tplans, s.steps)
        if options is not None:
            mixed = _mixed_formats(reader, options.dtype)
            if mixed:  # the rule of pairs (linalg.policy.compared_format), per (matrix, checkpoint) in two formats
                meta["mixed_formats"] = mixed
    if memo is not None:  # keep what this pass used: the next update needs no more
        used = (spectra.used if spectra is not None else set()) | (counts.used if counts is not None else set())
        for digest in [d for d in memo if d not in used]:
            del memo[digest]
    meta["cache"] = {"enabled": store is not None, **sum_counts([p["cache"] for p in parts])}
    if store is not None:
        meta["cache"]["root"] = str(store.root)
    meta["seconds"] = round(time.perf_counter() - t0, 3)
    rows = [r for p in parts for r in p["rows"]]
    missing = [x for p in parts for x in p["not_measured"]]
    return _Passed(records, experts, meta, rows, missing)


def _units(
    matrices: Sequence[MatrixPlan], tensors: Sequence[TensorPlan]
) -> list[tuple[str, MatrixPlan | None, TensorPlan | None]]:
    """One unit per followed uid: its matrix plan (spectra) and its tensor plan (sparsity), either may be None."""
    by_uid: dict[str, list[Any]] = {}
    for m in matrices:
        by_uid.setdefault(m.uid, [None, None])[0] = m
    for t in tensors:
        by_uid.setdefault(t.uid, [None, None])[1] = t
    return [(uid, m, t) for uid, (m, t) in by_uid.items()]


def _check_fits(reader: StreamReader, entry: MatrixPlan) -> None:
    """The least one matrix needs at once (W0 and one W_t as stored, their float32 difference) must fit."""
    m, n = entry.shape
    size = reader.base.info(entry.base_name).dtype.itemsize
    check_fits(
        m * n * (2 * size + 4),
        device=None,
        what=f"matrix {entry.uid!r} [{m}, {n}] (W0 and one checkpoint's, as stored, and their float32 difference)",
        fix=either(f"leave it out with exclude={entry.key!r}", f"leave it out with --exclude '{entry.key}'"),
    )


class _Batch:
    """ΔW_t of one matrix, stacked and decomposed in batches of at most UPDATE_BATCH_BYTES; each spectrum is
    stored as soon as it is computed (a killed run keeps it). Every batch draws its test matrices from the
    matrix's own seed, so a step's spectrum is the same whichever batch (or run) computes it."""

    def __init__(
        self,
        entry: MatrixPlan,
        options: StreamOptions,
        *,
        r: int,
        spectra: _Spectra,
        key_of: Mapping[int, CacheKey | None],
        out: dict[int, Spectrum],
    ) -> None:
        m, n = entry.shape
        self.per = max(1, UPDATE_BATCH_BYTES // (4 * m * n))
        self.seed = matrix_seed(options.seed, entry.uid)
        self.options, self.r, self.spectra, self.key_of, self.out = options, r, spectra, key_of, out
        self.batch: list[tuple[int, torch.Tensor]] = []

    def add(self, step: int, d: torch.Tensor) -> None:
        self.batch.append((step, d))
        if len(self.batch) >= self.per:
            self.flush()

    def flush(self) -> None:
        if not self.batch:
            return
        D = torch.stack([d for _, d in self.batch])
        fro = torch.linalg.vector_norm(D, dim=(-2, -1), dtype=torch.float64)
        nz = [i for i in range(len(self.batch)) if float(fro[i]) > 0]
        found = (
            dict(zip(nz, update_spectra(D[nz], r=self.r, k=self.options.k, seed=self.seed, frobenius=fro[nz])))
            if nz
            else {}
        )
        for i, (step, _) in enumerate(self.batch):
            sp = found.get(i)
            self.spectra.put(self.key_of[step], sp)
            if sp is not None:
                self.out[step] = sp
        self.batch.clear()


def _known(reader: StreamReader, entry: MatrixPlan, spectra: _Spectra) -> tuple[dict[int, Spectrum], list[int], dict]:
    """The spectra of one matrix already known (memo, cache), the steps (indices) still to compute and their keys."""
    steps = reader.stream.steps
    base_id = reader.base.identity(entry.base_name)
    keys = [spectra.key(base_id, ck.identity(name), entry.uid) for ck, name in zip(reader.checkpoints, entry.names)]
    out: dict[int, Spectrum] = {}
    todo = []
    for i, (step, key) in enumerate(zip(steps, keys)):
        found, sp = spectra.get(key, entry.shape)
        if not found:
            todo.append(i)
        elif sp is not None:
            out[step] = sp
    return out, todo, {steps[i]: keys[i] for i in todo}


def _follow(
    reader: StreamReader,
    entry: MatrixPlan,
    dev: torch.device,
    options: StreamOptions,
    *,
    r: int,
    spectra: _Spectra,
    advance: Callable[[float], object] = lambda x: None,
) -> dict[int, Spectrum]:
    """The spectra of one matrix's ΔW_t at every step where it is nonzero, in batches of stacked updates.

    Steps whose spectrum is known are not read; the others are computed and stored one batch at a time.
    ``advance`` moves the progress bar by fractions of this matrix (each step known, read or decomposed)."""
    out, todo, key_of = _known(reader, entry, spectra)
    share = 1.0 / max(len(reader.stream.steps), 1)
    advance(share * (len(reader.stream.steps) - len(todo)))
    if not todo:
        return dict(sorted(out.items()))
    spectra.read += 1 + len(todo)
    batch = _Batch(entry, options, r=r, spectra=spectra, key_of=key_of, out=out)
    for step, d in reader.updates(entry, device=dev, only=todo, rounding=options.dtype):
        advance(share)
        batch.add(step, d)
    batch.flush()
    return dict(sorted(out.items()))


class _TensorPass:
    """One tensor's sparsity counts and, for a matrix (``entry``), its spectra, from one read of each version: what
    must be read is known before anything is (:attr:`reads`: the base ``None`` first, then checkpoint indices in
    step order, only those some result still needs), and :meth:`feed` is given each version as read."""

    def __init__(
        self,
        reader: StreamReader,
        entry: MatrixPlan | None,
        plan: TensorPlan,
        dev: torch.device,
        options: StreamOptions | None,
        sparsity: SparsityOptions,
        *,
        r: int,
        spectra: _Spectra | None,
        counts: CountStore,
    ) -> None:
        self.reader, self.entry, self.plan, self.dev, self.sparsity, self.counts = (
            reader,
            entry,
            plan,
            dev,
            sparsity,
            counts,
        )
        steps = reader.stream.steps
        base_id = reader.base.identity(plan.base.name) if plan.base is not None else None
        ids = [None if v is None else ck.identity(v.name) for ck, v in zip(reader.checkpoints, plan.instances)]
        self.follower = TensorFollower(plan, steps, counts, (base_id, ids))
        need_base, need = self.follower.reads()
        self._out: dict[int, Spectrum] = {}
        self._todo: set[int] = set()
        self._batch: _Batch | None = None
        if entry is not None and spectra is not None and options is not None:
            self._out, todo, key_of = _known(reader, entry, spectra)
            self._todo = set(todo)
            self._batch = _Batch(entry, options, r=r, spectra=spectra, key_of=key_of, out=self._out)
        self._wanted = set(need)
        self._need_base = need_base
        self.reads: list[int | None] = ([None] if need_base or self._todo else []) + sorted(self._wanted | self._todo)
        self._w0: torch.Tensor | None = None
        # the FP8 rule compares stored codes and scales (not for experts, read as values: as the pair engine)
        self.fp8 = sparsity.dtype is None and plan.expert is None

    def where_stored(self) -> tuple[str, int, int]:
        """Where the base's version lies in its file (path, byte offset; then the expert): reading the tensors in
        this order reads each checkpoint's file front to back. Sources without a byte range keep plan order."""
        inst = self.plan.base or next(i for i in self.plan.instances if i is not None)
        ck = (
            self.reader.base if self.plan.base is not None else self.reader.checkpoints[self.plan.instances.index(inst)]
        )
        ident = ck.identity(inst.name) or {}
        where = ident.get("byte_range") or [0]
        path = ident.get("file", {}).get("path", "") if isinstance(ident.get("file"), dict) else ""
        return str(path), int(where[0]), -1 if self.plan.expert is None else self.plan.expert

    def nbytes(self, which: int | None) -> int:
        inst = self.plan.at(which)
        assert inst is not None
        return math.prod(self.plan.analysed(inst)) * inst.dtype.itemsize

    def read(self, which: int | None) -> Any:
        """The stored version (run by the read-ahead thread: file I/O only)."""
        ck = self.reader.base if which is None else self.reader.checkpoints[which]
        inst = self.plan.at(which)
        assert inst is not None
        return read_version(ck, inst, self.plan.expert, fp8=self.fp8)

    def feed(self, which: int | None, stored: Any) -> None:
        self.counts.read += 1
        steps = self.reader.stream.steps
        if which is None:
            v = Version(stored, f"{self.plan.uid} in the base ({self.reader.base.source})", self.sparsity, self.dev)
            if self._todo:
                self._w0 = v.dense().to(device=self.dev, dtype=torch.float32)
            if self._need_base:
                self.follower.see_base(v)
            return
        ck, step = self.reader.checkpoints[which], steps[which]
        v = Version(stored, f"{self.plan.uid} at step {step} ({ck.source})", self.sparsity, self.dev)
        if which in self._todo:
            assert self._batch is not None and self._w0 is not None
            d = v.dense().to(device=self.dev, dtype=torch.float32) - self._w0
            check_finite(d, f"{self.plan.uid} at step {step} ({ck.source}): W_t − W0")
            self._batch.add(step, d)
        if which in self._wanted:
            self.follower.see(which, v)

    def spectra_found(self) -> dict[int, Spectrum]:
        if self._batch is not None:
            self._batch.flush()
        return dict(sorted(self._out.items()))


#: bytes the reader thread may run ahead of the counting (besides the version being counted)
_AHEAD_BYTES = 256 << 20


def _read_ahead(reader: StreamReader, passes: Sequence[_TensorPass]) -> Iterable[_TensorPass]:
    """Feed every tensor's versions, read in pass order by a background thread a bounded number of bytes ahead of
    the counting (for checkpoints whose reads are pure file I/O), and yield each tensor once all are fed."""

    def items():
        for tp in passes:
            for which in tp.reads:
                yield tp.nbytes(which), (lambda tp=tp, which=which: (tp, which, tp.read(which)))
            yield 0, (lambda tp=tp: (tp, "done", None))

    background = reader.base.pure_io and all(ck.pure_io for ck in reader.checkpoints)
    with ReadAhead(items(), budget=_AHEAD_BYTES, background=background) as stream:
        for tp, which, stored in stream:
            if which == "done":
                yield tp
            else:
                tp.feed(which, stored)


def _stream_meta(
    s: Any,
    reader: StreamReader,
    dev: torch.device,
    world_size: int,
    parts: list[dict[str, Any]],
    *,
    matrices: bool = True,
    **params: Any,
) -> dict[str, Any]:
    """The provenance of a stream pass (every rank's share, what was skipped or unmatched, the hardware)."""
    meta: dict[str, Any] = {
        "kind": "trajectory",
        "stream": s.origin,
        "base": reader.base.source,
        "base_step": s.base_step,
        "steps": list(s.steps),
        "device": str(dev),
        "hardware": hardware(dev).as_dict(),
        # ΔW_t is formed in float32 (exact for bf16 pairs), so the policy gives float32 passes everywhere
        "pass_dtype": str(pass_dtype(torch.float32, dev, (1, 1))).replace("torch.", ""),
        **params,
        "skipped": [*s.skipped, *reader.skipped, *_source_skipped(reader)],
        "filtered_out": reader.filtered_out,  # tensors the include/exclude filter left out
        "unmatched": reader.unmatched,
        "torch_version": torch.__version__,
        "world_size": world_size,
        "processes": [
            {
                "process_rank": p["process_rank"],
                "matrices": p["matrices"],
                **({"tensors": p["tensors"]} if p["tensors"] else {}),
            }
            for p in parts
        ],
    }
    if not matrices:  # a sparsity pass: no spectra, so no SVD pass dtype
        del meta["pass_dtype"]
    in_out = [e.uid for e in reader.plan if reader.base.in_out_layout(e.base_name)]
    if in_out:  # Conv1D (GPT-2 style) matrices: their stored right side, used by Sim_K, is the output side
        meta["in_out_layout"] = in_out
    return meta


def _mixed_formats(reader: StreamReader, dtype: Any) -> dict[str, int]:
    """How many (matrix, checkpoint) pairs are stored in two float formats, by formats and the rule used (none
    with a ``dtype=``: everything is rounded to it)."""
    out: dict[str, int] = {}
    if dtype is not None:
        return out
    for e in reader.plan:
        a = reader.base.info(e.base_name).dtype
        for ck, name in zip(reader.checkpoints, e.names):
            rule = compared_format(a, ck.info(name).dtype)
            if rule is not None:
                how = f"both rounded to {rule[0]}" if rule[1] else "compared as stored"
                text = f"{a} vs {ck.info(name).dtype}: {how}".replace("torch.", "")
                out[text] = out.get(text, 0) + 1
    return out


def _source_skipped(reader: StreamReader) -> list[dict[str, Any]]:
    """Every checkpoint's entries that are not weights (optimizer state, FP8 scales, ...), tagged by side
    (``"base"``, or ``"ft"`` with the checkpoint's ``step``)."""
    out: list[dict[str, Any]] = [{**s, "side": "base"} for s in reader.base.skipped]
    for step, ck in zip(reader.stream.steps, reader.checkpoints):
        out += [{**s, "side": "ft", "step": int(step)} for s in ck.skipped]
    return out


def rank_curve(
    stream: Any,
    *,
    base: Any = None,
    steps: Sequence[int] | None = None,
    include: Filter = None,
    exclude: Filter = None,
    hill_k: int = HILL_K,
    k: int = STREAM_K,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    seed: int = SEED,
    progress: bool = PROGRESS,
    strict: bool = False,
    cache: CacheArg = None,
    config: Any = None,
    sparsity: bool = False,
    eta: float = ETA,
) -> Report:
    """Stable rank, norms, Hill index and Sim_K to the final subspace of ΔW_t along a stream (paper §4, Fig. 4).

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> w0 = {"layers.0.self_attn.q_proj.weight": torch.randn(24, 32, generator=g)}
    >>> u = torch.randn(24, 2, generator=g) @ torch.randn(2, 32, generator=g)
    >>> r = rank_curve([w0, {n: w + 0.01 * u for n, w in w0.items()}, {n: w + 0.02 * u for n, w in w0.items()}],
    ...                steps=[0, 10, 20], k=2, hill_k=2)
    >>> [round(r.summary["by_step"][s]["stable_rank"], 3) for s in (10, 20)]
    [1.382, 1.382]

    Args:
        stream: a run directory of checkpoint folders (HF Trainer ``checkpoint-N``, verl ``global_step_N``,
            DeepSpeed ``global_stepN``, Megatron ``iter_NNNNNNN``, torchtitan ``step-N``) or a sequence of
            checkpoint sources (see :func:`weightgeo.stream.open_stream`). Checkpoints not completely written
            are left out with a warning and listed in ``meta["skipped"]`` (docs/trajectories.md).
        base: the initial model W0 (default: the first complete checkpoint; it gets no row).
        steps: steps of a sequence (strictly increasing).
        include, exclude: regexes or presets (``"attention"`` = the paper's q/k/v/o set). Default: every
            2-D floating tensor present in all checkpoints (our choice).
        hill_k: number of top singular values in the Hill estimator (≥ 2; default 10, the paper is silent).
        k: subspace size K for ``final_subspace_similarity`` (default 16, the paper's).
        dtype: ``None`` (default): ΔW_t = W_t − W0 from the stored values (in float32, exact for bf16); a
            floating dtype: W0 and W_t rounded to it first (the update checkpoints in that format would show).
        device: where the linear algebra runs; ``None``: where the checkpoints are read, the CPU. seed: for the
            randomized SVD.
        progress: show a tqdm bar (default False; the command line shows one).
        strict: fail on the first checkpoint that is not completely written instead of leaving it out.
        cache: the result cache (``None``: ``WEIGHTGEO_CACHE``, on by default; ``False``: off; a folder; a
            :class:`~weightgeo.cache.ResultCache`). Each (matrix, step) spectrum of checkpoints on disk is
            stored as it is computed, so a re-run, a resumed run or a run with one more checkpoint reads and
            computes only what is new (docs/caching.md).
        config: the model's HF config (a ``config.json`` path, its folder or a dict) for native checkpoints
            whose name mapping needs architecture numbers (Megatron / torchtitan DCP folders; see
            :func:`~weightgeo.open_checkpoint`), given to the base and every checkpoint.
        sparsity: also the sparsity curves of :func:`sparsity_curve` (every floating tensor; ``eta`` its
            tolerance) from the same read of each checkpoint: a matrix's rows carry both, other tensors' rows the
            sparsity keys only, and ``summary["curves"]`` both sets (what ``weightgeo trajectory`` reports).

    Returns:
        :class:`~weightgeo.report.Report`: ``rows`` per (step, matrix) with ``step, name, shape, numel, module,
        layer, delta_frobenius`` (‖ΔW_t‖_F), ``spectral_norm``, ``stable_rank`` (in [1, rank]), ``hill_alpha``,
        ``delta_spectral_gap`` (σ_K/σ_{K+1} of ΔW_t: Sim_K means little near 1),
        ``final_subspace_similarity`` (Sim_K(t, t_end), in [0, 1])
        and ``method``; ``summary["by_step"][step]`` = unweighted means over matrices (with ``by_module``),
        ``summary["curves"]`` = those means as lists over ``summary["steps"]``; ``meta["cache"]`` the spectra
        reused and computed and the tensors read. Each tensor is read at most once.
    """
    options = StreamOptions.create(
        include=include,
        exclude=exclude,
        hill_k=hill_k,
        k=k,
        dtype=dtype,
        device=device,
        seed=seed,
        progress=progress,
        eta=eta if sparsity else None,
    )
    s = open_stream(stream, base=base, steps=steps, strict=strict)
    warn_skipped(s.skipped)
    return stream_report(s, options, cache=cache, config=config, warn=False)


def stream_report(
    s: CheckpointStream,
    options: StreamOptions | None = None,
    *,
    cache: CacheArg = None,
    config: Any = None,
    memo: MutableMapping[str, Any] | None = None,
    warn: bool = True,
) -> Report:
    """:func:`rank_curve` of an opened :class:`~weightgeo.stream.CheckpointStream` with ``options`` (default
    :class:`~weightgeo.options.StreamOptions`; with ``options.eta`` set, the sparsity curves too, from the same
    read); ``memo`` (a dict kept by the caller between calls, as follow mode does) holds the spectra and counts of
    the previous call so that only new checkpoints are computed; ``warn=False`` leaves warning about skipped
    checkpoints to the caller."""
    options = StreamOptions() if options is None else options
    if warn:
        warn_skipped(s.skipped)
    sparse = options.sparsity_options()
    passed = _stream_pass(s, options, r=options.r, cache=cache, config=config, memo=memo, sparsity=sparse)
    k = options.k
    rows, sims, zero = assemble(passed.records, s.steps, hill_k=options.hill_k, k=k, experts=passed.experts)
    meta = passed.meta
    meta.update(kind="rank_curve", params=options.params(), zero_updates=zero, similarity=sims)
    if meta.get("mixed_formats"):
        n = sum(meta["mixed_formats"].values())
        warnings.warn(
            f"{n} (matrix, checkpoint) pair(s) are stored in different float formats in the base and the checkpoint ("
            + "; ".join(f"{k}: {v}" for k, v in meta["mixed_formats"].items())
            + f"); where both are rounded to one format, rounding differences show in ΔW_t; {spell('dtype')} chooses "
            f"the format instead (docs/metrics.md)",
            RuntimeWarning,
            stacklevel=3,
        )
    if not rows:
        raise WeightgeoError(
            f"{s.origin}: every followed matrix has ΔW = 0 at every step; is base= the same model as the checkpoints?"
            + (" (sparsity_curve reports such a stream: every entry unchanged)" if sparse is not None else "")
        )
    if sparse is not None:
        rows = merge_rows(rows, passed.rows)
        _sparsity_meta(meta, passed, warn=warn)
    return Report(rows=rows, summary=trajectory_summary(rows, s.steps, sims, k=k), meta=meta)


def _sparsity_meta(meta: dict[str, Any], passed: _Passed, *, warn: bool) -> None:
    meta.update(patch_encoding=PATCH_ENCODING, not_measured=passed.not_measured)
    if warn:
        warn_dtype_changes(meta.get("dtype_changes", []), stacklevel=4)


def sparsity_curve(
    stream: Any,
    *,
    base: Any = None,
    steps: Sequence[int] | None = None,
    include: Filter = None,
    exclude: Filter = None,
    eta: float = ETA,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    progress: bool = PROGRESS,
    strict: bool = False,
    cache: CacheArg = None,
    config: Any = None,
) -> Report:
    """How many weights changed along a stream: against the base and step by step, with the sparse patch's size.

    >>> import torch
    >>> w0 = {"layers.0.mlp.up_proj.weight": torch.zeros(4, 8, dtype=torch.bfloat16)}
    >>> w1 = {n: w.clone() for n, w in w0.items()}; w1["layers.0.mlp.up_proj.weight"][0, :2] = 1
    >>> w2 = {n: w.clone() for n, w in w1.items()}; w2["layers.0.mlp.up_proj.weight"][1, 0] = 1
    >>> r = sparsity_curve([w0, w1, w2], steps=[0, 10, 20], cache=False)
    >>> [(row["step"], row["update_sparsity"], row["step_sparsity"], row["patch_bytes"]) for row in r.rows]
    [(10, 0.9375, 0.9375, 8), (20, 0.90625, 0.96875, 6)]

    Args:
        stream: a run directory of checkpoint folders (HF Trainer ``checkpoint-N``, verl ``global_step_N``,
            DeepSpeed ``global_stepN``, Megatron ``iter_NNNNNNN``, torchtitan ``step-N``) or a sequence of
            checkpoint sources, as :func:`rank_curve` reads them; checkpoints not completely written are left
            out with a warning and listed in ``meta["skipped"]``.
        base: the initial model W0 (default: the first complete checkpoint; it gets no row).
        steps: steps of a sequence (strictly increasing).
        include, exclude: regexes or presets; default every floating tensor (norms, biases, embeddings; an
            expert stack [E, out, in] per expert, rows with ``expert``).
        eta: the bf16 rule's relative tolerance η (default 1e-3, the paper's; η < 2⁻⁹: bf16 values differ).
        dtype: ``None`` (default): compare as stored (the FP8 rule where both versions are scaled FP8); a
            floating dtype: every version rounded to it first (patches then carry values of that size).
        device: where the counting runs (``None``: the CPU, where checkpoints are read; ``"cuda"``: the same
            counts there).
        progress: show a tqdm bar (default False; the command line shows one).
        strict: fail on the first checkpoint that is not completely written instead of leaving it out.
        cache: the result cache (``None``: ``WEIGHTGEO_CACHE``, on by default; ``False``: off; a folder; a
            :class:`~weightgeo.cache.ResultCache`): one entry per (tensor, pair of checkpoints), so a re-run or a
            run with one more checkpoint reads only what is new (docs/caching.md).
        config: the model's HF config for native checkpoints whose name mapping needs it (as :func:`rank_curve`).

    Returns:
        :class:`~weightgeo.report.Report`: ``rows`` per (step, tensor) with ``step, name, (expert), shape, numel,
        module, layer, stored_dtype``, ``update_sparsity`` (W_t against the base, in [0, 1]) and
        ``update_unchanged``, ``step_sparsity`` (against the previous checkpoint; the first against the base) and
        ``step_unchanged``, ``patch_bytes`` (the sparse patch of that step: metrics/stepwise.py) and
        ``dense_bytes``; ``summary["by_step"][step]``: both sparsities weighted by entries over the model, the
        counts and bytes summed, the same ``by_module`` (and ``experts``); ``summary["curves"]``:
        ``update_sparsity``, ``step_sparsity`` and ``patch_bytes`` as lists over ``summary["steps"]``;
        ``meta["not_measured"]`` (figures of versions that cannot be compared: absent, another shape),
        ``meta["dtype_changes"]``, ``meta["patch_encoding"]``, ``meta["cache"]``. Each tensor is read at most
        once per checkpoint (docs/trajectories.md).
    """
    options = SparsityOptions.create(
        include=include, exclude=exclude, eta=eta, dtype=dtype, device=device, progress=progress
    )
    s = open_stream(stream, base=base, steps=steps, strict=strict)
    warn_skipped(s.skipped)
    return sparsity_report(s, options, cache=cache, config=config, warn=False)


def sparsity_report(
    s: CheckpointStream,
    options: SparsityOptions | None = None,
    *,
    cache: CacheArg = None,
    config: Any = None,
    memo: MutableMapping[str, Any] | None = None,
    warn: bool = True,
) -> Report:
    """:func:`sparsity_curve` of an opened :class:`~weightgeo.stream.CheckpointStream` (``memo`` and ``warn`` as
    :func:`stream_report`)."""
    options = SparsityOptions() if options is None else options
    if warn:
        warn_skipped(s.skipped)
    passed = _stream_pass(s, None, r=0, cache=cache, config=config, memo=memo, sparsity=options)
    rows = merge_rows(passed.rows)
    meta = passed.meta
    meta.update(kind="sparsity_curve", params=options.params())
    _sparsity_meta(meta, passed, warn=True)
    return Report(rows=rows, summary=sparsity_summary(rows, s.steps), meta=meta)


def locking_onset(
    stream: Any,
    *,
    base: Any = None,
    steps: Sequence[int] | None = None,
    k: int = STREAM_K,
    threshold: float = THRESHOLD,
    include: Filter = None,
    exclude: Filter = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    seed: int = SEED,
    progress: bool = PROGRESS,
    strict: bool = False,
    cache: CacheArg = None,
    config: Any = None,
) -> LockingOnset:
    """When the top-K input subspace of ΔW_t locks onto the final one (paper §4, Fig. 5; definition ours).

    Onset (per matrix, and for the model on the mean curve): the first checkpoint t < t_end after which
    Sim_K(t', t_end) ≥ ``threshold`` for every checkpoint t' ≥ t before t_end; see :func:`onset_step`.

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> w0 = {"layers.0.self_attn.q_proj.weight": torch.randn(24, 32, generator=g)}
    >>> u = torch.randn(24, 2, generator=g) @ torch.randn(2, 32, generator=g)
    >>> ckpts = [{n: w + c * u for n, w in w0.items()} for c in (0.01, 0.02, 0.03)]
    >>> locking_onset(ckpts, base=w0, steps=[10, 20, 30], k=2).step
    10

    Args:
        stream: a stream (as :func:`rank_curve`), or a :class:`~weightgeo.report.Report` from
            :func:`rank_curve` (its similarities are reused, nothing is read; its ``k`` applies).
        base, steps, include, exclude, dtype, device, seed, progress, strict, cache, config: as :func:`rank_curve`.
        k: subspace size K (default 16). threshold: in (0, 1], default 0.9 (our choice).

    Returns:
        a :class:`LockingOnset` (``step``, ``per_matrix``, ``similarity``, ``mean_similarity``).
    """
    if isinstance(stream, Report):
        sims = stream.meta.get("similarity")
        if stream.meta.get("kind") != "rank_curve" or sims is None:
            raise WeightgeoError(
                "locking_onset(report): pass a Report made by rank_curve (it carries the similarities), or a stream"
            )
        sims = {n: {int(s): float(v) for s, v in c.items()} for n, c in sims.items()}
        return build_locking(sims, k=stream.meta["params"]["k"], threshold=threshold, meta=dict(stream.meta))
    options = StreamOptions.create(
        include=include,
        exclude=exclude,
        k=k,
        threshold=threshold,
        dtype=dtype,
        device=device,
        seed=seed,
        progress=progress,
    )
    s = open_stream(stream, base=base, steps=steps, strict=strict)
    warn_skipped(s.skipped)
    # r = k: the onset needs the top-K subspaces only (no Hill index)
    passed = _stream_pass(s, options, r=options.k, cache=cache, config=config)
    meta = passed.meta
    _, sims, zero = assemble(passed.records, s.steps, hill_k=2, k=options.k, experts=passed.experts)
    meta.update(kind="locking_onset", params=options.params(), zero_updates=zero)
    return build_locking(sims, k=options.k, threshold=options.threshold, meta=meta)
