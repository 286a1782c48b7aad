"""Follow a training run as it writes: each checkpoint is analysed as soon as it is completely written.

>>> import tempfile, torch, weightgeo
>>> from pathlib import Path
>>> from safetensors.torch import save_file
>>> g = torch.Generator().manual_seed(0)
>>> w0, u = torch.randn(24, 32, generator=g), torch.randn(24, 2, generator=g) @ torch.randn(2, 32, generator=g)
>>> run = Path(tempfile.mkdtemp())
>>> for step, c in ((0, 0.0), (10, 0.01), (20, 0.02)):
...     (run / f"checkpoint-{step}").mkdir()
...     save_file({"layers.0.self_attn.q_proj.weight": w0 + c * u}, str(run / f"checkpoint-{step}" / "model.safetensors"))
>>> (run / "checkpoint-30").mkdir()  # being written: left out until it is complete
>>> for update in weightgeo.follow(run, k=2, hill_k=2, idle_s=0, cache=False):
...     print(update.step, update.report.summary["steps"], [c["name"] for c in update.skipped])
10 [10] ['checkpoint-30']
20 [10, 20] ['checkpoint-30']

What an update reports: the :func:`~weightgeo.rank_curve` of every complete checkpoint so far (the base and all
steps analysed up to and including the new one), so its ``final_subspace_similarity`` is Sim_K(t, t_new), the
similarity to the *newest* step so far, recomputed for every earlier step from their kept spectra (K×n
products, nothing re-read); a later update changes it as t_end moves. The last update equals an offline
``rank_curve`` over the same checkpoints, row for row.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint.completeness import step_of
from .defaults import ETA, HILL_K, POLL_S, PROGRESS, SEED, STREAM_K
from .errors import WeightgeoError
from .options import Filter, StreamOptions
from .report import Report
from .stream import CheckpointStream, RunCheckpoints, base_folder_step, run_checkpoints, strict_error
from .trajectory import CacheArg, stream_report, warn_skipped
from .validation import check_amount, check_int, check_run_dir

__all__ = ["follow", "FollowUpdate"]


@dataclass(frozen=True)
class FollowUpdate:
    """One step of a followed run.

    Attributes:
        step: the step just analysed.
        report: the :func:`~weightgeo.rank_curve` report over every complete checkpoint analysed so far (its
            t_end is the newest of them; ``meta["follow"]`` says which update this is).
        skipped: checkpoints of the run left out at this point (not completely written), with reasons.
    """

    step: int
    report: Report
    skipped: list[dict[str, Any]]

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The rows of :attr:`step`."""
        return [r for r in self.report.rows if r["step"] == self.step]


