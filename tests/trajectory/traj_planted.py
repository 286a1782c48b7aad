"""Planted checkpoint streams with known trajectory answers, and float64 NumPy references (tests only)."""

from __future__ import annotations

import numpy as np
import torch

Q_NAME = "model.layers.0.self_attn.q_proj.weight"
BIG_NAME = "model.layers.1.self_attn.o_proj.weight"  # min(m, n) > 256: the randomized path
NORM_NAME = "model.layers.0.input_layernorm.weight"
SHAPES = {Q_NAME: (48, 64), BIG_NAME: (260, 272)}
K = 16


def _orth(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q


def _coeff(m: int, g: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """[m, K] with well-separated singular values (so top-K subspaces are well defined)."""
    U = torch.linalg.qr(torch.randn(m, K, generator=g, dtype=torch.float64)).Q
    s = scale * torch.logspace(0, -1, K, dtype=torch.float64)
    return U * s


def base_state(g: torch.Generator) -> dict[str, torch.Tensor]:
    sd = {n: 0.02 * torch.randn(*s, generator=g, dtype=torch.float64) for n, s in SHAPES.items()}
    sd[NORM_NAME] = torch.ones(64, dtype=torch.float64)
    return sd


def planted_stream(
    kind: str, steps: list[int], *, seed: int = 0, switch_at: int | None = None, dtype: torch.dtype = torch.float32
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """(base, checkpoints) for ``kind`` in {"fixed", "switch", "fresh"}; checkpoints align with ``steps``.

    fixed:  ΔW_t = C_t V0ᵀ with one fixed 16-dim input subspace V0 (coefficients change): onset = steps[0].
    switch: ΔW_t = c_t C V1ᵀ before ``switch_at``; from it on a 10× larger C' V2ᵀ is added (V2 ⊥ V1):
            onset = switch_at.
    fresh:  every checkpoint adds C_i V_iᵀ with a fresh random V_i, each 1.6× larger than the last: no onset.
    """
    g = torch.Generator().manual_seed(seed)
    w0 = base_state(g)
    deltas = {n: torch.zeros(s, dtype=torch.float64) for n, s in SHAPES.items()}
    bases = {n: _orth(s[1], 2 * K, g) for n, s in SHAPES.items()}
    fixed_C = {n: _coeff(s[0], g, 0.05) for n, s in SHAPES.items()}
    cks = []
    for i, step in enumerate(steps):
        ck = {}
        for n, (m, _) in SHAPES.items():
            V1, V2 = bases[n][:, :K], bases[n][:, K:]
            if kind == "fixed":
                deltas[n] = deltas[n] + _coeff(m, g, 0.05 * (i + 1)) @ V1.T
            elif kind == "switch":
                if step < switch_at:
                    deltas[n] = (i + 1) * fixed_C[n] @ V1.T
                else:
                    deltas[n] = deltas[n] + _coeff(m, g, 0.5 * (i + 1)) @ V2.T
            elif kind == "fresh":
                deltas[n] = deltas[n] + _coeff(m, g, 0.05 * 1.6**i) @ _orth(SHAPES[n][1], K, g).T
            else:
                raise ValueError(kind)
            ck[n] = (w0[n] + deltas[n]).to(dtype)
        ck[NORM_NAME] = w0[NORM_NAME].to(dtype)
        cks.append(ck)
    return {n: t.to(dtype) for n, t in w0.items()}, cks


# ---- float64 NumPy references ----------------------------------------------------------------------------
def ref_delta(w_t: torch.Tensor, w_0: torch.Tensor) -> np.ndarray:
    return w_t.double().numpy() - w_0.double().numpy()


def ref_stable_rank(D: np.ndarray) -> float:
    s = np.linalg.svd(D, compute_uv=False)
    return float((D**2).sum() / s[0] ** 2)


def ref_hill(D: np.ndarray, k: int) -> float:
    s = np.linalg.svd(D, compute_uv=False)[:k]
    return float(1.0 / (np.sum(np.log(s[:-1] / s[-1])) / (k - 1)))


def ref_sim(A: np.ndarray, B: np.ndarray, k: int) -> float:
    Va = np.linalg.svd(A, full_matrices=False)[2][:k].T
    Vb = np.linalg.svd(B, full_matrices=False)[2][:k].T
    return float(np.linalg.norm(Va.T @ Vb) ** 2 / k)
