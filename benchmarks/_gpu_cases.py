"""The GPU suite's cases (benchmarks/gpu_suite.py): Qwen3-8B's matrix shapes (and the --small ones), synthetic
matrices with a planted spectrum, their float64 singular values, and the engine's pair kernel as the suite
calls it."""

from __future__ import annotations

import math
from typing import Any

import torch
from _gpu_record import Suite

# Qwen3-8B: hidden 4096, 32 query / 8 KV heads of 128, intermediate 12288, vocabulary 151936, 36 layers,
# untied embeddings. Per layer: (name, rows, cols, matrices of that shape per layer).
QWEN3_8B = {"layers": 36, "hidden": 4096, "kv": 1024, "ffn": 12288, "vocab": 151936}
SMALL = {"layers": 36, "hidden": 256, "kv": 64, "ffn": 768, "vocab": 2048}
SMALL_RSVD = {"hidden": 384, "kv": 96, "ffn": 1152}


def layer_shapes(c: dict) -> list[tuple[str, int, int, int]]:
    h, kv, f = c["hidden"], c["kv"], c["ffn"]
    return [("k_proj", kv, h, 2), ("q_proj", h, h, 2), ("gate_proj", f, h, 2), ("down_proj", h, f, 1)]


def planted_stack(s: Suite, B: int, m: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 stack [B, m, n], planted σ [min(m, n)] float64): Haar factors and σᵢ = i^-0.5; entry i is a signed
    row and column permutation of entry 0, so every entry has exactly the planted spectrum."""
    dev = s.device
    g = torch.Generator(device=dev).manual_seed(seed)
    p = min(m, n)
    U = torch.linalg.qr(torch.randn(m, p, generator=g, device=dev)).Q
    V = torch.linalg.qr(torch.randn(n, p, generator=g, device=dev)).Q
    sigma = torch.arange(1, p + 1, dtype=torch.float64, device=dev).pow(-0.5)
    A0 = (U * sigma.float()) @ V.mT
    del U, V
    stack = torch.empty(B, m, n, device=dev)
    stack[0] = A0
    for i in range(1, B):
        pr, pc = torch.randperm(m, generator=g, device=dev), torch.randperm(n, generator=g, device=dev)
        sr = torch.randint(0, 2, (m, 1), generator=g, device=dev).float().mul_(2).sub_(1)
        sc = torch.randint(0, 2, (1, n), generator=g, device=dev).float().mul_(2).sub_(1)
        stack[i] = A0.index_select(0, pr).index_select(1, pc).mul_(sr).mul_(sc)
    return stack, sigma


def f64_sigma(A: torch.Tensor) -> torch.Tensor:
    """Singular values of one stored matrix: float64 ``eigvalsh`` of its small-side Gram (descending)."""
    X = A.double()
    G = X.mT @ X if X.shape[0] >= X.shape[1] else X @ X.mT
    return torch.linalg.eigvalsh(G).flip(-1).clamp_min(0).sqrt()


def sigma_error(S: torch.Tensor, ref: torch.Tensor, k: int) -> float:
    """max over entries and i ≤ k of |σ̂ᵢ − σᵢ| / σᵢ."""
    r = ref[..., :k].to(S.device)
    return float(((S[..., :k].double() - r).abs() / r).max())


def make_pair(m: int, n: int, rel: float, gen: torch.Generator, device: torch.device, *, planted: bool = True):
    """bf16 (W0, W1): W0 with σᵢ ∝ i^-0.5 and Haar factors (``planted``) or Gaussian, RMS 0.02; W1 = W0 + ΔW, ΔW
    dense Gaussian of ``rel`` × the RMS, rounded to bf16."""
    if planted:
        p = min(m, n)
        U = torch.linalg.qr(torch.randn(m, p, generator=gen, device=device)).Q
        V = torch.linalg.qr(torch.randn(n, p, generator=gen, device=device)).Q
        sig = torch.arange(1, p + 1, dtype=torch.float32, device=device).pow(-0.5)
        sig *= 0.02 * math.sqrt(m * n) / float(sig.norm())
        W = (U * sig) @ V.mT
        del U, V
    else:
        W = 0.02 * torch.randn(m, n, generator=gen, device=device)
    W0 = W.bfloat16()
    W.add_(torch.randn(m, n, generator=gen, device=device), alpha=rel * 0.02)
    return W0, W.bfloat16()


def pair_kernel(W0: torch.Tensor, W1: torch.Tensor, k: int) -> list[dict[str, Any]]:
    """The engine's kernel for a shape group: every pair metric, side right, the paper's defaults."""
    from weightgeo.metrics.pair import PAIR_METRICS, batched_pair_metrics

    return batched_pair_metrics(
        W0, W1, metrics=frozenset(PAIR_METRICS), k=k, side="right", rank=64, alpha=0.5, eta=1e-3, angles=True
    )


def stack_count(s: Suite, m: int, n: int, want: int) -> int:
    """Stack size that fits: the fp32 and bf16 stacks plus ~1.5× working space in 40 % of free GPU memory."""
    if not s.cuda:
        return want
    free, _ = torch.cuda.mem_get_info(s.device)
    per = m * n * (4 + 2) * 2.5
    return max(1, min(want, int(0.4 * free / per)))
