"""The plan of a comparison, from headers alone: which tensors, which rows, how they are grouped and sharded.

Bad inputs fail here, before any tensor is read. :func:`plan_pair` decides what to analyse between the base
and one fine-tune (a :class:`Plan` of :class:`Job` s); :func:`plan_work` turns the plans of one or several
fine-tunes of one base into work items, which :func:`pack_groups` packs into shape groups under a memory
budget. A per-tensor result cache would sit between :func:`plan_work` and :func:`pack_groups`: every job
names its tensors (stored names, dtypes, rows, and the plan's sources), and a group's rows are a function of
the options and the tensors only (:func:`weightgeo.engine.groups.matrix_rows`).
"""

from __future__ import annotations

import math
import re
import shlex
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..checkpoint import Alignment, Checkpoint, align, module_type
from ..checkpoint.names import VOCAB_MODULES
from ..distributed import World, balanced_shards
from ..errors import WeightgeoError
from ..selection import ByUid, Selector
from ..validation import either

__all__ = [
    "Job",
    "Plan",
    "plan_pair",
    "Unit",
    "Work",
    "plan_work",
    "Group",
    "pack_groups",
    "small_problem_bytes",
    "LEAST_GROUP_BYTES",
]


@dataclass(frozen=True)
class Job(ByUid):
    """One tensor of one (base, fine-tune) pair: canonical ``key``, each side's stored name and dtype, the base
    shape, the rows compared (fewer than the tensor's when tokens were added) and what the headers say."""

    key: str
    base_name: str
    ft_name: str
    shape: tuple[int, ...]
    rows: int
    rows_added: int
    base_dtype: torch.dtype
    ft_dtype: torch.dtype
    in_out: bool = False  # a 2-D weight stored [in, out] (transformers Conv1D)
    fp8: bool = False  # both sides store it as scaled FP8: the FP8 update rule compares codes and scales
    #: expert ``expert`` of an [E, out, in] expert stack (``shape`` is then the expert's [out, in]); else None
    expert: int | None = None

    @property
    def matrix(self) -> bool:
        return len(self.shape) == 2

    @property
    def row_len(self) -> int:
        """Entries per row (1 for 1-D and 0-d tensors)."""
        return math.prod(self.shape[1:]) if len(self.shape) > 1 else 1

    @property
    def compared(self) -> int:
        """Entries compared elementwise."""
        return self.rows * self.row_len if self.shape else 1


@dataclass(frozen=True)
class Plan:
    """What one (base, fine-tune) comparison analyses, decided from headers.

    ``jobs`` in checkpoint order; ``skipped``: tensors in both but not analysed, with reasons; ``partial``:
    tensors that get only the elementwise metrics (not matrices), with reasons; ``filtered_out``: how many the
    include/exclude filter left out; the ``alignment`` of names;
    ``base_skipped`` / ``ft_skipped``: what each side's source holds that is not a model weight
    (:attr:`Checkpoint.skipped <weightgeo.checkpoint.Checkpoint.skipped>`: optimizer state, FP8 scales, ...).
    """

    jobs: tuple[Job, ...]
    skipped: list[dict[str, str]]
    partial: list[dict[str, str]]
    alignment: Alignment
    base_source: str = ""
    ft_source: str = ""
    base_skipped: tuple[dict[str, str], ...] = ()
    ft_skipped: tuple[dict[str, str], ...] = ()
    filtered_out: int = 0

    def source_skipped(self) -> list[dict[str, str]]:
        """Both sources' non-weight entries, each tagged with its ``side`` (``"base"`` or ``"ft"``)."""
        return [{**s, "side": "base"} for s in self.base_skipped] + [{**s, "side": "ft"} for s in self.ft_skipped]


