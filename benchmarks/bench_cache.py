"""Result-cache overhead: key, put and get per tensor row and per base decomposition, against computing them.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_cache.py [--dir DIR] [--repeats 9]

Entries of realistic sizes (Qwen2.5-0.5B shapes): a compare row (JSON only), a trajectory update spectrum
(17 float64 values + 16×896 float32 vectors), the base decomposition of an 896×896 and of a 4864×896 bf16
matrix (float64 896×896 eigenbasis + values: what ``linalg.pairwise.base_spectrum`` computes), and a raw
4864×896 float64 tensor. "compute" is ``base_spectrum`` on the same matrix, so get/compute is the saving.
The cache folder is on the disk given by ``--dir`` (default: a temporary folder); put is timed with and without
fsync. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from _timing import machine_line, markdown_table, median_time
from safetensors.torch import save_file

from weightgeo.cache import ResultCache, pack, unpack
from weightgeo.checkpoint import open_checkpoint
from weightgeo.linalg.pairwise import base_spectrum
from weightgeo.linalg.svd import Decomposition

POLICY = "bench-policy"


def _row() -> dict:
    return {
        "name": "model.layers.3.mlp.down_proj.weight",
        "shape": (896, 4864),
        "numel": 4358144,
        "module": "down_proj",
        "layer": 3,
        "dtype": "bfloat16",
        "update_sparsity": 0.4123456789,
        "principal_overlap": 0.987654321,
        "max_principal_angle": 12.3456789,
        "mean_principal_angle": 3.21,
        "spectral_drift": 1.2e-4,
        "update_localization": 0.61,
        "stable_rank": 7.89,
        "k_effective": 512,
        "gap": math.inf,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=None, help="folder for the cache (default: a temporary one)")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="wg-bench-cache-", dir=args.dir))
    try:
        run(root, args.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(root: Path, repeats: int) -> None:
    g = torch.Generator().manual_seed(0)
    W = {
        "896x896": (0.02 * torch.randn(896, 896, generator=g)).bfloat16(),
        "4864x896": (0.02 * torch.randn(4864, 896, generator=g)).bfloat16(),
    }
    save_file({"a": W["896x896"], "b": W["4864x896"]}, str(root / "model.safetensors"))
    ck = open_checkpoint(root / "model.safetensors")
    ids = [ck.identity("a"), ck.identity("b")]

    entries: list[tuple[str, object, dict, float | None]] = [("compare row (JSON)", _row(), {}, None)]
    entries.append(
        (
            "update spectrum (S 17 f64, Vh 16x896 f32)",
            {"frobenius": 1.5, "method": "randomized"},
            {"S": torch.rand(17, generator=g, dtype=torch.float64), "Vh": torch.randn(16, 896, generator=g)},
            None,
        )
    )
    for shape, w in W.items():
        t_compute, _, _ = median_time(lambda s, w=w: base_spectrum(w), repeats=max(3, repeats // 3))
        row, tensors = pack(base_spectrum(w).decomposition)
        entries.append((f"base decomposition {shape} (896x896 f64 eigenbasis)", row, tensors, t_compute))
    entries.append(
        ("raw 4864x896 f64 tensor", None, {"U": torch.randn(4864, 896, generator=g, dtype=torch.float64)}, None)
    )

    t_id, _, _ = median_time(lambda s: open_checkpoint(root / "model.safetensors").identity("a"), repeats=repeats)
    table = []
    for i, (what, row, tensors, t_compute) in enumerate(entries):
        results = {}
        for fsync in (True, False):
            cache = ResultCache(root / f"cache-{int(fsync)}", fsync=fsync)
            n = [0]

            def put(s, cache=cache, row=row, tensors=tensors):
                n[0] += 1  # a new key each time: every put writes a new file, as a run does
                key = cache.key("bench", inputs=ids, options={"entry": i, "n": n[0]}, policy=POLICY)
                cache.put(key, row, tensors)
                return key

            results[fsync], _, keys = median_time(put, repeats=repeats)
        key = keys[-1]
        t_key, _, _ = median_time(
            lambda s: cache.key("bench", inputs=ids, options={"entry": i}, policy=POLICY), repeats=repeats
        )
        t_get, _, got = median_time(lambda s: cache.get(key), repeats=repeats)
        e = got[-1]
        assert e is not None and all(torch.equal(e.tensors[k], v.contiguous()) for k, v in tensors.items())
        if row is not None and "small_side" in row:
            unpack(Decomposition, e.row, e.tensors)
        size = cache.path(key).stat().st_size
        table.append(
            [
                what,
                f"{size / 1e6:.3f}",
                1e3 * t_key,
                1e3 * results[True],
                1e3 * results[False],
                1e3 * t_get,
                None if t_compute is None else 1e3 * t_compute,
                None if t_compute is None else t_get / t_compute,
            ]
        )
    print(f"# bench_cache {time.strftime('%Y-%m-%d')}: {machine_line()}")
    print(
        f"cache folder on {root} ({os.statvfs(root).f_bsize}-byte blocks); Checkpoint.identity(name) "
        f"{1e6 * t_id:.0f} µs (open + header + stat)\n"
    )
    print(
        markdown_table(
            [
                "entry",
                "MB",
                "key ms",
                "put ms (fsync)",
                "put ms (no fsync)",
                "get ms",
                "compute ms (base_spectrum)",
                "get / compute",
            ],
            table,
        )
    )


if __name__ == "__main__":
    main()
