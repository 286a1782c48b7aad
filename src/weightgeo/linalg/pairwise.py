"""Pair geometry of a base W0 and a fine-tuned W1 = W0 + ΔW in W0's eigenbasis (paper-notes §1.2–§1.3).

Method ("base-relative Gram", docs/numerics.md):

Orient every matrix tall (``A = W`` if ``m ≥ n`` else ``Wᵀ``; ``n = p = min(m, n)`` is the small side).

1. Base, once per W0 (:class:`BaseSpectrum`, reusable across fine-tunes and checkpoints):
   ``G0 = A0ᵀA0`` by one GEMM in the compute dtype (float32 for bf16/fp16/fp32 inputs: the products
   of bf16 values are exact, only the accumulation rounds), then ``G0 = V Λ0 Vᵀ`` by ``eigh`` in
   float64. The float32 rounding of ``G0`` is common to both sides of the pair (step 2 adds to the
   same ``G0``), so it enters the angles and NSS only at second order: measured ≤ 0.6 % of the
   tolerance on every case of docs/numerics.md.
2. Pair: ``D = A1ᵀA1 − A0ᵀA0 = ½[(A0+A1)ᵀΔ + Δᵀ(A0+A1)]`` from ``Δ = A1 − A0`` (exact for bf16 pairs),
   one GEMM in the compute dtype, so it is accurate relative to ``‖Δ‖``, not to ``‖A‖``; then
   ``F = VᵀDV`` (two n×n GEMMs, float32) and ``M1 = Λ0 + F`` in float64. ``M1`` is W1's Gram in W0's
   eigenbasis: ``eigh(M1) = Q diag(μ) Qᵀ`` in float64 gives σ(W1) = √μ and W1's small-side singular
   vectors ``V Q``.
3. NSS from ``σ1ᵢ − σ0ᵢ = (μᵢ − λ0ᵢ)/(√μᵢ + √λ0ᵢ)`` (no subtraction of rounded singular values).
4. Small-side angles: W0's top-k subspace is ``span(e_1..e_k)`` in this basis, so the sines are the
   singular values of the off-diagonal block ``Q[k:, :k]`` (no arccos, no product of two bases).
5. Big-side angles (left of a tall matrix, right of a wide one): with ``C = VᵀA0ᵀΔV``,
   ``U0ᵀU1_k = (Σ0 + Σ0⁻¹C) Q_k Σ1_k⁻¹`` and ``(I − U0U0ᵀ)U1_k = (I − U0U0ᵀ)ΔVQ_kΣ1_k⁻¹``; the sines² are
   the eigenvalues (float64) of ``X_{k:}ᵀX_{k:} + Σ1_k⁻¹Q_kᵀ H Q_kΣ1_k⁻¹`` with
   ``H = VᵀΔᵀΔV − CᵀΛ0⁻¹C`` (zero for a square full-rank W0, then skipped).

Why not float32 eigen/SVD solvers: their error is ``eps32·‖G‖`` (or ``eps32·‖W‖``) in absolute terms,
which swamps the tail shifts of near-identical pairs (NSS off by up to 3×, angles at k=512 of 896 off
by up to 170× the tolerance, docs/numerics.md); the base-relative float64 small problem is exact to
float64 while all O(m·n²) work stays in the inputs' precision.

Error bound (measured, docs/numerics.md): angles within ``1e-5·(2 % + 0.005°)`` of float64 NumPy,
NSS within 5e-6 relative, on all Qwen2.5-0.5B-shaped cases incl. σ_k/σ_{k+1} = 1.001. What limits
it is the float32 rounding of ``G0``, ``D`` and ``F`` (relative ``~√m·eps32`` of ``‖A‖²``, ``‖D‖``, ``‖F‖``),
i.e. the same order as perturbing the inputs by one float32 ulp, which the float64 problem itself
amplifies to ≤ 4 % of the tolerance (the problem's own conditioning).

Fallback: float64 inputs run every step in float64 (then it is the float64 Gram method). Singular
directions beyond the numerical rank (``max(m, n)·eps·σ₁``, eps of the input's compute dtype) are
arbitrary, so ``k`` is capped there, as in :mod:`weightgeo.metrics.rotation`.

Everything is batched over leading dimensions, device-agnostic, torch only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import WeightgeoError
from .svd import compute_dtype

__all__ = ["BaseSpectrum", "PairGeometry", "base_spectrum", "pair_geometry"]

_SIDES = ("right", "left")


def _as_matrix(W: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(W, torch.Tensor):
        raise WeightgeoError(f"{what}: expected a torch.Tensor, got {type(W).__name__}")
    if W.ndim < 2:
        raise WeightgeoError(f"{what}: expected a matrix [..., out, in], got shape {tuple(W.shape)}")
    if min(W.shape[-2:]) == 0:
        raise WeightgeoError(f"{what}: empty matrix of shape {tuple(W.shape)}")
    return W.detach().to(compute_dtype(W.dtype))


@dataclass(frozen=True)
class BaseSpectrum:
    """Reusable float64 eigendecomposition of the base's small-side Gram (build with :func:`base_spectrum`).

    ``A`` is the base oriented tall ([..., m, n] with m ≥ n; ``Wᵀ`` when ``transposed``), in the compute
    dtype. ``lam`` [..., n] are the Gram eigenvalues σ0² (float64, descending), ``V`` [..., n, n] the
    small-side singular vectors (float64), ``V_c`` the same in the compute dtype (for the GEMMs).
    """

    A: torch.Tensor
    transposed: bool
    lam: torch.Tensor
    V: torch.Tensor
    V_c: torch.Tensor
    eps: float

    @property
    def shape(self) -> tuple[int, int]:
        """The original (untransposed) matrix shape ``(m, n)``."""
        m, n = self.A.shape[-2:]
        return (n, m) if self.transposed else (m, n)

    @property
    def sigma(self) -> torch.Tensor:
        """Singular values of W0, float64, descending, [..., min(m, n)]."""
        return self.lam.clamp_min(0).sqrt()

    def rank(self) -> torch.Tensor:
        """Numerical rank ``#{σᵢ > max(m, n)·eps·σ₁}`` per matrix ([...] int64)."""
        return _rank(self.sigma, max(self.shape), self.eps)