def plan_pair(b: Checkpoint, f: Checkpoint, select: Selector, *, fp8: bool = True) -> Plan:
    """Decide what to analyse between ``b`` and ``f`` from their headers (raises when there is nothing).

    Args:
        select: which tensors, and how (:class:`~weightgeo.selection.Selector`: the filter, whether non-matrices
            are analysed elementwise, whether an expert stack [E, out, in] is E matrix jobs).
        fp8: a weight both sides store as scaled FP8 is compared by the FP8 update rule on its stored codes
            (``False`` when the options round both sides to a dtype first).
    """
    alignment = align(b, f)
    if not alignment.pairs:
        raise WeightgeoError(
            f"no tensors in common between {b.source} ({len(b)} tensors, e.g. {b.names()[:3]}) and "
            f"{f.source} ({len(f)} tensors, e.g. {f.names()[:3]}); are they the same architecture?"
        )
    jobs: list[Job] = []
    skipped: list[dict[str, str]] = []
    partial: list[dict[str, str]] = []
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    filtered_out = 0
    for pair in alignment.pairs:
        ib, i_f = b.info(pair.base_name), f.info(pair.ft_name)
        choice = select.choose(pair.key, ib.shape, ib.dtype, i_f.dtype)
        filtered_out += choice.filtered
        if choice.skipped is not None:
            skipped.append({"name": pair.key, "reason": choice.skipped})
        if choice.partial is not None:
            partial.append({"name": pair.key, "reason": choice.partial})
        if choice.analyse is None:
            continue
        common = _common_rows(ib.shape, i_f.shape, pair.key)
        if common is None:
            mismatched.append((pair.key, tuple(ib.shape), tuple(i_f.shape)))
            continue
        rows, added = common
        if choice.analyse == "experts":
            in_out = b.in_out_layout(pair.base_name)  # each expert [in, out] (gpt-oss)
            jobs.extend(
                Job(
                    pair.key,
                    pair.base_name,
                    pair.ft_name,
                    ib.shape[1:],
                    ib.shape[1],
                    0,
                    ib.dtype,
                    i_f.dtype,
                    in_out,
                    expert=j,
                )
                for j in range(choice.experts)
            )
            continue
        in_out = len(ib.shape) == 2 and b.in_out_layout(pair.base_name)
        is_fp8 = fp8 and b.fp8_block(pair.base_name) is not None and f.fp8_block(pair.ft_name) is not None
        jobs.append(
            Job(pair.key, pair.base_name, pair.ft_name, ib.shape, rows, added, ib.dtype, i_f.dtype, in_out, is_fp8)
        )
    if mismatched:
        raise shape_mismatch(mismatched, b, f, analysed=len(jobs) + len(mismatched))
    if not jobs:
        why = (f"{filtered_out} excluded by include/exclude" if filtered_out else "") + (
            f"{', ' if filtered_out else ''}{len(skipped)} skipped: {skipped[:3]}" if skipped else ""
        )
        raise WeightgeoError(
            f"nothing to analyse between {b.source} and {f.source}: {len(alignment.pairs)} "
            f"tensors in common, {why}; widen include/exclude or check the dtypes"
        )
    return Plan(
        tuple(jobs),
        skipped,
        partial,
        alignment,
        b.source,
        f.source,
        tuple(b.skipped),
        tuple(f.skipped),
        filtered_out,
    )


def _common_rows(sb: tuple[int, ...], sf: tuple[int, ...], key: str) -> tuple[int, int] | None:
    """``(rows compared, rows added)`` of a tensor stored with shapes ``sb`` and ``sf``; ``None`` when the shapes
    cannot be compared."""
    if sb == sf:
        return (sb[0] if sb else 1), 0
    if len(sb) == len(sf) == 2 and sb[1:] == sf[1:] and module_type(key) in VOCAB_MODULES:
        # Added tokens: compare the rows both share; the new rows have no base to compare with.
        return min(sb[0], sf[0]), sf[0] - sb[0]
    return None


_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model", "dim")


