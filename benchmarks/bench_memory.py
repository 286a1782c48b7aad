"""Peak memory and throughput of `weightgeo compare` on two synthetic ~1 GB bf16 checkpoints (Qwen2.5-0.5B shapes).

    python benchmarks/bench_memory.py [--dir /tmp/wg-qwen05] [--metrics update_sparsity ...] [--format dcp] [--cleanup]

Step 1 writes base and fine-tuned checkpoints once (494 M params each, bf16, tied embeddings, like
Qwen2.5-0.5B; the fine-tune changes about a third of the bf16 values, as an RL run would): HF safetensors
folders, or with ``--format dcp`` torch.distributed.checkpoint folders written by ``dcp.save`` (HF names,
one stored chunk per tensor, plus optimizer-like state that the reader skips). Step 2 times the
sparsity pass inside this process (the streaming rate itself), then runs ``python -m weightgeo compare``
under ``/usr/bin/time -v`` in a fresh process per metric set and prints wall time (interpreter start and
imports included), GB/s of checkpoint data and peak RSS. The page cache is warm (the files were just written or read).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

os.environ["WEIGHTGEO_CACHE"] = "off"  # time the computation, not the result cache (bench_resume.py times that)

VOCAB, HIDDEN, INTER, LAYERS, KV = 151936, 896, 4864, 24, 128
HEADS, KV_HEADS = 14, 2


def qwen05_shapes() -> dict[str, tuple[int, ...]]:
    s: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        s[p + "self_attn.q_proj.weight"] = (HIDDEN, HIDDEN)
        s[p + "self_attn.q_proj.bias"] = (HIDDEN,)
        s[p + "self_attn.k_proj.weight"] = (KV, HIDDEN)
        s[p + "self_attn.k_proj.bias"] = (KV,)
        s[p + "self_attn.v_proj.weight"] = (KV, HIDDEN)
        s[p + "self_attn.v_proj.bias"] = (KV,)
        s[p + "self_attn.o_proj.weight"] = (HIDDEN, HIDDEN)
        s[p + "mlp.gate_proj.weight"] = (INTER, HIDDEN)
        s[p + "mlp.up_proj.weight"] = (INTER, HIDDEN)
        s[p + "mlp.down_proj.weight"] = (HIDDEN, INTER)
        s[p + "input_layernorm.weight"] = (HIDDEN,)
        s[p + "post_attention_layernorm.weight"] = (HIDDEN,)
    return s


CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": HIDDEN,
    "intermediate_size": INTER,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "vocab_size": VOCAB,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}


def synthetic_pair(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Base and fine-tuned state dicts of Qwen2.5-0.5B shapes (bf16)."""
    g = torch.Generator().manual_seed(seed)
    base, ft = {}, {}
    for name, shape in qwen05_shapes().items():
        w = torch.randn(shape, generator=g) * 0.02 if len(shape) == 2 else 1 + 0.1 * torch.randn(shape, generator=g)
        # An update of ~half a bf16 ULP moves about a third of the stored values (RL-like).
        d = torch.randn(shape, generator=g) * w.abs() * 2.0**-9
        base[name], ft[name] = w.to(torch.bfloat16), (w + d).to(torch.bfloat16)
    return base, ft


