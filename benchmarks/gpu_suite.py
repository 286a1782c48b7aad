"""GPU suite (issue 14): the CUDA tests, batched randomized SVD against svd_lowrank and the HBM floor, the full pair
suite on Qwen3-8B-shaped layers against the float64 CPU route, peak GPU memory, and a per-step profile, in one
command of at most ~8 minutes on one H100/H200-class GPU. It prints one markdown table and writes every figure
to ``--out`` (JSON, rewritten after each part, so a run cut short still leaves what it measured).

On the GPU machine, from the repository root, with the python that holds a CUDA torch (nothing is installed:
this checkout's ``src/`` goes first on ``sys.path``, here and in the subprocesses; weightgeo's own needs are
torch, numpy, safetensors, huggingface-hub, einops and tqdm, plus pytest and scipy for the tests part)::

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_suite.py --out $OUT/gpu.json 2>&1 | tee $OUT/gpu.log

(``python3 -m pip install -e . --no-deps --no-build-isolation`` installs weightgeo there instead, if wanted; the
build isolation would try to download setuptools.) Give the command ~9 minutes (``--budget`` is 450 s of
measuring plus start-up). A short re-run of one part: ``--parts pair --budget 150``.

Dry run on any machine (same code paths, tiny shapes, well under a minute)::

    python benchmarks/gpu_suite.py --device cpu --small --out /tmp/gpu.json

Parts (``--parts``, each with its own share of ``--budget``; a part that runs out skips what is left and says so,
time it does not use goes to the next; a part that fails is reported and the suite goes on):

* ``tests``: every test marked ``cuda`` (``pytest -m cuda``; tests/conftest.py adds the marker to any test whose
  ``skipif`` reason mentions CUDA), in a subprocess, pass/fail per test.
* ``rsvd``: ``weightgeo.randomized_svd`` (bf16 passes on the bf16 stack, fp32 passes on the fp32 stack) against
  ``torch.svd_lowrank`` (fp32 stack; a bf16 stack is tried once and its error recorded) at the same q = 2 power
  iterations and the same sketch width l = k + p (p = weightgeo's default), on stacks of 36 Qwen3-8B-shaped
  matrices (4096², 1024×4096, 12288×4096, 4096×12288) at k = 16 and 64. Times are CUDA-event medians after a
  warm-up. The matrices have a planted spectrum (σᵢ = i^-0.5, Haar factors; each stack entry is a signed row
  and column permutation of one matrix, so every entry has exactly that spectrum), so the σ error of the fp32
  stack is measured against the exact values for free; the bf16 stack's (its rounding moves σ) against
  float64 ``eigvalsh`` of the Gram of its first ``--ref-entries`` entries. The floor is the HBM floor
  ``(2q+2)·bytes(A)/bandwidth`` with the bandwidth stated in the header (``--bandwidth``, default by device
  name from the datasheet; the measured device-to-device copy rate is printed beside it); the roofline
  ``max(floor, flops/measured GEMM rate)`` is given too, since fp32 passes at l = 128 are compute-bound.
* ``pair``: the full pair suite (all pair metrics, k = 512, side right: the engine's kernel
  ``batched_pair_metrics``) on one synthetic Qwen3-8B layer (q/o 4096², k/v 1024×4096, gate/up 12288×4096, down
  4096×12288, bf16, σᵢ ∝ i^-0.5, ΔW dense 1e-3 of the weight RMS) and on the 151936×4096 vocabulary matrices
  (Gaussian: only their time is measured): the time on the device per shape for one layer and per member of a
  batch of ``--batch`` layers, against the float64 CPU route (``torch.linalg.svd`` in float64 of both sides, tall
  orientation, angles by SciPy) on the same layer, with the agreement (angles within 2 % + 0.005°, NSS within
  2 %), and the projected whole-model time (36 layers + embed_tokens + lm_head, which Qwen3-8B does not tie). On
  CUDA the float64 route runs from the start in a background process on ``--ref-threads`` CPU cores (GPU times
  are CUDA-event times; the table says it ran alongside); each shape it cannot finish by its deadline is skipped
  and listed.
* ``profile``: where a pair's time goes on the device (base Gram, base eigh, products, F and the pair eigh,
  spectrum, angles, stable rank, localization), the alternatives that are cheap to switch (eigh through MAGMA,
  on the host's cores, in float32 for speed only; batched eigh; the sines by another SVD driver or eigvalsh;
  larger row blocks), and the randomized SVD's steps (one pass, CholeskyQR2, the small SVD by driver). Nothing
  here changes a library default; ``--pair-eigh cpu|magma`` runs the pair part with that eigh route.
* ``engine``: ``weightgeo.compare(..., device=...)`` end to end on two safetensors checkpoints of
  ``--engine-layers`` such layers (reading, pinned shape groups, non-blocking copies, the elementwise pass).

Peak GPU memory (``torch.cuda.max_memory_allocated``) is recorded per part and per case.

This file holds the parts tests, rsvd, pair and engine and the command line; beside it: ``_gpu_record.py`` (the
table, the JSON record, the time box, CUDA-event timing, the measured ceilings), ``_gpu_cases.py`` (the shapes
and synthetic matrices), ``_f64_route.py`` (the float64 CPU route and its background worker) and
``_gpu_profile.py`` (the profile part). ``tests/test_gpu_suite.py`` dry-runs every part.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
# Measure this checkout, whatever else is installed (the GPU machine has no weightgeo).
sys.path.insert(0, str(BENCH.parent / "src"))
sys.path.insert(0, str(BENCH))

import torch
from _f64_route import References, route_flops
from _gpu_cases import (
    QWEN3_8B,
    SMALL,
    SMALL_RSVD,
    f64_sigma,
    layer_shapes,
    make_pair,
    pair_kernel,
    planted_stack,
    sigma_error,
    stack_count,
)
from _gpu_profile import eigh_route, part_profile
from _gpu_record import (
    ROOT,
    SHARES,
    Suite,
    bandwidth_used,
    ceilings,
    child_env,
    environment,
    ms,
    once,
    timed,
)

os.environ["WEIGHTGEO_CACHE"] = "off"  # time the computation, not the result cache (bench_resume.py times that)

PARTS = ("tests", "rsvd", "pair", "profile", "engine")


# ----------------------------------------------------------------------------------------------------------------
# part a: the CUDA tests


def cuda_test_files() -> list[str]:
    """The test files that mention CUDA: collecting only them keeps the part short and out of reach of unrelated
    modules' imports (the GPU machine has its own transformers, no deepspeed); within them the ``cuda`` marker
    (written, or added by tests/conftest.py from a ``skipif`` reason) selects."""
    return sorted(
        str(f.relative_to(ROOT))
        for f in (ROOT / "tests").rglob("test_*.py")
        if "cuda" in f.read_text(errors="replace").lower()
    )


def part_tests(s: Suite) -> None:
    paths = cuda_test_files() if s.args.tests == "auto" else s.args.tests.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="wg_gpu_tests_"))
    xml = tmp / "junit.xml"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "cuda",
        "-v",
        "-p",
        "no:cacheprovider",
        "--continue-on-collection-errors",
        f"--junitxml={xml}",
        *paths,
    ]
    budget = max(5.0, s.left())
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=budget)
        out, rc, killed = p.stdout + p.stderr, p.returncode, False
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc, killed = None, True
    wall = time.perf_counter() - t
    results = _junit(xml) if xml.exists() else _verbose_lines(out)
    s.record["parts"]["tests"]["command"] = " ".join(cmd)
    s.record["parts"]["tests"]["returncode"] = rc
    s.record["parts"]["tests"]["output_tail"] = out[-4000:]
    for r in results:
        s.row("tests", r["id"], r["outcome"], ms=r.get("seconds", 0.0) * 1e3, note=r.get("message", "")[:160])
    n_fail = sum(r["outcome"] in ("failed", "error") for r in results)
    summary = f"{len(results)} selected, {n_fail} failed, pytest rc {rc}, {wall:.0f} s wall"
    if killed:
        summary += f"; killed at the part's time box ({budget:.0f} s): tests not listed did not run"
    if not results:
        summary += "; no test reported: output_tail in the JSON"
    s.row(
        "tests",
        "pytest -m cuda",
        "FAIL" if n_fail or killed or rc not in (0, 5) or not results else "ok",
        ms=wall * 1e3,
        note=summary,
    )
    shutil.rmtree(tmp, ignore_errors=True)


def _junit(path: Path) -> list[dict[str, Any]]:
    out = []
    for case in ET.parse(path).getroot().iter("testcase"):
        cls, name = case.get("classname", ""), case.get("name", "")
        ident = (cls.replace(".", "/") + ".py::" + name) if cls else name
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = (
                    (child.get("message") or child.text or "").strip().splitlines()[0]
                    if (child.get("message") or child.text)
                    else ""
                )
                break
        out.append({"id": ident, "outcome": outcome, "seconds": float(case.get("time") or 0.0), "message": message})
    return out


def _verbose_lines(text: str) -> list[dict[str, Any]]:
    """``pytest -v`` result lines, for a run killed before it wrote its JUnit file."""
    out = []
    for line in text.splitlines():
        for word in (" PASSED", " FAILED", " SKIPPED", " ERROR"):
            if line.startswith("tests/") and word in line:
                out.append({"id": line.split(word)[0], "outcome": word.strip().lower(), "seconds": 0.0})
                break
    return out


# ----------------------------------------------------------------------------------------------------------------
# part b: randomized SVD against svd_lowrank and the HBM floor


def part_rsvd(s: Suite, ceil: dict[str, float], bw_tbs: float, bw_text: str) -> None:
    from weightgeo.linalg.hardware import pass_dtype
    from weightgeo.linalg.rsvd import default_oversample, randomized_svd_with_info

    a = s.args
    c = SMALL_RSVD if a.small else QWEN3_8B
    h, kv, f = c["hidden"], c["kv"], c["ffn"]
    shapes = [("q/o", h, h), ("k/v", kv, h), ("gate/up", f, h), ("down", h, f)]
    shapes.sort(key=lambda t: t[1] * t[2])
    ks = [int(x) for x in a.rsvd_k.split(",")]
    q = 2
    rec = s.record["parts"]["rsvd"]
    rec.update(bandwidth=bw_text, n_iter=q, cases=[])
    tried_bf16_lowrank = False
    todo = len(shapes) * len(ks) * 3 + 1  # cases left, for sharing the part's time among them
    for name, m, n in shapes:
        B = stack_count(s, m, n, a.stack)
        if s.left() < 2:
            s.skip("rsvd", f"{B}×{m}×{n}", "time box")
            continue
        s.reset_peak()
        stack32, planted = planted_stack(s, B, m, n, seed=a.seed)
        stack16 = stack32.to(torch.bfloat16)
        R = min(a.ref_entries, B)
        ref16 = torch.stack([f64_sigma(stack16[i]) for i in range(R)])
        ref32 = f64_sigma(stack32[0])[None]  # only to show how exact the planted values are
        planted_dev = float(((ref32 - planted).abs() / planted)[:, : max(ks)].max())
        storage_dev = float(((ref16 - planted).abs() / planted)[:, : max(ks)].max())
        s.sync()
        base_alloc = torch.cuda.memory_allocated(s.device) if s.cuda else 0
        for k in ks:
            p = default_oversample(k)
            l_ = k + p
            flops = (2 * q + 2) * 2 * B * m * n * l_
            cases = [
                ("weightgeo bf16 passes", stack16, torch.bfloat16),
                ("weightgeo fp32 passes", stack32, torch.float32),
                ("svd_lowrank", stack32, None),
            ]
            if not tried_bf16_lowrank:
                cases.append(("svd_lowrank on the bf16 stack", stack16, None))
                tried_bf16_lowrank = True
            t_lowrank = None
            results = {}
            for label, A, pdt in cases:
                case = f"{B}×{m}×{n} ({name}) k={k} l={l_}: {label}"
                if pdt is None:
                    fn = lambda A=A: lowrank(A, l_, q, a.seed)
                else:
                    fn = lambda A=A, pdt=pdt: randomized_svd_with_info(
                        A, k, n_iter=q, oversample=p, seed=a.seed, pass_dtype=pdt
                    )
                bytes_a = A.numel() * A.element_size()
                floor = (2 * q + 2) * bytes_a / (bw_tbs * 1e12)
                rate = ceil["gemm_bf16_TFLOPs" if A.dtype == torch.bfloat16 else "gemm_fp32_TFLOPs"] * 1e12
                roof = max(floor, flops / rate)
                try:
                    s.reset_peak()
                    todo -= 1
                    t_first, out = once(s, fn)
                    share = s.left() / max(1, todo + 1)
                    reps = max(1, min(a.reps, int(share / max(t_first, 1e-4)) - 1))
                    if s.left() < 2 * t_first:
                        s.skip("rsvd", case, f"time box (one call took {ms(t_first)})")
                        continue
                    t, times, out = timed(s, fn, reps=reps, warmup=0)
                except Exception as e:
                    s.free()
                    s.row(
                        "rsvd",
                        case,
                        "unsupported" if "BFloat16" in str(e) or "dtype" in str(e) else "error",
                        note=f"{type(e).__name__}: {str(e).splitlines()[0][:140]}",
                    )
                    continue
                S = out[1] if pdt is None else out.S
                ref = ref16 if A.dtype == torch.bfloat16 else None
                err_planted = sigma_error(S, planted, k)
                err_ref = sigma_error(S[:R], ref, k) if ref is not None else err_planted
                acc = f"σ err {err_ref:.1e} (f64 of stored)" + (
                    f", {err_planted:.1e} (planted)" if ref is not None else " (planted = exact)"
                )
                peak = s.peak_gib()
                extra = (peak - base_alloc / 2**30) if peak is not None else None
                note = f"× roofline {t / roof:.2f}"
                if pdt is None:
                    t_lowrank = t
                else:
                    if pdt == torch.bfloat16:
                        note += f"; the policy's passes for this stack: {pass_dtype(torch.bfloat16, s.device, (m, n))}"
                    if out.method != "randomized":
                        note += f"; method {out.method}"
                results[label] = (
                    t,
                    s.row(
                        "rsvd",
                        case,
                        "ok",
                        ms=t * 1e3,
                        against=f"HBM floor {ms(floor)}",
                        ratio=t / floor,
                        accuracy=acc,
                        peak=peak,
                        note=note,
                        seconds=times,
                        floor_s=floor,
                        roofline_s=roof,
                        sigma_err_ref=err_ref,
                        sigma_err_planted=err_planted,
                        working_gib=extra,
                        B=B,
                        m=m,
                        n=n,
                        k=k,
                        l=l_,
                        reps=len(times),
                    ),
                )
            if t_lowrank:
                for label in ("weightgeo bf16 passes", "weightgeo fp32 passes"):
                    if label in results:
                        t, r = results[label]
                        r["note"] += f"; / svd_lowrank {t / t_lowrank:.2f}"
                        r["vs_lowrank"] = t / t_lowrank
        rec["cases"].append(dict(shape=(B, m, n), planted_vs_f64_fp32=planted_dev, planted_vs_f64_bf16=storage_dev))
        del stack32, stack16, ref16, ref32
        s.free()
        s.write()


def lowrank(A: torch.Tensor, l_: int, q: int, seed: int):
    """torch.svd_lowrank draws from the global RNG: seed it inside a fork, so the caller's state is untouched."""
    devices = [A.device.index or 0] if A.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return torch.svd_lowrank(A, q=l_, niter=q)


