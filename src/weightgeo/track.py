"""In-training tracking of the trajectory diagnostics: ``Tracker.update(model.named_parameters(), step)``.

The tracker is framework-free: call :meth:`Tracker.update` from any loop (or the transformers callback in
``weightgeo.integrations.transformers``) and log the flat ``dict[str, float]`` it returns. At the end,
:meth:`Tracker.rank_curve` and :meth:`Tracker.locking_onset` give the same results as the offline
:func:`~weightgeo.trajectory.rank_curve` / :func:`~weightgeo.trajectory.locking_onset` on the
checkpoints the run would have saved.

>>> import torch
>>> lin = torch.nn.Linear(32, 24, bias=False)
>>> with torch.no_grad():
...     _ = lin.weight.copy_(torch.randn(24, 32, generator=torch.Generator().manual_seed(0)))
>>> tr = Tracker(lin, k=2, hill_k=2)
>>> u = torch.randn(24, 2, generator=torch.Generator().manual_seed(1)) @ torch.randn(2, 32, generator=torch.Generator().manual_seed(2))
>>> for step in (1, 2, 3):
...     with torch.no_grad():
...         _ = lin.weight.add_(0.05 * u)
...     logs = tr.update(lin.named_parameters(), step)
>>> round(logs["weightgeo/previous_subspace_similarity/mean"], 4), logs["weightgeo/n_matrices"]
(1.0, 1.0)
>>> tr.locking_onset(threshold=0.9).step
1

What is tracked: every 2-D floating weight that passes ``include``/``exclude``, and each expert of an expert
stack [E, out, in] (its rows carry ``expert``), as :func:`~weightgeo.rank_curve` follows them in checkpoints
(:class:`~weightgeo.selection.Selector`); everything else is listed in :attr:`Tracker.skipped` with the reason.

Modes (memory per tracked [m, n] matrix; K = ``k``, r = max(k, hill_k)):

* ``"exact"``: a copy of W0 in ``dtype`` (each parameter's own by default: 4·m·n bytes for fp32, 2·m·n for bf16,
  on ``base_device``, CPU by default). Each update forms ΔW_t = round(W_t) − W0 exactly, where round() is the
  cast to ``dtype``: by default none, so the tracker sees the update the run's checkpoints show (a trainer saves
  the parameters as they are); ``dtype=torch.bfloat16`` sees what a bf16 checkpoint of fp32 masters would.
* ``"sketch"``: single-pass two-sided sketches of W0 (Tropp, Yurtsever, Udell & Cevher 2017), float64:
  Y0 = W0·Ω ([m, s]) and Z0 = Ψ·W0 ([l, n]) with seeded Gaussian Ω, Ψ regenerated on demand, s = 2r + 1,
  l = 2s + 1: 8·(m·s + l·n) bytes. The update is linear, so Y_t − Y0 = ΔW_t·Ω and Z_t − Z0 = Ψ·ΔW_t.
  From them: Q = orth(ΔW Ω), X = (ΨQ)⁺(ΨΔW) ≈ QᵀΔW; singular values and V_K from X; ‖ΔW‖_F² from ‖X‖_F²
  plus an unbiased estimate of the part of ΔW outside range(Q) from the least-squares residual.
  float64 because the difference of two sketches of nearly equal matrices cancels: in float32 its error
  grows like 6e-8·‖W‖/‖ΔW‖.

Sparsity (exact mode only: it compares with W0's copy): ``weightgeo/update_sparsity`` of every tracked tensor
(the 1-D norms and biases too, whose W0 copies are kept for it) at no other cost, and with ``step_sparsity=True``
``weightgeo/step_sparsity`` and ``weightgeo/patch_bytes``, the previous step held exactly as a patch of W0 (at most
one more bf16 copy; :mod:`weightgeo.track_sparsity`). :meth:`Tracker.sparsity_curve` equals
:func:`~weightgeo.sparsity_curve` on the checkpoints the run writes in the rounding dtype.

Both modes store per tracked step and matrix the top r+1 singular values (float64) and V_K ([K, n] float32):
4·K·n bytes. Distributed training: parameters must be whole matrices when ``update`` is called. DeepSpeed
ZeRO-3 shards (``ds_id``) are accepted only inside ``deepspeed.zero.GatheredParameters``; FSDP flat parameters
are refused (use ``use_orig_params=True`` and call ``update`` inside ``FSDP.summon_full_params(model)`` on
every rank); DTensor parameters (FSDP2) are gathered with ``full_tensor()`` when ``gather=True`` (a
collective: every rank must call ``update``), refused otherwise.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import canonical_name
from .defaults import ETA, HILL_K, SEED, STREAM_K, THRESHOLD, TRACKER_DTYPE
from .errors import WeightgeoError
from .jsonfile import loads
from .means import nanmean
from .metrics.catalog import TRACKER_OUTPUTS, TRACKER_PREFIX
from .metrics.trajectory import (
    UPDATE_BATCH_BYTES,
    LockingOnset,
    Spectrum,
    build_locking,
    matrix_seed,
    subspace_sim,
    update_spectra,
)
from .options import Filter, SparsityOptions, StreamOptions
from .outputs import atomic_output
from .report import Report
from .selection import ByUid, tensor_uid
from .track_sparsity import LiveSparsity
from .trajectory import assemble, spectrum_row, trajectory_summary
from .validation import check_choice, check_finite, check_int, check_next_step

__all__ = ["Tracker"]

_PREFIX = TRACKER_PREFIX
_MODES = {"exact": "a copy of W0 in dtype", "sketch": "random sketches of W0"}
_FORMAT = 3  # 3: sparsity counts; 2: expert stacks per expert; files of format 1 and 2 still load (no sparsity)


@dataclass(frozen=True)
class _Matrix(ByUid):
    """One tracked matrix: a 2-D parameter, or expert ``expert`` of the stack parameter ``name``."""

    key: str
    name: str
    shape: tuple[int, int]
    seed: int
    expert: int | None = None


class Tracker:
    """Follow ΔW_t = W_t − W0 of every tracked matrix during training (paper §4), in memory bounded per matrix.

    Args:
        model: the model at the start of training (W0): an ``nn.Module``, a ``Mapping[str, Tensor]`` or an
            iterable of ``(name, tensor)`` pairs. The 2-D floating parameters and expert stacks (per expert) with
            ``requires_grad`` (for ``nn.Parameter``) that pass ``include``/``exclude`` are tracked; the other
            tensors are listed in :attr:`skipped` with the reason.
        every: track steps that are multiples of ``every``; ``update`` returns ``{}`` on the others.
        k: subspace size K for V_K and Sim_K (default 16, the paper's).
        include, exclude: regexes or presets (``"attention"``, ``"mlp"``, ``"linear"``, ``"experts"``, ...);
            default all 2-D weights and expert stacks.
        mode: ``"exact"`` (a ``dtype`` copy of W0) or ``"sketch"`` (float64 sketches, see the module doc).
        device: where the linear algebra runs; ``None``: where the data is, each parameter's own device.
        hill_k: top singular values in the Hill estimator (default 10).
        dtype: W0 and W_t are rounded to this before subtracting. Default ``None``: each parameter's own dtype,
            the format a trainer's checkpoints hold (``save_pretrained`` writes the parameters as they are), so the
            live numbers equal :func:`~weightgeo.rank_curve` of the run's checkpoints; a loop that saves in another
            format passes it (``torch.bfloat16`` for bf16 checkpoints of fp32 masters).
        seed: seeds every random test matrix (per matrix, stable across processes).
        sketch_rank: s, the sketch's range size (default 2·max(k, hill_k) + 1); l = 2s + 1.
        base_device: where the W0 copy / sketches are kept (default CPU).
        gather: gather DTensor parameters with ``full_tensor()`` (every rank must call ``update``).
        eta: the bf16 rule's tolerance η of the sparsity logs (exact mode: ``weightgeo/update_sparsity``).
        step_sparsity: also log ``weightgeo/step_sparsity`` (entries unchanged since the previous tracked step)
            and ``weightgeo/patch_bytes`` (exact mode; memory: the previous step held as a patch of W0, at most
            one more copy in bf16: :mod:`weightgeo.track_sparsity`).
    """

    def __init__(
        self,
        model: Any,
        *,
        every: int = 1,
        k: int = STREAM_K,
        include: Filter = None,
        exclude: Filter = None,
        mode: str = "exact",
        device: str | torch.device | None = None,
        hill_k: int = HILL_K,
        dtype: torch.dtype | str | None = TRACKER_DTYPE,
        seed: int = SEED,
        sketch_rank: int | None = None,
        base_device: str | torch.device = "cpu",
        gather: bool = False,
        eta: float = ETA,
        step_sparsity: bool = False,
    ) -> None:
        self.mode = check_choice(mode, "mode", _MODES)
        self.options = StreamOptions.create(
            include=include, exclude=exclude, k=k, hill_k=hill_k, dtype=dtype, device=device, seed=seed
        )
        sparse = SparsityOptions.create(include=include, exclude=exclude, eta=eta, device=device)
        if step_sparsity and self.mode != "exact":
            raise WeightgeoError(
                "Tracker(step_sparsity=True) needs mode='exact' (the sparsity counts compare with W0's copy; "
                "sketches keep none)"
            )
        self.every = check_int(every, "every", minimum=1)
        self.gather = bool(gather)
        r = self.options.r
        self.sketch_rank = (
            check_int(sketch_rank, "sketch_rank", minimum=r + 1) if sketch_rank is not None else 2 * r + 1
        )
        self.base_device = torch.device(base_device)
        self.skipped: list[dict[str, Any]] = []
        self.filtered_out = 0
        self.steps: list[int] = []
        self._records: dict[str, dict[int, Spectrum]] = {}
        self._matrices: dict[str, _Matrix] = {}  # by uid: a 2-D parameter's key, or ``key[j]`` for expert j
        self._base: dict[str, torch.Tensor] = {}  # exact: W0 copy; sketch: Y0 and Z0 under uid+"/y", uid+"/z"
        # exact mode: the sparsity counts of every tracked tensor (the matrices' W0 copies are shared)
        self._live = (
            LiveSparsity(sparse, step_sparsity=bool(step_sparsity), base=self._base, base_device=self.base_device)
            if self.mode == "exact"
            else None
        )
        select, elementwise = self.options.selector(), sparse.selector()
        names: dict[str, str] = {}
        for name, p in _named_tensors(model):
            key = canonical_name(name)
            if not isinstance(p, torch.Tensor):
                self.skipped.append({"name": key, "reason": f"not a tensor ({type(p).__name__})"})
                continue
            frozen = isinstance(p, torch.nn.Parameter) and not p.requires_grad
            choice = select.choose(key, _full_shape(p), p.dtype, trainable=not frozen)
            self.filtered_out += choice.filtered
            # a tensor that is not a matrix (a norm, a bias) gets the sparsity counts only
            counted = (
                self._live is not None
                and not frozen
                and choice.analyse is None
                and elementwise.choose(key, _full_shape(p), p.dtype).analyse == "elementwise"
            )
            if choice.analyse is None:
                if choice.skipped is not None:
                    self.skipped.append({"name": key, "reason": choice.skipped})
                if not counted:
                    continue
            if key in names:
                raise WeightgeoError(
                    f"parameters {names[key]!r} and {name!r} both map to {key!r}; "
                    f"pass a model without duplicate wrapper prefixes"
                )
            names[key] = name
            w = self._full(name, p)
            if counted:
                assert self._live is not None
                self._live.add(key, key, tuple(w.shape), self.dtype or w.dtype, self._round(w))
                continue
            experts: list[int | None] = list(range(choice.experts)) if choice.analyse == "experts" else [None]
            for j in experts:
                shape = tuple(w.shape[-2:])
                m = _Matrix(key, name, (shape[0], shape[1]), matrix_seed(self.seed, tensor_uid(key, j)), j)
                self._matrices[m.uid] = m
                self._capture_base(m, w if j is None else w[j])
                if self._live is not None:  # its W0 copy is the one just captured
                    self._live.add(m.uid, key, tuple(w.shape), self.dtype or w.dtype, None)
        if not self._matrices:
            raise WeightgeoError(
                f"Tracker: no parameter to track (include={include!r}, exclude={exclude!r}; "
                f"{self.filtered_out} left out by include/exclude, {len(self.skipped)} skipped: {self.skipped[:3]}); "
                f"track 2-D trainable weights or expert stacks"
            )

    # --- the options -----------------------------------------------------------------------------------------
    @property
    def k(self) -> int:
        return self.options.k

    @property
    def hill_k(self) -> int:
        return self.options.hill_k

    @property
    def seed(self) -> int:
        return self.options.seed

    @property
    def dtype(self) -> torch.dtype | None:
        return self.options.dtype

    @property
    def device(self) -> torch.device | None:
        return self.options.device

    @property
    def include(self) -> Filter:
        return self.options.include

    @property
    def exclude(self) -> Filter:
        return self.options.exclude

    # --- W0 ------------------------------------------------------------------------------------------------
    def _round(self, w: torch.Tensor) -> torch.Tensor:
        return self.options.round(w.detach())

    def _test_matrices(self, m: _Matrix, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        rows, cols = m.shape
        s = min(self.sketch_rank, rows, cols)
        l_ = min(2 * s + 1, rows)
        g = torch.Generator(device=device).manual_seed(m.seed)
        omega = torch.randn(cols, s, generator=g, dtype=torch.float64, device=device)
        psi = torch.randn(l_, rows, generator=g, dtype=torch.float64, device=device)
        return omega, psi

    def _capture_base(self, m: _Matrix, w: torch.Tensor) -> None:
        w = self._round(w)
        if self.mode == "exact":
            self._base[m.uid] = w.to(self.base_device, copy=True)
            return
        dev = self.options.where(w.device)
        omega, psi = self._test_matrices(m, dev)
        w64 = w.to(dev, torch.float64)
        self._base[m.uid + "/y"] = (w64 @ omega).to(self.base_device)
        self._base[m.uid + "/z"] = (psi @ w64).to(self.base_device)

    def _full(self, name: str, p: torch.Tensor) -> torch.Tensor:
        """The whole matrix behind ``p``, or a WeightgeoError saying how to gather it."""
        if hasattr(p, "ds_id"):
            status = getattr(getattr(p, "ds_status", None), "name", None)
            ds_shape = tuple(getattr(p, "ds_shape", ()))
            if status != "AVAILABLE" or tuple(p.shape) != ds_shape:
                raise WeightgeoError(
                    f"parameter {name!r} is a DeepSpeed ZeRO-3 shard (ds_id={p.ds_id}, local shape "
                    f"{tuple(p.shape)}, full {ds_shape}, status {status}); the Tracker needs whole matrices: call "
                    f"update inside `with deepspeed.zero.GatheredParameters(list(model.parameters())):` on every "
                    f"rank, or track a ZeRO-1/2 run"
                )
            return p
        if type(p).__name__ == "FlatParameter" or getattr(p, "_is_flat_param", False) or "_flat_param" in name:
            raise WeightgeoError(
                f"parameter {name!r} is an FSDP flat parameter (shape {tuple(p.shape)}): it is a shard of many "
                f"matrices; wrap with use_orig_params=True and call update inside "
                f"`with FSDP.summon_full_params(model):` on every rank"
            )
        if _is_dtensor(p):
            dt: Any = p  # a torch.distributed.tensor.DTensor
            if not self.gather:
                raise WeightgeoError(
                    f"parameter {name!r} is a DTensor sharded as {getattr(dt, 'placements', '?')} (local shape "
                    f"{tuple(dt.to_local().shape)}, full {tuple(dt.shape)}); pass Tracker(..., gather=True) and "
                    f"call update on every rank (full_tensor() is a collective)"
                )
            return dt.full_tensor()
        return p

    # --- tracking ------------------------------------------------------------------------------------------
    def update(
        self, named_parameters: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor], step: int
    ) -> dict[str, float]:
        """Measure ΔW_t at ``step`` and return a flat ``{"weightgeo/<metric>/<group>": value}`` dict.

        Keys: ``weightgeo/{stable_rank,delta_frobenius,spectral_norm,hill_alpha}/{mean,<module type>}``
        (unweighted means over matrices), ``weightgeo/previous_subspace_similarity/mean`` (Sim_K to the
        previous tracked step) and ``weightgeo/n_matrices`` (matrices with a nonzero update); in exact mode
        ``weightgeo/update_sparsity`` (entries unchanged since W0, weighted by entries over every tracked tensor)
        and ``weightgeo/update_sparsity/<module type>``, with ``step_sparsity=True`` also
        ``weightgeo/step_sparsity`` (and per module type) and ``weightgeo/patch_bytes``; the names are
        :mod:`weightgeo.metrics.catalog`'s. Returns ``{}`` when ``step`` is not a multiple of ``every``; a step
        where no tracked matrix has changed gets no spectra (its sparsity counts are recorded).
        """
        last = max(
            self.steps[-1] if self.steps else -1, self._live.steps[-1] if self._live and self._live.steps else -1
        )
        step = check_next_step(step, last if last >= 0 else None, what="Tracker.update")
        if step % self.every:
            return {}
        current = self._collect(named_parameters)
        logs: dict[str, float] = {}
        if self._live is not None:
            logs = self._live.measure(step, {u: self._round(w) for u, w in current.items() if u in self._live.units})
        current = {u: w for u, w in current.items() if u in self._matrices}
        specs = self._measure_exact(current, step) if self.mode == "exact" else self._measure_sketch(current)
        if not specs:
            return {**logs, f"{_PREFIX}/n_matrices": 0.0}
        prev = self.steps[-1] if self.steps else None
        self.steps.append(step)
        for key, sp in specs.items():
            self._records.setdefault(key, {})[step] = sp
        return {**self._log(specs, step, prev), **logs}

    def _collect(self, named_parameters: Any) -> dict[str, torch.Tensor]:
        """Each tracked matrix's W_t (by uid) from the parameters: a 2-D parameter, or one expert of a stack."""
        stacks: dict[str, list[_Matrix]] = {}
        for m in self._matrices.values():
            stacks.setdefault(m.key, []).append(m)
        counted = {u: t.shape for u, t in (self._live.units.items() if self._live else ()) if u not in self._matrices}
        got: dict[str, torch.Tensor] = {}
        seen: set[str] = set()
        for name, p in _named_tensors(named_parameters):
            key = canonical_name(name)
            ms = stacks.get(key)
            if ms is None:
                if key in counted:  # a tensor tracked for its sparsity counts only
                    w = self._full(name, p)
                    if tuple(w.shape) != counted[key]:
                        raise WeightgeoError(
                            f"parameter {name!r} has shape {tuple(w.shape)} but {counted[key]} at the start; "
                            f"the tracker follows fixed tensors"
                        )
                    got[key] = w.detach()
                    seen.add(key)
                continue
            w = self._full(name, p)
            want = ms[0].shape if ms[0].expert is None else (len(ms), *ms[0].shape)
            if tuple(w.shape) != tuple(want):
                raise WeightgeoError(
                    f"parameter {name!r} has shape {tuple(w.shape)} but {tuple(want)} at the start; "
                    f"the tracker follows fixed matrices"
                )
            w = w.detach()
            for m in ms:
                got[m.uid] = w if m.expert is None else w[m.expert]
            seen.add(key)
        missing = [k for k in [*stacks, *counted] if k not in seen]
        if missing:
            raise WeightgeoError(
                f"Tracker.update: {len(missing)} tracked parameter(s) missing, e.g. "
                f"{[stacks[k][0].name if k in stacks else k for k in missing[:3]]}; pass model.named_parameters() "
                f"of the tracked model"
            )
        return got

    def _measure_exact(self, current: dict[str, torch.Tensor], step: int) -> dict[str, Spectrum]:
        groups: dict[tuple[tuple[int, int], torch.device], list[str]] = {}
        for key, w in current.items():
            groups.setdefault((self._matrices[key].shape, self.options.where(w.device)), []).append(key)
        r = max(self.k, self.hill_k)
        out: dict[str, Spectrum] = {}
        for (shape, dev), keys in groups.items():
            per = max(1, UPDATE_BATCH_BYTES // (4 * shape[0] * shape[1]))
            g = torch.Generator(device=dev).manual_seed(matrix_seed(self.seed + step, f"{shape}"))
            for i in range(0, len(keys), per):
                chunk = keys[i : i + per]
                D = torch.stack(
                    [
                        self._round(current[k]).to(dev, torch.float32) - self._base[k].to(dev, torch.float32)
                        for k in chunk
                    ]
                )
                for j, key in enumerate(chunk):
                    check_finite(D[j], f"Tracker.update(step={step}): {key}: W_t − W0")
                fro = torch.linalg.vector_norm(D, dim=(-2, -1), dtype=torch.float64)
                nz = [j for j in range(len(chunk)) if float(fro[j]) > 0]
                if nz:
                    for j, sp in zip(nz, update_spectra(D[nz], r=r, k=self.k, generator=g, frobenius=fro[nz])):
                        out[chunk[j]] = sp
        return out

    def _measure_sketch(self, current: dict[str, torch.Tensor]) -> dict[str, Spectrum]:
        r = max(self.k, self.hill_k)
        out: dict[str, Spectrum] = {}
        for key, w in current.items():
            m = self._matrices[key]
            dev = self.options.where(w.device)
            omega, psi = self._test_matrices(m, dev)
            w64 = self._round(w).to(dev, torch.float64)
            Y = w64 @ omega - self._base[key + "/y"].to(dev)
            Z = psi @ w64 - self._base[key + "/z"].to(dev)
            del w64
            if not bool(Y.any()) and not bool(Z.any()):
                continue
            out[key] = sketch_spectrum(Y, Z, psi, r=r, k=self.k)
        return out

    def _log(self, specs: dict[str, Spectrum], step: int, prev: int | None) -> dict[str, float]:
        rows = [
            spectrum_row(m.key, m.shape, step, sp, hill_k=self.hill_k, k=self.k, expert=m.expert)
            for m, sp in ((self._matrices[uid], sp) for uid, sp in specs.items())
        ]
        out: dict[str, float] = {}
        for metric in TRACKER_OUTPUTS:
            out[f"{_PREFIX}/{metric}/mean"] = nanmean(r[metric] for r in rows)
        by_module: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            by_module.setdefault(r["module"], []).append(r)
        for mod, rs in sorted(by_module.items()):
            for metric in TRACKER_OUTPUTS:
                out[f"{_PREFIX}/{metric}/{mod}"] = nanmean(r[metric] for r in rs)
        if prev is not None:
            sims = [  # not where K reaches the smaller side: Sim_K says nothing there (docs/metrics.md)
                subspace_sim(Vh, before)
                for key, sp in specs.items()
                if self.k < min(self._matrices[key].shape)
                and prev in self._records.get(key, {})
                and (Vh := sp.Vh) is not None
                and (before := self._records[key][prev].Vh) is not None
            ]
            if sims:
                out[f"{_PREFIX}/previous_subspace_similarity/mean"] = nanmean(sims)
        out[f"{_PREFIX}/n_matrices"] = float(len(rows))
        return out

    # --- results -------------------------------------------------------------------------------------------
    def _need_steps(self) -> None:
        if not self.steps:
            raise WeightgeoError(
                "the Tracker has no tracked step with a nonzero update yet; call update(...) during training first"
            )

    def rank_curve(self) -> Report:
        """The same :class:`~weightgeo.report.Report` as :func:`~weightgeo.trajectory.rank_curve`."""
        self._need_steps()
        rows, sims, zero = assemble(*self._assembly(), hill_k=self.hill_k, k=self.k, experts=self._experts())
        meta = {
            "kind": "rank_curve",
            "source": "Tracker",
            "mode": self.mode,
            "steps": list(self.steps),
            "params": {
                **self.options.params(),
                "every": self.every,
                "sketch_rank": self.sketch_rank if self.mode == "sketch" else None,
            },
            "seed": self.seed,
            "include": self.include,
            "exclude": self.exclude,
            "skipped": list(self.skipped),
            "filtered_out": self.filtered_out,
            "zero_updates": zero,
            "similarity": sims,
            "unmatched": {},
        }
        return Report(rows=rows, summary=trajectory_summary(rows, self.steps, sims, k=self.k), meta=meta)

    def sparsity_curve(self) -> Report:
        """The same :class:`~weightgeo.report.Report` as :func:`~weightgeo.sparsity_curve` on the checkpoints the
        run writes at the tracked steps, when they store the tensors in the rounding ``dtype`` (exact mode; rows
        carry ``step_sparsity`` and ``patch_bytes`` when the Tracker was built with ``step_sparsity=True``)."""
        if self._live is None:
            raise WeightgeoError(
                "Tracker.sparsity_curve needs mode='exact' (the counts compare with W0's copy; sketches keep none)"
            )
        if not self._live.steps:
            raise WeightgeoError("the Tracker has no tracked step yet; call update(...) during training first")
        return self._live.report(
            {
                "source": "Tracker",
                "mode": self.mode,
                "steps": list(self._live.steps),
                "params": {**self._live.options.params(), "dtype": self.options.params()["dtype"], "every": self.every},
                "skipped": [s for s in self.skipped if s["name"] not in {u.key for u in self._live.units.values()}],
                "filtered_out": self.filtered_out,
                "not_measured": [],
            }
        )

    def locking_onset(self, threshold: float = THRESHOLD) -> LockingOnset:
        """The :class:`~weightgeo.metrics.trajectory.LockingOnset` with t_end = the last tracked step."""
        self._need_steps()
        _, sims, _ = assemble(*self._assembly(), hill_k=self.hill_k, k=self.k, experts=self._experts())
        return build_locking(
            sims, k=self.k, threshold=threshold, meta={"kind": "locking_onset", "source": "Tracker", "mode": self.mode}
        )

    def _assembly(self) -> tuple[dict[str, tuple[tuple[int, int], dict[int, Spectrum]]], list[int]]:
        return {u: (m.shape, self._records.get(u, {})) for u, m in self._matrices.items()}, self.steps

    def _experts(self) -> dict[str, tuple[str, int]]:
        return {u: (m.key, m.expert) for u, m in self._matrices.items() if m.expert is not None}

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held: ``base`` (W0 copy or sketches), ``history`` (per-step spectra and V_K) and ``previous`` (the
        previous tracked step held for ``step_sparsity``)."""
        base = sum(t.numel() * t.element_size() for t in self._base.values())
        hist = sum(
            sp.S.numel() * sp.S.element_size() + (0 if sp.Vh is None else sp.Vh.numel() * sp.Vh.element_size())
            for per in self._records.values()
            for sp in per.values()
        )
        return {"base": base, "history": hist, "previous": self._live.memory_bytes() if self._live else 0}

    @property
    def names(self) -> list[str]:
        """The tracked matrices: canonical names (``name[j]`` for expert j of a stack)."""
        return list(self._matrices)

    # --- persistence ---------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the tracker (config, W0 copy or sketches, history) to one ``.safetensors`` file, atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors: dict[str, torch.Tensor] = {f"base/{k}": t.detach().cpu().contiguous() for k, t in self._base.items()}
        hist: dict[str, dict[str, Any]] = {}
        for key, per in self._records.items():
            for step, sp in per.items():
                tensors[f"S/{step}/{key}"] = sp.S.contiguous()
                if sp.Vh is not None:
                    tensors[f"V/{step}/{key}"] = sp.Vh.contiguous()
                hist.setdefault(key, {})[str(step)] = {"frobenius": sp.frobenius, "method": sp.method}
        state = {
            "format": _FORMAT,
            "mode": self.mode,
            "every": self.every,
            "k": self.k,
            "hill_k": self.hill_k,
            "dtype": None if self.dtype is None else str(self.dtype).replace("torch.", ""),
            "seed": self.seed,
            "sketch_rank": self.sketch_rank,
            "include": self.include,
            "exclude": self.exclude,
            "gather": self.gather,
            "steps": self.steps,
            "skipped": self.skipped,
            "filtered_out": self.filtered_out,
            "history": hist,
            "matrices": [[m.key, m.name, list(m.shape), m.seed, m.expert] for m in self._matrices.values()],
        }
        if self._live is not None:
            state["sparsity"], held = self._live.state()
            tensors.update(held)
        with atomic_output(path, what="tracker state") as tmp:
            save_file(tensors, str(tmp), metadata={"weightgeo_tracker": json.dumps(state)})
        return path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        device: str | torch.device | None = None,
        base_device: str | torch.device = "cpu",
    ) -> Tracker:
        """Read a tracker written by :meth:`save`; it can go on tracking (same W0, same test matrices)."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if "weightgeo_tracker" not in meta:
                    raise WeightgeoError(
                        f"{path}: not a weightgeo Tracker file (no 'weightgeo_tracker' metadata); "
                        f"write one with Tracker.save"
                    )
                state = loads(meta["weightgeo_tracker"], source=str(path), what="Tracker state")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except WeightgeoError:
            raise
        except Exception as e:  # OSError, JSON errors, safetensors' own SafetensorError
            raise WeightgeoError(
                f"{path}: cannot read a Tracker file ({type(e).__name__}: {e}); write one with Tracker.save"
            ) from e
        if state.get("format") not in (1, 2, _FORMAT):
            raise WeightgeoError(f"{path}: Tracker file format {state.get('format')} is not {_FORMAT} (or 1, 2)")
        self = cls.__new__(cls)
        self.mode, self.every = state["mode"], state["every"]
        self.options = StreamOptions.create(
            include=state["include"],
            exclude=state["exclude"],
            k=state["k"],
            hill_k=state["hill_k"],
            dtype=state["dtype"],
            device=device,
            seed=state["seed"],
        )
        self.sketch_rank, self.gather = state["sketch_rank"], state["gather"]
        self.base_device = torch.device(base_device)
        self.skipped = list(state["skipped"])
        self.filtered_out = int(state.get("filtered_out", 0))
        self.steps = [int(s) for s in state["steps"]]
        matrices = [
            _Matrix(m[0], m[1], (m[2][0], m[2][1]), m[3], m[4] if len(m) > 4 else None) for m in state["matrices"]
        ]
        self._matrices = {m.uid: m for m in matrices}
        self._base = {k[len("base/") :]: t.to(self.base_device) for k, t in tensors.items() if k.startswith("base/")}
        self._live = None  # files before format 3 hold no sparsity state (and no W0 of the tensors it needs)
        if "sparsity" in state:
            sp = state["sparsity"]
            self._live = LiveSparsity(
                SparsityOptions.create(
                    include=state["include"], exclude=state["exclude"], eta=sp["eta"], device=device
                ),
                step_sparsity=bool(sp["step_sparsity"]),
                base=self._base,
                base_device=self.base_device,
            )
            self._live.load_state(sp, tensors)
        self._records = {}
        for key, per in state["history"].items():
            for step, h in per.items():
                self._records.setdefault(key, {})[int(step)] = Spectrum(
                    float(h["frobenius"]), tensors[f"S/{step}/{key}"], tensors.get(f"V/{step}/{key}"), h["method"]
                )
        return self

    def __repr__(self) -> str:
        return (
            f"Tracker(mode={self.mode!r}, matrices={len(self._matrices)}, k={self.k}, every={self.every}, "
            f"steps={len(self.steps)})"
        )


def sketch_spectrum(Y: torch.Tensor, Z: torch.Tensor, psi: torch.Tensor, *, r: int, k: int) -> Spectrum:
    """Estimate ΔW's top spectrum, V_K and ‖ΔW‖_F from Y = ΔW·Ω ([m, s]), Z = Ψ·ΔW ([l, n]) and Ψ (float64).

    Tropp et al. 2017, two-sided sketch: Q = orth(Y), X = (ΨQ)⁺Z ≈ QᵀΔW. With Gaussian Ψ independent of Q,
    the least-squares residual E = Z − ΨQ·X has E‖E‖² = (l − s)·‖(I − QQᵀ)ΔW‖_F² and X carries noise of
    expected energy s/(l − s − 1) of that tail, so ‖ΔW‖_F² ≈ ‖X‖² + t·(1 − s/(l − s − 1)), t = ‖E‖²/(l − s).
    """
    Q, _ = torch.linalg.qr(Y)
    s = Q.shape[1]
    l_ = psi.shape[0]
    PQ = psi @ Q
    Qp, Rp = torch.linalg.qr(PQ)
    X = torch.linalg.solve_triangular(Rp, Qp.mT @ Z, upper=True)
    E = Z - PQ @ X
    x2 = float((X * X).sum())
    if l_ > s + 1:
        tail = float((E * E).sum()) / (l_ - s)
        fro2 = max(x2 + tail * (1.0 - s / (l_ - s - 1)), 0.0)
    else:
        fro2 = x2
    _, S, Vh = torch.linalg.svd(X, full_matrices=False)
    want = min(r + 1, S.shape[0])
    return Spectrum(math.sqrt(fro2), S[:want].double().cpu(), Vh[:k].float().cpu(), "sketch")


def _named_tensors(obj: Any) -> Iterable[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.nn.Module):
        return obj.named_parameters()
    if isinstance(obj, Mapping):
        return obj.items()
    return obj


def _full_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The whole parameter's shape (a DeepSpeed ZeRO-3 shard says it in ``ds_shape``)."""
    ds = getattr(p, "ds_shape", None)
    return tuple(ds) if ds is not None else tuple(p.shape)


def _is_dtensor(p: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(p, DTensor)