def _rank(s: torch.Tensor, big: int, eps: float) -> torch.Tensor:
    return (s > big * eps * s[..., :1]).sum(-1)


def base_spectrum(W0: torch.Tensor) -> BaseSpectrum:
    """Decompose the base once: ``G0 = A0ᵀA0`` (compute dtype) and ``eigh`` in float64.

    >>> b = base_spectrum(torch.diag(torch.tensor([3.0, 1.0])))
    >>> b.sigma
    tensor([3., 1.], dtype=torch.float64)

    Args:
        W0: [..., m, n] base weight (bf16/fp16/fp32/fp64, any device).

    Returns:
        a :class:`BaseSpectrum` to pass as ``base=`` to :func:`pair_geometry` for every fine-tune of W0.
    """
    A = _as_matrix(W0, "W0")
    transposed = A.shape[-2] < A.shape[-1]
    if transposed:
        A = A.mT
    G = A.mT @ A
    lam, V = torch.linalg.eigh(G.to(torch.float64))
    lam, V = lam.flip(-1), V.flip(-1)
    return BaseSpectrum(A.contiguous(), transposed, lam, V, V.to(A.dtype), torch.finfo(A.dtype).eps)


@dataclass(frozen=True)
class PairGeometry:
    """Result of :func:`pair_geometry` (all float64 tensors, batched like the inputs).

    ``angles_right`` / ``angles_left``: [..., k] principal angles in degrees, ascending, between the
    top-``k`` singular subspaces of W0 and W1 (``None`` for a side not asked for). ``nss``: [...]
    ``‖σ(W1) − σ(W0)‖₂ / ‖σ(W0)‖₂``. ``sigma0`` / ``sigma1``: [..., min(m, n)] descending.
    ``gap``: [...] ``σ_k(W0)/σ_{k+1}(W0)`` (``inf`` when k = min(m, n)); angles are reproducible only
    where it is clearly above 1. ``k``: the effective subspace dimension.
    """

    angles_right: torch.Tensor | None
    angles_left: torch.Tensor | None
    nss: torch.Tensor
    sigma0: torch.Tensor
    sigma1: torch.Tensor
    gap: torch.Tensor
    k: int

    def overlap(self, side: str = "right") -> torch.Tensor:
        """Mean cos² of the angles on ``side`` ([...], in [0, 1]; 1 = same subspace)."""
        a = self.angles_right if side == "right" else self.angles_left
        if a is None:
            raise WeightgeoError(f"pair_geometry was not asked for side {side!r}; pass sides=(..., {side!r})")
        return torch.cos(torch.deg2rad(a)).pow(2).mean(-1)