def write_dcp_pair(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """The same tensors as :func:`write_pair`, saved by ``torch.distributed.checkpoint.save`` (single process)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    base_dir, ft_dir = root / "dcp_base", root / "dcp_ft"
    if (ft_dir / ".metadata").exists():
        return base_dir, ft_dir
    for d, tensors in zip((base_dir, ft_dir), synthetic_pair(seed)):
        state = {**tensors, "optimizer": {"state": {"model.norm.weight": {"step": 1}}}, "train_state": {"step": 1}}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(state, checkpoint_id=str(d), no_dist=True)
        (d / "config.json").write_text(json.dumps(CONFIG))
    return base_dir, ft_dir


def write_pair(root: Path, seed: int = 0) -> tuple[Path, Path]:
    base_dir, ft_dir = root / "base", root / "ft"
    if (ft_dir / "model.safetensors").exists():
        return base_dir, ft_dir
    for d, tensors in zip((base_dir, ft_dir), synthetic_pair(seed)):
        d.mkdir(parents=True, exist_ok=True)
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(CONFIG))
    return base_dir, ft_dir


def run_compare(base: Path, ft: Path, metrics: list[str], extra: list[str]) -> dict[str, float]:
    cmd = [
        "/usr/bin/time",
        "-v",
        sys.executable,
        "-m",
        "weightgeo",
        "compare",
        str(base),
        str(ft),
        "--summary",
        "--no-progress",
        "--metrics",
        *metrics,
        *extra,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"compare failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    cpu = re.search(r"Percent of CPU this job got: (\d+)%", proc.stderr).group(1)
    return {"wall_s": wall, "peak_rss_gb": rss_kb / 1e6, "cpu_percent": float(cpu), "stdout": proc.stdout}


def in_process_pass(base: Path, ft: Path, repeats: int = 3) -> float:
    """Median seconds of ``weightgeo.compare(..., metrics="update_sparsity")`` inside this process: the
    streaming pass itself, without interpreter start and imports (about 0.8 s here)."""
    import weightgeo

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        weightgeo.compare(base, ft, metrics="update_sparsity", progress=False)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/wg-qwen05"))
    ap.add_argument(
        "--metrics",
        nargs="+",
        action="append",
        default=None,
        help="a metric set to time (repeatable); default: update_sparsity, then all metrics on the "
        "attention and MLP matrices",
    )
    ap.add_argument(
        "--format",
        choices=("safetensors", "dcp"),
        default="safetensors",
        help="checkpoint format to write and read (dcp: torch.distributed.checkpoint folders)",
    )
    ap.add_argument("--cleanup", action="store_true", help="delete the checkpoints written by this run at the end")
    args = ap.parse_args()
    fresh = not (args.dir / ("dcp_ft" if args.format == "dcp" else "ft")).exists()
    base, ft = (write_dcp_pair if args.format == "dcp" else write_pair)(args.dir)
    try:
        measure(args, base, ft)
    finally:
        if args.cleanup and fresh:
            import shutil

            for d in (base, ft):
                shutil.rmtree(d, ignore_errors=True)


def measure(args: argparse.Namespace, base: Path, ft: Path) -> None:
    size_gb = sum(p.stat().st_size for d in (base, ft) for p in d.iterdir() if p.is_file()) / 1e9
    sets = args.metrics or [["update_sparsity"]]
    print(f"checkpoints ({args.format}): {base} and {ft}, {size_gb:.2f} GB together")
    t = in_process_pass(base, ft)
    print(f"sparsity pass in-process (median of 3): {t:.2f} s = {size_gb / t:.2f} GB/s of checkpoint data\n")
    print("| metrics | wall (s) | checkpoint GB/s | peak RSS (GB) | CPU % |")
    print("|---|---|---|---|---|")
    for metrics in sets:
        r = run_compare(base, ft, metrics, [])
        print(
            f"| {' '.join(metrics)} | {r['wall_s']:.2f} | {size_gb / r['wall_s']:.2f} | "
            f"{r['peak_rss_gb']:.2f} | {r['cpu_percent']:.0f} |"
        )
    if args.metrics is None:
        r = run_compare(
            base,
            ft,
            ["update_sparsity", "principal_overlap", "spectral_drift", "update_localization", "stable_rank"],
            [],
        )
        print(
            f"| all (every tensor, embedding included) | {r['wall_s']:.2f} | {size_gb / r['wall_s']:.2f} | "
            f"{r['peak_rss_gb']:.2f} | {r['cpu_percent']:.0f} |"
        )
        print("\n" + r["stdout"][-1500:])


if __name__ == "__main__":
    main()
