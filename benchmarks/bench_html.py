"""The HTML page's budget: a 0.5B-shaped comparison (290 tensors) written from a saved report in ≤ 2 s and
≤ 3 MB; a three-run page likewise; plus a 0.5B-shaped trajectory (24 layers x 7 matrices x 20 steps).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_html.py [--repeats 5] [--dir DIR]

The saved reports are synthetic, shaped like Qwen2.5-0.5B (24 blocks: q/k/v weights and biases, o, gate, up, down,
two norms; the embedding and the final norm: 290 tensors) with every metric a comparison writes, a few values not
measured (with a reason, as a k ≥ the smaller side gives), seeded values, written with ``Report.to_json``. The
timed work is what ``weightgeo report R.json ... --out page.html`` does: read the JSON, build the page, write it.
Prints a markdown table (median seconds, page size) and the machine line.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

from _timing import machine_line, markdown_table, median_time

import weightgeo
from weightgeo.report import Report, summarize_rows

HIDDEN, KV, INTER, VOCAB, LAYERS = 896, 128, 4864, 151936, 24


def _shapes() -> list[tuple[str, tuple[int, ...]]]:
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
            (p + "self_attn.q_proj.bias", (HIDDEN,)),
            (p + "self_attn.k_proj.weight", (KV, HIDDEN)),
            (p + "self_attn.k_proj.bias", (KV,)),
            (p + "self_attn.v_proj.weight", (KV, HIDDEN)),
            (p + "self_attn.v_proj.bias", (KV,)),
            (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
            (p + "mlp.gate_proj.weight", (INTER, HIDDEN)),
            (p + "mlp.up_proj.weight", (INTER, HIDDEN)),
            (p + "mlp.down_proj.weight", (HIDDEN, INTER)),
            (p + "input_layernorm.weight", (HIDDEN,)),
            (p + "post_attention_layernorm.weight", (HIDDEN,)),
        ]
    return out + [("model.norm.weight", (HIDDEN,))]


def _module(name: str) -> str:
    return name.split(".")[-2]


def pair_report(seed: int, *, k: int = 512) -> Report:
    """A comparison report of the 0.5B shapes with seeded values."""
    rng = random.Random(seed)
    rows = []
    for name, shape in _shapes():
        layer = int(name.split(".")[2]) if ".layers." in name else None
        row: dict = {
            "name": name.removeprefix("model."),
            "shape": shape,
            "numel": shape[0] * (shape[1] if len(shape) > 1 else 1),
            "module": _module(name),
            "layer": layer,
            "dtype": "bfloat16",
            "update_sparsity": rng.uniform(0.3, 0.95),
        }
        if len(shape) == 2:
            trivial = min(shape) <= k  # issue 19's rule: the subspace metrics are not measurable
            angle = None if trivial else rng.lognormvariate(0, 1)
            row.update(
                principal_overlap=None if trivial else 1 - rng.uniform(0, 1e-3),
                max_principal_angle=angle,
                mean_principal_angle=None if angle is None else angle / 5,
                k_effective=min(k, *shape),
                spectral_gap=None if trivial else rng.uniform(1.0, 1.1),
                spectral_drift=rng.lognormvariate(-9, 1),
                stable_rank=rng.uniform(5, 120),
                delta_frobenius=rng.lognormvariate(-4, 1),
                density=1 - row["update_sparsity"],
                principal_mask_overlap=rng.uniform(0.2, 0.6),
                low_magnitude_overlap=rng.uniform(0.4, 0.9),
            )
            if trivial:
                why = f"k={k} ≥ the smaller side {min(shape)}: the top-k subspace is the whole space"
                row["not_measurable"] = {
                    m: why for m in ("principal_overlap", "max_principal_angle", "mean_principal_angle", "spectral_gap")
                }
        rows.append(row)
    meta = {
        "kind": "compare",
        "base": "Qwen/Qwen2.5-0.5B",
        "ft": f"runs/method{seed}/checkpoint-300",
        "params": {"k": k, "side": "right", "rank": 64, "alpha": 0.5, "eta": 1e-3},
        "partial": [
            {"name": r["name"], "reason": "1-D tensor: SVD metrics need a matrix"} for r in rows if len(r["shape"]) == 1
        ],
        "skipped": [],
        "unmatched": {"only_base": [], "only_ft": []},
        "weightgeo_version": weightgeo.__version__,
    }
    return Report(rows=rows, summary=summarize_rows(rows), meta=meta)


def trajectory_report(seed: int, *, steps: int = 20) -> Report:
    """A rank_curve-shaped report: the 7 linear matrices of 24 blocks at ``steps`` checkpoints."""
    from weightgeo.trajectory import trajectory_summary

    rng = random.Random(seed)
    mats = [(n, s) for n, s in _shapes() if len(s) == 2 and ".layers." in n]
    step_list = [10 * (i + 1) for i in range(steps)]
    rows, sims = [], {}
    for name, shape in mats:
        curve = {}
        for t in step_list:
            sim = min(1.0, 0.2 + t / step_list[-1] * rng.uniform(0.7, 0.9)) if t < step_list[-1] else 1.0
            curve[t] = sim
            rows.append(
                {
                    "step": t,
                    "name": name,
                    "shape": shape,
                    "numel": shape[0] * shape[1],
                    "module": _module(name),
                    "layer": int(name.split(".")[2]),
                    "frobenius_norm": 1e-3 * t * rng.uniform(0.8, 1.2),
                    "spectral_norm": 3e-4 * t,
                    "stable_rank": rng.uniform(3, 9),
                    "hill_alpha": rng.uniform(1, 4),
                    "spectral_gap": rng.uniform(1, 2),
                    "final_subspace_similarity": sim,
                    "method": "randomized",
                }
            )
        sims[name] = curve
    meta = {"kind": "rank_curve", "stream": f"runs/run{seed}", "params": {"k": 16, "hill_k": 10}, "similarity": sims}
    return Report(rows=rows, summary=trajectory_summary(rows, step_list, sims, k=16), meta=meta)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=None, help="folder for the saved reports and pages")
    args = ap.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="bench-html-"))
    root.mkdir(parents=True, exist_ok=True)
    saved = {f"pair{i}": pair_report(i).to_json(root / f"pair{i}.json") for i in range(3)}
    trajectory_report(0).to_json(root / "traj.json")
    del saved
    cases = {
        "one comparison, 290 tensors": ["pair0"],
        "three comparisons side by side": ["pair0", "pair1", "pair2"],
        "one trajectory, 168 matrices x 20 steps": ["traj"],
        "two comparisons and a trajectory": ["pair0", "pair1", "traj"],
    }
    rows = []
    for what, names in cases.items():
        page = root / (("_".join(names)) + ".html")

        def run(_seed: int, names=names, page=page) -> int:
            reports = {n: Report.from_json(root / f"{n}.json") for n in names}
            weightgeo.write_html(reports, page)
            return page.stat().st_size

        med, times, sizes = median_time(run, repeats=args.repeats)
        rows.append(
            [
                what,
                f"{med:.3f}",
                f"{min(times):.3f}–{max(times):.3f}",
                f"{sizes[0] / 1e6:.2f}",
                "yes" if med <= 2 and sizes[0] <= 3e6 else "NO",
            ]
        )
    print(machine_line())
    print(markdown_table(["page (from saved JSON)", "median s", "range s", "MB", "≤ 2 s, ≤ 3 MB"], rows))
    print(f"pages in {root}")


if __name__ == "__main__":
    main()
