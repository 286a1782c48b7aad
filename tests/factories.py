"""Test factories: tiny Llama-style state_dicts, HF checkpoint folders and PEFT LoRA adapters on disk.

Shared by every test package (import as ``from factories import ...``; ``tests/`` is on ``sys.path`` via
``tests/conftest.py``). The API is stable:

- ``tiny_llama_state(num_layers=2, hidden=16, intermediate=32, vocab=40, dtype=torch.bfloat16, seed=0)``
  -> ``{name: Tensor}`` with HF Llama/Qwen names, deterministic (own ``torch.Generator``).
- ``write_hf_checkpoint(path, tensors, *, shards=1, config=None, fmt="safetensors") -> Path``: an HF model
  folder (``config.json`` + ``model.safetensors`` or ``model-0000k-of-0000N.safetensors`` + index with
  ``metadata.total_size``; ``fmt="bin"`` writes ``pytorch_model.bin`` [shards + index] instead).
- ``write_lora_adapter(path, base_tensors, *, targets=("q_proj", "v_proj"), r=4, alpha=8, rslora=False,
  rank_pattern=None, alpha_pattern=None, seed=0) -> Path``: a PEFT adapter folder (``adapter_config.json`` +
  ``adapter_model.safetensors``, float32 factors, both nonzero so the update is visible).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

__all__ = ["tiny_llama_state", "write_hf_checkpoint", "write_lora_adapter", "lora_pattern_value"]


def tiny_llama_state(
    num_layers: int = 2,
    hidden: int = 16,
    intermediate: int = 32,
    vocab: int = 40,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A random Llama/Qwen-style state_dict (``model.embed_tokens.weight`` ... ``lm_head.weight``)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rand(vocab, hidden)}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{proj}.weight"] = rand(hidden, hidden)
        sd[p + "mlp.gate_proj.weight"] = rand(intermediate, hidden)
        sd[p + "mlp.up_proj.weight"] = rand(intermediate, hidden)
        sd[p + "mlp.down_proj.weight"] = rand(hidden, intermediate)
        sd[p + "input_layernorm.weight"] = (1 + rand(hidden, scale=0.1).float()).to(dtype)
        sd[p + "post_attention_layernorm.weight"] = (1 + rand(hidden, scale=0.1).float()).to(dtype)
    sd["model.norm.weight"] = (1 + rand(hidden, scale=0.1).float()).to(dtype)
    sd["lm_head.weight"] = rand(vocab, hidden)
    return sd


def _split(names: list[str], shards: int) -> list[list[str]]:
    shards = max(1, min(shards, len(names)))
    size = -(-len(names) // shards)
    return [names[i : i + size] for i in range(0, len(names), size)]


def write_hf_checkpoint(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    *,
    shards: int = 1,
    config: dict | None = None,
    fmt: Literal["safetensors", "bin"] = "safetensors",
) -> Path:
    """Write ``tensors`` as an HF model folder at ``path`` (created) and return the folder."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if config is None:
        config = {"model_type": "llama", "tie_word_embeddings": "lm_head.weight" not in tensors}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    data = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    groups = _split(sorted(data), shards)
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    if fmt not in ("safetensors", "bin"):
        raise ValueError(f"fmt must be 'safetensors' or 'bin', got {fmt!r}")

    def save(part: dict[str, torch.Tensor], file: Path) -> None:
        if fmt == "safetensors":
            save_file(part, str(file), metadata={"format": "pt"})
        else:
            torch.save(part, file)

    if len(groups) == 1:
        save(data, path / f"{stem}.{ext}")
        return path
    weight_map = {}
    for k, group in enumerate(groups, start=1):
        file = f"{stem}-{k:05d}-of-{len(groups):05d}.{ext}"
        save({n: data[n] for n in group}, path / file)
        weight_map.update({n: file for n in group})
    total = sum(t.numel() * t.element_size() for t in data.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2))
    return path


def lora_pattern_value(patterns: Mapping[str, float] | None, module: str, default: float) -> float:
    """PEFT's ``get_pattern_key`` rule, written independently of weightgeo: first key with
    ``re.match(rf"(.*\\.)?({key})$", module)`` wins."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def write_lora_adapter(
    path: str | Path,
    base_tensors: Mapping[str, torch.Tensor],
    *,
    targets: Iterable[str] = ("q_proj", "v_proj"),
    r: int = 4,
    alpha: float = 8,
    rslora: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    seed: int = 0,
) -> Path:
    """Write a PEFT LoRA adapter for the 2-D ``.weight`` tensors of ``base_tensors`` whose module is in ``targets``.

    Keys are ``base_model.model.<module>.lora_A.weight`` [rank, in] / ``lora_B.weight`` [out, rank], rank from
    ``rank_pattern`` (PEFT's matching) else ``r``. Returns the folder.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    targets = tuple(targets)
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name in sorted(base_tensors):
        t = base_tensors[name]
        if not name.endswith(".weight") or t.ndim != 2:
            continue
        module = name[: -len(".weight")]
        if module.split(".")[-1] not in targets:
            continue
        rank = int(lora_pattern_value(rank_pattern, module, r))
        n_out, n_in = t.shape
        out[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, n_in, generator=g) * 0.1
        out[f"base_model.model.{module}.lora_B.weight"] = torch.randn(n_out, rank, generator=g) * 0.1
    save_file(out, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": rslora,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": list(targets),
        "rank_pattern": rank_pattern or {},
        "alpha_pattern": alpha_pattern or {},
        "fan_in_fan_out": False,
        "use_dora": False,
        "modules_to_save": None,
    }
    (path / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return path
