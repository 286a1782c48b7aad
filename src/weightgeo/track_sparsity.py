"""The Tracker's sparsity logs: how many weights changed since W0 and since the previous tracked step, live.

In exact mode the :class:`~weightgeo.track.Tracker` keeps W0 of every tracked tensor in its rounding dtype; the
update sparsity of a step compares the rounded W_t with that copy (the bf16 rule), so it costs no memory beyond
it (the copy of the tensors that are not matrices, norms and biases, is the only addition: a few kB per layer).

``step_sparsity=True`` also compares W_t with the previous tracked step, which needs that step's values. A hash or
a bitmask of what changed is not enough: whether an entry changed in the next step depends on its previous
*value* (the rule compares values; an entry may move and come back). So the Tracker holds the previous step
exactly, as a patch of W0 (:class:`~weightgeo.metrics.stepwise.HeldVersion`): a bitmask of the entries whose
bf16 bits differ from W0's and their bf16 values, n/8 + 2·c bytes for c such entries, or the bf16 values whole
(2·n bytes) when that is smaller. That is at most one more bf16 copy of the tracked tensors, and much less
while the update is sparse (an RL run that moved 20 % of the entries: 0.525 bytes per entry instead of 2).

>>> import torch
>>> from weightgeo.options import SparsityOptions
>>> live = LiveSparsity(SparsityOptions(), step_sparsity=True, base={}, base_device=torch.device("cpu"))
>>> live.add("norm.weight", "norm.weight", (4,), torch.bfloat16, torch.zeros(4, dtype=torch.bfloat16))
>>> live.measure(1, {"norm.weight": torch.tensor([0.0, 1.0, 0.0, 0.0])})["weightgeo/step_sparsity"]
0.75
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .metrics.catalog import TRACKER_PREFIX
from .metrics.stepwise import HeldVersion, changed_count, checked_bf16, hold, restore
from .options import SparsityOptions
from .report import Report, summarize_rows
from .selection import ByUid
from .stream_sparsity import PATCH_ENCODING, Changed, Instance, StepCounts, TensorPlan, sparsity_row, sparsity_summary

__all__ = ["LiveSparsity", "Unit"]

_STEP_KEYS = ("step_sparsity", "step_unchanged", "patch_bytes")


@dataclass(frozen=True)
class Unit(ByUid):
    """One tensor the Tracker counts: a parameter, or expert ``expert`` of a stack; ``shape`` is the parameter's
    whole shape, ``dtype`` what W_t is rounded to (the dtype its checkpoints store)."""

    key: str
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    expert: int | None = None

    def plan(self, steps: int) -> TensorPlan:
        inst = Instance(self.name, self.shape, self.dtype)
        return TensorPlan(self.key, inst, (inst,) * steps, self.expert)


class LiveSparsity:
    """The sparsity counts of a Tracker, step by step.

    Args:
        options: the filter (already applied by the Tracker), ``eta`` and ``device`` (``dtype`` None: the units'
            own ``dtype`` is what their checkpoints store).
        step_sparsity: also count against the previous tracked step (holds it: module docstring).
        base: the Tracker's W0 copies by uid (shared: the copies of matrices are the ones its spectra use).
        base_device: where held versions are kept (the Tracker's ``base_device``).
    """

    def __init__(
        self,
        options: SparsityOptions,
        *,
        step_sparsity: bool,
        base: dict[str, torch.Tensor],
        base_device: torch.device,
    ) -> None:
        self.options, self.step_sparsity, self.base, self.base_device = options, step_sparsity, base, base_device
        self.units: dict[str, Unit] = {}
        self.steps: list[int] = []
        self.counts: dict[int, dict[str, tuple[int, int | None]]] = {}
        self.held: dict[str, HeldVersion] = {}

    def add(self, uid: str, key: str, shape: tuple[int, ...], dtype: torch.dtype, w0: torch.Tensor | None) -> None:
        """Follow ``uid`` (``key[j]`` for expert j); ``w0``: its W0 copy when the Tracker keeps none yet."""
        expert = None if uid == key else int(uid[len(key) + 1 : -1])
        self.units[uid] = Unit(key, key, tuple(shape), dtype, expert)
        if w0 is not None:
            self.base[uid] = w0.to(self.base_device, copy=True)

    def measure(self, step: int, current: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Count step ``step`` (``current``: each unit's W_t, rounded) and return its log entries."""
        counts: dict[str, tuple[int, int | None]] = {}
        for uid, w in current.items():
            dev = self.options.where(w.device)
            what = f"Tracker.update(step={step}): {uid}"
            b0 = checked_bf16(self.base[uid].to(dev), f"{what} at W0")
            bt = checked_bf16(w.detach().to(dev), f"{what} at W_t")
            up = changed_count(b0, bt, self.options.eta)
            st = None
            if self.step_sparsity:
                prev = restore(b0, self.held[uid]) if uid in self.held else b0  # the first step: against W0
                st = changed_count(prev, bt, self.options.eta)
                self.held[uid] = hold(b0, bt, device=self.base_device)
            counts[uid] = (up, st)
        self.steps.append(int(step))
        self.counts[int(step)] = counts
        by = summarize_rows(self._rows(step))
        out = {f"{TRACKER_PREFIX}/update_sparsity": by["update_sparsity"]}
        if self.step_sparsity:
            out[f"{TRACKER_PREFIX}/step_sparsity"] = by["step_sparsity"]
            out[f"{TRACKER_PREFIX}/patch_bytes"] = float(by["patch_bytes"])
        for mod, m in by.get("by_module", {}).items():
            out[f"{TRACKER_PREFIX}/update_sparsity/{mod}"] = m["update_sparsity"]
            if self.step_sparsity:
                out[f"{TRACKER_PREFIX}/step_sparsity/{mod}"] = m["step_sparsity"]
        return out

    def _rows(self, step: int) -> list[dict[str, Any]]:
        at = self.steps.index(step)
        rows = []
        for uid, (up, st) in self.counts[step].items():
            u = self.units[uid]
            plan = u.plan(len(self.steps))
            inst = plan.instances[at]
            assert inst is not None
            rec = StepCounts(step, inst, math.prod(plan.shape), Changed(up), None if st is None else Changed(st))
            row = sparsity_row(plan, rec, self.options)
            if st is None:
                for k in _STEP_KEYS:
                    del row[k]
            rows.append(row)
        rows.sort(key=lambda r: (r["name"], r.get("expert", -1)))
        return rows

    def report(self, meta: Mapping[str, Any]) -> Report:
        """The same :class:`~weightgeo.report.Report` as :func:`~weightgeo.sparsity_curve` on the checkpoints the run
        wrote at the tracked steps (in the dtype the units are rounded to)."""
        rows = [r for s in self.steps for r in self._rows(s)]
        return Report(
            rows=rows,
            summary=sparsity_summary(rows, self.steps),
            meta={"kind": "sparsity_curve", "patch_encoding": PATCH_ENCODING, **meta},
        )

    def memory_bytes(self) -> int:
        """Bytes of the held previous versions (the W0 copies are the Tracker's)."""
        return sum(h.nbytes for h in self.held.values())

    # --- persistence (Tracker.save / load) ------------------------------------------------------------------
    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """JSON-able state and tensors (the held versions) for :meth:`Tracker.save <weightgeo.track.Tracker.save>`."""
        tensors: dict[str, torch.Tensor] = {}
        for uid, h in self.held.items():
            tensors[f"held/values/{uid}"] = h.values.contiguous().cpu()
            if h.mask is not None:
                tensors[f"held/mask/{uid}"] = h.mask.contiguous().cpu()
        state = {
            "eta": self.options.eta,
            "step_sparsity": self.step_sparsity,
            "units": [
                [u.key, list(u.shape), str(u.dtype).removeprefix("torch."), uid] for uid, u in self.units.items()
            ],
            "steps": self.steps,
            "counts": {str(s): {uid: list(c) for uid, c in per.items()} for s, per in self.counts.items()},
            "held_shapes": {uid: list(h.shape) for uid, h in self.held.items()},
        }
        return state, tensors

    def load_state(self, state: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
        for key, shape, dtype, uid in state["units"]:
            u = Unit(key, key, tuple(shape), getattr(torch, dtype), None if uid == key else int(uid[len(key) + 1 : -1]))
            self.units[uid] = u
        self.steps = [int(s) for s in state["steps"]]
        self.counts = {
            int(s): {uid: (int(c[0]), None if c[1] is None else int(c[1])) for uid, c in per.items()}
            for s, per in state["counts"].items()
        }
        for uid, shape in state["held_shapes"].items():
            mask = tensors.get(f"held/mask/{uid}")
            self.held[uid] = HeldVersion(
                tensors[f"held/values/{uid}"].to(self.base_device),
                None if mask is None else mask.to(self.base_device),
                tuple(shape),
            )
