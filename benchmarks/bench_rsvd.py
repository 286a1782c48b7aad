"""Randomized SVD: weightgeo vs torch.svd_lowrank vs scikit-learn, timed in one process.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_rsvd.py            # everything
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_rsvd.py --quick    # no Llama-7B shapes
    ... --shapes 896x896,4864x896 --k 16 --spectra power --no-qwen --markdown /tmp/rows.md
    ... --stacks-only                     # update-like stacks (fp32 and bf16) against svd_lowrank, the policy's pass dtype

Needs scikit-learn (``pip install -e .[bench]``). Unset OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE: some
images set them and they change numpy/scipy's OpenBLAS kernels (hence sklearn's timings).

Test matrices are A = U diag(σ) Vᵀ with Haar-random U, V (float32) and a known spectrum, so the exact
top-k is known without an exact SVD: ``power`` σᵢ = i^-0.5; ``rank16`` 16 values from 10 down to
2.14 over a Marchenko–Pastur-like tail starting at 1 (σ16/σ17 = 2.14, flat beyond).

Methods, all at the SAME total sketch width q = k + p (p = 10) and 2 power iterations unless named:
  lowrank   torch.svd_lowrank(A, q=k+10, niter=2)           (global RNG seeded per run)
  wg32      weightgeo.randomized_svd(A, k, n_iter=2, oversample=10)                  fp32 passes
  wgbf16    ... pass_dtype=torch.bfloat16 (A cast to bf16 inside, timed)             bf16 passes
  sk2       sklearn randomized_svd(n_components=k, n_oversamples=10, n_iter=2)
  skauto    sklearn ... n_iter='auto' (7 when k < 0.1·min(m, n), else 4)
  wgacc     weightgeo "accurate": n_iter=5, default oversample p = k (10 ≤ p ≤ 64), fp32 passes
Each is warmed up once, then timed on seeds 0..4 (median time; the minimum is shown in parentheses,
useful on a loaded machine); accuracy numbers are medians over seeds 0..10 (two HMT variants at the
same q and p have the same error distribution, so 5 seeds decide "≤ 1.1×" mostly by luck): max relative error of the top-k σ, largest principal angle (degrees) between the
computed and exact top-k left subspaces, captured energy ‖ÛᵀA‖²_F / Σ_{i≤k} σᵢ².

Targets (issue 3): wg32 ≤ 0.75× lowrank time with σ error ≤ 1.1× lowrank's; wgbf16 ≤ 0.5× lowrank;
wg32 ≤ 0.6× sk2; wgacc ≤ 0.4× skauto at equal or better σ error; all linear weights of
Qwen2.5-0.5B at k=16 in ≤ 1 s. σ errors below 2e-6 (the float32 rounding of A) count as equal.

Update-like stacks (issue 11, ``--stacks``): B same-shape updates ΔW (rank-32 signal with σ decaying 1 → 0.03,
plus 1e-3 noise), stored fp32 and bf16, the way shape groups and trajectories meet them. Per stack: weightgeo's
default (the hardware policy's pass dtype), weightgeo with fp32 passes, and svd_lowrank on the float32 stack,
all at q = k + 10 and 2 power iterations; σ errors against float64 ``svdvals`` of the stored stack. Goal: the
default ≤ 0.75× svd_lowrank at equal accuracy on every CPU kind.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import machine_line, markdown_table, median_time

from weightgeo.linalg.hardware import hardware, pass_dtype
from weightgeo.linalg.rsvd import ACCURATE_N_ITER, randomized_svd

ALL_SHAPES = [(128, 896), (896, 896), (4864, 896), (2048, 1024), (3072, 1024), (4096, 4096), (11008, 4096)]
LLAMA7B = {(4096, 4096), (11008, 4096)}
P = 10  # oversampling shared with svd_lowrank / sklearn for the ratio targets
ACCURATE = dict(n_iter=ACCURATE_N_ITER)  # 5, + default oversample (p = k, 10..64)
ERR_FLOOR = 2e-6  # σ errors below this are float32 rounding of A: equal

QWEN05 = {  # all linear weights of Qwen2.5-0.5B, stacked by shape: (count, m, n)
    "q_proj+o_proj": (48, 896, 896),
    "k_proj+v_proj": (48, 128, 896),
    "gate_proj+up_proj": (48, 4864, 896),
    "down_proj": (24, 896, 4864),
}


# ---- test matrices with a known SVD -----------------------------------------------------------
def spectrum(kind: str, p: int) -> torch.Tensor:
    i = torch.arange(1, p + 1, dtype=torch.float64)
    if kind == "power":
        return i**-0.5
    if kind == "rank16":
        s = torch.sqrt(torch.clamp(1 - (i - 17) / p, min=0.0))
        s[:16] = torch.from_numpy(np.geomspace(10.0, 2.14, 16))
        return s
    raise SystemExit(f"unknown spectrum {kind!r}: use power or rank16")


def make_matrix(m: int, n: int, kind: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    p = min(m, n)
    U = torch.linalg.qr(torch.randn(m, p, generator=g)).Q
    V = torch.linalg.qr(torch.randn(n, p, generator=g)).Q
    s = spectrum(kind, p)
    A = (U * s.float()) @ V.mT
    return A.contiguous(), s, U


def accuracy(Uh, Sh, A: torch.Tensor, s: torch.Tensor, U: torch.Tensor, k: int) -> tuple[float, float, float]:
    Uh = torch.as_tensor(np.ascontiguousarray(Uh) if isinstance(Uh, np.ndarray) else Uh)[:, :k].double()
    Sh = torch.as_tensor(np.asarray(Sh) if isinstance(Sh, np.ndarray) else Sh)[:k].double()
    err = float(((Sh - s[:k]).abs() / s[:k]).max())
    Uk = U[:, :k].double()
    Q = torch.linalg.qr(Uh).Q
    sin = float(torch.linalg.matrix_norm(Q - Uk @ (Uk.mT @ Q), ord=2).clamp(max=1.0))
    angle = math.degrees(math.asin(sin))
    energy = float(torch.linalg.matrix_norm(Q.float().mT @ A).double() ** 2 / (s[:k] ** 2).sum())
    return err, angle, energy


# ---- one case -----------------------------------------------------------------------------------
def methods(k: int, with_sklearn: bool):
    out = {
        "lowrank": lambda A, sd: _lowrank(A, k, sd),
        "wg32": lambda A, sd: randomized_svd(A, k, n_iter=2, oversample=P, seed=sd)[:2],
        "wgbf16": lambda A, sd: randomized_svd(A, k, n_iter=2, oversample=P, seed=sd, pass_dtype=torch.bfloat16)[:2],
        "wgacc": lambda A, sd: randomized_svd(A, k, seed=sd, **ACCURATE)[:2],
    }
    if with_sklearn:
        from sklearn.utils.extmath import randomized_svd as sk_rsvd

        def sk(A, sd, n_iter):
            U, S, _ = sk_rsvd(A.numpy(), k, n_oversamples=P, n_iter=n_iter, random_state=sd)
            return U, S

        out["sk2"] = lambda A, sd: sk(A, sd, 2)
        out["skauto"] = lambda A, sd: sk(A, sd, "auto")
    return out


def _lowrank(A: torch.Tensor, k: int, seed: int):
    torch.manual_seed(seed)
    U, S, _ = torch.svd_lowrank(A, q=k + P, niter=2)
    return U, S


def run_case(A, s, U, k, repeats, acc_seeds, with_sklearn):
    res = {}
    for name, fn in methods(k, with_sklearn).items():
        time.sleep(0.05)  # let the previous method's BLAS worker threads go idle
        t, ts, outs = median_time(lambda sd: fn(A, sd if sd >= 0 else 1000 - sd), repeats=repeats)
        outs += [fn(A, sd) for sd in range(repeats, max(repeats, acc_seeds))]  # untimed, accuracy only
        accs = np.array([accuracy(o[0], o[1], A, s, U, k) for o in outs])
        res[name] = (t, *np.median(accs, axis=0), min(ts))  # median s, σ err, angle, energy, min s
    return res


def fmt_ms(t: float) -> str:
    return f"{t * 1e3:.3g}" if t < 0.1 else f"{t * 1e3:.0f}"


def le_err(a: float, b: float, factor: float) -> bool:
    return a <= max(factor * b, ERR_FLOOR)


# ---- whole model --------------------------------------------------------------------------------
def run_qwen(repeats: int, k: int = 16):
    g = torch.Generator().manual_seed(0)
    bf = {name: (0.02 * torch.randn(c, m, n, generator=g)).to(torch.bfloat16) for name, (c, m, n) in QWEN05.items()}
    f32 = {name: w.float() for name, w in bf.items()}
    n_params = sum(w.numel() for w in bf.values())

    def all_weights(stacks, **kw):
        return lambda sd: [randomized_svd(w, k, seed=sd, **kw)[1] for w in stacks.values()]

    def lowrank(sd):
        torch.manual_seed(sd)
        return [torch.svd_lowrank(w, q=k + P, niter=2)[1] for w in f32.values()]

    fp32 = torch.float32
    policy = str(pass_dtype(torch.bfloat16, "cpu", (896, 896))).replace("torch.", "")
    runs = {
        "weightgeo fp32 passes, fp32 weights (p=10)": all_weights(f32, oversample=P),
        "weightgeo fp32 passes, bf16 weights (p=10)": all_weights(bf, oversample=P, pass_dtype=fp32),
        "weightgeo bf16 passes, bf16 weights (p=10)": all_weights(bf, oversample=P, pass_dtype=torch.bfloat16),
        "weightgeo (q=2, p=k=16), bf16 weights, fp32 passes": all_weights(bf, pass_dtype=fp32),
        "weightgeo (q=2, p=k=16), bf16 weights, bf16 passes": all_weights(bf, pass_dtype=torch.bfloat16),
        f"weightgeo default (q=2, p=k=16), bf16 weights: policy passes ({policy})": all_weights(bf),
        "torch.svd_lowrank(q=26, niter=2), fp32 weights, batched": lowrank,
    }
    rows = []
    for name, fn in runs.items():
        time.sleep(0.05)
        t, ts, _ = median_time(fn, repeats=repeats)
        rows.append((name, t, min(ts), max(ts)))
        print(f"  {name:62s} {t:7.3f} s  (min {min(ts):.3f}, max {max(ts):.3f})", flush=True)
    return n_params, rows


# ---- update-like stacks -------------------------------------------------------------------------
STACKS = [(24, 128, 896), (8, 896, 896), (8, 4864, 896), (4, 896, 4864), (2, 3072, 1024)]


def update_stack(B: int, m: int, n: int, g: torch.Generator) -> torch.Tensor:
    """B updates [m, n]: a rank-32 signal with σ from 1 down to 0.03 (geometric) plus 1e-3 Gaussian noise."""
    r = 32
    U = torch.linalg.qr(torch.randn(B, m, r, generator=g)).Q
    V = torch.linalg.qr(torch.randn(B, n, r, generator=g)).Q
    s = torch.logspace(0, -1.5, r)
    return (U * s) @ V.mT + 1e-3 * torch.randn(B, m, n, generator=g) / math.sqrt(max(m, n))


def run_stacks(repeats: int, ks: list[int]) -> list[list]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for B, m, n in STACKS:
        D = update_stack(B, m, n, g)
        for dtype in (torch.float32, torch.bfloat16):
            A = D.to(dtype)
            A32 = A.float()
            ref = torch.linalg.svdvals(A32.double())
            chosen = str(pass_dtype(dtype, "cpu", (m, n))).replace("torch.", "")
            for k in ks:
                if 2 * (k + P) >= min(m, n):
                    continue

                def err(S):
                    return float(((S.double() - ref[..., :k]).abs() / ref[..., :1]).max())

                runs = {
                    "lowrank": lambda sd: _lowrank(A32, k, sd)[1][..., :k],
                    "default": lambda sd: randomized_svd(A, k, oversample=P, seed=sd)[1],
                    "fp32": lambda sd: randomized_svd(A, k, oversample=P, seed=sd, pass_dtype=torch.float32)[1],
                }
                res = {}
                for name, fn in runs.items():
                    time.sleep(0.05)
                    t, ts, outs = median_time(fn, repeats=repeats)
                    res[name] = (t, min(ts), float(np.median([err(o) for o in outs])))
                lr = res["lowrank"]
                rows.append(
                    [
                        f"{B}×{m}×{n}",
                        str(dtype).replace("torch.", ""),
                        k,
                        chosen,
                        f"{res['default'][0] / lr[0]:.2f} ({res['default'][1] / lr[1]:.2f})",
                        f"{res['fp32'][0] / lr[0]:.2f} ({res['fp32'][1] / lr[1]:.2f})",
                        fmt_ms(lr[0]),
                        f"{lr[2]:.1e}",
                        f"{res['default'][2]:.1e}",
                        f"{res['fp32'][2]:.1e}",
                    ]
                )
                print("  " + " | ".join(str(x) for x in rows[-1]), f"(load {os.getloadavg()[0]:.1f})", flush=True)
    return rows


# ---- the GEMM floor and the chunking (issue 22) -------------------------------------------------
def passes_only(A: torch.Tensor, l: int, n_iter: int, pdt: torch.dtype, cdt: torch.dtype, g: torch.Generator):
    """The 2q+2 products with A that randomized_svd makes, alone (no orthonormalisation, no small SVD), with bases
    of the shapes and dtypes it uses: the first product with the shared Ω, then batched bases. Their time is the
    floor the whole call is measured against. ``A`` is already in the pass dtype (the cast is timed apart)."""
    m, n = A.shape[-2:]
    batch = A.shape[:-2]
    right = m >= n
    basis = torch.randn(l, min(m, n), generator=g, dtype=cdt)
    bases = {
        True: torch.randn(*batch, l, n, generator=g, dtype=cdt).to(pdt),
        False: torch.randn(*batch, l, m, generator=g, dtype=cdt).to(pdt),
    }

    def run() -> None:
        b = basis.to(pdt)
        r = right
        for _ in range(2 * n_iter + 2):
            out = torch.matmul(A, b.mT) if r else torch.matmul(b, A)
            if out.dtype != cdt:
                out.to(cdt)
            r = not r
            b = bases[r]

    return run


def run_floor(repeats: int, ks: list[int], stacks: list[tuple[int, int, int]]) -> list[list]:
    """Per stack (fp32 and bf16 storage) and k: weightgeo's default call, the same call as one batch (no chunking),
    the GEMM floor (its 2q+2 products alone), the cast of the stack to the pass dtype where the policy casts, and
    svd_lowrank at the same q and niter, all in one process, fastest of ``repeats`` each."""
    from weightgeo.linalg import rsvd

    g = torch.Generator().manual_seed(0)
    rows = []
    for B, m, n in stacks:
        D = update_stack(B, m, n, g)
        for dtype in (torch.float32, torch.bfloat16):
            A = D.to(dtype).contiguous()
            A32 = A.float()
            pdt = pass_dtype(dtype, "cpu", (m, n))
            for k in ks:
                l = k + P
                if 2 * l >= min(m, n):
                    continue
                Ap = A if A.dtype == pdt else A.to(pdt)
                floor_fn = passes_only(Ap, l, 2, pdt, torch.float32, g)

                def one_batch(sd):
                    saved = rsvd._CPU_CAST_CHUNK_BYTES
                    rsvd._CPU_CAST_CHUNK_BYTES = 1 << 62
                    try:
                        return randomized_svd(A, k, oversample=P, seed=sd)
                    finally:
                        rsvd._CPU_CAST_CHUNK_BYTES = saved

                runs = {
                    "default": lambda sd: randomized_svd(A, k, oversample=P, seed=sd),
                    "one batch": one_batch,
                    "floor": lambda sd: floor_fn(),
                    "cast": (lambda sd: A.to(pdt)) if A.dtype != pdt else None,
                    "lowrank": lambda sd: _lowrank(A32, k, sd),
                }
                best = {}
                for name, fn in runs.items():
                    if fn is None:
                        best[name] = 0.0
                        continue
                    time.sleep(0.05)
                    _, ts, _ = median_time(fn, repeats=repeats)
                    best[name] = min(ts)
                f = best["floor"] + best["cast"]
                rows.append(
                    [
                        f"{B}×{m}×{n}",
                        str(dtype).replace("torch.", ""),
                        k,
                        str(pdt).replace("torch.", ""),
                        fmt_ms(best["floor"]),
                        fmt_ms(best["cast"]) if best["cast"] else "–",
                        fmt_ms(best["default"]),
                        f"{best['default'] / f:.2f}",
                        f"{best['one batch'] / f:.2f}",
                        f"{best['default'] / best['one batch']:.2f}",
                        f"{best['default'] / best['lowrank']:.2f}",
                    ]
                )
                print("  " + " | ".join(str(x) for x in rows[-1]), f"(load {os.getloadavg()[0]:.1f})", flush=True)
    return rows


FLOOR_HEADER = [
    "stack",
    "stored",
    "k",
    "passes",
    "floor: 2q+2 products (ms)",
    "cast (ms)",
    "default (ms)",
    "default / (floor + cast) (≤ 1.10)",
    "one batch / (floor + cast)",
    "default / one batch (≤ 1.05)",
    "default / svd_lowrank",
]


# ---- main ---------------------------------------------------------------------------------------
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="skip the Llama-7B shapes 4096x4096 and 11008x4096")
    ap.add_argument("--shapes", help="comma-separated MxN list (default: all seven)")
    ap.add_argument("--k", default="16,64", help="comma-separated k values (default 16,64)")
    ap.add_argument("--spectra", default="power,rank16", help="power,rank16")
    ap.add_argument("--repeats", type=int, default=5, help="timed seeded runs per method (median reported)")
    ap.add_argument(
        "--acc-seeds",
        type=int,
        default=11,
        help="seeds for the accuracy medians (the timed runs plus untimed ones; default 11)",
    )
    ap.add_argument("--no-sklearn", action="store_true")
    ap.add_argument("--no-qwen", action="store_true", help="skip the all-linear-weights-of-Qwen2.5-0.5B run")
    ap.add_argument("--qwen-only", action="store_true")
    ap.add_argument("--stacks", action="store_true", help="also time update-like fp32/bf16 stacks (issue 11)")
    ap.add_argument("--stacks-only", action="store_true", help="only the update-like stacks")
    ap.add_argument("--floor", action="store_true", help="only the GEMM floor and chunking table (issue 22)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--markdown", help="also write the markdown rows to this file")
    a = ap.parse_args(argv)

    if a.shapes:
        shapes = [tuple(int(x) for x in s.lower().split("x")) for s in a.shapes.split(",")]
    else:
        shapes = [s for s in ALL_SHAPES if not (a.quick and s in LLAMA7B)]
    ks = [int(x) for x in a.k.split(",")]
    spectra = a.spectra.split(",")
    with_sk = not a.no_sklearn
    if with_sk:
        try:
            import sklearn  # noqa: F401
        except ImportError:
            print("scikit-learn not installed (pip install -e .[bench]); running without it", file=sys.stderr)
            with_sk = False

    envs = [v for v in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if v in os.environ]
    if envs:
        print(f"warning: {', '.join(envs)} set; run with env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE", file=sys.stderr)
    command = "env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_rsvd.py " + " ".join(
        shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:])
    )
    head = [
        f"- machine: {machine_line()}",
        f"- command: `{command.strip()}`",
        f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; times: medians of {a.repeats} seeded runs after a "
        f"warm-up; accuracy: medians over {max(a.repeats, a.acc_seeds)} seeds",
    ]
    print("\n".join(head), flush=True)

    if a.threads:
        torch.set_num_threads(a.threads)
        head[0] = f"- machine: {machine_line()}"
    if a.floor:
        hw = hardware("cpu")
        print(f"GEMM floor and chunking ({hw.kind}, capability {hw.capability}):", flush=True)
        frows = run_floor(a.repeats, ks, STACKS)
        text = "\n".join(
            [
                "",
                *head,
                "",
                f"randomized_svd against its own GEMM floor on update-like stacks ({hw.kind}, torch capability "
                f"{hw.capability}), q = k + {P}, 2 power iterations, fastest of {a.repeats}; the floor is the 2q+2 "
                "products alone in the policy's pass dtype, plus the cast of the stack where the policy casts:",
                "",
                markdown_table(FLOOR_HEADER, frows),
                "",
                "load average at the end: {:.1f}/{:.1f}/{:.1f}".format(*os.getloadavg()),
            ]
        )
        print(text)
        if a.markdown:
            Path(a.markdown).write_text(text + "\n")
        return

    case_rows, ratio_rows, acc_rows = [], [], []
    names = ["lowrank", "wg32", "wgbf16", "wgacc"] + (["sk2", "skauto"] if with_sk else [])
    tally = {"T1": [0, 0], "T2": [0, 0], "T3": [0, 0], "T4": [0, 0]}
    for m, n in [] if a.qwen_only or a.stacks_only else shapes:
        for kind in spectra:
            A, s, U = make_matrix(m, n, kind)
            for k in ks:
                if k + P > min(m, n):
                    continue
                r = run_case(A, s, U, k, a.repeats, a.acc_seeds, with_sk)
                exact = 2 * (k + P) >= min(m, n)
                label = f"{m}×{n}" + (" (exact)" if exact else "")
                case_rows.append([label, kind, k] + [f"{fmt_ms(r[x][0])} ({fmt_ms(r[x][4])})" for x in names])
                acc_rows.append([f"{m}×{n}", kind, k] + ["{:.1e} / {:.1f} / {:.4f}".format(*r[x][1:4]) for x in names])
                lr = r["lowrank"]

                def ratio(x, y):  # median ratio (min ratio)
                    return r[x][0] / r[y][0], f"{r[x][0] / r[y][0]:.2f} ({r[x][4] / r[y][4]:.2f})"

                t1, s1 = ratio("wg32", "lowrank")
                e1 = le_err(r["wg32"][1], lr[1], 1.1)
                t2, s2 = ratio("wgbf16", "lowrank")
                row = [f"{m}×{n}", kind, k, s1, "yes" if e1 else "no", s2]
                ok1, ok2 = t1 <= 0.75 and e1, t2 <= 0.5
                tally["T1"][0] += ok1
                tally["T2"][0] += ok2
                tally["T1"][1] += 1
                tally["T2"][1] += 1
                if with_sk:
                    t3, s3 = ratio("wg32", "sk2")
                    _, s3b = ratio("wgbf16", "sk2")
                    t4, s4 = ratio("wgacc", "skauto")
                    e4 = le_err(r["wgacc"][1], r["skauto"][1], 1.0)
                    ok3, ok4 = t3 <= 0.6, t4 <= 0.4 and e4
                    tally["T3"][0] += ok3
                    tally["T4"][0] += ok4
                    tally["T3"][1] += 1
                    tally["T4"][1] += 1
                    row += [s3, s3b, s4, "yes" if e4 else "no"]
                row.append(
                    " ".join(
                        t
                        for t, ok in [("T1", ok1), ("T2", ok2)] + ([("T3", ok3), ("T4", ok4)] if with_sk else [])
                        if not ok
                    )
                    or "all met"
                )
                ratio_rows.append(row)
                print(
                    f"{m}×{n} {kind} k={k}: "
                    + "  ".join(
                        f"{x} {fmt_ms(r[x][0])} ms ({r[x][1]:.1e}, {r[x][2]:.1f}°, {r[x][3]:.4f})" for x in names
                    ),
                    flush=True,
                )

    out = ["", *head, ""]
    if case_rows:
        out += [
            "Time, ms: median (min) of the seeded runs:",
            "",
            markdown_table(["m×n", "spectrum", "k"] + names, case_rows),
            "",
        ]
        out += [
            "Accuracy (max rel σ error / largest angle ° / captured energy):",
            "",
            markdown_table(["m×n", "spectrum", "k"] + names, acc_rows),
            "",
        ]
        rh = ["m×n", "spectrum", "k", "wg32/lowrank (≤0.75)", "σ err ≤1.1×", "wgbf16/lowrank (≤0.5)"]
        if with_sk:
            rh += ["wg32/sk2 (≤0.6)", "wgbf16/sk2", "wgacc/skauto (≤0.4)", "σ err ≤ skauto"]
        out += [
            "Ratios of medians (ratios of minima) vs targets; a target counts as met on the medians:",
            "",
            markdown_table(rh + ["missed"], ratio_rows),
            "",
        ]
        out += ["Targets met: " + ", ".join(f"{t} {a_}/{b}" for t, (a_, b) in tally.items() if b), ""]
    if a.stacks or a.stacks_only:
        hw = hardware("cpu")
        print(f"Update-like stacks ({hw.kind}, capability {hw.capability}):", flush=True)
        srows = run_stacks(a.repeats, ks)
        out += [
            f"Update-like stacks on this CPU ({hw.kind}, torch capability {hw.capability}): weightgeo's default "
            f"(the policy's pass dtype) and fp32 passes against svd_lowrank on the float32 stack, q = k + 10, "
            f"niter 2; ratios of medians (of minima); σ error = max |σ̂ − σ| / σ₁, median over seeds:",
            "",
            markdown_table(
                [
                    "stack",
                    "stored",
                    "k",
                    "policy passes",
                    "default/lowrank",
                    "fp32/lowrank",
                    "lowrank ms",
                    "lowrank σ err",
                    "default σ err",
                    "fp32 σ err",
                ],
                srows,
            ),
            "",
        ]
    if not a.no_qwen and not a.stacks_only:
        print("All linear weights of Qwen2.5-0.5B at k=16 (stacked by shape):", flush=True)
        n_params, qrows = run_qwen(a.repeats)
        out += [
            f"All linear weights of Qwen2.5-0.5B at k=16 ({n_params / 1e6:.0f} M params in 4 same-shape stacks; target ≤ 1 s):",
            "",
            markdown_table(
                ["method", "median s", "min s", "max s"],
                [[nm, f"{t:.3f}", f"{lo:.3f}", f"{hi:.3f}"] for nm, t, lo, hi in qrows],
            ),
            "",
        ]
    out.append("load average at the end: {:.1f}/{:.1f}/{:.1f}".format(*os.getloadavg()))
    text = "\n".join(out)
    print(text)
    if a.markdown:
        Path(a.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
