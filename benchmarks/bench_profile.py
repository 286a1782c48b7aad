"""Where the full suite's time goes: ``weightgeo.compare`` (all metrics, k = 512, no cache) per stage and shape.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_profile.py --workload qwen05
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_profile.py --workload layer8b
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_profile.py --workload vocab8b
    ... --threads 1,2     # the same pass with 1 and with 2 torch threads (scaling)

Workloads (synthetic bf16 safetensors pairs, written once under ``--dir``; the fine-tune changes about a third of
the bf16 values, as in bench_memory.py):

* ``qwen05``: the Qwen2.5-0.5B-shaped pair of bench_memory.py (24 layers, the 151936×896 embedding, tied);
* ``layer8b``: one Qwen3-8B-shaped layer (q/o 4096², k/v 1024×4096, gate/up 12288×4096, down 4096×12288, norms);
* ``layers8b``: two such layers (in a whole model each shape group holds members of several layers: with two lanes,
  two per group, one per lane, so ``down_proj`` too has a partner);
* ``vocab8b``: Qwen3-8B's vocabulary matrices, ``embed_tokens`` and ``lm_head`` (151936×4096 each, not tied).

Each run is a fresh worker process that wraps the library's step functions
(benchmarks/_stages.py) and prints, per stage and shape group, the exclusive seconds, then the wall time and the
peak RSS (its own: ``VmHWM``, not ``ru_maxrss``, which a child forked from a parent that has just written a
workload's checkpoints inherits across ``exec``). A whole Qwen3-8B pair is projected as 36 × layer8b + vocab8b.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ["WEIGHTGEO_CACHE"] = "off"

HIDDEN8B, INTER8B, KV8B, VOCAB = 4096, 12288, 1024, 151936


def layer8b_shapes(layers: int = 1) -> dict[str, tuple[int, ...]]:
    return {name: shape for i in range(layers) for name, shape in _layer8b_shapes(i).items()}


def _layer8b_shapes(i: int) -> dict[str, tuple[int, ...]]:
    p = f"model.layers.{i}."
    return {
        p + "self_attn.q_proj.weight": (HIDDEN8B, HIDDEN8B),
        p + "self_attn.k_proj.weight": (KV8B, HIDDEN8B),
        p + "self_attn.v_proj.weight": (KV8B, HIDDEN8B),
        p + "self_attn.o_proj.weight": (HIDDEN8B, HIDDEN8B),
        p + "self_attn.q_norm.weight": (128,),
        p + "self_attn.k_norm.weight": (128,),
        p + "mlp.gate_proj.weight": (INTER8B, HIDDEN8B),
        p + "mlp.up_proj.weight": (INTER8B, HIDDEN8B),
        p + "mlp.down_proj.weight": (HIDDEN8B, INTER8B),
        p + "input_layernorm.weight": (HIDDEN8B,),
        p + "post_attention_layernorm.weight": (HIDDEN8B,),
    }


def vocab8b_shapes() -> dict[str, tuple[int, ...]]:
    return {"model.embed_tokens.weight": (VOCAB, HIDDEN8B), "lm_head.weight": (VOCAB, HIDDEN8B)}


CONFIG8B = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": HIDDEN8B,
    "intermediate_size": INTER8B,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": VOCAB,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def synthetic(shape: tuple[int, ...], g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One bf16 (base, fine-tune) tensor as bench_memory.synthetic_pair makes them, in row chunks (a 151936×4096
    float32 temporary would be 2.5 GB)."""
    b = torch.empty(shape, dtype=torch.bfloat16)
    f = torch.empty(shape, dtype=torch.bfloat16)
    rows = shape[0]
    step = max(1, (1 << 24) // max(1, math.prod(shape[1:])))
    for s in range(0, rows, step):
        e = min(rows, s + step)
        sub = (e - s, *shape[1:])
        w = torch.randn(sub, generator=g) * 0.02 if len(shape) == 2 else 1 + 0.1 * torch.randn(sub, generator=g)
        d = torch.randn(sub, generator=g) * w.abs() * 2.0**-9
        b[s:e], f[s:e] = w.to(torch.bfloat16), (w + d).to(torch.bfloat16)
    return b, f


def write_checkpoints(root: Path, shapes: dict[str, tuple[int, ...]], config: dict, seed: int) -> tuple[Path, Path]:
    from safetensors.torch import save_file

    base_dir, ft_dir = root / "base", root / "ft"
    if (ft_dir / "model.safetensors").exists():
        return base_dir, ft_dir
    g = torch.Generator().manual_seed(seed)
    base, ft = {}, {}
    for name, shape in shapes.items():
        base[name], ft[name] = synthetic(shape, g)
    for d, tensors in ((base_dir, base), (ft_dir, ft)):
        d.mkdir(parents=True, exist_ok=True)
        save_file(tensors, d / "model.safetensors.tmp", metadata={"format": "pt"})
        os.replace(d / "model.safetensors.tmp", d / "model.safetensors")
        (d / "config.json").write_text(json.dumps(config))
    return base_dir, ft_dir


def checkpoints(workload: str, root: Path) -> tuple[Path, Path]:
    if workload == "qwen05":
        from bench_memory import write_pair

        return write_pair(root / "qwen05")
    if workload == "layer8b":
        return write_checkpoints(root / "layer8b", layer8b_shapes(), CONFIG8B, seed=1)
    if workload == "layers8b":
        return write_checkpoints(root / "layers8b", layer8b_shapes(2), CONFIG8B, seed=3)
    if workload == "vocab8b":
        return write_checkpoints(root / "vocab8b", vocab8b_shapes(), CONFIG8B, seed=2)
    raise SystemExit(f"unknown workload {workload!r}")


# ---- the worker: one compare pass under the stage timers ------------------------------------------------------
def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.worker_threads)
    from weightgeo.linalg import hardware

    hardware.LANES = None if args.worker_lanes == "auto" else int(args.worker_lanes)
    from _stages import Stages

    import weightgeo

    base, ft = checkpoints(args.workload, args.dir)
    metrics = None if args.metrics == "all" else args.metrics.split(",")
    t0 = time.perf_counter()
    with Stages() as st:
        rep = weightgeo.compare(base, ft, metrics=metrics, k=args.k, progress=False, cache=False)
    wall = time.perf_counter() - t0
    rss = own_peak_rss_gb()
    out = {
        "wall": wall,
        "peak_rss_gb": rss,
        "threads": torch.get_num_threads(),
        "lanes": hardware.lanes("cpu"),
        "table": st.table(wall),
        "stages": st.as_dict(),
        "rows": len(rep.rows),
        "summary": {k: v for k, v in rep.summary.items() if isinstance(v, (int, float))},
        "load_end": os.getloadavg(),
    }
    print("@@RESULT@@" + json.dumps(out))