# ----------------------------------------------------------------------------------------------------------------
# part c: the pair suite against the float64 CPU route, and the whole-model projection


def part_pair(s: Suite, pairs: dict, refs: References, cfg: dict) -> dict[str, Any]:
    a = s.args
    rec = s.record["parts"]["pair"]
    rec.update(k=a.pair_k, eigh_route=a.pair_eigh, rel=a.rel, ref_mode=refs.mode, ref_threads=refs.threads, shapes={})
    dev = s.device
    results: dict[str, Any] = {}
    shapes = {nm: (m, n, count) for nm, m, n, count in layer_shapes(cfg)}
    shapes["embed_tokens+lm_head"] = (cfg["vocab"], cfg["hidden"], 2)
    gen = torch.Generator(device=dev).manual_seed(a.seed + 1)
    with eigh_route(a.pair_eigh, dev):
        for i_shape, (nm, (m, n, count)) in enumerate(shapes.items()):
            if s.left() < 3:
                s.skip("pair", f"{nm} {m}×{n}", "time box")
                continue
            try:
                if nm in pairs:
                    W0, W1 = (w.to(dev) for w in pairs[nm])
                else:
                    if s.cuda and torch.cuda.mem_get_info(dev)[0] < 8 * m * n * 2 + (4 << 30):
                        s.skip("pair", f"{nm} {m}×{n}", "not enough GPU memory")
                        continue
                    W0, W1 = make_pair(m, n, a.rel, gen, dev, planted=False)
                s.reset_peak()
                t1, r1 = once(s, lambda: pair_kernel(W0[None], W1[None], a.pair_k))  # warm-up (and estimate)
                share = s.left() / (len(shapes) - i_shape)  # this shape's share of what is left
                Bt = pair_batch(s, m, n, a.batch)
                reps = max(1, min(a.pair_reps, int(share / max(t1, 1e-3)) - 1 - Bt))
                t, times, rows = timed(s, lambda: pair_kernel(W0[None], W1[None], a.pair_k), reps=reps, warmup=0)
                peak1 = s.peak_gib()
                res = {"m": m, "n": n, "count": count, "one_s": t, "times": times, "row": rows[0], "peak1": peak1}
                if Bt > 1 and share - t1 * (1 + reps) > 1.2 * t * Bt:
                    s.reset_peak()
                    S0, S1 = W0[None].repeat(Bt, 1, 1), W1[None].repeat(Bt, 1, 1)
                    tb, _, _ = timed(s, lambda: pair_kernel(S0, S1, a.pair_k), reps=1, warmup=0)
                    res.update(batch=Bt, member_s=tb / Bt, peakB=s.peak_gib())
                    del S0, S1
                results[nm] = res
                row = rows[0]
                note = f"k_eff {row['k_effective']:.0f}, gap {row['spectral_gap']:.4f}, {len(times)} reps; " + (
                    f"B={Bt}: {ms(res['member_s'])}/member" + (f", peak {res['peakB']:.2f} GiB" if s.cuda else "")
                    if "member_s" in res
                    else "no batched run (time box or size)"
                )
                note += f"; {count} per {'layer' if nm in pairs else 'model'}"
                s.row("pair", f"{nm} {m}×{n}, one matrix", "ok", ms=t * 1e3, peak=peak1, note=note)
                rec["shapes"][nm] = {k_: v for k_, v in res.items() if k_ != "row"} | {
                    "row": {k_: v for k_, v in row.items() if k_ != "principal_angles"}
                }
                del W0, W1
                s.free()
            except Exception as e:
                s.free()
                s.row("pair", f"{nm} {m}×{n}", "error", note=f"{type(e).__name__}: {str(e).splitlines()[0][:150]}")
                rec.setdefault("errors", []).append(traceback.format_exc())
            s.write()
    refs.run_inline(max(1.0, s.left()))
    return results


