"""Trajectory kernels: the spectra of cumulative updates, Sim_K and the locking onset (paper §4).

The stream pass that reads checkpoints and the rows and reports built from these kernels live one floor up,
in :mod:`weightgeo.trajectory` (``rank_curve``, ``locking_onset``) and :mod:`weightgeo.track` (the Tracker).

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
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..defaults import SEED, SIDE, STREAM_K, THRESHOLD
from ..errors import WeightgeoError
from ..linalg.rsvd import randomized_svd
from ..linalg.svd import decompose
from ..means import nanmean
from ..validation import check_k, check_matrix, check_side, check_threshold

__all__ = [
    "Spectrum",
    "update_spectra",
    "matrix_seed",
    "subspace_sim",
    "subspace_similarity",
    "onset_step",
    "LockingOnset",
    "build_locking",
    "EXACT_MAX_DIM",
    "RTOL",
    "UPDATE_BATCH_BYTES",
]

#: min(m, n) at or below which the exact policy is used directly (randomized has no edge there).
EXACT_MAX_DIM = 256
#: residual a randomized triplet must meet: ‖ΔW v_i − σ_i u_i‖ ≤ RTOL·σ₁. This bounds every Ritz value's error
#: by RTOL·σ₁ (so σ₁, ‖ΔW‖₂ and the stable rank to RTOL) and the top-K subspace's angles by RTOL·σ₁/gap. A
#: per-value bound (RTOL·σ_i) is unreachable on the flat bf16-noise tails of real updates and sent most matrices
#: to the exact path without buying accuracy where the subspace is defined.
RTOL = 1e-3
_N_ITER = (2, 8)  # power iterations of the first and the retry pass
#: updates are formed and decomposed in batches of at most this many bytes (float32)
UPDATE_BATCH_BYTES = 1 << 28


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


def update_spectra(
    D: torch.Tensor,
    *,
    r: int,
    k: int,
    generator: torch.Generator | None = None,
    frobenius: torch.Tensor | None = None,
    seed: int | None = None,
) -> list[Spectrum]:
    """Top-``r`` singular values (+1 for the gap) and top-``k`` right vectors of each nonzero ΔW in ``D``.

    >>> g = torch.Generator().manual_seed(0)
    >>> D = torch.randn(3, 300, 2, generator=g) @ torch.randn(3, 2, 280, generator=g)
    >>> alone = update_spectra(D[1:2], r=4, k=2, seed=7)[0]
    >>> torch.equal(update_spectra(D, r=4, k=2, seed=7)[1].Vh, alone.Vh), alone.method
    (True, 'randomized')

    Args:
        D: [B, m, n] float32/float64 updates, all nonzero.
        r: number of singular values needed (``max(k, hill_k)``).
        k: number of right singular vectors to keep (0 for none).
        generator: for the randomized passes (on ``D``'s device), advanced by each pass.
        frobenius: [B] ‖ΔW‖_F if already computed.
        seed: instead of ``generator``: every call draws the same test matrices from ``seed``, so each member's
            spectrum depends on its own ΔW and ``seed`` only, not on the batch it is in or on earlier calls
            (the Ω of a pass is shared by the batch; what a resumed or cached stream pass relies on).

    Returns:
        one :class:`Spectrum` per matrix.
    """
    if seed is not None:
        if generator is not None:
            raise WeightgeoError("update_spectra: pass generator or seed, not both")
        generator = torch.Generator(device=D.device).manual_seed(int(seed))
    B, m, n = D.shape
    mn = min(m, n)
    want = min(max(r, k) + 1, mn)
    fro = (
        torch.linalg.vector_norm(D, dim=(-2, -1), dtype=torch.float64)
        if frobenius is None
        else frobenius.to(torch.float64)
    ).cpu()
    S_out = torch.zeros(B, want, dtype=torch.float64, device="cpu")  # host results, whatever the default device
    V_out = torch.zeros(B, min(k, mn), n, dtype=torch.float32, device="cpu") if k else None
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
            # One copy to the host per round, not one sync per matrix (on CUDA).
            ok_host, S_host = ok.tolist(), S.double().cpu()
            Vh_host = Vh[:, : V_out.shape[1]].float().cpu() if V_out is not None else None
            for j, i in enumerate(todo):
                if ok_host[j]:
                    S_out[i] = S_host[j]
                    if V_out is not None and Vh_host is not None:
                        V_out[i] = Vh_host[j]
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


def subspace_sim(Va: torch.Tensor, Vb: torch.Tensor) -> float:
    """‖Va Vbᵀ‖_F² / K for [K, n] orthonormal rows: the mean cos² of the principal angles, in [0, 1].

    >>> subspace_sim(torch.eye(3)[:2], torch.eye(3)[1:])
    0.5
    """
    K = min(Va.shape[0], Vb.shape[0])
    M = Va[:K].double() @ Vb[:K].double().mT
    return float(min(1.0, max(0.0, float((M * M).sum()) / K)))


def subspace_similarity(delta_a: Any, delta_b: Any, *, k: int = STREAM_K, side: str = SIDE, seed: int = SEED) -> float:
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
    a, b = _update_matrix(delta_a, "delta_a"), _update_matrix(delta_b, "delta_b")
    check_side(side)
    if side == "left":
        a, b = a.mT, b.mT
    if a.shape[1] != b.shape[1]:
        raise WeightgeoError(
            f"subspace_similarity(side={side!r}): the {side} sides differ: shapes "
            f"{tuple(delta_a.shape)} and {tuple(delta_b.shape)}; compare updates of one matrix"
        )
    k = check_k(k)
    if k >= min(*a.shape, *b.shape):
        raise WeightgeoError(
            f"k={k} must be in [1, {min(*a.shape, *b.shape) - 1}] for shapes {tuple(delta_a.shape)} and "
            f"{tuple(delta_b.shape)}: at the smaller side the top-k subspace holds every direction (Sim_k would "
            f"say nothing)"
        )
    vs = []
    for x, what in ((a, "delta_a"), (b, "delta_b")):
        if not bool(x.any()):
            raise WeightgeoError(f"subspace_similarity: {what} is all zeros: it has no top-{k} subspace")
        g = torch.Generator(device=x.device).manual_seed(int(seed))
        vh = update_spectra(x[None], r=k, k=k, generator=g)[0].Vh
        assert vh is not None  # k ≥ 1 vectors were asked for
        vs.append(vh)
    return subspace_sim(vs[0], vs[1])


def _update_matrix(x: Any, what: str) -> torch.Tensor:
    """An update [out, in], checked (floating, finite), in float32 (float64 kept)."""
    x = check_matrix(x, what, finite=True)
    return x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)


# --------------------------------------------------------------------------------------------------------------
# locking onset
def onset_step(similarity: Mapping[int, float], threshold: float = THRESHOLD) -> int | None:
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
        return pd.DataFrame(
            [
                {"name": n, "step": s, "similarity": v, "onset": self.per_matrix.get(n)}
                for n, curve in self.similarity.items()
                for s, v in curve.items()
            ]
        )

    def __repr__(self) -> str:
        return (
            f"LockingOnset(step={self.step}, k={self.k}, threshold={self.threshold}, final_step="
            f"{self.final_step}, matrices={len(self.per_matrix)}, locked_fraction={self.locked_fraction:.3f})"
        )


def build_locking(
    similarity: dict[str, dict[int, float]], *, k: int, threshold: float, meta: dict[str, Any] | None = None
) -> LockingOnset:
    """The :class:`LockingOnset` of per-matrix similarity curves (shared by streams, reports and the Tracker)."""
    threshold = check_threshold(threshold)
    steps = sorted({s for c in similarity.values() for s in c})
    if not steps:
        raise WeightgeoError("no checkpoint with a nonzero update: nothing to lock onto")
    mean = {s: nanmean(c[s] for c in similarity.values() if s in c) for s in steps}
    per = {
        n: onset_step(c, threshold) if c and not all(math.isnan(v) for v in c.values()) else None
        for n, c in similarity.items()
    }
    return LockingOnset(
        onset_step(mean, threshold), per, similarity, mean, int(k), threshold, steps[-1], dict(meta or {})
    )
