"""Independent float64 NumPy/SciPy references for every metric, plus the test-case generator.

Nothing here imports weightgeo: the references share no code with the implementation.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg

EPS32 = float(np.finfo(np.float32).eps)


# ---- bf16 rounding by bit manipulation -------------------------------------------------------
def bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 -> nearest-even bf16 -> float32, on the bits (finite inputs; overflow gives ±inf)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    lsb = (bits >> 16) & 1
    rounded = ((bits + 0x7FFF + lsb) & 0xFFFF0000).astype(np.uint32)
    return rounded.view(np.float32)


def unchanged_mask(w0: np.ndarray, w1: np.ndarray, eta: float = 1e-3) -> np.ndarray:
    x0 = bf16_round(w0).astype(np.float64)
    x1 = bf16_round(w1).astype(np.float64)
    return np.abs(x1 - x0) <= eta * np.maximum(np.abs(x0), np.abs(x1))


def sparsity(w0: np.ndarray, w1: np.ndarray, eta: float = 1e-3) -> float:
    return float(unchanged_mask(w0, w1, eta).mean())


# ---- decompositions -------------------------------------------------------------------------
def svd(A: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.linalg.svd(np.asarray(A, dtype=np.float64), full_matrices=False)


def numerical_rank(s: np.ndarray, shape: tuple[int, ...], eps: float = EPS32) -> int:
    if s.size == 0 or s[0] == 0:
        return 0
    return int((s > max(shape) * eps * s[0]).sum())


def principal_angles_deg(A0: np.ndarray, A1: np.ndarray, k: int, side: str = "right", eps: float = EPS32) -> np.ndarray:
    """Degrees, ascending; k capped at min(m, n) and both numerical ranks (tolerance with ``eps``)."""
    U0, s0, V0h = svd(A0)
    U1, s1, V1h = svd(A1)
    k = min(k, *A0.shape, numerical_rank(s0, A0.shape, eps), numerical_rank(s1, A1.shape, eps))
    if side == "right":
        Q0, Q1 = V0h[:k].T, V1h[:k].T
    else:
        Q0, Q1 = U0[:, :k], U1[:, :k]
    return np.sort(np.degrees(scipy.linalg.subspace_angles(Q0, Q1)))


def overlap(deg: np.ndarray) -> float:
    return float(np.mean(np.cos(np.radians(deg)) ** 2))


def spectral_drift(A0: np.ndarray, A1: np.ndarray) -> float:
    s0 = np.linalg.svd(np.asarray(A0, np.float64), compute_uv=False)
    s1 = np.linalg.svd(np.asarray(A1, np.float64), compute_uv=False)
    return float(np.linalg.norm(s1 - s0) / np.linalg.norm(s0))


def stable_rank(D: np.ndarray) -> float:
    D = np.asarray(D, np.float64)
    s = np.linalg.svd(D, compute_uv=False)
    return 0.0 if s[0] == 0 else float((D**2).sum() / s[0] ** 2)


def select_mask(key: np.ndarray, count: int, largest: bool) -> np.ndarray:
    flat = key.reshape(-1)
    order = np.argsort(-flat if largest else flat, kind="stable")
    m = np.zeros(flat.size, bool)
    m[order[:count]] = True
    return m


def localization(
    A0: np.ndarray, A1: np.ndarray, rank: int = 64, alpha: float = 0.5, eta: float = 1e-3, upd: np.ndarray | None = None
) -> dict:
    """``upd``: the update mask (True = updated) when it is not the bf16 rule's (FP8 weights)."""
    A0 = np.asarray(A0, np.float64)
    U, s, Vh = svd(A0)
    r = min(rank, *A0.shape)
    recon = (U[:, :r] * s[:r]) @ Vh[:r]
    if upd is None:
        upd = ~unchanged_mask(A0.astype(np.float32), np.asarray(A1, np.float32), eta)
    upd = np.asarray(upd, bool).reshape(-1)
    n = A0.size
    count = math.floor(alpha * n)
    mp = select_mask(np.abs(recon), count, True)
    ml = select_mask(np.abs(A0), count, False)
    nu = int(upd.sum())
    return {
        "density": nu / n,
        "principal_overlap": (mp & upd).sum() / nu if nu else float("nan"),
        "low_magnitude_overlap": (ml & upd).sum() / nu if nu else float("nan"),
        "n_updated": nu,
    }


# ---- the case matrix ------------------------------------------------------------------------
def orthogonal(rng: np.random.Generator, n: int, p: int) -> np.ndarray:
    Q, R = np.linalg.qr(rng.standard_normal((n, p)))
    return Q * np.sign(np.diag(R))


def make_base(kind: str, m: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """float32 base of one structure: gaussian, powerlaw (σᵢ = i^-0.5), lowrank_noise, lowrank (exact, r=8)."""
    p = min(m, n)
    if kind == "gaussian":
        A = rng.standard_normal((m, n)) / math.sqrt(n)
    elif kind == "powerlaw":
        A = (orthogonal(rng, m, p) * np.arange(1, p + 1) ** -0.5) @ orthogonal(rng, n, p).T
    elif kind == "lowrank_noise":
        r = 8
        A = (orthogonal(rng, m, r) * np.linspace(3, 1, r)) @ orthogonal(rng, n, r).T
        A += 0.02 * rng.standard_normal((m, n)) / math.sqrt(n)
    elif kind == "lowrank":
        r = 8
        A = (orthogonal(rng, m, r) * np.linspace(3, 1, r)) @ orthogonal(rng, n, r).T
    else:
        raise ValueError(kind)
    return A.astype(np.float32)


def make_pair(kind: str, update: str, m: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(base, ft, storage). ``update`` is "independent" (ft of the same kind, fp32 storage) or a relative
    update "1e-2" / "1e-3" / "2e-4" of the weight RMS, both stored in bf16 (returned as float32 values),
    except for the exactly low-rank base, which stays in fp32 (bf16 rounding would make it full rank).
    """
    rng = np.random.default_rng(seed)
    A = make_base(kind, m, n, rng)
    if update == "independent":
        return A, make_base(kind, m, n, rng), "fp32"
    rel = float(update)
    if kind == "lowrank":
        # keep it exactly low rank: update inside the column space (a rank-8 perturbation)
        U, s, Vh = np.linalg.svd(A.astype(np.float64), full_matrices=False)
        r = 8
        D = U[:, :r] @ rng.standard_normal((r, r)) @ Vh[:r]
        D *= rel * np.sqrt(np.mean(A.astype(np.float64) ** 2)) / np.sqrt(np.mean(D**2))
        return A, (A + D).astype(np.float32), "fp32"
    base = bf16_round(A)
    rms = float(np.sqrt(np.mean(base.astype(np.float64) ** 2)))
    ft = bf16_round((base + rel * rms * rng.standard_normal((m, n))).astype(np.float32))
    return base, ft, "bf16"


KINDS = ("gaussian", "powerlaw", "lowrank_noise", "lowrank")
UPDATES = ("independent", "1e-2", "1e-3", "2e-4")