def pair_agreement(s: Suite, results: dict, refs: References, cfg: dict) -> None:
    """Rows of the float64 route per layer shape (time, speed-up, agreement), and the whole-model projection."""
    rec = s.record["parts"]["pair"]
    rate = refs.rate()
    f64_layer, f64_complete = 0.0, True
    for nm, m, n, count in layer_shapes(cfg):
        res = results.get(nm)
        ref, why = refs.result(nm)
        if ref is None:
            f64_complete = False
            est = f"; estimate {route_flops(m, n) / rate:.0f} s" if rate else ""
            s.skip("pair", f"{nm} {m}×{n}: float64 CPU route", why + est)
            continue
        f64_layer += ref["seconds"] * count
        if res is None:
            s.row(
                "pair",
                f"{nm} {m}×{n}: float64 CPU route",
                "ok",
                ms=ref["seconds"] * 1e3,
                note="no device result to compare",
            )
            continue
        row = res["row"]
        if row.get("principal_angles") is None:  # k reaches the smaller side: no top-k subspace to agree on
            s.skip(
                "pair", f"{nm} {m}×{n}: agreement with the float64 CPU route", row["not_measurable"]["principal_angles"]
            )
            continue
        dev_ang = torch.tensor(row["principal_angles"], dtype=torch.float64)
        ang = ref["angles"]
        kk = min(len(dev_ang), len(ang))
        err = (dev_ang[:kk] - ang[:kk]).abs()
        tol = 0.02 * ang[:kk].abs() + 0.005
        worst = float((err / tol).max()) if kk else math.nan
        nss_err = abs(row["spectral_drift"] / ref["nss"] - 1) if ref["nss"] else math.nan
        ok = kk == len(ang) and worst <= 1 and nss_err <= 0.02
        s.row(
            "pair",
            f"{nm} {m}×{n}: agreement with the float64 CPU route",
            "pass" if ok else "FAIL",
            ms=res["one_s"] * 1e3,
            against=f"float64 route {ref['seconds']:.3g} s ({ref['threads']} threads)",
            ratio=ref["seconds"] / res["one_s"],
            accuracy=f"angles ≤ {worst:.1e} of tol (max {float(err.max()) if kk else math.nan:.1e}°), "
            f"NSS {nss_err:.1e} rel",
            note=f"k {kk} of {len(ang)}; NSS {ref['nss']:.3e}; ratio = speed-up"
            + ("; ran alongside the device parts" if refs.mode == "background" else ""),
            worst_angle_over_tol=worst,
            nss_rel_err=nss_err,
            f64_s=ref["seconds"],
        )
        rec["shapes"].setdefault(nm, {})["f64"] = {k_: v for k_, v in ref.items() if k_ != "angles"}
    # the projection
    per_layer = [
        (results[nm]["one_s"], results[nm].get("member_s", results[nm]["one_s"]), count)
        for nm, _, _, count in layer_shapes(cfg)
        if nm in results
    ]
    if len(per_layer) < len(layer_shapes(cfg)):
        s.skip("pair", "whole model projection", "a layer shape was not measured")
        return
    L = cfg["layers"]
    one = sum(t * c for t, _, c in per_layer)
    batched = sum(t * c for _, t, c in per_layer)
    emb = results.get("embed_tokens+lm_head")
    emb_s = 2 * emb["one_s"] if emb else None
    total1 = L * one + (emb_s or 0.0)
    # As the engine runs it: same-shape layers batched on CUDA (budget a quarter of free memory), one at a time
    # on CPU (64 MiB groups hold one such matrix).
    totalB = L * (batched if s.cuda else one) + (emb_s or 0.0)
    against = ""
    ratio = None
    if f64_complete:
        emb_f64 = (2 * route_flops(cfg["vocab"], cfg["hidden"]) / rate) if rate else 0.0
        f64_total = L * f64_layer + emb_f64
        against = f"float64 route {f64_total / 60:.1f} min (36 × measured layer + vocab estimated)"
        ratio = f64_total / totalB
    label = "Qwen3-8B" if not s.args.small else "small model"
    s.row(
        "pair",
        f"{label} whole model projected ({L} layers + 2 vocab matrices)",
        "ok",
        ms=totalB * 1e3,
        against=against,
        ratio=ratio,
        note=(
            f"{L} × {batched if s.cuda else one:.2f} s/layer ({'batched members' if s.cuda else 'one at a time'})"
            f" + vocab {emb_s or 0:.2f} s; {L} × one-layer runs: {total1:.0f} s, × batched members: "
            f"{L * batched + (emb_s or 0.0):.0f} s; target ≤ 300 s: {'met' if totalB <= 300 else 'missed'}"
            + ("" if emb else "; vocab matrices not measured")
            + "; reading and the host-side elementwise pass not included (engine part)"
        ),
        projected_s=totalB,
        projected_one_layer_s=total1,
    )
    rec["projection"] = {
        "per_layer_s": one,
        "per_layer_batched_s": batched,
        "vocab_s": emb_s,
        "total_s": totalB,
        "total_one_layer_s": total1,
    }


