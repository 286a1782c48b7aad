"""Checkpoint streams: an ordered run of checkpoints of one training run, and the one-read pass over them.

A stream is either a directory of HF Trainer ``checkpoint-<step>`` folders, or a sequence of checkpoint
sources (paths, mappings, modules, :class:`~weightgeo.checkpoint.Checkpoint` objects) with their steps.
The base (initial model, W0) is ``base=`` or, by default, the first checkpoint.

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

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from .checkpoint import Checkpoint, align, compile_filter, open_checkpoint
from .errors import WeightgeoError
from .validation import check_finite

__all__ = ["CheckpointStream", "open_stream", "StreamReader", "MatrixPlan"]

_CKPT_DIR = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True)
class CheckpointStream:
    """An ordered, validated stream: ``sources[i]`` is the checkpoint at ``steps[i]``; nothing is read yet.

    Attributes:
        sources: the checkpoint sources compared with the base, in step order (the base excluded).
        steps: their training steps, strictly increasing.
        base: the base source (W0).
        base_step: the base's step when it is the stream's first checkpoint, else ``None``.
        origin: where the stream came from, for messages and report meta.
    """

    sources: tuple[Any, ...]
    steps: tuple[int, ...]
    base: Any
    base_step: int | None
    origin: str

    def __len__(self) -> int:
        return len(self.steps)


def open_stream(stream: Any, *, base: Any = None, steps: Sequence[int] | None = None) -> CheckpointStream:
    """Validate a stream description (directory or sequence) and pin every checkpoint to its step.

    Nothing but folder names and ``trainer_state.json`` files is read.

    Args:
        stream: a directory of ``checkpoint-<step>`` folders (step from the folder name, checked against
            ``trainer_state.json``'s ``global_step`` when present), a sequence of checkpoint sources, or a
            :class:`CheckpointStream`.
        base: the initial model W0. Default: the first checkpoint, which then contributes no update of its own.
        steps: for a sequence, its steps (strictly increasing). Default: the numbers in the folder names when
            every source is a ``checkpoint-<step>`` path, else positions (base = 0; our choice).

    Raises:
        WeightgeoError: empty directory or sequence, a single checkpoint and no separate base (nothing to
            compare), duplicate or unsorted steps, a ``trainer_state.json`` that disagrees with its folder.
    """
    if isinstance(stream, CheckpointStream):
        if base is not None or steps is not None:
            raise WeightgeoError("open_stream: the CheckpointStream already fixes its base and steps; "
                                 "pass base=/steps= only with a directory or a sequence of sources")
        return stream
    if isinstance(stream, (str, os.PathLike)):
        if steps is not None:
            raise WeightgeoError(f"stream {str(stream)!r} is a directory: its steps come from the "
                                 f"checkpoint-<step> folder names; drop steps= (or pass a list of sources)")
        sources, found_steps, origin = _scan_directory(Path(stream))
        return _finish(sources, found_steps, base, origin, checked=True)
    if isinstance(stream, (Sequence, Iterator)) and not isinstance(stream, (bytes, dict)):
        sources = list(stream)
        if not sources:
            raise WeightgeoError("the stream is an empty sequence; pass checkpoint sources in step order")
        origin = f"sequence of {len(sources)} checkpoints"
        if steps is None:
            named = [_step_from_path(s) for s in sources]
            if all(n is not None for n in named):
                found = [int(n) for n in named]  # type: ignore[arg-type]
                _check_order(found, "the checkpoint-<step> folder names", sources)
                for s, n in zip(sources, found):
                    _check_trainer_state(Path(s), n)
                return _finish(sources, found, base, origin, checked=True)
            start = 1 if base is not None else 0
            return _finish(sources, list(range(start, start + len(sources))), base, origin, checked=False)
        given = _validate_steps(steps, len(sources))
        for s, n in zip(sources, given):
            if isinstance(s, (str, os.PathLike)) and Path(s).is_dir():
                _check_trainer_state(Path(s), n)
        return _finish(sources, given, base, origin, checked=True)
    raise WeightgeoError(f"stream must be a directory of checkpoint-<step> folders or a sequence of checkpoint "
                         f"sources, got {type(stream).__name__}")


def _finish(sources: list[Any], steps: list[int], base: Any, origin: str, *, checked: bool) -> CheckpointStream:
    if base is None:
        if len(sources) < 2:
            raise WeightgeoError(
                f"{origin}: a stream with one checkpoint (step {steps[0]}) has nothing to compare; add "
                f"checkpoints, or pass the initial model as base=")
        return CheckpointStream(tuple(sources[1:]), tuple(steps[1:]), sources[0], steps[0], origin)
    return CheckpointStream(tuple(sources), tuple(steps), base, None, origin)


def _validate_steps(steps: Sequence[int], n: int) -> list[int]:
    out = []
    for s in steps:
        if isinstance(s, bool) or not isinstance(s, int) and not (hasattr(s, "__index__")):
            raise WeightgeoError(f"steps must be integers, got {s!r} ({type(s).__name__})")
        out.append(int(s))
    if len(out) != n:
        raise WeightgeoError(f"steps has {len(out)} entries for {n} checkpoints; give one step per checkpoint")
    _check_order(out, "steps", None)
    return out


def _check_order(steps: list[int], what: str, sources: list[Any] | None) -> None:
    seen: dict[int, int] = {}
    for i, s in enumerate(steps):
        if s in seen:
            where = "" if sources is None else f" ({sources[seen[s]]!s} and {sources[i]!s})"
            raise WeightgeoError(f"duplicate step {s} in {what}{where}; every checkpoint needs its own step")
        seen[s] = i
    for a, b in zip(steps, steps[1:]):
        if b < a:
            raise WeightgeoError(f"{what} are not increasing ({a} then {b}): {steps}; pass the checkpoints in "
                                 f"training order")


def _step_from_path(source: Any) -> int | None:
    if isinstance(source, (str, os.PathLike)):
        m = _CKPT_DIR.match(Path(source).name)
        if m:
            return int(m.group(1))
    return None


def _scan_directory(root: Path) -> tuple[list[Path], list[int], str]:
    if not root.exists():
        raise WeightgeoError(f"stream directory {root} does not exist; pass the Trainer output_dir that holds "
                             f"the checkpoint-<step> folders")
    if not root.is_dir():
        raise WeightgeoError(f"stream {root} is a file, not a directory of checkpoint-<step> folders; for a list "
                             f"of checkpoints pass a sequence of sources with steps=")
    found: dict[int, Path] = {}
    others = []
    for child in sorted(root.iterdir()):
        m = _CKPT_DIR.match(child.name)
        if m and child.is_dir():
            step = int(m.group(1))
            if step in found:  # checkpoint-10 and checkpoint-010
                raise WeightgeoError(f"duplicate step {step} in {root}: {found[step].name} and {child.name}; "
                                     f"remove one")
            found[step] = child
        else:
            others.append(child.name)
    if not found:
        what = "it is empty" if not others else f"it holds {others[:6]}" + (" ..." if len(others) > 6 else "")
        hint = (" It looks like a single checkpoint: pass a list of checkpoints, or its parent run directory."
                if any(o in ("config.json", "model.safetensors", "model.safetensors.index.json",
                             "pytorch_model.bin") for o in others) else "")
        raise WeightgeoError(f"stream directory {root} has no checkpoint-<step> folders ({what}).{hint}")
    steps = sorted(found)
    for s in steps:
        _check_trainer_state(found[s], s)
    return [found[s] for s in steps], steps, str(root)


def _check_trainer_state(folder: Path, step: int) -> None:
    state = folder / "trainer_state.json"
    if not state.is_file():
        return
    try:
        data = json.loads(state.read_text())
    except (OSError, ValueError) as e:
        raise WeightgeoError(f"{state}: not readable JSON ({e}); fix or delete the file") from e
    gs = data.get("global_step") if isinstance(data, dict) else None
    if gs is not None and int(gs) != step:
        raise WeightgeoError(f"{state}: global_step is {gs} but the checkpoint is at step {step} (from its folder "
                             f"name or steps=); rename the folder or pass steps= explicitly")


@dataclass(frozen=True)
class MatrixPlan:
    """One matrix followed along the stream: its key and stored name in the base and in each checkpoint."""

    key: str
    shape: tuple[int, int]
    base_name: str
    names: tuple[str, ...]


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

    @classmethod
    def open(cls, stream: CheckpointStream, *, include: Any = None, exclude: Any = None,
             config: Any = None) -> "StreamReader":
        """``config``: architecture numbers for native checkpoints, given to every ``open_checkpoint``."""
        keep = compile_filter(include, exclude)
        base = open_checkpoint(stream.base, config=config)
        cks: list[Checkpoint] = []
        try:
            for src in stream.sources:
                cks.append(open_checkpoint(src, base=base, config=config))
            plan, skipped, unmatched = _plan(base, cks, stream.steps, keep, explicit=include is not None)
        except BaseException:
            for c in [base, *cks]:
                c.close()
            raise
        if not plan:
            for c in [base, *cks]:
                c.close()
            raise WeightgeoError(
                f"{stream.origin}: no matrix to follow ({len(base)} tensors in the base {base.source}; "
                f"{len(skipped)} skipped, e.g. {skipped[:3]}); widen include=/exclude= (default: every 2-D "
                f"floating tensor present in all checkpoints)")
        return cls(stream, base, cks, plan, skipped, unmatched)

    def updates(self, entry: MatrixPlan, *, device: torch.device, dtype: torch.dtype = torch.float32
                ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(step, ΔW_t)`` for one matrix, reading the base tensor once and each checkpoint's once.

        ΔW_t = W_t − W0 is formed in ``dtype`` (float32 by default: the difference of two bf16 values is exact
        in float32) on ``device``.
        """
        w0 = self.base.get(entry.base_name).to(device=device, dtype=dtype)
        for step, ck, name in zip(self.stream.steps, self.checkpoints, entry.names):
            wt = ck.get(name).to(device=device, dtype=dtype)
            d = wt - w0
            del wt
            check_finite(d, f"{entry.key} at step {step} ({ck.source}): W_t − W0")
            yield step, d

    def close(self) -> None:
        for c in [self.base, *self.checkpoints]:
            c.close()

    def __enter__(self) -> "StreamReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _plan(base: Checkpoint, cks: list[Checkpoint], steps: Sequence[int], keep: Callable[..., bool], *,
          explicit: bool) -> tuple[list[MatrixPlan], list[dict[str, Any]], dict[str, list[str]]]:
    """Which matrices to follow, from headers alone. A key must be present in the base and every checkpoint."""
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
    for key in sorted(keys):
        pairs = [m[key] for m in per_ck]
        bi = base.info(pairs[0].base_name)
        if not keep(key, bi.shape):
            continue
        if len(bi.shape) != 2:
            if explicit or len(bi.shape) > 2:  # 1-D norms and biases are not followed by default; ≥3-D is news
                skipped.append({"name": key, "reason": f"{len(bi.shape)}-D tensor: trajectory metrics need a matrix"})
            continue
        if not bi.dtype.is_floating_point:
            skipped.append({"name": key, "reason": f"non-floating dtype {bi.dtype}"})
            continue
        bad = [(s, ck.info(p.ft_name).shape) for s, ck, p in zip(steps, cks, pairs)
               if ck.info(p.ft_name).shape != bi.shape]
        if bad:
            skipped.append({"name": key, "reason": f"shape changes along the stream: base {bi.shape}, "
                                                   f"step {bad[0][0]} {bad[0][1]}"})
            continue
        if min(bi.shape) == 0:
            skipped.append({"name": key, "reason": "empty matrix"})
            continue
        plan.append(MatrixPlan(key, (bi.shape[0], bi.shape[1]), pairs[0].base_name,
                               tuple(p.ft_name for p in pairs)))
    return plan, skipped, {"only_base": sorted(only_base), "only_ft": sorted(only_ft)}
