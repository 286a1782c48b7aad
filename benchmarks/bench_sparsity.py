"""The sparsity pass is bandwidth-bound: ``sparsity_curve`` over a stream against a cold sequential read of the
same bytes, side by side in one run.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_sparsity.py [--layers 8] [--checkpoints 4]
        [--repeats 3] [--drop auto|proc|fadvise] [--dir DIR]

A synthetic stream of Qwen2.5-0.5B-shaped layers (hidden 896, MLP 4864, a 32000-token embedding and head; bf16
safetensors, HF ``checkpoint-N`` folders; an RL-like update: ~5 % of the entries move by a few bf16 ULPs per
checkpoint) is written once into ``--dir`` (default: a temporary folder). Each repeat then runs, each from a
cold page cache and in an order rotated from one repeat to the next: ``cat`` of every checkpoint file to
/dev/null, a plain Python read of the same files (``readinto`` 16 MiB chunks), and
``weightgeo.sparsity_curve(run, cache=False)``, which reads every tensor of every checkpoint once. The ratios are
the pass's throughput over each read's (the target: ≥ 0.8 of a cold sequential read).

Cold cache: ``--drop proc`` writes 1 to /proc/sys/vm/drop_caches after ``sync`` (root; drops the whole page
cache, so other processes re-read their files); ``--drop fadvise`` calls ``posix_fadvise(POSIX_FADV_DONTNEED)``
on each file of the stream (evicts only these files' clean pages, no privilege needed); ``auto`` (default):
proc where it is writable, else fadvise. A warm ``cat`` is timed too, to show the drop took effect.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _timing import machine_line
from safetensors.torch import save_file

os.environ["WEIGHTGEO_CACHE"] = "off"  # time the pass, not the result cache
import weightgeo

HIDDEN, MLP, VOCAB = 896, 4864, 32000


def layer_shapes(i: int) -> dict[str, tuple[int, ...]]:
    p = f"model.layers.{i}."
    return {
        p + "input_layernorm.weight": (HIDDEN,),
        p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
        p + "self_attn.q_proj.bias": (HIDDEN,),
        p + "self_attn.k_proj.weight": (128, HIDDEN),
        p + "self_attn.k_proj.bias": (128,),
        p + "self_attn.v_proj.weight": (128, HIDDEN),
        p + "self_attn.v_proj.bias": (128,),
        p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
        p + "post_attention_layernorm.weight": (HIDDEN,),
        p + "mlp.gate_proj.weight": (MLP, HIDDEN),
        p + "mlp.up_proj.weight": (MLP, HIDDEN),
        p + "mlp.down_proj.weight": (HIDDEN, MLP),
    }


def write_stream(run: Path, layers: int, checkpoints: int, p: float = 0.05) -> list[Path]:
    """checkpoint-0 .. checkpoint-N (bf16); each step moves a fraction ``p`` of the entries by 1-3 bf16 ULPs."""
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    for i in range(layers):
        shapes.update(layer_shapes(i))
    g = torch.Generator().manual_seed(0)
    state = {n: (0.02 * torch.randn(s, generator=g)).bfloat16() for n, s in shapes.items()}
    files = []
    for t in range(checkpoints + 1):
        if t:
            for n, w in state.items():
                move = torch.rand(w.shape, generator=g) < p
                bits = w.view(torch.int16)
                step = torch.randint(1, 4, w.shape, generator=g, dtype=torch.int16)
                state[n] = torch.where(move, bits + step, bits).view(torch.bfloat16)
        folder = run / f"checkpoint-{t * 10}"
        folder.mkdir(parents=True, exist_ok=True)
        save_file(state, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"model_type": "qwen2", "tie_word_embeddings": False}))
        files.append(folder / "model.safetensors")
    return files


def drop(files: list[Path], how: str) -> None:
    if how == "proc":
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cat(files: list[Path]) -> None:
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)


def python_read(files: list[Path]) -> None:
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(view):
                pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--checkpoints", type=int, default=4, help="checkpoints after the base (default 4)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--drop", choices=("auto", "proc", "fadvise"), default="auto")
    ap.add_argument("--dir", type=Path, default=None, help="where the stream is (written when missing; kept)")
    ap.add_argument("--json", type=Path, default=None, help="also write the record here")
    args = ap.parse_args(argv)
    how = args.drop
    if how == "auto":
        how = "proc" if os.access("/proc/sys/vm/drop_caches", os.W_OK) else "fadvise"
    tmp = None
    if args.dir is None:
        tmp = tempfile.mkdtemp(prefix="bench_sparsity_")
        root = Path(tmp)
    else:
        root = args.dir
    run = root / f"run_{args.layers}l_{args.checkpoints}c"
    try:
        files = sorted(run.glob("checkpoint-*/model.safetensors"), key=lambda p: int(p.parent.name.split("-")[1]))
        if len(files) != args.checkpoints + 1:
            shutil.rmtree(run, ignore_errors=True)
            t = timed(lambda: files.extend(write_stream(run, args.layers, args.checkpoints)))
            print(f"wrote {run} in {t:.1f} s", file=sys.stderr)
        nbytes = sum(p.stat().st_size for p in files)
        load0 = os.getloadavg()
        rows: dict[str, list[float]] = {"cat": [], "python read": [], "sparsity_curve": []}
        warm: list[float] = []
        found: list = []
        runs = {
            "cat": lambda: cat(files),
            "python read": lambda: python_read(files),
            "sparsity_curve": lambda: found.append(weightgeo.sparsity_curve(run, cache=False)),
        }
        order = list(runs)
        for r in range(args.repeats):
            # each repeat starts with another of the three: a virtual disk's host-side cache can favour what
            # follows the first read of a repeat, whichever it is
            for what in order[r % 3 :] + order[: r % 3]:
                drop(files, how)
                rows[what].append(timed(runs[what]))
            warm.append(timed(lambda: cat(files)))  # the files are now cached: a warm read, for reference
        report = found[-1]
        load1 = os.getloadavg()
        med = {k: statistics.median(v) for k, v in rows.items()}
        record = {
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": machine_line(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "drop": how,
            "load_start": [round(x, 2) for x in load0],
            "load_end": [round(x, 2) for x in load1],
            "bytes": nbytes,
            "files": len(files),
            "tensors_read": report.meta["cache"]["tensors_read"],
            "seconds": {k: [round(x, 3) for x in v] for k, v in rows.items()},
            "warm_cat_s": [round(x, 3) for x in warm],
            "gb_per_s": {k: round(nbytes / v / 1e9, 3) for k, v in med.items()},
            "ratio_to_cat": round(med["cat"] / med["sparsity_curve"], 3),
            "ratio_to_python_read": round(med["python read"] / med["sparsity_curve"], 3),
            "step_sparsity_last": report.summary["by_step"][report.summary["steps"][-1]]["step_sparsity"],
        }
        print(json.dumps(record, indent=2))
        print()
        print(f"| read (cold, median of {args.repeats}) | seconds | GB/s |")
        print("|---|---|---|")
        for k, v in med.items():
            print(f"| {k} | {v:.3f} | {nbytes / v / 1e9:.3f} |")
        print(
            f"\nsparsity_curve / cat: {record['ratio_to_cat']}, / python read: {record['ratio_to_python_read']} "
            f"({nbytes / 1e9:.2f} GB in {len(files)} files; warm cat {statistics.median(warm):.3f} s; drop: {how})"
        )
        if args.json is not None:
            args.json.write_text(json.dumps(record, indent=2) + "\n")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