def own_peak_rss_gb() -> float:
    """This process's peak RSS in GB (10⁶ kB, as the other benchmarks report it): its memory map's high-water mark (``VmHWM``, reset by ``exec``); ``ru_maxrss``
    where there is no /proc (on Linux it keeps the forking parent's peak across ``exec``)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1e6  # kB, as ru_maxrss and /usr/bin/time give it
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--workload", default="qwen05", help="qwen05, layer8b, layers8b, vocab8b (comma-separated for several)"
    )
    ap.add_argument("--dir", type=Path, default=Path("/tmp/wg-profile"))
    ap.add_argument("--threads", default=str(torch.get_num_threads()), help="torch threads, e.g. 1,2")
    ap.add_argument(
        "--lanes",
        default="auto",
        help="pair-kernel lanes (linalg.hardware.LANES): auto (the policy: 2 with >= 2 threads), 1, or both: auto,1",
    )
    ap.add_argument("--k", type=int, default=512)
    ap.add_argument("--metrics", default="all", help="'all' or a comma-separated list")
    ap.add_argument("--json", type=Path, help="also write every figure here")
    ap.add_argument("--worker-threads", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--worker-lanes", default="auto", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker_threads:
        worker(args)
        return
    from _timing import machine_line

    command = "env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_profile.py " + " ".join(
        shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:])
    )
    print(f"- machine: {machine_line()}")
    print(f"- torch CPU capability: {torch.backends.cpu.get_cpu_capability()}")
    print(f"- command: `{command.strip()}`")
    print(f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}")
    results = {}
    for workload in args.workload.split(","):
        checkpoints(workload, args.dir)  # written once, outside the timed workers
        for threads, lanes in [(int(t), ln) for t in args.threads.split(",") for ln in args.lanes.split(",")]:
            if threads == 1 and lanes != args.lanes.split(",")[0]:
                continue  # one thread has one lane whatever is asked
            load = os.getloadavg()
            cmd = [sys.executable, __file__, "--workload", workload, "--dir", str(args.dir), "--k", str(args.k)]
            cmd += ["--metrics", args.metrics, "--worker-threads", str(threads), "--worker-lanes", lanes]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("@@RESULT@@")]
            if proc.returncode or not line:
                raise SystemExit(f"worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            r = json.loads(line[0][len("@@RESULT@@") :])
            results[f"{workload}/{threads}/{lanes}"] = {**r, "load_start": load}
            print(
                f"\n#### {workload}, {threads} thread(s), {r['lanes']} lane(s): wall {r['wall']:.1f} s, "
                f"peak RSS {r['peak_rss_gb']:.2f} GB, "
                f"{r['rows']} rows; load average {load[0]:.1f} at the start, {r['load_end'][0]:.1f} at the end\n"
            )
            print(r["table"], flush=True)
    for key, lay in results.items():
        voc = results.get(key.replace(key.split("/")[0] + "/", "vocab8b/"))
        if key.split("/")[0] in ("layer8b", "layers8b") and voc:
            total = (36 if key.startswith("layer8b/") else 18) * lay["wall"] + voc["wall"]
            t, ln = key.split("/")[1:]
            print(
                f"\nProjected whole Qwen3-8B pair from {key.split('/')[0]}, {t} thread(s), lanes {ln}: "
                f"{36 if key.startswith('layer8b/') else 18} × {lay['wall']:.1f} s + "
                f"{voc['wall']:.1f} s = {total:.0f} s ({total / 60:.1f} min); peak RSS "
                f"{max(lay['peak_rss_gb'], voc['peak_rss_gb']):.2f} GB"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
