"""Trajectory diagnostics: stable rank, Hill index and top-K subspace locking of cumulative updates (paper §4).

For a stream of checkpoints W_t with base W0, the cumulative update is ΔW_t = W_t − W0 ([out, in]). Per matrix
and checkpoint we report ‖ΔW_t‖_F, ‖ΔW_t‖₂, the stable rank ‖ΔW_t‖_F²/‖ΔW_t‖₂², the Hill tail index over
the top ``hill_k`` singular values, and Sim_K(t, t_end) = ‖V_K(t)ᵀV_K(t_end)‖_F²/K, the similarity of the
top-K right (input-side) singular subspace to the final one (paper-notes §2, Figs. 4–5).

>>> import torch
>>> g = torch.Generator().manual_seed(0)
>>> a = torch.randn(32, 4, generator=g) @ torch.randn(4, 48, generator=g)
>>> round(subspace_similarity(a, 3.0 * a, k=4), 6)
1.0

Numerics (our choices): top-K subspaces and spectral norms come from the batched randomized SVD
(``linalg/rsvd.py``; update spectra decay fast), verified a posteriori: every returned triplet must satisfy
‖ΔW v_i − σ_i u_i‖ ≤ 1e-3·max(σ_i, 1e-4·σ₁) (the other side holds exactly for a Rayleigh–Ritz pair). Triplets that fail are
recomputed with 8 power iterations, then by the exact float64 policy (``linalg/svd.py``); matrices with
min(m, n) ≤ 256 go to the exact policy directly. ‖ΔW_t‖_F is always exact (float64 accumulation).
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..checkpoint import layer_index, module_type
from ..errors import WeightgeoError
from ..linalg.rsvd import randomized_svd
from ..linalg.spectra import hill_tail_index
from ..linalg.svd import decompose
from ..report import Report, summarize_rows

__all__ = ["rank_curve", "locking_onset", "subspace_similarity", "LockingOnset", "onset_step"]

#: min(m, n) at or below which the exact policy is used directly (randomized has no edge there).
EXACT_MAX_DIM = 256
#: residual a randomized triplet must meet: ‖ΔW v_i − σ_i u_i‖ ≤ RTOL·σ₁. This bounds every Ritz value's error
#: by RTOL·σ₁ (so σ₁, ‖ΔW‖₂ and the stable rank to RTOL) and the top-K subspace's angles by RTOL·σ₁/gap. A
#: per-value bound (RTOL·σ_i) is unreachable on the flat bf16-noise tails of real updates and sent most matrices
#: to the exact path without buying accuracy where the subspace is defined.
RTOL = 1e-3
_N_ITER = (2, 8)  # power iterations of the first and the retry pass
# Updates are formed and decomposed in batches of at most this many bytes (float32).
_BATCH_BYTES = 1 << 28


# --------------------------------------------------------------------------------------------------------------
# per-matrix spectra: the one kernel shared by rank_curve, locking_onset and the Tracker
@dataclass(frozen=True)
class Spectrum:
    """What the trajectory metrics keep of one ΔW_t: enough for every figure, K×in floats at most.

    ``S`` holds the top singular values (float64, descending, ``r + 1`` of them when the matrix allows, the
    extra one for the gap ratio); ``Vh`` the top-K right singular vectors ([K, in], float32) or ``None``;
    ``method`` is ``"exact"``, ``"randomized"`` or ``"sketch"``.
    """

    frobenius: float
    S: torch.Tensor
    Vh: torch.Tensor | None
    method: str


def matrix_seed(seed: int, key: str) -> int:
    """A per-matrix seed, stable across runs and processes (not Python's salted ``hash``)."""
    return (int(seed) * 1_000_003 + zlib.crc32(key.encode())) % (2**62)


def update_spectra(D: torch.Tensor, *, r: int, k: int, generator: torch.Generator | None = None,
                   frobenius: torch.Tensor | None = None) -> list[Spectrum]:
    """Top-``r`` singular values (+1 for the gap) and top-``k`` right vectors of each nonzero ΔW in ``D``.

    Args:
        D: [B, m, n] float32/float64 updates, all nonzero.
        r: number of singular values needed (``max(k, hill_k)``).
        k: number of right singular vectors to keep (0 for none).
        generator: for the randomized passes (on ``D``'s device).
        frobenius: [B] ‖ΔW‖_F if already computed.

    Returns:
        one :class:`Spectrum` per matrix.
    """
    B, m, n = D.shape
    mn = min(m, n)
    want = min(max(r, k) + 1, mn)
    fro = (torch.linalg.vector_norm(D, dim=(-2, -1), dtype=torch.float64) if frobenius is None
           else frobenius.to(torch.float64)).cpu()
    S_out = torch.zeros(B, want, dtype=torch.float64)
    V_out = torch.zeros(B, min(k, mn), n, dtype=torch.float32) if k else None
    method = ["exact"] * B
    todo = list(range(B))
    if mn > EXACT_MAX_DIM:
        for n_iter in _N_ITER:
            if not todo:
                break
            sub = D[todo]
            U, S, Vh = randomized_svd(sub, want, n_iter=n_iter, generator=generator)
            need = min(max(r, k), want)
            R = sub @ Vh[..., :need, :].mT - U[..., :need] * S[..., None, :need]
            rho = torch.linalg.vector_norm(R, dim=-2)
            ok = (rho <= RTOL * S[..., :1]).all(-1) & (S[..., :1] > 0).all(-1)
            keep = []
            for j, i in enumerate(todo):
                if bool(ok[j]):
                    S_out[i] = S[j].double().cpu()
                    if V_out is not None:
                        V_out[i] = Vh[j, : V_out.shape[1]].float().cpu()
                    method[i] = "randomized"
                else:
                    keep.append(i)
            todo = keep
    if todo:
        sub = D[todo]
        dec = decompose(sub, vectors=V_out is not None)
        S_out[todo] = dec.S[..., :want].cpu()
        if V_out is not None:
            V = dec.vectors_for(sub, V_out.shape[1], "right")  # [b, n, k] float64
            V_out[todo] = V.mT.float().cpu()
    return [Spectrum(float(fro[i]), S_out[i], None if V_out is None else V_out[i], method[i]) for i in range(B)]


def _sim(Va: torch.Tensor, Vb: torch.Tensor) -> float:
    """‖Va Vbᵀ‖_F² / K for [K, n] orthonormal rows: the mean cos² of the principal angles, in [0, 1]."""
    K = min(Va.shape[0], Vb.shape[0])
    M = Va[:K].double() @ Vb[:K].double().mT
    return float(min(1.0, max(0.0, float((M * M).sum()) / K)))


def subspace_similarity(delta_a: Any, delta_b: Any, *, k: int = 16, side: str = "right", seed: int = 0) -> float:
    """Sim_K = ‖V_K(a)ᵀ V_K(b)‖_F² / K between the top-``k`` singular subspaces of two updates (paper §4).

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> a = torch.randn(64, 8, generator=g) @ torch.randn(8, 80, generator=g)
    >>> b = torch.randn(64, 80, generator=g)
    >>> round(subspace_similarity(a, a + 1e-3 * b, k=8), 4), subspace_similarity(a, b, k=8) < 0.5
    (1.0, True)

    Args:
        delta_a, delta_b: [out, in] updates (torch tensors or NumPy arrays, any float dtype).
        k: subspace size K (default 16, as the paper); at most min(out, in).
        side: ``"right"`` (V, input side, the paper's) or ``"left"`` (U, output side).
        seed: seeds the randomized SVD used for large matrices (results are verified, see the module doc).

    Returns:
        float in [0, 1] (the mean cos² of the K principal angles); 1 = same subspace, K/in for random ones.
        Meaningful only when σ_K > σ_{K+1} for both (else V_K is not unique).
    """
    a, b = _as_matrix(delta_a, "delta_a"), _as_matrix(delta_b, "delta_b")
    if side not in ("right", "left"):
        raise WeightgeoError(f"side must be 'right' (V, input side) or 'left' (U, output side), got {side!r}")
    if side == "left":
        a, b = a.mT, b.mT
    if a.shape[1] != b.shape[1]:
        raise WeightgeoError(f"subspace_similarity(side={side!r}): the {side} sides differ: shapes "
                             f"{tuple(delta_a.shape)} and {tuple(delta_b.shape)}; compare updates of one matrix")
    k = int(k)
    if k < 1 or k > min(*a.shape, *b.shape):
        raise WeightgeoError(f"k={k} must be in [1, {min(*a.shape, *b.shape)}] for shapes {tuple(delta_a.shape)} and "
                             f"{tuple(delta_b.shape)}")
    vs = []
    for x, what in ((a, "delta_a"), (b, "delta_b")):
        if not bool(x.any()):
            raise WeightgeoError(f"subspace_similarity: {what} is all zeros: it has no top-{k} subspace")
        g = torch.Generator(device=x.device).manual_seed(int(seed))
        vs.append(update_spectra(x[None], r=k, k=k, generator=g)[0].Vh)
    return _sim(vs[0], vs[1])


def _as_matrix(x: Any, what: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise WeightgeoError(f"{what} must be a torch tensor or NumPy array, got {type(x).__name__}")
    if x.ndim != 2 or not x.dtype.is_floating_point:
        raise WeightgeoError(f"{what} must be a 2-D floating [out, in] matrix, got shape {tuple(x.shape)} {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise WeightgeoError(f"{what} has non-finite values (NaN/Inf)")
    return x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)


# --------------------------------------------------------------------------------------------------------------
# locking onset
def onset_step(similarity: Mapping[int, float], threshold: float = 0.9) -> int | None:
    """The locking onset of one similarity curve ``{step: Sim_K(step, t_end)}`` (our definition).

    With checkpoints t_1 < … < t_n (t_n = t_end), the onset is the smallest t_i, i < n, such that
    Sim_K(t_j, t_end) ≥ ``threshold`` for every j with i ≤ j < n. t_end itself never counts (its
    similarity is 1 by construction) unless it is the only checkpoint, when the onset is t_end (vacuous).
    ``None`` when Sim_K(t_{n−1}, t_end) < threshold (or is NaN): the subspace never locks before the end.

    >>> onset_step({64: 0.5, 128: 0.95, 192: 0.93, 256: 1.0})
    128
    >>> onset_step({64: 0.95, 128: 0.5, 192: 1.0}) is None
    True
    """
    steps = sorted(similarity)
    if not steps:
        return None
    if len(steps) == 1:
        return steps[0]
    found = None
    for t in reversed(steps[:-1]):
        v = similarity[t]
        if not (v >= threshold):  # NaN fails too
            break
        found = t
    return found


@dataclass(frozen=True)
class LockingOnset:
    """When each matrix's top-K input subspace locks onto its final one (paper §4, Fig. 5; definition ours).

    Attributes:
        step: model-level onset: :func:`onset_step` on ``mean_similarity``.
        per_matrix: name -> onset step or ``None``.
        similarity: name -> {step: Sim_K(step, t_end)} (NaN where ΔW is zero at that step or at t_end).
        mean_similarity: {step: unweighted mean over matrices of Sim_K(step, t_end)} (NaN-free entries).
        k, threshold, final_step: the parameters and t_end.
    """

    step: int | None
    per_matrix: dict[str, int | None]
    similarity: dict[str, dict[int, float]]
    mean_similarity: dict[int, float]
    k: int
    threshold: float
    final_step: int
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def locked_fraction(self) -> float:
        """Fraction of matrices whose subspace locks before t_end (per_matrix not ``None``)."""
        v = list(self.per_matrix.values())
        return sum(x is not None for x in v) / len(v) if v else math.nan

    def to_pandas(self):  # -> pandas.DataFrame
        """Long table: one row per (name, step) with ``similarity`` and the matrix's ``onset``."""
        try:
            import pandas as pd
        except ImportError as e:
            raise ImportError("LockingOnset.to_pandas needs pandas: pip install 'weightgeo[pandas]'") from e
        return pd.DataFrame([{"name": n, "step": s, "similarity": v, "onset": self.per_matrix.get(n)}
                             for n, curve in self.similarity.items() for s, v in curve.items()])

    def __repr__(self) -> str:
        return (f"LockingOnset(step={self.step}, k={self.k}, threshold={self.threshold}, final_step="
                f"{self.final_step}, matrices={len(self.per_matrix)}, locked_fraction={self.locked_fraction:.3f})")


def _check_threshold(threshold: float) -> float:
    t = float(threshold)
    if not 0.0 < t <= 1.0:
        raise WeightgeoError(f"threshold={threshold!r} must be in (0, 1]: Sim_K lies in [0, 1]")
    return t


def build_locking(similarity: dict[str, dict[int, float]], *, k: int, threshold: float,
                  meta: dict[str, Any] | None = None) -> LockingOnset:
    """The :class:`LockingOnset` of per-matrix similarity curves (shared by streams, reports and the Tracker)."""
    threshold = _check_threshold(threshold)
    steps = sorted({s for c in similarity.values() for s in c})
    if not steps:
        raise WeightgeoError("no checkpoint with a nonzero update: nothing to lock onto")
    mean = {}
    for s in steps:
        vals = [c[s] for c in similarity.values() if s in c and not math.isnan(c[s])]
        mean[s] = math.fsum(vals) / len(vals) if vals else math.nan
    per = {n: onset_step(c, threshold) if c and not all(math.isnan(v) for v in c.values()) else None
           for n, c in similarity.items()}
    return LockingOnset(onset_step(mean, threshold), per, similarity, mean, int(k), threshold, steps[-1],
                        dict(meta or {}))


# --------------------------------------------------------------------------------------------------------------
# rows: one per (step, matrix), from Spectrum records
def spectrum_row(key: str, shape: tuple[int, int], step: int, sp: Spectrum, *, hill_k: int, k: int
                 ) -> dict[str, Any]:
    """The report row of one (step, matrix) from its :class:`Spectrum`."""
    S = sp.S
    s1 = float(S[0])
    fro = sp.frobenius
    kh = min(hill_k, S.shape[0])
    row: dict[str, Any] = {
        "step": int(step), "name": key, "shape": tuple(shape), "numel": shape[0] * shape[1],
        "module": module_type(key), "layer": layer_index(key),
        "frobenius_norm": fro, "spectral_norm": s1,
        "stable_rank": fro * fro / (s1 * s1) if s1 > 0 else math.nan,
        "hill_alpha": float(hill_tail_index(S, kh)) if kh >= 2 else math.nan,
    }
    kk = min(k, min(shape))
    if S.shape[0] > kk and float(S[kk - 1]) > 0:
        row["gap_ratio"] = float(S[kk]) / float(S[kk - 1])
    row["method"] = sp.method
    return row


def assemble(records: Mapping[str, tuple[tuple[int, int], Mapping[int, Spectrum]]], steps: Sequence[int], *,
             hill_k: int, k: int) -> tuple[list[dict[str, Any]], dict[str, dict[int, float]], list[dict[str, Any]]]:
    """Rows (sorted by step, name), similarity curves to the final step, and zero-update skips."""
    rows: list[dict[str, Any]] = []
    sims: dict[str, dict[int, float]] = {}
    skipped: list[dict[str, Any]] = []
    t_end = steps[-1]
    for key, (shape, per_step) in records.items():
        final = per_step.get(t_end)
        curve: dict[int, float] = {}
        for s in steps:
            sp = per_step.get(s)
            if sp is None:
                skipped.append({"name": key, "step": int(s), "reason": "ΔW is exactly zero at this step"})
                curve[s] = math.nan
                continue
            row = spectrum_row(key, shape, s, sp, hill_k=hill_k, k=k)
            if final is not None and final.Vh is not None and sp.Vh is not None:
                curve[s] = _sim(sp.Vh, final.Vh)
                row["final_subspace_similarity"] = curve[s]
            else:
                curve[s] = math.nan
            rows.append(row)
        sims[key] = curve
    rows.sort(key=lambda r: (r["step"], r["name"]))
    return rows, sims, skipped


def trajectory_summary(rows: list[dict[str, Any]], steps: Sequence[int], sims: dict[str, dict[int, float]],
                       *, k: int) -> dict[str, Any]:
    """``steps``, ``by_step`` ({step: unweighted means over matrices, with ``by_module``}) and the curves."""
    by_step: dict[int, Any] = {}
    for s in steps:
        rs = [r for r in rows if r["step"] == s]
        by_step[int(s)] = summarize_rows(rs) if rs else {"n_tensors": 0}
    curve = {m: [by_step[int(s)].get(m, math.nan) for s in steps]
             for m in ("stable_rank", "frobenius_norm", "spectral_norm", "hill_alpha", "final_subspace_similarity")}
    return {"steps": [int(s) for s in steps], "final_step": int(steps[-1]), "k": int(k), "by_step": by_step,
            "curves": curve}


# --------------------------------------------------------------------------------------------------------------
# stream-level verbs
def _stream_pass(stream: Any, *, base: Any, steps: Any, include: Any, exclude: Any, r: int, k: int,
                 device: Any, seed: int, progress: bool):
    from ..devices import resolve_device
    from ..distributed import balanced_shards, current_world
    from ..stream import StreamReader, open_stream

    s = open_stream(stream, base=base, steps=steps)
    dev = resolve_device(device)
    t0 = time.perf_counter()
    records: dict[str, tuple[tuple[int, int], dict[int, Spectrum]]] = {}
    with StreamReader.open(s, include=include, exclude=exclude) as reader:
        # Under torchrun each rank follows its own share of the matrices (balanced by size); records are
        # gathered below so every rank returns the single-process result.
        world = current_world(dev)
        full_plan = list(reader.plan)
        shards = balanced_shards([e.shape[0] * e.shape[1] for e in full_plan], world.size)
        plan = [full_plan[i] for i in sorted(shards[world.rank])]
        if progress and world.is_main:
            from tqdm.auto import tqdm

            plan = tqdm(plan, desc="weightgeo trajectory", unit="matrix", leave=False, dynamic_ncols=True)
        for entry in plan:
            m, n = entry.shape
            per_batch = max(1, _BATCH_BYTES // (4 * m * n))
            g = torch.Generator(device=dev).manual_seed(matrix_seed(seed, entry.key))
            out: dict[int, Spectrum] = {}
            batch: list[tuple[int, torch.Tensor]] = []

            def flush() -> None:
                if not batch:
                    return
                D = torch.stack([d for _, d in batch])
                fro = torch.linalg.vector_norm(D, dim=(-2, -1), dtype=torch.float64)
                nz = [i for i in range(len(batch)) if float(fro[i]) > 0]
                if nz:
                    specs = update_spectra(D[nz], r=r, k=k, generator=g, frobenius=fro[nz])
                    for i, sp in zip(nz, specs):
                        out[batch[i][0]] = sp
                batch.clear()

            for step, d in reader.updates(entry, device=dev):
                batch.append((step, d))
                if len(batch) >= per_batch:
                    flush()
            flush()
            records[entry.key] = (entry.shape, out)
        parts = world.gather({"rank": world.rank, "matrices": list(records), "records": records})
        merged = {key: rec for part in parts for key, rec in part["records"].items()}
        records = {e.key: merged[e.key] for e in full_plan if e.key in merged}
        meta = {"kind": "trajectory", "stream": s.origin, "base": reader.base.source, "base_step": s.base_step,
                "steps": list(s.steps), "device": str(dev), "seed": seed, "include": include, "exclude": exclude,
                "skipped": list(reader.skipped), "unmatched": reader.unmatched,
                "torch_version": torch.__version__, "world_size": world.size,
                "ranks": [{"rank": p["rank"], "matrices": p["matrices"]} for p in parts]}
        in_out = [e.key for e in full_plan if reader.base.in_out_layout(e.base_name)]
        if in_out:  # Conv1D (GPT-2 style) matrices: their stored right side, used by Sim_K, is the output side
            meta["in_out_layout"] = in_out
    meta["seconds"] = round(time.perf_counter() - t0, 3)
    return s, records, meta


def rank_curve(stream: Any, *, base: Any = None, steps: Sequence[int] | None = None,
               include: str | Sequence[str] | None = None, exclude: str | Sequence[str] | None = None,
               hill_k: int = 10, k: int = 16, device: str | torch.device | None = None, seed: int = 0,
               progress: bool = False) -> Report:
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
        stream: a directory of ``checkpoint-<step>`` folders or a sequence of checkpoint sources
            (see :func:`weightgeo.stream.open_stream`).
        base: the initial model W0 (default: the first checkpoint; it gets no row).
        steps: steps of a sequence (strictly increasing).
        include, exclude: regexes or presets (``"attention"`` = the paper's q/k/v/o set). Default: every
            2-D floating tensor present in all checkpoints (our choice).
        hill_k: number of top singular values in the Hill estimator (≥ 2; default 10, the paper is silent).
        k: subspace size K for ``final_subspace_similarity`` (default 16, the paper's).
        device: where the linear algebra runs; reading is on CPU. seed: for the randomized SVD.
        progress: show a tqdm bar.

    Returns:
        :class:`~weightgeo.report.Report`: ``rows`` per (step, matrix) with ``step, name, shape, numel, module,
        layer, frobenius_norm, spectral_norm, stable_rank`` (in [1, rank]), ``hill_alpha``, ``gap_ratio``
        (σ_{K+1}/σ_K: Sim_K means little near 1), ``final_subspace_similarity`` (Sim_K(t, t_end), in [0, 1])
        and ``method``; ``summary["by_step"][step]`` = unweighted means over matrices (with ``by_module``),
        ``summary["curves"]`` = those means as lists over ``summary["steps"]``. Each tensor is read once.
    """
    hill_k, k = _check_k(hill_k, "hill_k", 2), _check_k(k, "k", 1)
    s, records, meta = _stream_pass(stream, base=base, steps=steps, include=include, exclude=exclude,
                                    r=max(hill_k, k), k=k, device=device, seed=seed, progress=progress)
    rows, sims, zero = assemble(records, s.steps, hill_k=hill_k, k=k)
    meta.update(kind="rank_curve", params={"hill_k": hill_k, "k": k}, zero_updates=zero,
                similarity=sims)
    if not rows:
        raise WeightgeoError(f"{s.origin}: every followed matrix has ΔW = 0 at every step; is base= the same "
                             f"model as the checkpoints?")
    return Report(rows=rows, summary=trajectory_summary(rows, s.steps, sims, k=k), meta=meta)


def locking_onset(stream: Any, *, base: Any = None, steps: Sequence[int] | None = None, k: int = 16,
                  threshold: float = 0.9, include: str | Sequence[str] | None = None,
                  exclude: str | Sequence[str] | None = None, device: str | torch.device | None = None,
                  seed: int = 0, progress: bool = False) -> LockingOnset:
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
        base, steps, include, exclude, device, seed, progress: as :func:`rank_curve`.
        k: subspace size K (default 16). threshold: in (0, 1], default 0.9 (our choice).

    Returns:
        a :class:`LockingOnset` (``step``, ``per_matrix``, ``similarity``, ``mean_similarity``).
    """
    threshold = _check_threshold(threshold)
    if isinstance(stream, Report):
        sims = stream.meta.get("similarity")
        if stream.meta.get("kind") != "rank_curve" or sims is None:
            raise WeightgeoError("locking_onset(report): pass a Report made by rank_curve (it carries the "
                                 "similarities), or a stream")
        sims = {n: {int(s): float(v) for s, v in c.items()} for n, c in sims.items()}
        return build_locking(sims, k=stream.meta["params"]["k"], threshold=threshold, meta=dict(stream.meta))
    k = _check_k(k, "k", 1)
    s, records, meta = _stream_pass(stream, base=base, steps=steps, include=include, exclude=exclude, r=k, k=k,
                                    device=device, seed=seed, progress=progress)
    _, sims, zero = assemble(records, s.steps, hill_k=2, k=k)
    meta.update(kind="locking_onset", zero_updates=zero)
    return build_locking(sims, k=k, threshold=threshold, meta=meta)


def _check_k(v: int, what: str, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < low:
        raise WeightgeoError(f"{what}={v!r} must be an integer ≥ {low}")
    return int(v)
