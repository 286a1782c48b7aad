"""What the result cache saves: a second ``rank_curve`` / ``compare`` over unchanged checkpoints, and a
``rank_curve`` over a run with one more checkpoint, against the first (cold-cache) run, in one process.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_resume.py [--layers 2] [--checkpoints 8]

A run folder of ``checkpoint-N`` folders (HF Trainer layout: ``model.safetensors`` + ``trainer_state.json``)
with Qwen2.5-0.5B shapes per layer (q/o 896×896, k/v 128×896, gate/up 4864×896, down 896×4864; bf16), each
ΔW_t a growing low-rank update plus small full-rank noise (the low-rank part dominates from the first
step, so every step costs about the same). Timed, each in a fresh cache folder: the first
``rank_curve`` (cold cache, which writes every spectrum), the same without a cache, the second over the
unchanged run (everything served), and one after one more checkpoint was written (its spectra computed, the
rest served); then ``compare(first, last)`` cold and warm. Prints a markdown table of seconds and ratios, and
checks that every warm result equals the cold one row for row. Goals (issue 13): unchanged ≤ 0.05× the first
run; one extra checkpoint ≤ its share of the first run (≈ 1/T) plus reading headers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from _timing import machine_line
from safetensors.torch import save_file

from weightgeo import compare, rank_curve

SHAPES = {
    "self_attn.q_proj": (896, 896),
    "self_attn.k_proj": (128, 896),
    "self_attn.v_proj": (128, 896),
    "self_attn.o_proj": (896, 896),
    "mlp.gate_proj": (4864, 896),
    "mlp.up_proj": (4864, 896),
    "mlp.down_proj": (896, 4864),
}


class Run:
    """A synthetic training run written checkpoint by checkpoint (``write(t)`` = the trainer saving step t)."""

    def __init__(self, root: Path, layers: int, seed: int = 0) -> None:
        self.root = root
        g = torch.Generator().manual_seed(seed)
        self.g = g
        self.base, self.drift = {}, {}
        for i in range(layers):
            for mod, (m, n) in SHAPES.items():
                name = f"model.layers.{i}.{mod}.weight"
                self.base[name] = 0.02 * torch.randn(m, n, generator=g)
                U = torch.linalg.qr(torch.randn(m, 24, generator=g)).Q
                V = torch.linalg.qr(torch.randn(n, 24, generator=g)).Q
                self.drift[name] = (U * torch.arange(1, 25) ** -0.7, V)

    def write(self, step: int) -> Path:
        folder = self.root / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        sd = {}
        for name, w in self.base.items():
            U, V = self.drift[name]
            noise = 2e-6 * torch.randn(w.shape, generator=self.g)
            sd[name] = (w + 1e-3 * step * (U @ V.T) + noise).bfloat16()
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        return folder


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def rows(report) -> list:
    return json.loads(report.to_json())["rows"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--checkpoints", type=int, default=8, help="checkpoints T before the extra one (base included)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="each timing is the fastest of this many (fresh caches)")
    ap.add_argument("--dir", type=Path, default=None, help="where the run and caches go (default: a temporary folder)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="wg-bench-resume-", dir=args.dir))
    try:
        run = Run(tmp / "run", args.layers)
        steps = [10 * t for t in range(args.checkpoints)]
        for t in steps:
            run.write(t)
        kw = dict(k=16, hill_k=10)
        warm = {"w": torch.randn(64, 64, generator=torch.Generator().manual_seed(0))}
        rank_curve([warm, {"w": warm["w"] + 0.1}], cache=False, k=4, hill_k=4)  # thread pools, lazy imports
        pair = dict(k=64, rank=16, progress=False)
        b = run.root / f"checkpoint-{steps[0]}"
        t: dict[str, list[float]] = {}
        for r in range(args.repeats):  # each repeat: fresh caches and a freshly written extra checkpoint
            cache, res = tmp / f"cache-{r}", {}
            shutil.rmtree(run.root / f"checkpoint-{10 * args.checkpoints}", ignore_errors=True)
            for name, fn in (
                ("nocache", lambda: rank_curve(run.root, cache=False, **kw)),
                ("first", lambda: rank_curve(run.root, cache=cache, **kw)),
                ("second", lambda: rank_curve(run.root, cache=cache, **kw)),
            ):
                sec, out = timed(fn)
                t.setdefault(name, []).append(sec)
                res[name] = out
            extra = run.write(10 * args.checkpoints)
            for name, fn in (
                ("extra", lambda: rank_curve(run.root, cache=cache, **kw)),
                ("extra_ref", lambda: rank_curve(run.root, cache=False, **kw)),
                ("cmp_first", lambda: compare(b, extra, cache=tmp / f"cmp-{r}", **pair)),
                ("cmp_second", lambda: compare(b, extra, cache=tmp / f"cmp-{r}", **pair)),
            ):
                sec, out = timed(fn)
                t.setdefault(name, []).append(sec)
                res[name] = out
            assert rows(res["first"]) == rows(res["nocache"]) == rows(res["second"])
            assert rows(res["extra"]) == rows(res["extra_ref"]) and rows(res["cmp_first"]) == rows(res["cmp_second"])
        best = {name: min(v) for name, v in t.items()}  # the least disturbed of the repeats (a shared machine)
        t_nocache, t_first, t_second = best["nocache"], best["first"], best["second"]
        t_extra, t_extra_ref, t_cmp_first, t_cmp_second = (
            best[n] for n in ("extra", "extra_ref", "cmp_first", "cmp_second")
        )
        first, second, grown, c1, c2 = (res[n] for n in ("first", "second", "extra", "cmp_first", "cmp_second"))

        n_updates = args.checkpoints - 1  # the first checkpoint is the base
        share = 1 / n_updates
        matrices = len({r["name"] for r in first.rows})
        print(machine_line())
        print(
            f"capability {torch.backends.cpu.get_cpu_capability()}; run: {args.layers} layers × 7 matrices = "
            f"{matrices} matrices, {args.checkpoints} checkpoints (base + {n_updates} updates), then one more; fastest of {args.repeats}\n"
        )
        print("| run | seconds | ratio to the first run | goal | cache |")
        print("|---|---|---|---|---|")
        c = lambda r: r.meta["cache"]
        print(f"| `rank_curve`, no cache | {t_nocache:.2f} | {t_nocache / t_first:.3f} | | off |")
        print(
            f"| `rank_curve`, first run (cold cache, writes {c(first)['spectra_computed']} spectra) | "
            f"{t_first:.2f} | 1.000 | | {c(first)['writes']} writes |"
        )
        print(
            f"| `rank_curve`, unchanged run | {t_second:.3f} | **{t_second / t_first:.3f}** | ≤ 0.05 | "
            f"{c(second)['spectra_reused']} reused, {c(second)['spectra_computed']} computed, "
            f"{c(second)['tensors_read']} tensors read |"
        )
        print(
            f"| `rank_curve`, one extra checkpoint | {t_extra:.2f} | **{t_extra / t_first:.3f}** | ≤ {share:.3f} "
            f"(1/{n_updates}) + headers | {c(grown)['spectra_reused']} reused, "
            f"{c(grown)['spectra_computed']} computed, {c(grown)['tensors_read']} tensors read |"
        )
        print(
            f"| `rank_curve` of the grown run without a cache | {t_extra_ref:.2f} | {t_extra_ref / t_first:.3f} | | "
            f"off: one more checkpoint adds {t_extra_ref - t_nocache:.2f} s |"
        )
        print(
            f"| `compare(first, last)`, k=64, cold cache | {t_cmp_first:.2f} | 1.000 (of itself) | | "
            f"{c(c1)['rows_computed']} rows computed |"
        )
        print(
            f"| `compare(first, last)`, warm | {t_cmp_second:.3f} | **{t_cmp_second / t_cmp_first:.3f}** | ≤ 0.05 | "
            f"{c(c2)['rows_cached']} rows served, {c(c2)['tensors_read']} tensors read |"
        )
        print("\nwarm results equal the cold ones row for row (checked)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
