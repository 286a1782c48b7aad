"""The GPU suite's profile part (benchmarks/gpu_suite.py): where a pair's time goes on the device, the
alternatives that are cheap to switch (eigh through MAGMA, on the host, in float32, batched; the sines by another
driver; larger row blocks), and the randomized SVD's steps. Nothing here changes a library default."""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any

import torch
from _gpu_cases import layer_shapes, pair_kernel, stack_count
from _gpu_record import Suite, ms, once, timed


@contextlib.contextmanager
def eigh_route(route: str, device: torch.device):
    """The pair method's float64 eigensolvers on another route, for this benchmark only (library unchanged):
    ``cpu`` moves each ``eigh``/``eigvalsh`` input to the host (all cores) and the result back; ``magma`` prefers
    MAGMA to cuSOLVER for CUDA linear algebra."""
    if route == "default" or device.type != "cuda":
        yield
        return
    if route == "magma":
        before = torch.backends.cuda.preferred_linalg_library()
        torch.backends.cuda.preferred_linalg_library("magma")
        try:
            yield
        finally:
            torch.backends.cuda.preferred_linalg_library(before)
        return
    eigh, eigvalsh = torch.linalg.eigh, torch.linalg.eigvalsh

    def host_eigh(A, *args, **kw):
        w, Q = eigh(A.cpu(), *args, **kw)
        return w.to(A.device, non_blocking=True), Q.to(A.device, non_blocking=True)

    def host_eigvalsh(A, *args, **kw):
        return eigvalsh(A.cpu(), *args, **kw).to(A.device)

    torch.linalg.eigh, torch.linalg.eigvalsh = host_eigh, host_eigvalsh
    try:
        yield
    finally:
        torch.linalg.eigh, torch.linalg.eigvalsh = eigh, eigvalsh


def part_profile(s: Suite, pairs: dict, cfg: dict, later: list) -> None:
    """q_proj's steps first (the square 4096² pair, two full float64 eigh), then the alternatives and the rSVD
    steps, then the other shapes' steps, as far as the part's time goes."""
    a = s.args
    shapes = sorted((x for x in layer_shapes(cfg) if x[0] in pairs), key=lambda x: x[0] != "q_proj")
    saved: dict[str, Any] = {}
    s.record["parts"]["profile"]["steps"] = {}
    for i, (nm, m, n, _) in enumerate(shapes):
        if s.left() < 4:
            s.skip("profile", f"{nm} {m}×{n} steps", "time box")
            continue
        _pair_steps(s, nm, pairs[nm], a.pair_k, saved if nm == "q_proj" else None)
        if i == 0:
            if saved and s.left() > 3:
                _alternatives(s, saved, a.pair_k)
            if s.left() > 3:
                _rsvd_steps(s, cfg)
    if saved:
        # The host-side alternatives run once the float64 worker has stopped (they would share its cores).
        later.append(lambda: _host_alternatives(s, saved, a.pair_k))


def _pair_steps(s: Suite, nm: str, pair: tuple[torch.Tensor, torch.Tensor], k: int, saved: dict | None) -> None:
    from weightgeo.linalg.pairwise import (
        base_spectrum,
        effective_k,
        pair_angles,
        pair_eigen,
        pair_products,
        pair_spectrum,
        tall_like,
    )
    from weightgeo.linalg.svd import gram
    from weightgeo.metrics.localization import localize

    def step(fn):
        """(seconds, result): the faster of two synchronised calls when there is time, else one."""
        t, out = once(s, fn)
        if s.left() > 30:
            t = min(t, once(s, fn)[0])
        return t, out

    W0, W1 = (w.to(s.device)[None] for w in pair)
    m, n = W0.shape[-2:]
    steps: dict[str, float] = {}
    steps["base: float64 Gram"], G = step(lambda: gram(W0, dtype=torch.float64))
    steps["base: eigh float64 (n×n)"], _ = step(lambda: torch.linalg.eigh(G))
    t_base, base = step(lambda: base_spectrum(W0))
    steps["base: rest (checks, casts)"] = max(
        0.0, t_base - steps["base: float64 Gram"] - steps["base: eigh float64 (n×n)"]
    )
    A1 = tall_like(base, W1, "W1")
    steps["products (row blocks)"], prod = step(lambda: pair_products(base, A1, sides=("right",), stable_rank=True))
    t_eig, eig = step(lambda: pair_eigen(base, prod, vectors=True))
    M1 = torch.diag_embed(base.lam) + eig.F
    steps["pair: eigh float64 (n×n)"], _ = step(lambda: torch.linalg.eigh(-M1))
    steps["pair: F = VᵀDV (GEMMs)"] = max(0.0, t_eig - steps["pair: eigh float64 (n×n)"])
    steps["pair: spectrum, NSS, checks"], spec = step(lambda: pair_spectrum(base, A1, eig))
    ke = int(effective_k(k, base, spec).min())
    steps["angles (k)"], _ = step(lambda: pair_angles(base, prod, eig, spec, ke, ("right",)))
    steps["stable rank: eigvalsh float64 of ΔᵀΔ"], _ = step(lambda: torch.linalg.eigvalsh(prod.J.double()))
    r = min(64, m, n)
    steps["localization (3 passes)"], _ = step(
        lambda: localize(W0[0], W1[0], base.V_c[0, :, :r], base.transposed, alpha=0.5, eta=1e-3)
    )
    whole, _ = step(lambda: pair_kernel(W0, W1, k))
    total = sum(steps.values())
    for name, t in steps.items():
        s.row(
            "profile", f"{nm} {m}×{n}: {name}", "ok", ms=t * 1e3, against=f"whole kernel {ms(whole)}", ratio=t / whole
        )
    eig_share = (steps["base: eigh float64 (n×n)"] + steps["pair: eigh float64 (n×n)"]) / whole
    s.row(
        "profile",
        f"{nm} {m}×{n}: sum of steps",
        "ok",
        ms=total * 1e3,
        against=f"whole kernel {ms(whole)}",
        ratio=total / whole,
        note=f"the two n×n eigh: {eig_share:.0%} of the kernel",
    )
    s.record["parts"]["profile"]["steps"][nm] = {"steps_s": steps, "whole_s": whole}
    if saved is not None:
        saved.update(G=G, M1=M1, Q=eig.Q, ke=ke, W0=W0, W1=W1, base=base, A1=A1)
    s.free()
    s.write()


