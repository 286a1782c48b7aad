"""PEFT LoRA adapters: factored updates ``ΔW = scaling · B @ A`` and base + adapter as one checkpoint.

``scaling = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), where ``r`` and ``alpha`` come from
``rank_pattern``/``alpha_pattern`` when a key matches the module name the way PEFT matches it (first key,
in file order, for which ``re.match(rf"(.*\\.)?({key})$", module)`` succeeds), else from ``r``/``lora_alpha``.
DoRA adapters are refused (their update is not low-rank).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import WeightgeoError
from ._files import read_json_object
from .base import Checkpoint, FactoredDelta, TensorInfo
from .format import Format, Source, nothing_to_check
from .hf import has_weight_files
from .names import canonical_name
from .safetensors import SafetensorsCheckpoint
from .torch_bin import TorchBinCheckpoint

__all__ = ["FORMAT", "ADAPTER_CONFIG", "LoraAdapter", "MergedAdapterCheckpoint", "pattern_value"]

#: what marks a PEFT adapter folder
ADAPTER_CONFIG = "adapter_config.json"
_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
    r"(?:\.(?P<adapter>[^.]+))?(?:\.weight)?$"
)


def pattern_value(patterns: Mapping[str, Any] | None, module: str, default: Any) -> Any:
    """The value of the first pattern key matching ``module`` as PEFT matches it, else ``default``.

    A key matches when ``re.match(rf"(.*\\.)?({key})$", module)`` succeeds: a suffix at a ``.`` boundary,
    or a regex matching the whole name.

    >>> pattern_value({"q_proj": 8, r"layers\\.1\\..*v_proj": 2}, "model.layers.1.self_attn.v_proj", 4)
    2
    >>> pattern_value({"q_proj": 8}, "model.layers.0.self_attn.k_proj", 4)
    4
    """
    for key, value in (patterns or {}).items():
        if module == key:
            return value
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error as e:
            raise WeightgeoError(
                f"adapter pattern {key!r} is not a valid regular expression ({e}); fix "
                f"rank_pattern/alpha_pattern in adapter_config.json"
            ) from None
    return default


@dataclass(frozen=True)
class _Module:
    name: str  # module path without PEFT's base_model.model. prefix
    a_key: str
    b_key: str
    rank: int
    alpha: float
    scaling: float
    transpose: bool  # ΔW = (B @ A).T (embeddings, fan_in_fan_out)
    shape: tuple[int, int]  # shape of ΔW


class LoraAdapter:
    """A PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors`` or ``.bin``).

    ``modules`` maps each adapted module's name (PEFT prefix removed) to its factors' keys, rank, alpha and
    scaling; :meth:`delta` reads one module's factors.

    >>> import tempfile, json, torch
    >>> from pathlib import Path
    >>> from safetensors.torch import save_file
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    >>> save_file({"base_model.model.layer.q_proj.lora_A.weight": torch.ones(2, 3),
    ...            "base_model.model.layer.q_proj.lora_B.weight": torch.ones(5, 2)}, str(d / "adapter_model.safetensors"))
    >>> ad = LoraAdapter(d)
    >>> list(ad.modules), ad.modules["layer.q_proj"].scaling, ad.delta("layer.q_proj").dense().shape
    (['layer.q_proj'], 2.0, torch.Size([5, 3]))
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        if path.is_file() and path.name == ADAPTER_CONFIG:
            path = path.parent
        self.path = path
        cfg_path = path / ADAPTER_CONFIG
        if not cfg_path.is_file():
            raise WeightgeoError(f"{path}: no {ADAPTER_CONFIG}; pass a PEFT adapter folder")
        cfg = read_json_object(cfg_path, what=ADAPTER_CONFIG)
        self.config: dict[str, Any] = cfg
        peft_type = cfg.get("peft_type", "LORA")
        if str(peft_type).upper() != "LORA":
            raise WeightgeoError(
                f"{cfg_path}: peft_type {peft_type!r} is not supported, only LoRA adapters; "
                f"merge the adapter into the model (merge_and_unload) and compare full weights"
            )
        if cfg.get("use_dora"):
            raise WeightgeoError(
                f"{cfg_path}: DoRA not supported (use_dora=true: the update is not low-rank); "
                f"merge the adapter with PEFT's merge_and_unload() and compare the merged weights"
            )
        self.r = _positive(cfg_path, "r", cfg.get("r", 8))
        self.lora_alpha = _number(cfg_path, "lora_alpha", cfg.get("lora_alpha", 8))
        self.use_rslora = bool(cfg.get("use_rslora", False))
        self.fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
        self.rank_pattern = _mapping(cfg_path, "rank_pattern", cfg.get("rank_pattern"))
        self.alpha_pattern = _mapping(cfg_path, "alpha_pattern", cfg.get("alpha_pattern"))
        self.target_modules = cfg.get("target_modules")
        self.weights = _open_weights(path)
        self.modules: dict[str, _Module] = {}
        self.extra: list[str] = []  # non-LoRA tensors (modules_to_save): full replacement weights
        self._build(cfg_path)

    def _build(self, cfg_path: Path) -> None:
        found: dict[str, dict[str, str]] = {}
        for key in self.weights.names():
            m = _LORA_KEY.match(key)
            if m is None:
                self.extra.append(key)
                continue
            module = m["module"]
            module = module[len(_PEFT_PREFIX) :] if module.startswith(_PEFT_PREFIX) else module
            kind = m["kind"].replace("embedding_", "")
            slot = found.setdefault(module, {})
            if kind in slot:
                raise WeightgeoError(
                    f"{self.weights.source}: module {module!r} has two {kind} tensors "
                    f"({slot[kind]!r}, {key!r}); save one adapter per folder"
                )
            slot[kind] = key
            slot["embedding"] = slot.get("embedding", "") or ("1" if "embedding" in m["kind"] else "")
        for module, slot in found.items():
            if "lora_A" not in slot or "lora_B" not in slot:
                have = next(iter(v for k, v in slot.items() if k.startswith("lora")))
                raise WeightgeoError(
                    f"{self.weights.source}: {have!r} has no matching "
                    f"{'lora_B' if 'lora_A' in slot else 'lora_A'} tensor; re-save the adapter"
                )
            a = self.weights.info(slot["lora_A"])
            b = self.weights.info(slot["lora_B"])
            if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
                raise WeightgeoError(
                    f"{self.weights.source}: module {module!r}: lora_A {a.shape} and lora_B "
                    f"{b.shape} are not [r, in] and [out, r] (conv LoRA is not supported)"
                )
            rank = a.shape[0]
            want = pattern_value(self.rank_pattern, module, self.r)
            if int(want) != rank:
                raise WeightgeoError(
                    f"{self.weights.source}: module {module!r} has rank {rank} (lora_A {a.shape}) "
                    f"but adapter_config.json gives r={want}; fix r/rank_pattern in {cfg_path}"
                )
            alpha = float(pattern_value(self.alpha_pattern, module, self.lora_alpha))
            scaling = alpha / math.sqrt(rank) if self.use_rslora else alpha / rank
            # PEFT's embedding LoRA stores A [r, vocab], B [dim, r] and applies (B @ A).T
            transpose = bool(slot["embedding"]) or self.fan_in_fan_out
            shape = (a.shape[1], b.shape[0]) if transpose else (b.shape[0], a.shape[1])
            self.modules[module] = _Module(
                module, slot["lora_A"], slot["lora_B"], rank, alpha, scaling, transpose, shape
            )
        if not self.modules:
            raise WeightgeoError(
                f"{self.weights.source}: no lora_A/lora_B tensors found (keys: "
                f"{self.weights.names()[:5]}); pass a PEFT LoRA adapter folder"
            )

    def delta(self, module: str) -> FactoredDelta:
        """The factored update of one module: ``B`` [out, r], ``A`` [r, in], scaling (dtype as stored)."""
        m = self.modules.get(module)
        if m is None:
            raise WeightgeoError(f"{self.path}: no LoRA module {module!r}; adapted modules: {list(self.modules)[:5]}")
        A = self.weights.get(m.a_key)
        B = self.weights.get(m.b_key)
        if m.transpose:
            A, B = B.T.contiguous(), A.T.contiguous()
        return FactoredDelta(B=B, A=A, scaling=m.scaling)

    def close(self) -> None:
        self.weights.close()

    def __repr__(self) -> str:
        return f"LoraAdapter({str(self.path)!r}, modules={len(self.modules)}, r={self.r}, alpha={self.lora_alpha})"