def follow(
    run_dir: str | os.PathLike[str],
    *,
    base: Any = None,
    include: Filter = None,
    exclude: Filter = None,
    hill_k: int = HILL_K,
    k: int = STREAM_K,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    seed: int = SEED,
    until: int | None = None,
    poll_s: float = POLL_S,
    idle_s: float | None = None,
    strict: bool = False,
    cache: CacheArg = None,
    config: Any = None,
    progress: bool = PROGRESS,
    sparsity: bool = False,
    eta: float = ETA,
) -> Iterator[FollowUpdate]:
    """Analyse a run's checkpoints as they become complete: one :class:`FollowUpdate` per new step.

    The run directory is scanned every ``poll_s`` seconds (:func:`~weightgeo.stream.run_checkpoints`: names,
    sizes, headers and completion markers). Each checkpoint that has become complete is analysed on its own (its
    tensors and the base's, the spectra of ΔW_t; the earlier steps' spectra are kept in memory and in the result
    cache, so a restarted follow resumes without recomputing) and an update over all complete checkpoints so far
    is yielded. Stops after the first step ≥ ``until`` (steps beyond it are not analysed), after ``idle_s``
    seconds without a new complete checkpoint, or when the caller stops iterating (Ctrl-C included).

    Args:
        run_dir: the run directory (``checkpoint-N``, ``global_step_N``, ``global_stepN``, ``iter_N``,
            ``step-N`` folders). It may hold no checkpoint yet.
        base: the initial model W0; default: the first complete checkpoint (it gets no row).
        include, exclude, hill_k, k, dtype, device, seed, cache, config, progress, sparsity, eta: as
            :func:`~weightgeo.rank_curve` (``sparsity=True``: each update carries the sparsity curves too, each
            checkpoint's counts computed once, as it arrives, from the same read as its spectra).
        until: the last step to analyse (default: no end).
        poll_s: seconds between scans of the run directory (default 10).
        idle_s: stop after this many seconds without a new complete checkpoint (default: never; ``0`` = analyse
            what is complete now and stop).
        strict: fail when an older checkpoint is incomplete (corrupt or abandoned); the newest being written is
            always waited for.

    Yields:
        :class:`FollowUpdate` (``step``, ``report``, ``skipped``); see the module docstring for what Sim_K means
        in an update.

    Raises:
        WeightgeoError: ``run_dir`` is missing or a file, bad options, and what :func:`~weightgeo.rank_curve`
            raises for the checkpoints themselves.
    """
    root = check_run_dir(
        run_dir, what="follow: run directory", fix="pass the folder the trainer writes its checkpoint folders into"
    )
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
    if until is not None:
        until = check_int(until, "until", minimum=0)
    poll_s = check_amount(poll_s, "poll_s", unit="seconds")
    if idle_s is not None:
        idle_s = check_amount(idle_s, "idle_s", unit="seconds", finite=False)  # inf: never stop, as None
    memo: dict[str, Any] = {}
    done: set[int] = set()
    warned: set[tuple[str, str]] = set()
    last_new = time.monotonic()
    updates = 0
    while True:
        found = _scan(root)
        complete = dict(found.complete) if found is not None else {}
        skipped = list(found.skipped) if found is not None else []
        _report_bad(skipped, warned, strict=strict)
        own = base_folder_step(base, sorted(complete.items()))  # base= one of the run's folders: not a step
        separate = None if own is not None and own == min(complete) else base
        base_step = None if separate is not None or not complete else min(complete)
        steps = [t for t in sorted(complete) if t not in (base_step, own)]
        new = [t for t in steps if t not in done and (until is None or t <= until)]
        for step in new:
            included = sorted(t for t in done | {step} if t in complete)
            sources = [complete[t] for t in included]
            if separate is not None:
                s = CheckpointStream.of(sources, included, base=separate, origin=str(root), skipped=skipped)
            else:
                assert base_step is not None  # a new step implies a complete checkpoint, the first being the base
                s = CheckpointStream.of(
                    [complete[base_step], *sources], [base_step, *included], origin=str(root), skipped=skipped
                )
            report = stream_report(s, options, cache=cache, config=config, memo=memo, warn=False)
            updates += 1
            report.meta["follow"] = {
                "update": updates,
                "new_step": step,
                "final_step": included[-1],
                "run_dir": str(root),
            }
            done.add(step)
            last_new = time.monotonic()
            yield FollowUpdate(step, report, skipped)
            if until is not None and step >= until:
                return
        if new:
            continue  # look again at once: more may have completed meanwhile
        if until is not None and any(t >= until for t in complete):
            return  # the run is past `until`; every step up to it has been analysed
        if idle_s is not None and time.monotonic() - last_new >= idle_s:
            return
        time.sleep(poll_s)


def _scan(root: Path) -> RunCheckpoints | None:
    """The run's checkpoints, or ``None`` while it holds no checkpoint folder yet (the trainer has not saved)."""
    try:
        if not any(step_of(p.name)[0] is not None and p.is_dir() for p in root.iterdir()):
            return None
    except OSError as e:
        raise WeightgeoError(f"follow: cannot list {root} ({e})") from None
    return run_checkpoints(root)


def _report_bad(skipped: list[dict[str, Any]], warned: set[tuple[str, str]], *, strict: bool) -> None:
    """Older incomplete checkpoints: an error with ``strict``, else one warning each (the newest one being
    written is what following a run expects: no warning)."""
    bad = [c for c in skipped if c.get("state") != "in_progress"]
    if strict and bad:
        raise strict_error(bad[0]["path"], bad[0]["reason"], step=bad[0]["step"])
    fresh = [c for c in bad if (c["path"], str(c["problem"])) not in warned]
    warned.update((c["path"], str(c["problem"])) for c in fresh)
    if fresh:
        with warnings.catch_warnings():
            warnings.simplefilter("always")  # a checkpoint that breaks again later is named again
            warn_skipped(fresh)