def _sines_small(Q: torch.Tensor, k: int) -> torch.Tensor:
    """Sines (ascending, length k) between span(e_1..e_k) and span(Q[:, :k]) for orthogonal Q."""
    n = Q.shape[-1]
    shape = Q.shape[:-2]
    if k >= n:
        return Q.new_zeros(*shape, k)
    # Singular values of the off-diagonal block; float32 costs ~1e-7 absolute in a sine.
    B = Q[..., k:, :k]
    s = torch.linalg.svdvals(B.to(torch.float32) if B.dtype == torch.float64 else B).to(Q.dtype)
    pad = Q.new_zeros(*shape, k - s.shape[-1])
    return torch.cat([pad, s.flip(-1)], -1)  # min(k, n-k) sines; the other angles are exactly 0


def pair_geometry(
    W0: torch.Tensor | None,
    W1: torch.Tensor,
    *,
    k: int = 512,
    sides: Sequence[str] = ("right",),
    base: BaseSpectrum | None = None,
) -> PairGeometry:
    """Principal angles between top-k singular subspaces and NSS of a near-identical pair, float64-accurate.

    >>> W0 = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    >>> g = pair_geometry(W0, W0, k=2)
    >>> g.angles_right, g.nss
    (tensor([0., 0.], dtype=torch.float64), tensor(0., dtype=torch.float64))

    Args:
        W0: [..., m, n] base weight; may be ``None`` when ``base`` is given (then ``base.A`` is used).
        W1: [..., m, n] fine-tuned weight (same shape). bf16/fp16 are upcast to float32, exactly.
        k: subspace dimension (paper default 512); capped at min(m, n) and at both numerical ranks
            (the minimum over the batch), reported as ``PairGeometry.k``.
        sides: any of "right" (V, input side) and "left" (U, output side).
        base: a :func:`base_spectrum` of W0, to reuse across several W1 (saves ~40 % per pair).

    Returns:
        a :class:`PairGeometry`. Method and measured error bound: module docstring and docs/numerics.md.
    """
    sides = tuple(sides)
    bad = [s for s in sides if s not in _SIDES]
    if bad or not sides:
        raise WeightgeoError(f"sides must be a non-empty subset of {_SIDES}, got {sides!r}")
    if isinstance(k, bool) or int(k) != k or int(k) < 1:
        raise WeightgeoError(f"k must be a positive integer (subspace dimension, default 512), got {k!r}")
    if base is None:
        if W0 is None:
            raise WeightgeoError("pair_geometry: give W0 or base=base_spectrum(W0)")
        base = base_spectrum(W0)
    A0 = base.A
    A1 = _as_matrix(W1, "W1").to(A0.dtype)
    if base.transposed:
        A1 = A1.mT
    if A1.shape != A0.shape:
        shp = tuple(A1.mT.shape if base.transposed else A1.shape)
        raise WeightgeoError(f"pair_geometry: W1 has shape {shp}, the base has {base.shape}; they must match")
    m, n = A0.shape[-2:]
    f64 = torch.float64
    lam, V, Vc = base.lam, base.V, base.V_c

    # Which side of the tall matrix is asked for: small = right of tall = V side.
    want_small = ("right" in sides and not base.transposed) or ("left" in sides and base.transposed)
    want_big = ("left" in sides and not base.transposed) or ("right" in sides and base.transposed)

    Delta = A1 - A0
    rank0 = base.rank()
    complement = want_big and (m > n or bool((rank0 < n).any()))
    if complement:
        C0 = A0.mT @ Delta
        J = Delta.mT @ Delta
        D = C0 + C0.mT + J
    else:
        P = (A0 + A1).mT @ Delta
        D = 0.5 * (P + P.mT)
        C0 = J = None
    F = (Vc.mT @ D @ Vc).to(f64)
    F = 0.5 * (F + F.mT)
    M1 = torch.diag_embed(lam) + F
    mu, Q = torch.linalg.eigh(M1)
    mu, Q = mu.flip(-1), Q.flip(-1)

    s0 = lam.clamp_min(0).sqrt()
    s1 = mu.clamp_min(0).sqrt()
    den = s0 + s1
    ds = torch.where(den > 0, (mu - lam) / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))
    num = torch.linalg.vector_norm(ds, dim=-1)
    nrm = torch.linalg.vector_norm(s0, dim=-1)
    nss = torch.where(nrm > 0, num / torch.where(nrm > 0, nrm, torch.ones_like(nrm)),
                      torch.where(num > 0, torch.full_like(num, math.inf), torch.zeros_like(num)))

    big = max(m, n)
    rank1 = _rank(s1, big, base.eps)
    k_eff = int(min(int(k), n, int(rank0.min()), int(rank1.min())))
    if n > k_eff:
        gap = s0[..., k_eff - 1] / s0[..., k_eff] if k_eff > 0 else s0[..., 0] * math.inf
    else:
        gap = torch.full(s0.shape[:-1], math.inf, dtype=f64, device=s0.device)

    small_angles = big_angles = None
    if k_eff > 0 and want_small:
        small_angles = torch.rad2deg(torch.arcsin(_sines_small(Q, k_eff).clamp(0, 1)))
    elif want_small:
        small_angles = s0.new_zeros(*s0.shape[:-1], 0)
    if want_big:
        if k_eff == 0:
            big_angles = s0.new_zeros(*s0.shape[:-1], 0)
        else:
            big_angles = torch.rad2deg(_big_side_angles(A0, Delta, s0, mu, Q, Vc, C0, J, k_eff, base.eps))
    if base.transposed:
        right, left = big_angles, small_angles
    else:
        right, left = small_angles, big_angles
    if "right" not in sides:
        right = None
    if "left" not in sides:
        left = None
    return PairGeometry(right, left, nss, s0, s1, gap, k_eff)