def shape_mismatch(
    mismatched: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]],
    b: Checkpoint,
    f: Checkpoint,
    *,
    analysed: int,
) -> WeightgeoError:
    """One error for every tensor whose shapes differ: how many, a few examples, the hidden sizes that differ
    (from the configs, else the dimension the shapes differ in most), and the fix in the interface's syntax."""
    n = len(mismatched)
    examples = "; ".join(f"{k!r} {sb} vs {sf}" for k, sb, sf in mismatched[:3]) + ("; ..." if n > 3 else "")
    hb = next((b.config[h] for h in _HIDDEN_KEYS if isinstance(b.config.get(h), int)), None)
    hf = next((f.config[h] for h in _HIDDEN_KEYS if isinstance(f.config.get(h), int)), None)
    if hb is not None and hf is not None and hb != hf:
        sizes = f"their hidden sizes differ, {hb} vs {hf} (config.json)"
    else:
        pairs = Counter(
            (x, y) for _, sb, sf in mismatched if len(sb) == len(sf) for x, y in zip(sb, sf) if x != y
        ).most_common(1)
        if not pairs:
            sizes = "the tensors differ in their number of dimensions"
        elif n >= max(2, analysed // 2):  # most of the model: another architecture
            sizes = (
                f"the hidden sizes differ, {pairs[0][0][0]} vs {pairs[0][0][1]} (the dimension most shapes differ in)"
            )
        else:
            sizes = f"a dimension differs, {pairs[0][0][0]} vs {pairs[0][0][1]}"
    if n == analysed:
        flag = either("exclude=", "--exclude REGEX")
        fix = (
            f"these are two architectures: compare a fine-tune with the model it started from (leaving tensors "
            f"out with {flag} cannot help: every analysed tensor differs)"
        )
    else:
        names = [k for k, _, _ in mismatched]
        types = sorted({module_type(k) for k in names})
        regex = "|".join(re.escape(k) for k in names) if n <= 3 else "|".join(types)
        flag = either(f"exclude={regex!r}", f"--exclude {shlex.quote(regex)}")
        fix = f"compare checkpoints of one architecture, or leave these tensors out with {flag}"
    return WeightgeoError(
        f"{n} of {analysed} tensors have other shapes in {f.source} than in {b.source} ({examples}): {sizes}; {fix}"
    )


# --- work items ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Unit:
    """One work item. A matrix ``unit`` is one base matrix (its first ``rows`` rows) and every fine-tune's job
    on it: ``users`` = ((fine-tune, job index), ...), all through the batched pair kernel. A stream unit
    (``matrix=False``) is one fine-tune's tensor read in row chunks for the elementwise metrics alone."""

    base_name: str
    rows: int
    users: tuple[tuple[int, int], ...]
    matrix: bool
    weight: int  # entries read: the base once plus each user's (balances ranks)
    expert: int | None = None  # the expert of an [E, out, in] stack that ``base_name`` is


@dataclass(frozen=True)
class Work:
    """The work items of a pass (in plan order) and the plans they come from."""

    plans: tuple[Plan, ...]
    units: tuple[Unit, ...]

    def job(self, ft: int, j: int) -> Job:
        return self.plans[ft].jobs[j]

    def shard(self, world: World) -> Work:
        """This rank's share of the units, balanced by entries read (every rank computes the same split)."""
        mine = sorted(balanced_shards([u.weight for u in self.units], world.size)[world.process_rank])
        return Work(self.plans, tuple(self.units[i] for i in mine))

    def n_rows(self) -> int:
        """Rows (one per fine-tune and tensor) these units produce."""
        return sum(len(u.users) for u in self.units)


def plan_work(plans: Sequence[Plan], *, pair: bool) -> Work:
    """The units of a pass over ``plans`` (one per fine-tune of one base): with pair metrics, every matrix job
    joins the unit of its base matrix and row count (read and decomposed once for all fine-tunes); everything
    else is streamed per fine-tune."""
    units: list[Unit | None] = []
    users: dict[tuple[str, int | None, int], list[tuple[int, int]]] = {}
    slot: dict[tuple[str, int | None, int], int] = {}
    for i, plan in enumerate(plans):
        for j, job in enumerate(plan.jobs):
            if pair and job.matrix:
                key = (job.base_name, job.expert, job.rows)
                if key not in users:
                    users[key], slot[key] = [], len(units)
                    units.append(None)
                users[key].append((i, j))
            else:
                units.append(Unit(job.base_name, job.rows, ((i, j),), False, 2 * math.prod(job.shape), job.expert))
    for (name, expert, rows), us in users.items():
        numel = math.prod(plans[us[0][0]].jobs[us[0][1]].shape)
        units[slot[(name, expert, rows)]] = Unit(name, rows, tuple(us), True, numel * (1 + len(us)), expert)
    return Work(tuple(plans), tuple(u for u in units if u is not None))


# --- shape groups --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Group:
    """Same-shape matrix units analysed as one [B, rows, cols] batch: ``units`` (indices into the work's units),
    their base names, and per fine-tune its job index for every unit, or ``()`` when it holds none of them
    (groups are keyed by which fine-tunes hold a matrix, and in which dtype)."""

    units: tuple[int, ...]
    base_names: tuple[str, ...]
    rows: int
    jobs: tuple[tuple[int, ...], ...]
    nbytes: int  # bytes of every stacked input, as stored
    experts: tuple[int | None, ...] = ()  # per unit, the expert of a stack its base name is (else None)


def small_problem_bytes(rows: int, cols: int) -> int:
    """Working set of one matrix's small problems: about a dozen float64 small-side square matrices (Grams,
    eigenvectors, products); row-block temporaries are bounded separately (the policy's row blocks)."""
    return 12 * 8 * min(rows, cols) ** 2


#: with ``least`` members asked for (one per lane), a group holds them where they cost at most this together by the
#: plan's estimate: an 896-wide pair, a 4096-wide one, not two 151936×4096 vocabulary matrices
LEAST_GROUP_BYTES = 4 << 30


def pack_groups(work: Work, n_fts: int, budget: int, *, least: int = 1) -> list[Group]:
    """Pack the matrix units into same-shape, same-dtype groups whose estimated working set fits ``budget``.

    One member costs its stored inputs (the base and each fine-tune holding it) plus its small problems; with
    several fine-tunes the base's decomposition stays alive while each fine-tune's are formed (twice the small
    problems). ``least``: members per group over the budget where they cost at most :data:`LEAST_GROUP_BYTES`
    together (the CPU's lanes each take a member, :func:`~weightgeo.linalg.hardware.over_lanes`).
    """
    by_key: dict[tuple, list[int]] = {}
    for u, unit in enumerate(work.units):
        if not unit.matrix:
            continue
        first = work.job(*unit.users[0])
        held = {i: work.job(i, j).ft_dtype for i, j in unit.users}
        key = (unit.rows, first.shape[1], first.base_dtype, tuple(held.get(i) for i in range(n_fts)))
        by_key.setdefault(key, []).append(u)
    groups = []
    for (rows, cols, dtype, ft_dtypes), members in by_key.items():
        inputs = rows * cols * (dtype.itemsize + sum(d.itemsize for d in ft_dtypes if d is not None))
        cost = inputs + (1 if n_fts == 1 else 2) * small_problem_bytes(rows, cols)
        size = max(1, budget // max(cost, 1))
        if size < least and least * cost <= LEAST_GROUP_BYTES:
            size = least
        for s in range(0, len(members), size):
            part = tuple(members[s : s + size])
            per_ft = tuple(
                tuple(dict(work.units[u].users)[i] for u in part) if ft_dtypes[i] is not None else ()
                for i in range(n_fts)
            )
            groups.append(
                Group(
                    part,
                    tuple(work.units[u].base_name for u in part),
                    rows,
                    per_ft,
                    inputs * len(part),
                    tuple(work.units[u].expert for u in part),
                )
            )
    return groups