def _positive(where: Path, key: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise WeightgeoError(f"{where}: {key} must be a positive integer, found {v!r}; fix adapter_config.json")
    return v


def _number(where: Path, key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise WeightgeoError(f"{where}: {key} must be a number, found {v!r}; fix adapter_config.json")
    return float(v)


def _mapping(where: Path, key: str, v: Any) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v.values()):
        raise WeightgeoError(
            f"{where}: {key} must map module patterns to numbers, found {v!r:.200}; fix adapter_config.json"
        )
    return dict(v)


def _open_weights(path: Path) -> Checkpoint:
    st, pt = (path / n for n in _ADAPTER_WEIGHTS)
    if st.is_file():
        return SafetensorsCheckpoint([st])
    if pt.is_file():
        return TorchBinCheckpoint([pt])
    raise WeightgeoError(
        f"{path}: adapter_config.json found but no adapter_model.safetensors or adapter_model.bin "
        f"(folder holds {sorted(p.name for p in path.iterdir())[:12]}); re-save the adapter"
    )


class MergedAdapterCheckpoint(Checkpoint):
    """``base`` with a LoRA ``adapter`` applied: same names; adapted weights are ``W + scaling · B @ A``.

    The sum is computed in float32 and cast to the base tensor's dtype. :meth:`factored_delta` returns the
    update kept factored. Adapter tensors that are not LoRA factors (``modules_to_save``) replace the
    base tensor of the same canonical name.
    """

    def __init__(self, base: Checkpoint, adapter: LoraAdapter) -> None:
        super().__init__()
        self.base = base
        self.adapter = adapter
        self.config = dict(base.config)
        self.source = f"{base.source} + LoRA {adapter.path}"
        by_canon = {canonical_name(n): n for n in base.names()}
        self._targets: dict[str, str] = {}  # base name -> adapter module
        unmatched = []
        for module, m in adapter.modules.items():
            name = by_canon.get(canonical_name(module + ".weight"))
            if name is None:
                unmatched.append(module)
                continue
            shape = base.info(name).shape
            if tuple(shape) != m.shape:
                raise WeightgeoError(
                    f"{adapter.path}: LoRA update of {module!r} has shape {m.shape} but base tensor "
                    f"{name!r} is {shape}; use the base model this adapter was trained on"
                )
            self._targets[name] = module
        self._replace: dict[str, str] = {}
        for key in adapter.extra:
            k = key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key
            k = k.replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".")
            name = by_canon.get(canonical_name(k))
            if name is None:
                unmatched.append(key)
            else:
                self._replace[name] = key
        if unmatched:
            matched = "none" if not self._targets else f"{len(self._targets)} matched"
            raise WeightgeoError(
                f"{adapter.path}: adapter targets match no base tensor ({matched}; unmatched adapter modules "
                f"{unmatched[:4]}, base keys look like {base.names()[:4]}); pass the base model this adapter "
                f"was trained on"
            )

    def _infos(self) -> dict[str, TensorInfo]:
        return dict(self.base.infos)

    def _get(self, name: str) -> torch.Tensor:
        if name in self._replace:
            return self.adapter.weights.get(self._replace[name]).to(self.base.info(name).dtype)
        w = self.base.get(name)
        if name not in self._targets:
            return w
        d = self.adapter.delta(self._targets[name])
        return (w.float() + d.dense(torch.float32)).to(w.dtype)

    def _get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        if name in self._replace or name not in self._targets:
            return self._get(name)[start:stop] if name in self._replace else self.base.get_rows(name, start, stop)
        w = self.base.get_rows(name, start, stop)
        d = self.adapter.delta(self._targets[name])
        dw = (d.B[start:stop].float() @ d.A.float()) * d.scaling
        return (w.float() + dw).to(w.dtype)

    def factored_delta(self, name: str) -> FactoredDelta | None:
        """The adapter's update of ``name`` kept factored, or ``None`` for tensors it does not adapt."""
        self.info(name)
        module = self._targets.get(name)
        return None if module is None else self.adapter.delta(module)

    def identity(self, name: str) -> dict[str, Any] | None:
        """The base tensor's identity, plus the adapter's factors and scaling (or its replacement tensor) when
        it adapts ``name``; ``None`` when any part has no on-disk identity."""
        base = self.base.identity(name)
        parts: dict[str, Any]
        if name in self._replace:  # the replacement's values, cast to the base tensor's dtype
            parts = {"base": base, "replacement": self.adapter.weights.identity(self._replace[name])}
        elif name in self._targets:
            m = self.adapter.modules[self._targets[name]]
            parts = {
                "base": base,
                "A": self.adapter.weights.identity(m.a_key),
                "B": self.adapter.weights.identity(m.b_key),
                "scaling": m.scaling,
                "transpose": m.transpose,
            }
        else:
            return base
        return None if any(v is None for v in parts.values()) else {"format": "lora", **parts}

    def adapted(self) -> list[str]:
        """Base names that the adapter changes."""
        return sorted(set(self._targets) | set(self._replace))

    def close(self) -> None:
        self.base.close()
        self.adapter.close()


# --- the format ---------------------------------------------------------------------------------------------
def _recognise(source: Source) -> bool:
    if source.file is not None:
        return source.file.name == ADAPTER_CONFIG
    folder = source.folder
    # an HF folder that also holds an adapter is the model, unless a base says the adapter is what is meant
    return (
        folder is not None
        and (folder / ADAPTER_CONFIG).is_file()
        and (source.base is not None or not has_weight_files(folder))
    )


def _open(source: Source) -> Checkpoint:
    folder = source.file.parent if source.file is not None else source.folder
    assert folder is not None  # recognised: a folder or its adapter_config.json
    if source.base is None:
        raise WeightgeoError(
            f"{folder}: is a LoRA adapter ({ADAPTER_CONFIG}); pass the base model too: "
            f"open_checkpoint({str(folder)!r}, base=<base model path, hub id or Checkpoint>)"
        )
    return MergedAdapterCheckpoint(source.base, LoraAdapter(folder))


FORMAT = Format(
    "lora",
    f"a PEFT LoRA adapter ({ADAPTER_CONFIG} + adapter_model.safetensors/.bin) applied to base=",
    recognise=_recognise,
    open=_open,
    complete=nothing_to_check,
    needs_base=True,
)
