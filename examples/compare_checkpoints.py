"""Build two small fine-tunes of one synthetic base in Hugging Face layout and compare them with weightgeo.

    python examples/compare_checkpoints.py [--out runs/compare] [--layers 4] [--hidden 256]

The base has Qwen/Llama tensor names and power-law spectra like pretrained weights. "dense" adds a
full-rank update of 1% of the weight RMS (SFT-like: nearly every bf16 value moves); "gentle" adds a
rank-8 update of 0.05% (RL-like: most entries stay below half a bf16 ULP, so they are unchanged).
Everything is seeded; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

import weightgeo


def power_law_matrix(m: int, n: int, g: torch.Generator, *, exponent: float = 0.5) -> torch.Tensor:
    """A matrix with singular values i^-exponent and random orthogonal factors, scaled to RMS 0.02."""
    r = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=g))
    s = torch.arange(1, r + 1, dtype=torch.float32) ** -exponent
    w = (u * s) @ v.T
    return w * (0.02 / w.pow(2).mean().sqrt())


def synthetic_base(layers: int, hidden: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    inter, vocab = 4 * hidden, 512
    t = {
        "model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g) * 0.02,
        "model.norm.weight": torch.ones(hidden),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[p + f"self_attn.{name}.weight"] = power_law_matrix(hidden, hidden, g)
        t[p + "mlp.gate_proj.weight"] = power_law_matrix(inter, hidden, g)
        t[p + "mlp.up_proj.weight"] = power_law_matrix(inter, hidden, g)
        t[p + "mlp.down_proj.weight"] = power_law_matrix(hidden, inter, g)
        t[p + "input_layernorm.weight"] = torch.ones(hidden)
        t[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
    t["lm_head.weight"] = torch.randn(vocab, hidden, generator=g) * 0.02
    return t


def fine_tune(base: dict[str, torch.Tensor], g: torch.Generator, *, scale: float, rank: int | None):
    out = {}
    for name, w in base.items():
        if w.ndim == 2:
            m, n = w.shape
            if rank is None:
                d = torch.randn(m, n, generator=g)
            else:
                d = torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g) / rank**0.5
            out[name] = w + scale * w.pow(2).mean().sqrt() * d
        else:
            out[name] = w.clone()
    return out


def save_hf(path: Path, tensors: dict[str, torch.Tensor], hidden: int, layers: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()},
        path / "model.safetensors",
        metadata={"format": "pt"},
    )
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/compare"))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    g = torch.Generator().manual_seed(args.seed)
    base = synthetic_base(args.layers, args.hidden, g)
    paths = {"base": save_hf(args.out / "base", base, args.hidden, args.layers)}
    for label, scale, rank in (("dense", 1e-2, None), ("gentle", 5e-4, 8)):
        paths[label] = save_hf(args.out / label, fine_tune(base, g, scale=scale, rank=rank), args.hidden, args.layers)

    summaries = {}
    for label in ("dense", "gentle"):
        report = weightgeo.compare(paths["base"], paths[label], k=64, progress=False)
        report.to_json(args.out / f"{label}.json")
        print(f"== base vs {label} ==")
        print(
            report.table(
                columns=[
                    "name",
                    "shape",
                    "update_sparsity",
                    "max_principal_angle",
                    "spectral_drift",
                    "density",
                    "low_magnitude_overlap",
                    "stable_rank",
                ],
                max_rows=9,
            )
        )
        print()
        summaries[label] = report.summary

    keys = (
        "update_sparsity",
        "principal_overlap",
        "max_principal_angle",
        "spectral_drift",
        "density",
        "principal_mask_overlap",
        "low_magnitude_overlap",
        "stable_rank",
    )
    print("model summary        " + "".join(f"{k:>14}" for k in ("dense", "gentle")))
    for key in keys:
        print(f"{key:<21}" + "".join(f"{summaries[lbl][key]:>14.4g}" for lbl in ("dense", "gentle")))
    print(f"\nreports written to {args.out}/dense.json and {args.out}/gentle.json")


if __name__ == "__main__":
    main()
