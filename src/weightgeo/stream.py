"""Checkpoint streams: an ordered run of checkpoints of one training run, and the one-read pass over them.

A stream is either a run directory of checkpoint folders (HF Trainer ``checkpoint-N``, verl ``global_step_N``,
DeepSpeed / OpenRLHF ``global_stepN``, Megatron / slime ``iter_NNNNNNN``, torchtitan ``step-N``, ``step_N``;
the step from the folder name), or a sequence of checkpoint sources (paths, mappings, modules,
:class:`~weightgeo.checkpoint.Checkpoint` objects) with their steps. The base (initial model, W0) is ``base=``
or, by default, the first complete checkpoint. Checkpoints that are not completely written (a shard cut short,
an empty folder, a missing completion marker: :func:`~weightgeo.checkpoint.completeness.scan_run`) are left
out and listed in ``CheckpointStream.skipped`` with the reason, unless ``strict=True``.

>>> import torch
>>> g = torch.Generator().manual_seed(0)
>>> w0 = {"layers.0.q_proj.weight": torch.randn(4, 4, generator=g)}
>>> w1 = {"layers.0.q_proj.weight": w0["layers.0.q_proj.weight"] + 0.1}
>>> s = open_stream([w0, w1], steps=[0, 100])
>>> s.steps, s.base_step
((100,), 0)

The pass (:meth:`StreamReader.updates`) reads every tensor of every checkpoint exactly once and the base once,
matrix by matrix, so memory holds one base matrix plus one batch of updates, never a whole checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import Checkpoint, align, open_checkpoint
from .checkpoint.completeness import CheckpointStatus, checkpoint_status, scan_run, step_of
from .checkpoint.hf import TRAINER_STATE
from .checkpoint.registry import is_checkpoint_folder
from .checkpoint.runs import NAMINGS_TEXT
from .checkpoint.view import read_expert
from .errors import WeightgeoError
from .jsonfile import read_json
from .linalg.policy import compared_format
from .options import StreamOptions
from .selection import ByUid, Selector
from .validation import check_finite, check_increasing, check_run_dir, check_steps

__all__ = [
    "CheckpointStream",
    "open_stream",
    "run_checkpoints",
    "RunCheckpoints",
    "skipped_checkpoint",
    "base_folder_step",
    "strict_error",
    "StreamReader",
    "MatrixPlan",
]


@dataclass(frozen=True)
class CheckpointStream:
    """An ordered, validated stream: ``sources[i]`` is the checkpoint at ``steps[i]``; nothing is read yet.

    Attributes:
        sources: the checkpoint sources compared with the base, in step order (the base excluded).
        steps: their training steps, strictly increasing.
        base: the base source (W0).
        base_step: the base's step when it is the stream's first checkpoint, else ``None``.
        origin: where the stream came from, for messages and report meta.
        skipped: checkpoints left out because they are not completely written, each a dict (``name``, ``kind``
            = ``"checkpoint"``, ``step``, ``path``, ``state``, ``problem``, ``reason``; :func:`skipped_checkpoint`).
    """

    sources: tuple[Any, ...]
    steps: tuple[int, ...]
    base: Any
    base_step: int | None
    origin: str
    skipped: tuple[dict[str, Any], ...] = ()

    def __len__(self) -> int:
        return len(self.steps)

    @classmethod
    def of(
        cls,
        sources: Sequence[Any],
        steps: Sequence[int],
        *,
        base: Any = None,
        origin: str = "",
        skipped: Sequence[dict[str, Any]] = (),
    ) -> CheckpointStream:
        """A stream of ``sources`` at ``steps`` (already in order); without ``base`` the first one is the base.

        Raises:
            WeightgeoError: a single checkpoint and no separate base (nothing to compare).
        """
        return _finish(
            list(sources),
            [int(t) for t in steps],
            base,
            origin or f"sequence of {len(sources)} checkpoints",
            skipped=tuple(skipped),
        )


def open_stream(
    stream: Any, *, base: Any = None, steps: Sequence[int] | None = None, strict: bool = False
) -> CheckpointStream:
    """Validate a stream description (directory or sequence) and pin every checkpoint to its step.

    Nothing but folder names, sizes, headers and completion markers is read (no tensor data).

    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from safetensors.torch import save_file
    >>> run = Path(tempfile.mkdtemp())
    >>> for step in (0, 10, 20):
    ...     (run / f"global_step_{step}").mkdir()
    ...     save_file({"w": torch.ones(4, 4) * step}, str(run / f"global_step_{step}" / "model.safetensors"))
    >>> (run / "global_step_30").mkdir()  # the trainer has just created it
    >>> s = open_stream(run)
    >>> s.base_step, s.steps, [(c["step"], c["problem"]) for c in s.skipped]
    (0, (10, 20), [(30, 'empty')])

    Args:
        stream: a run directory of checkpoint folders (``checkpoint-N``, ``global_step_N``, ``global_stepN``,
            ``iter_NNNNNNN``, ``step-N``, ``step_N``; the step from the folder name, checked against
            ``trainer_state.json``'s ``global_step`` when present), a sequence of checkpoint sources, or a
            :class:`CheckpointStream`.
        base: the initial model W0. Default: the first complete checkpoint, which then contributes no update of
            its own.
        steps: for a sequence, its steps (strictly increasing). Default: the numbers in the folder names when
            every source is a checkpoint folder named as above, else positions (base = 0; our choice).
        strict: raise on the first checkpoint that is not completely written instead of leaving it out.

    Raises:
        WeightgeoError: empty directory or sequence, a single checkpoint and no separate base (nothing to
            compare), duplicate or unsorted steps, a ``trainer_state.json`` that disagrees with its folder, an
            incomplete base, an incomplete checkpoint with ``strict=True``.
    """
    if isinstance(stream, CheckpointStream):
        if base is not None or steps is not None:
            raise WeightgeoError(
                "open_stream: the CheckpointStream already fixes its base and steps; "
                "pass base=/steps= only with a directory or a sequence of sources"
            )
        return stream
    _check_base(base)
    if isinstance(stream, (str, os.PathLike)):
        if steps is not None:
            raise WeightgeoError(
                f"stream {str(stream)!r} is a directory: its steps come from the checkpoint "
                f"folder names; drop steps= (or pass a list of sources)"
            )
        found = run_checkpoints(stream, strict=strict)
        if not found.complete:
            raise WeightgeoError(
                f"stream directory {found.root} has no complete checkpoint yet" + _left_out(found.skipped)
            )
        complete = list(found.complete)
        own = base_folder_step(base, complete)
        if own is not None:  # base= is one of the run's own folders: the base, not a step of the stream
            base = None if own == complete[0][0] else base
            complete = [(t, p) for t, p in complete if t != own or base is None]
        paths = [p for _, p in complete]
        return _finish(paths, [t for t, _ in complete], base, str(found.root), skipped=tuple(found.skipped))
    if isinstance(stream, (Sequence, Iterator)) and not isinstance(stream, (bytes, dict)):
        sources = list(stream)
        if not sources:
            raise WeightgeoError("the stream is an empty sequence; pass checkpoint sources in step order")
        origin = f"sequence of {len(sources)} checkpoints"
        if steps is None:
            named = [_step_from_path(s) for s in sources]
            if all(n is not None for n in named):
                found_steps = [n for n in named if n is not None]
                check_increasing(found_steps, "the checkpoint folder names", sources)
            else:
                start = 1 if base is not None else 0
                found_steps = list(range(start, start + len(sources)))
        else:
            found_steps = check_steps(steps, len(sources))
        kept, kept_steps, skipped = _complete_sources(sources, found_steps, strict=strict)
        for src, n in zip(kept, kept_steps):
            if isinstance(src, (str, os.PathLike)) and Path(src).is_dir():
                _check_trainer_state(Path(src), n)
        if not kept:
            raise WeightgeoError(f"{origin}: no complete checkpoint" + _left_out(skipped))
        return _finish(kept, kept_steps, base, origin, skipped=tuple(skipped))
    raise WeightgeoError(
        f"stream must be a run directory of checkpoint folders ({NAMINGS_TEXT}) or a sequence of "
        f"checkpoint sources, got {type(stream).__name__}"
    )


@dataclass(frozen=True)
class RunCheckpoints:
    """The checkpoints of a run directory (from :func:`run_checkpoints`): ``complete`` as ``(step, path)`` in
    step order, and the ``skipped`` ones (:func:`skipped_checkpoint` dicts), in step order."""

    root: Path
    complete: list[tuple[int, Path]]
    skipped: list[dict[str, Any]]


def run_checkpoints(root: str | os.PathLike[str], *, strict: bool = False) -> RunCheckpoints:
    """Which checkpoints of run directory ``root`` are complete (:func:`~weightgeo.checkpoint.completeness.scan_run`),
    and which are left out and why.

    Raises:
        WeightgeoError: ``root`` is missing or a file, holds no checkpoint folder, holds two complete folders of
            one step (``checkpoint-10`` and ``checkpoint-010``), or (``strict``) an incomplete checkpoint.
    """
    root = check_run_dir(
        root,
        what="stream directory",
        fix=f"pass the run directory that holds the checkpoint folders ({NAMINGS_TEXT}), or a list of checkpoints "
        f"with steps=",
    )
    scan = scan_run(root)
    if not scan.checkpoints:
        others = sorted(c.name for c in root.iterdir())
        what = "it is empty" if not others else f"it holds {others[:6]}" + (" ..." if len(others) > 6 else "")
        hint = (
            " It looks like a single checkpoint: pass a list of checkpoints, or its parent run directory."
            if is_checkpoint_folder(root)
            else ""
        )
        raise WeightgeoError(f"stream directory {root} has no checkpoint folders ({NAMINGS_TEXT}; {what}).{hint}")
    states = {id(c): "corrupt" for c in scan.corrupt}
    states.update({id(c): "abandoned" for c in scan.abandoned})
    states.update({id(c): "in_progress" for c in scan.in_progress})
    complete: dict[int, Path] = {}
    skipped = []
    for st in scan.checkpoints:
        if not st.complete:
            if strict:
                raise strict_error(st.path, st.reason)
            skipped.append(skipped_checkpoint(st, states.get(id(st), "corrupt")))
            continue
        assert st.step is not None
        if st.step in complete:
            raise WeightgeoError(
                f"duplicate step {st.step} in {root}: {complete[st.step].name} and {st.path.name}; remove one"
            )
        complete[st.step] = st.path
    for step, path in complete.items():
        _check_trainer_state(path, step)
    return RunCheckpoints(root, sorted(complete.items()), skipped)


def base_folder_step(base: Any, complete: Sequence[tuple[int, Path]]) -> int | None:
    """The step of the run folder (in ``complete``, ``(step, path)`` pairs) that ``base`` is, else ``None``.

    >>> base_folder_step("/run/checkpoint-10", [(0, Path("/run/checkpoint-0")), (10, Path("/run/checkpoint-10"))])
    10
    """
    if not isinstance(base, (str, os.PathLike)):
        return None
    where = os.path.realpath(base)
    return next((t for t, p in complete if os.path.realpath(p) == where), None)


def skipped_checkpoint(status: CheckpointStatus, state: str) -> dict[str, Any]:
    """The ``report.meta["skipped"]`` entry of a checkpoint left out: ``name`` (the folder), ``kind``
    (``"checkpoint"``), ``step``, ``path``, ``state`` (``"in_progress"``: the newest, probably still being written;
    ``"corrupt"``: an older one, a failed save or a damaged copy; ``"abandoned"``: an old temporary folder),
    ``problem`` (one of :data:`~weightgeo.checkpoint.completeness.PROBLEMS`) and ``reason``."""
    return {
        "name": status.path.name,
        "kind": "checkpoint",
        "step": status.step,
        "path": str(status.path),
        "state": state,
        "problem": status.problem,
        "reason": status.reason,
    }


def strict_error(path: Any, reason: str | None, *, step: int | None = None) -> WeightgeoError:
    """The error of ``strict=True`` (CLI ``--strict``) on a checkpoint that is not completely written."""
    at = "" if step is None else f" (step {step})"
    return WeightgeoError(
        f"{path}{at} is not completely written ({reason or 'incomplete'}); strict=True (--strict) fails on it: "
        f"wait for the save to finish, remove the folder, or drop strict to leave it out"
    )


def _left_out(skipped: Sequence[dict[str, Any]]) -> str:
    """``; left out <path> (step N): <reason>`` for each checkpoint left out, for an error message."""
    return "".join(
        f"; left out {c.get('path', c.get('name'))} (step {c.get('step')}): {c.get('reason')}" for c in skipped
    )


def _check_base(base: Any) -> None:
    """A base given as a checkpoint folder must be completely written: it cannot be left out."""
    if isinstance(base, (str, os.PathLike)) and Path(base).is_dir() and step_of(Path(base).name)[0] is not None:
        st = checkpoint_status(base)
        if not st.complete:
            raise WeightgeoError(f"base {base} is not completely written ({st.reason}); pass a complete base")


def _complete_sources(
    sources: list[Any], steps: list[int], *, strict: bool
) -> tuple[list[Any], list[int], list[dict[str, Any]]]:
    """The sources of a sequence that are complete (checkpoint folders are checked; other sources pass)."""
    statuses = [
        checkpoint_status(s) if isinstance(s, (str, os.PathLike)) and Path(s).is_dir() else None for s in sources
    ]
    newest = max((i for i, st in enumerate(statuses) if st is not None), default=None)
    kept, kept_steps, skipped = [], [], []
    for i, (src, step, st) in enumerate(zip(sources, steps, statuses)):
        if st is None or st.complete:
            kept.append(src)
            kept_steps.append(step)
            continue
        if strict:
            raise strict_error(st.path, st.reason)
        state = "in_progress" if i == newest else ("abandoned" if st.temporary else "corrupt")
        skipped.append({**skipped_checkpoint(st, state), "step": step})
    return kept, kept_steps, skipped


def _finish(
    sources: list[Any], steps: list[int], base: Any, origin: str, *, skipped: tuple[dict[str, Any], ...] = ()
) -> CheckpointStream:
    if base is None:
        if len(sources) < 2:
            raise WeightgeoError(  # with what was left out: why a run of several folders came down to one
                f"{origin}: a stream with one checkpoint (step {steps[0]}) has nothing to compare; add "
                f"checkpoints, or pass the initial model as base=" + _left_out(skipped)
            )
        return CheckpointStream(tuple(sources[1:]), tuple(steps[1:]), sources[0], steps[0], origin, skipped)
    return CheckpointStream(tuple(sources), tuple(steps), base, None, origin, skipped)


def _step_from_path(source: Any) -> int | None:
    if isinstance(source, (str, os.PathLike)):
        step, _, temporary = step_of(Path(source).name)
        if step is not None and not temporary:
            return step
    return None


def _check_trainer_state(folder: Path, step: int) -> None:
    """A checkpoint's ``trainer_state.json``, when there is one, must agree with the step of its folder."""
    state = folder / TRAINER_STATE
    if not state.is_file():
        return
    fix = f"fix or delete {state} (weightgeo reads only its global_step; the weights do not need it)"
    data = read_json(state, what=TRAINER_STATE, fix=fix)
    gs = data.get("global_step") if isinstance(data, dict) else None
    if gs is None:
        return
    if isinstance(gs, bool) or not isinstance(gs, (int, float)) or not float(gs).is_integer():
        raise WeightgeoError(f"{state}: global_step is {gs!r}, not a whole number of steps; {fix}")
    if int(gs) != step:
        raise WeightgeoError(
            f"{state}: global_step is {int(gs)} but the checkpoint is at step {step} (from its folder "
            f"name or steps=); rename the folder or pass steps= explicitly"
        )


@dataclass(frozen=True)
class MatrixPlan(ByUid):
    """One matrix followed along the stream: its key and stored name in the base and in each checkpoint.

    For expert ``expert`` of an [E, out, in] expert stack, ``shape`` is the expert's [out, in] and the names are
    the stack's (every expert of a stack shares its key; :attr:`uid` tells them apart)."""

    key: str
    shape: tuple[int, int]
    base_name: str
    names: tuple[str, ...]
    expert: int | None = None


@dataclass
class StreamReader:
    """The opened stream (lazy checkpoints) and the plan of matrices to follow; use as a context manager.

    Built by :meth:`open`, which validates every header (alignment, shapes, dtypes) before reading any tensor.
    """

    stream: CheckpointStream
    base: Checkpoint
    checkpoints: list[Checkpoint]
    plan: list[MatrixPlan]
    skipped: list[dict[str, Any]] = field(default_factory=list)
    unmatched: dict[str, list[str]] = field(default_factory=dict)

    filtered_out: int = 0

    @classmethod
    def open(
        cls, stream: CheckpointStream, select: Selector | None = None, *, config: Any = None, matrices: bool = True
    ) -> StreamReader:
        """Open the base and every checkpoint (headers only) and plan the matrices to follow (``select``: which,
        default :meth:`StreamOptions.selector() <weightgeo.options.StreamOptions.selector>`). ``config``: the
        model's HF config for native checkpoints whose name mapping needs architecture numbers. ``matrices=False``:
        no matrix plan (a pass that follows tensors elementwise plans its own)."""
        select = StreamOptions().selector() if select is None else select
        base = open_checkpoint(stream.base, config=config)
        cks: list[Checkpoint] = []
        try:
            for src in stream.sources:
                cks.append(open_checkpoint(src, base=base, config=config))
            plan, skipped, unmatched, filtered = (
                _plan(base, cks, stream.steps, select) if matrices else ([], [], {"only_base": [], "only_ft": []}, 0)
            )
        except BaseException:
            for c in [base, *cks]:
                c.close()
            raise
        if not plan and matrices:
            for c in [base, *cks]:
                c.close()
            raise WeightgeoError(
                f"{stream.origin}: no matrix to follow ({len(base)} tensors in the base {base.source}; "
                f"{filtered} left out by include/exclude, {len(skipped)} skipped, e.g. {skipped[:3]}); widen "
                f"include=/exclude= (default: every 2-D floating tensor and expert stack present in all checkpoints)"
            )
        return cls(stream, base, cks, plan, skipped, unmatched, filtered)

    def updates(
        self,
        entry: MatrixPlan,
        *,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        only: Sequence[int] | None = None,
        rounding: torch.dtype | None = None,
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(step, ΔW_t)`` for one matrix, reading the base tensor once and each checkpoint's once.

        ΔW_t = W_t − W0 is formed in ``dtype`` (float32 by default: the difference of two bf16 values is exact
        in float32) on ``device``, from W0 and W_t as stored, or rounded to ``rounding`` first (the options'
        ``dtype``). Without ``rounding``, a W_t stored in a float format that neither holds nor is held by W0's
        (fp16 and bf16) is compared by the pair rule: both rounded to the coarser
        (:func:`~weightgeo.linalg.policy.compared_format`). ``only``: the indices (into the stream's steps) to
        read; default all.
        """
        picks = range(len(self.checkpoints)) if only is None else sorted(set(only))
        if not picks:
            return

        def read(ck: Checkpoint, name: str, to: torch.dtype | None) -> torch.Tensor:
            w = _read(ck, name, entry.expert)
            w = w if to is None or w.dtype == to else w.to(to)
            return w.to(device=device, dtype=dtype)

        stored0 = self.base.info(entry.base_name).dtype
        w0 = read(self.base, entry.base_name, rounding)
        for i in picks:
            step, ck, name = self.stream.steps[i], self.checkpoints[i], entry.names[i]
            rule = None if rounding is not None else compared_format(stored0, ck.info(name).dtype)
            to = rule[0] if rule is not None and rule[1] else rounding
            wt = read(ck, name, to)
            d = wt - (w0 if to is None or to == rounding else w0.to(to).to(dtype))
            del wt
            check_finite(d, f"{entry.uid} at step {step} ({ck.source}): W_t − W0")
            yield step, d

    def close(self) -> None:
        for c in [self.base, *self.checkpoints]:
            c.close()

    def __enter__(self) -> StreamReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read(ck: Checkpoint, name: str, expert: int | None) -> torch.Tensor:
    """The tensor ``name``, or expert ``expert`` of the stack ``name`` read alone (not the whole stack)."""
    return ck.get(name) if expert is None else read_expert(ck, name, expert)


def _plan(
    base: Checkpoint, cks: list[Checkpoint], steps: Sequence[int], select: Selector
) -> tuple[list[MatrixPlan], list[dict[str, Any]], dict[str, list[str]], int]:
    """Which matrices to follow, from headers alone (:meth:`Selector.choose <weightgeo.selection.Selector.choose>`
    on the base's shape and dtype and each checkpoint's dtype): the plan, the tensors skipped with reasons, the
    unmatched names and how many the filter left out. A key must be present in the base and every checkpoint."""
    per_ck = []
    only_base: set[str] = set()
    only_ft: set[str] = set()
    for ck in cks:
        al = align(base, ck)
        per_ck.append({p.key: p for p in al.pairs})
        only_base.update(al.only_base)
        only_ft.update(al.only_ft)
    keys = set(per_ck[0])
    for m in per_ck[1:]:
        keys &= set(m)
    for m in per_ck:  # present in some checkpoints but not all: unmatched
        for k in set(m) - keys:
            only_base.add(m[k].base_name)
    plan: list[MatrixPlan] = []
    skipped: list[dict[str, Any]] = []
    filtered = 0
    for key in sorted(keys):
        pairs = [m[key] for m in per_ck]
        bi = base.info(pairs[0].base_name)
        infos = [ck.info(p.ft_name) for ck, p in zip(cks, pairs)]
        ft_dtype = next((i.dtype for i in infos if not i.dtype.is_floating_point), infos[0].dtype)
        choice = select.choose(key, bi.shape, bi.dtype, ft_dtype)
        filtered += choice.filtered
        if choice.analyse is None:
            if choice.skipped is not None:
                skipped.append({"name": key, "reason": choice.skipped})
            continue
        bad = [(s, i.shape) for s, i in zip(steps, infos) if i.shape != bi.shape]
        if bad:
            skipped.append(
                {
                    "name": key,
                    "reason": f"shape changes along the stream: base {bi.shape}, step {bad[0][0]} {bad[0][1]}",
                }
            )
            continue
        names = tuple(p.ft_name for p in pairs)
        if choice.analyse == "experts":  # E matrices [out, in], each followed (and read) on its own, as pairs
            plan.extend(
                MatrixPlan(key, (bi.shape[1], bi.shape[2]), pairs[0].base_name, names, expert=j)
                for j in range(choice.experts)
            )
        else:
            plan.append(MatrixPlan(key, (bi.shape[0], bi.shape[1]), pairs[0].base_name, names))
    return plan, skipped, {"only_base": sorted(only_base), "only_ft": sorted(only_ft)}, filtered