def _alternatives(s: Suite, saved: dict, k: int) -> None:
    import weightgeo.linalg.pairwise as pairwise
    import weightgeo.linalg.policy as policy
    import weightgeo.linalg.svd as svd

    G, Q, ke = saved["G"], saved["Q"], saved["ke"]
    n = G.shape[-1]
    t_def = once(s, lambda: torch.linalg.eigh(G))[0]
    tag = f"eigh float64 {n}×{n}"
    rows = []
    if s.cuda and getattr(torch.cuda, "has_magma", False):
        with eigh_route("magma", s.device):
            rows.append((f"{tag}: MAGMA", once(s, lambda: torch.linalg.eigh(G))[0], ""))
    rows.append((f"{tag}: values only (eigvalsh)", once(s, lambda: torch.linalg.eigvalsh(G))[0], ""))
    G32 = G.float()
    rows.append(
        (
            f"{tag}: in float32 (speed only: not accurate enough, docs/numerics.md)",
            once(s, lambda: torch.linalg.eigh(G32))[0],
            "",
        )
    )
    if s.left() > 8 * t_def + 2:
        G4 = G.expand(4, -1, -1).contiguous()
        rows.append((f"{tag}: batch of 4, per matrix", once(s, lambda: torch.linalg.eigh(G4))[0] / 4, ""))
        del G4
    for label, t, note in rows:
        s.row("profile", label, "ok", ms=t * 1e3, against=f"default {ms(t_def)}", ratio=t / t_def, note=note)
    # the small-side sines: svdvals of the (n−k)×k block
    Bk = Q[..., ke:, :ke].float()
    t_sv = once(s, lambda: torch.linalg.svdvals(Bk))[0]
    alts = []
    if s.cuda:
        for drv in ("gesvd", "gesvda"):
            try:
                alts.append((f"driver {drv}", once(s, lambda drv=drv: torch.linalg.svdvals(Bk, driver=drv))[0]))
            except Exception as e:
                alts.append((f"driver {drv}: {type(e).__name__}", math.nan))
    Bd = Q[..., ke:, :ke]
    alts.append(("eigvalsh float64 of BᵀB", once(s, lambda: torch.linalg.eigvalsh(Bd.mT @ Bd))[0]))
    for label, t in alts:
        s.row(
            "profile",
            f"angles: sines of the {Bk.shape[-2]}×{Bk.shape[-1]} block, {label}",
            "ok",
            ms=t * 1e3,
            against=f"svdvals float32 default {ms(t_sv)}",
            ratio=t / t_sv,
        )
    # row blocks 16× larger (same sums, another order: timing only)
    W0, A1, base = saved["W0"], saved["A1"], saved["base"]
    t_rb = once(s, lambda: pairwise.pair_products(base, A1, sides=("right",), stable_rank=True))[0]
    orig = policy.ROW_BLOCK  # policy.batch_row_blocks reads it at call time (the kernels' one row-block rule)
    policy.ROW_BLOCK = orig << 4
    try:
        t_big = once(s, lambda: pairwise.pair_products(base, A1, sides=("right",), stable_rank=True))[0]
        t_gram = once(s, lambda: svd.gram(W0, dtype=torch.float64))[0]
    finally:
        policy.ROW_BLOCK = orig
    t_gram0 = once(s, lambda: svd.gram(W0, dtype=torch.float64))[0]
    s.row(
        "profile",
        "products with row blocks of 2²⁶ entries",
        "ok",
        ms=t_big * 1e3,
        against=f"2²² (policy) {ms(t_rb)}",
        ratio=t_big / t_rb,
    )
    s.row(
        "profile",
        "base float64 Gram with row blocks of 2²⁶ entries",
        "ok",
        ms=t_gram * 1e3,
        against=f"2²² (policy) {ms(t_gram0)}",
        ratio=t_gram / t_gram0,
    )
    s.write()