def pair_batch(s: Suite, m: int, n: int, want: int) -> int:
    if want <= 1:
        return 1
    if not s.cuda:
        return want if m * n <= (1 << 20) else 1
    from weightgeo.engine.plan import small_problem_bytes

    free, _ = torch.cuda.mem_get_info(s.device)
    per = 2 * m * n * 2 + 2 * small_problem_bytes(m, n)  # inputs + twice the engine's estimate of the rest
    return max(1, min(want, int(0.5 * free / per)))


# ----------------------------------------------------------------------------------------------------------------
# engine: compare() end to end


def part_engine(s: Suite, pairs: dict, cfg: dict, results: dict) -> None:
    from safetensors.torch import save_file

    import weightgeo
    from weightgeo.options import default_batch_bytes

    a = s.args
    L = a.engine_layers
    # compare() cannot be stopped half-way: size it from the pair part's one-layer kernel times (plus reading).
    per_layer = sum(r["one_s"] * r["count"] for nm, r in results.items() if nm in pairs)
    if per_layer and len(results) >= len(pairs):
        L = min(L, int((s.left() - 10) / (1.5 * per_layer + 2)))
        if L < 1:
            s.skip(
                "engine",
                "weightgeo.compare",
                f"time box: one layer's kernels take {per_layer:.1f} s, {s.left():.0f} s left",
            )
            return
    d = Path(tempfile.mkdtemp(prefix="wg_gpu_engine_"))
    try:
        names = {
            "q_proj": "self_attn",
            "k_proj": "self_attn",
            "v_proj": "self_attn",
            "o_proj": "self_attn",
            "gate_proj": "mlp",
            "up_proj": "mlp",
            "down_proj": "mlp",
        }
        same = {"v_proj": "k_proj", "o_proj": "q_proj", "up_proj": "gate_proj"}
        base, ft = {}, {}
        for i in range(L):
            for nm, kind in names.items():
                w0, w1 = pairs[same.get(nm, nm)]
                key = f"model.layers.{i}.{kind}.{nm}.weight"
                base[key], ft[key] = w0.clone(), w1.clone()  # one storage per entry (safetensors refuses shared)
            norm = torch.ones(cfg["hidden"], dtype=torch.bfloat16)
            base[f"model.layers.{i}.input_layernorm.weight"] = norm
            ft[f"model.layers.{i}.input_layernorm.weight"] = norm * 1.01
        t_w = time.perf_counter()
        save_file(base, str(d / "base.safetensors"))
        save_file(ft, str(d / "ft.safetensors"))
        t_w = time.perf_counter() - t_w
        nbytes = 2 * sum(v.numel() * v.element_size() for v in base.values())
        del base, ft
        if s.left() < 5:
            s.skip("engine", f"compare, {L} layers", "time box")
            return
        s.reset_peak()
        t, rep = once(
            s,
            lambda: weightgeo.compare(
                str(d / "base.safetensors"), str(d / "ft.safetensors"), device=s.device, progress=False, k=a.pair_k
            ),
        )
        s.row(
            "engine",
            f"weightgeo.compare, {L} layers × 7 matrices, device={s.device}",
            "ok",
            ms=t * 1e3,
            against=f"{nbytes / 1e9:.2f} GB read",
            peak=s.peak_gib(),
            note=f"{t / L:.2f} s/layer incl. reading, group budget {default_batch_bytes(s.device) / 2**30:.1f} GiB, "
            f"{len(rep.rows)} rows, {nbytes / t / 1e9:.2f} GB/s; files written in {t_w:.1f} s; one run "
            "(kernels warmed by the pair part)",
            seconds_per_layer=t / L,
            rows=len(rep.rows),
        )
        s.record["parts"]["engine"]["summary"] = {k_: v for k_, v in rep.summary.items() if isinstance(v, (int, float))}
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument("--small", action="store_true", help="tiny shapes (the dry run); timings mean nothing")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds of measuring in all (default 450)")
    ap.add_argument("--out", default=None, help="JSON file with every figure (rewritten after each part)")
    ap.add_argument(
        "--bandwidth",
        type=float,
        default=None,
        help="HBM bandwidth in TB/s for the floor (default: the datasheet value for the device name)",
    )
    ap.add_argument(
        "--tests",
        default="auto",
        help="comma-separated test paths for the tests part (default: the test files that mention CUDA)",
    )
    ap.add_argument("--stack", type=int, default=None, help="matrices per rSVD stack (default 36; 3 with --small)")
    ap.add_argument("--rsvd-k", default=None, help="k values of the rSVD part (default 16,64; 8,16 with --small)")
    ap.add_argument(
        "--reps",
        type=int,
        default=None,
        help="timed repetitions per rSVD case, fewer if time is short (default 5; 2 with --small)",
    )
    ap.add_argument("--ref-entries", type=int, default=2, help="bf16 stack entries with a float64 σ reference")
    ap.add_argument("--pair-k", type=int, default=None, help="k of the pair suite (default 512; 32 with --small)")
    ap.add_argument("--pair-reps", type=int, default=None, help="timed runs per pair shape (default 3; 1 with --small)")
    ap.add_argument(
        "--batch",
        type=int,
        default=None,
        help="layers per batched pair measurement, 1: none (default 4; 2 with --small)",
    )
    ap.add_argument("--rel", type=float, default=1e-3, help="ΔW size relative to the weight RMS")
    ap.add_argument(
        "--pair-eigh",
        choices=("default", "cpu", "magma"),
        default="default",
        help="eigh route of the pair part (benchmark only; the library default is 'default')",
    )
    ap.add_argument(
        "--ref",
        choices=("auto", "background", "inline", "off"),
        default="auto",
        help="float64 route: background process (CUDA default), inline after the device runs (CPU)",
    )
    ap.add_argument("--ref-threads", type=int, default=0, help="CPU threads of the float64 route (default cores - 4)")
    ap.add_argument("--engine-layers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    a.stack = a.stack or (3 if a.small else 36)
    a.rsvd_k = a.rsvd_k or ("8,16" if a.small else "16,64")
    a.pair_k = a.pair_k or (32 if a.small else 512)  # --small: below its k/v side (64), so the angles measure
    a.reps = a.reps or (2 if a.small else 5)
    a.pair_reps = a.pair_reps or (1 if a.small else 3)
    a.batch = a.batch or (2 if a.small else 4)
    unknown = set(a.parts.split(",")) - set(PARTS)
    if unknown:
        ap.error(f"unknown part(s) {sorted(unknown)}; choose from {','.join(PARTS)}")
    return a


def no_cuda_message(args: argparse.Namespace) -> str:
    smi = shutil.which("nvidia-smi")
    return (
        f"gpu_suite: --device {args.device} but torch {torch.__version__} here has no usable CUDA "
        f"(torch.version.cuda = {torch.version.cuda}, torch.cuda.is_available() = {torch.cuda.is_available()}; "
        f"nvidia-smi {'at ' + smi if smi else 'not found'}). This suite installs nothing. Install a CUDA build "
        "of torch that matches the driver (nvidia-smi prints the CUDA version it supports), e.g. "
        "`python3 -m pip install torch==<version>+cu<NNN>` from PyTorch's CUDA wheel index, then run this "
        "command again; or dry-run on CPU with `--device cpu --small`."
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        msg = no_cuda_message(a)
        print(msg, file=sys.stderr)
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps({"error": msg}, indent=1))
        raise SystemExit(2)
    if a.pair_eigh == "magma" and not getattr(torch.cuda, "has_magma", False):
        raise SystemExit("gpu_suite: --pair-eigh magma, but this torch was built without MAGMA")
    from weightgeo.devices import resolve_device

    device = resolve_device(a.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
    s = Suite(a, device)
    parts = [p for p in PARTS if p in a.parts.split(",")]
    s.record["env"] = env = environment(s)
    ceil = ceilings(s)
    bw, bw_text = bandwidth_used(s, ceil["copy_TBs"])
    a.bandwidth_used = bw
    env.update(ceilings=ceil, bandwidth_for_floor=bw_text)
    header = (
        f"### GPU suite: {env['device']}, torch {env['torch']} (CUDA {env['cuda']}), driver {env['driver']}, "
        f"{env['gpu_memory_gib']} GiB\n\n{env['machine']}  \n"
        f"weightgeo {env['weightgeo']}; measured: copy {ceil['copy_TBs']:.3g} TB/s (read+write), GEMM bf16 "
        f"{ceil['gemm_bf16_TFLOPs']:.3g} / fp32 {ceil['gemm_fp32_TFLOPs']:.3g} TFLOP/s; floor bandwidth "
        f"{bw_text}; {datetime.date.today()}; `{s.record['command']}`"
    )
    print(header, flush=True)
    cfg = SMALL if a.small else QWEN3_8B
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    refs = None
    later: list[Callable[[], None]] = []
    if {"pair", "profile", "engine"} & set(parts):
        gen = torch.Generator(device=device).manual_seed(a.seed + 1)
        for nm, m, n, _ in layer_shapes(cfg):
            pairs[nm] = tuple(w.cpu() for w in make_pair(m, n, a.rel, gen, device))  # type: ignore[assignment]
        s.free()
        if "pair" in parts:
            # Until the end of the profile part (the engine part reads files on the host cores).
            upto = sum(SHARES[p] for p in PARTS[: PARTS.index("profile") + 1] if p in parts) * a.budget
            refs = References(s, pairs, a.pair_k, deadline_s=upto)
    results: dict[str, Any] = {}
    try:
        for p in parts:
            allowed = s.start_part(p)
            s.record["parts"][p] = {"budget_s": round(allowed, 1)}
            t_part = time.perf_counter()
            if allowed < 2:
                s.skip(p, "(whole part)", f"time box: {allowed:.0f} s left of --budget {a.budget:.0f}")
                continue
            s.reset_peak()
            try:
                if p == "tests":
                    part_tests(s)
                elif p == "rsvd":
                    part_rsvd(s, ceil, bw, bw_text)
                elif p == "pair":
                    assert refs is not None
                    results = part_pair(s, pairs, refs, cfg)
                elif p == "profile":
                    part_profile(s, pairs, cfg, later)
                elif p == "engine":
                    if refs is not None and refs.running():
                        refs.finish(0)  # its deadline has passed; the host cores are the engine's now
                    part_engine(s, pairs, cfg, results)
            except Exception as e:
                s.free()
                s.row(p, "(part)", "error", note=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
                s.record["parts"][p]["traceback"] = traceback.format_exc()
            s.record["parts"][p].update(seconds=round(time.perf_counter() - t_part, 2), peak_gib=s.peak_gib())
            if p != "tests":
                s.row(
                    p,
                    "(part total)",
                    "ok",
                    ms=(time.perf_counter() - t_part) * 1e3,
                    peak=s.peak_gib(),
                    note=f"budget {allowed:.0f} s" + ("; peak = torch.cuda.max_memory_allocated" if s.cuda else ""),
                )
            s.end_part()
            s.write()
        if refs is not None:
            refs.finish(s.deadline - time.perf_counter() - 0.5 * s.reserve)
            pair_agreement(s, results, refs, cfg)
        for fn in later:
            try:
                fn()
            except Exception as e:
                s.row("profile", "(host alternatives)", "error", note=f"{type(e).__name__}: {str(e)[:150]}")
    finally:
        if refs is not None:
            refs.finish(0)
            refs.cleanup()
    table = s.table()
    s.record["table"] = header + "\n\n" + table
    s.record["rows"] = s.rows
    s.write()
    print("\n" + header + "\n\n" + table, flush=True)
    return s.record


if __name__ == "__main__":
    main()