def _big_side_angles(A0, Delta, s0, mu, Q, Vc, C0, J, k, eps):
    """Angles (radians, ascending) between the top-k big-side singular subspaces (module docstring, step 5)."""
    f64 = torch.float64
    n = Q.shape[-1]
    big = max(A0.shape[-2:])
    in_rank = s0 > big * eps * s0[..., :1]  # U0 is defined on W0's numerical range only
    inv_s0 = torch.where(in_rank, 1.0 / torch.where(in_rank, s0, torch.ones_like(s0)), torch.zeros_like(s0))
    if C0 is None:
        C0 = A0.mT @ Delta
    C = (Vc.mT @ C0 @ Vc).to(f64)
    Qk = Q[..., :, :k]
    inv_s1 = 1.0 / mu[..., :k].clamp_min(torch.finfo(f64).tiny).sqrt()
    # Rows k: of X = U0ᵀU1_k = (Σ0 Q_k + Σ0⁻¹ C Q_k) Σ1_k⁻¹; rows outside W0's range are 0.
    CQ = (C[..., k:, :].to(Vc.dtype) @ Qk.to(Vc.dtype)).to(f64)
    X = (s0[..., k:, None] * Qk[..., k:, :] + inv_s0[..., k:, None] * CQ) * inv_s1[..., None, :]
    X = X * in_rank[..., k:, None]
    K = X.mT @ X
    if J is not None:
        # H = VᵀΔᵀ(I − U0U0ᵀ)ΔV = VᵀΔᵀΔV − Cᵀ Λ0⁺ C (component of ΔV outside W0's range).
        H = (Vc.mT @ J @ Vc).to(f64) - C.mT @ (inv_s0[..., :, None] ** 2 * C)
        Qc = Qk.to(Vc.dtype)
        Hq = (Qc.mT @ H.to(Vc.dtype) @ Qc).to(f64)
        K = K + inv_s1[..., :, None] * Hq * inv_s1[..., None, :]
    K = 0.5 * (K + K.mT)
    sin2 = torch.linalg.eigvalsh(K).clamp(0, 1)  # ascending
    return torch.arcsin(sin2.sqrt())