def _rsvd_steps(s: Suite, cfg: dict) -> None:
    """One pass, CholeskyQR2 and the final small SVD of a batched randomized SVD, timed apart (torch ops that
    mirror linalg/rsvd.py's steps), on the largest Qwen3-8B stack at k = 64."""
    from weightgeo.linalg.rsvd import default_oversample, randomized_svd_with_info

    a, dev = s.args, s.device
    m, n = cfg["ffn"], cfg["hidden"]
    B = stack_count(s, m, n, a.stack)
    k = 64 if not a.small else 16
    l_ = k + default_oversample(k)
    g = torch.Generator(device=dev).manual_seed(a.seed + 2)
    A = torch.randn(B, m, n, generator=g, device=dev, dtype=torch.bfloat16)
    X = torch.randn(l_, n, generator=g, device=dev, dtype=torch.bfloat16)
    floor = A.numel() * 2 / (a.bandwidth_used * 1e12)
    t_pass = timed(s, lambda: torch.matmul(A, X.mT), reps=3)[0]
    W = torch.randn(B, l_, m, generator=g, device=dev)

    def cholqr2(W):
        for _ in range(2):
            R, _ = torch.linalg.cholesky_ex(W @ W.mT, upper=True)
            eye = torch.eye(l_, device=dev)
            W = torch.linalg.solve_triangular(R, eye, upper=True).mT @ W
        return W

    t_qr = timed(s, lambda: cholqr2(W), reps=3)[0]
    T = torch.randn(B, n, l_, generator=g, device=dev)
    torch.linalg.svd(T[:1, :64], full_matrices=False)  # the solver's set-up, outside the timings
    t_svd = once(s, lambda: torch.linalg.svd(T, full_matrices=False))[0]
    whole = timed(s, lambda: randomized_svd_with_info(A, k, n_iter=2, seed=0, pass_dtype=torch.bfloat16), reps=1)[0]
    tag = f"rsvd steps, {B}×{m}×{n} bf16, l={l_}"
    s.row(
        "profile",
        f"{tag}: one pass A·Xᵀ (of 6)",
        "ok",
        ms=t_pass * 1e3,
        against=f"HBM floor {ms(floor)}",
        ratio=t_pass / floor,
    )
    s.row(
        "profile",
        f"{tag}: CholeskyQR2 of the {l_}×{m} rows (of 5)",
        "ok",
        ms=t_qr * 1e3,
        against=f"whole call {ms(whole)}",
        ratio=t_qr / whole,
    )
    alts = [("default driver", t_svd)]
    if s.cuda:
        for drv in ("gesvd", "gesvda"):
            if s.left() < 3 * max(t for _, t in alts if t == t) + 1:
                alts.append((f"driver {drv}: skipped (time box)", math.nan))
                continue
            try:
                alts.append(
                    (f"driver {drv}", once(s, lambda drv=drv: torch.linalg.svd(T, full_matrices=False, driver=drv))[0])
                )
            except Exception as e:
                alts.append((f"driver {drv}: {type(e).__name__}", math.nan))
    alts.append(("eigh float64 of the l×l Gram", once(s, lambda: torch.linalg.eigh((T.mT @ T).double()))[0]))
    for label, t in alts:
        s.row(
            "profile",
            f"{tag}: final small SVD of ({B}, {n}, {l_}) fp32, {label}",
            "ok",
            ms=t * 1e3,
            against=f"whole call {ms(whole)}",
            ratio=t / whole,
        )
    del A, X, W, T
    s.free()
    s.write()


def _host_alternatives(s: Suite, saved: dict, k: int) -> None:
    if not s.cuda or s.deadline - time.perf_counter() < 6:
        return
    G = saved["G"]
    t_def = once(s, lambda: torch.linalg.eigh(G))[0]
    t_host = once(s, lambda: [t.to(s.device) for t in torch.linalg.eigh(G.cpu())])[0]
    s.row(
        "profile",
        f"eigh float64 {G.shape[-1]}×{G.shape[-1]}: on the host ({torch.get_num_threads()} threads, copies included)",
        "ok",
        ms=t_host * 1e3,
        against=f"GPU {ms(t_def)}",
        ratio=t_host / t_def,
    )
    W0, W1 = saved["W0"], saved["W1"]
    if s.deadline - time.perf_counter() < 4 * t_host + 4:
        return
    ref = pair_kernel(W0, W1, k)[0]
    with eigh_route("cpu", s.device):
        t_alt, rows = once(s, lambda: pair_kernel(W0, W1, k))
    t_dev = once(s, lambda: pair_kernel(W0, W1, k))[0]
    diff = max(abs(x - y) for x, y in zip(rows[0]["principal_angles"], ref["principal_angles"]))
    s.row(
        "profile",
        "q_proj whole kernel with every eigh on the host (--pair-eigh cpu)",
        "ok",
        ms=t_alt * 1e3,
        against=f"default {ms(t_dev)}",
        ratio=t_alt / t_dev,
        accuracy=f"angles differ ≤ {diff:.1e}°, NSS {abs(rows[0]['spectral_drift'] / ref['spectral_drift'] - 1):.1e}",
    )
