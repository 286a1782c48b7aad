"""Tensor names: prefix normalisation, module type, layer index, and include/exclude filters.

Checkpoints of one model name their tensors differently (``model.`` in HF causal LMs, ``base_model.model.``
in PEFT, ``module.`` under DDP, ``_orig_mod.`` under ``torch.compile``). :func:`canonical_name` strips those
prefixes so that tensors align; the other helpers read structure out of a name.

>>> canonical_name("base_model.model.model.layers.0.self_attn.q_proj.weight")
'layers.0.self_attn.q_proj.weight'
>>> module_type("model.layers.3.mlp.down_proj.weight"), layer_index("model.layers.3.mlp.down_proj.weight")
('down_proj', 3)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from ..errors import WeightgeoError

__all__ = [
    "canonical_name",
    "module_type",
    "layer_index",
    "compile_filter",
    "stored_in_out",
    "PRESETS",
    "INPUT_EMBEDDINGS",
    "OUTPUT_EMBEDDINGS",
    "VOCAB_MODULES",
    "is_embedding",
    "expert_index",
    "expert_tensor",
    "is_expert_stack",
]

# The one list of wrappers a name may carry. Prefixes are stripped repeatedly from the front of a name (order does
# not matter); wrapper components are removed wherever they stand (before another component): PEFT's
# ``base_layer`` (a wrapped Linear's own weight), FSDP's and activation checkpointing's wrapped modules.
_PREFIXES = ("base_model.model.", "_orig_mod.", "module.", "model.")
_WRAPPER_COMPONENTS = frozenset({"base_layer", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
# Layer-container names after which the next integer component is the layer index.
_LAYER_CONTAINERS = frozenset({"layers", "h", "blocks", "block", "layer"})
_PARAM_SUFFIXES = frozenset({"weight", "bias"})

_ATTENTION = re.compile(
    r"(^|\.)(q_proj|k_proj|v_proj|o_proj|qkv_proj|c_attn|query_key_value|Wqkv|out_proj)\.weight$"
    r"|(attn|attention)\.(c_proj|dense)\.weight$"
    r"|(attn|attention)\.(self\.)?(query|key|value)\.weight$"
    r"|attention\.output\.dense\.weight$"
)
_MLP = re.compile(
    r"(^|\.)(gate_proj|up_proj|down_proj|gate_up_proj|fc1|fc2|c_fc|w1|w2|w3|dense_h_to_4h|dense_4h_to_h)"
    r"\.weight$"
    r"|mlp\.c_proj\.weight$"
)
# Routed experts: a component named ``experts`` (not ``shared_experts``, the always-active dense MLP). A stack
# ``...experts.gate_up_proj`` [E, out, in] (transformers' fused layout, in memory and in state dicts), or one
# expert ``...experts.{j}.gate_proj.weight`` (HF on disk; Megatron and torchtitan views).
_EXPERTS = re.compile(r"(^|\.)experts\.")
_EXPERT_J = re.compile(r"(^|\.)experts\.(\d+)\.")
# The routers of MoE blocks (Qwen/Mixtral/DeepSeek ``mlp.gate``, Mixtral ``block_sparse_moe.gate``, gpt-oss and
# Megatron ``router``, torchtitan ``moe.router.gate``) and Qwen2-MoE's shared-expert gate.
_ROUTER = re.compile(
    r"(^|\.)(mlp|moe|block_sparse_moe|feed_forward)\.(gate|router|router\.gate)\.weight$"
    r"|(^|\.)shared_expert_gate\.weight$"
)

# The one list of vocabulary modules (rows = tokens), by module type. Input embeddings are what an absent
# lm_head.weight may be tied to (checkpoint.align); a vocabulary module's row count may differ between base and
# fine-tune (added tokens, engine.plan); embeddings are not "linear" (the preset below).
#: input token embeddings (HF Llama/Qwen, GPT-2, BLOOM/Falcon, GPT-NeoX, Meta/torchtitan Llama)
INPUT_EMBEDDINGS = frozenset({"embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings"})
#: output projections onto the vocabulary (HF, GPT-NeoX, Meta/torchtitan Llama)
OUTPUT_EMBEDDINGS = frozenset({"lm_head", "embed_out", "output"})
#: every module whose rows are tokens
VOCAB_MODULES = INPUT_EMBEDDINGS | OUTPUT_EMBEDDINGS
# other embeddings that are not linear maps: GPT-2's position embedding, T5's shared token embedding
_OTHER_EMBEDDINGS = frozenset({"wpe", "shared"})

#: The include/exclude presets accepted by :func:`compile_filter` (2-D ``.weight`` tensors and expert stacks).
PRESETS = ("attention", "mlp", "linear", "experts", "router")


def canonical_name(name: str) -> str:
    """The name with wrapper prefixes (``base_model.model.``, ``model.``, ``module.``, ``_orig_mod.``) stripped.

    Wrapper components are removed too, wherever they stand: PEFT's ``base_layer`` (a wrapped Linear's own
    weight), FSDP's ``_fsdp_wrapped_module`` and activation checkpointing's ``_checkpoint_wrapped_module``. A
    prefix is kept when stripping it would leave a bare ``weight``/``bias``.

    >>> canonical_name("model.layers.0.self_attn.q_proj.weight")
    'layers.0.self_attn.q_proj.weight'
    >>> canonical_name("module._orig_mod.model.norm.weight")
    'norm.weight'
    >>> canonical_name("_fsdp_wrapped_module.model.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight")
    'layers.0.mlp.up_proj.weight'
    >>> canonical_name("lm_head.weight")
    'lm_head.weight'
    """
    if not isinstance(name, str):
        raise WeightgeoError(f"tensor names are strings, got {type(name).__name__} {name!r}")
    parts = name.split(".")
    kept = [p for p in parts[:-1] if p not in _WRAPPER_COMPONENTS] + parts[-1:]
    if 1 < len(kept) < len(parts):  # never down to a bare ``weight``
        name = ".".join(kept)
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if name.startswith(p) and name[len(p) :] not in _PARAM_SUFFIXES and len(name) > len(p):
                name = name[len(p) :]
                changed = True
    return name


def module_type(name: str) -> str:
    """The module's own name: the component before ``.weight``/``.bias`` (e.g. ``"q_proj"``).

    For other tensors (buffers such as ``rotary_emb.inv_freq``) it is the last non-numeric component.

    >>> module_type("model.layers.0.input_layernorm.weight")
    'input_layernorm'
    >>> module_type("lm_head.weight"), module_type("layers.1.self_attn.k_proj.bias")
    ('lm_head', 'k_proj')
    """
    parts = canonical_name(name).split(".")
    if len(parts) > 1 and parts[-1] in _PARAM_SUFFIXES:
        parts = parts[:-1]
    for part in reversed(parts):
        if not part.isdigit():
            return part
    return parts[-1]


def layer_index(name: str) -> int | None:
    """The layer number in a name, or ``None``: the first integer after ``layers``/``h``/``blocks``/``block``/``layer``.

    Falls back to the first integer component anywhere in the name.

    >>> layer_index("model.layers.12.mlp.up_proj.weight"), layer_index("transformer.h.3.attn.c_attn.weight")
    (12, 3)
    >>> layer_index("model.embed_tokens.weight") is None
    True
    """
    parts = name.split(".")
    for prev, part in zip(parts, parts[1:]):
        if prev in _LAYER_CONTAINERS and part.isdigit():
            return int(part)
    for part in parts:
        if part.isdigit():
            return int(part)
    return None


def is_embedding(name: str) -> bool:
    """True for embedding tables and vocabulary projections (by module type), which the "linear" preset leaves out.

    >>> [is_embedding(n) for n in ("model.embed_tokens.weight", "lm_head.weight", "layers.0.mlp.fc1.weight")]
    [True, True, False]
    """
    mt = module_type(name)
    return mt in VOCAB_MODULES or mt in _OTHER_EMBEDDINGS or "embed" in mt.lower()


def expert_index(name: str) -> int | None:
    """The expert number in a per-expert name (``...experts.{j}.gate_proj.weight``), else ``None``.

    >>> expert_index("model.layers.1.mlp.experts.7.down_proj.weight"), expert_index("layers.1.mlp.gate.weight")
    (7, None)
    """
    m = _EXPERT_J.search(name)
    return int(m.group(2)) if m else None


def expert_tensor(name: str) -> str:
    """The expert tensor a per-expert name belongs to (its expert number removed); other names unchanged.

    >>> expert_tensor("layers.1.mlp.experts.7.down_proj.weight"), expert_tensor("layers.1.mlp.experts.down_proj")
    ('layers.1.mlp.experts.down_proj.weight', 'layers.1.mlp.experts.down_proj')
    """
    return _EXPERT_J.sub(lambda m: f"{m.group(1)}experts.", name, count=1)


def is_expert_stack(name: str, shape: tuple[int, ...] | None) -> bool:
    """True for a stack of routed experts' matrices [E, out, in]: a 3-D tensor (any, without a shape) under an
    ``experts`` component (transformers' fused ``mlp.experts.gate_up_proj``; not ``shared_experts``).

    >>> is_expert_stack("model.layers.0.mlp.experts.gate_up_proj", (8, 96, 64))
    True
    >>> is_expert_stack("model.layers.0.mlp.shared_experts.gate_up_proj", (8, 96, 64))
    False
    """
    c = canonical_name(name)
    return (
        (shape is None or len(shape) == 3)
        and bool(_EXPERTS.search(c))
        and not _EXPERT_J.search(c)
        and not c.endswith(".bias")
        and not c.endswith("_bias")
    )


def _preset(kind: str) -> Callable[[str, tuple[int, ...] | None], bool]:
    def two_d_weight(cname: str, shape: tuple[int, ...] | None) -> bool:
        return cname.endswith(".weight") and (shape is None or len(shape) == 2)

    def matrices(cname: str, shape: tuple[int, ...] | None) -> bool:  # 2-D weights and expert stacks
        return two_d_weight(cname, shape) or (shape is not None and is_expert_stack(cname, shape))

    if kind == "attention":
        return lambda c, s: two_d_weight(c, s) and bool(_ATTENTION.search(c))
    if kind == "mlp":
        return lambda c, s: (two_d_weight(c, s) and bool(_MLP.search(c))) or (s is not None and is_expert_stack(c, s))
    if kind == "experts":
        return lambda c, s: matrices(c, s) and bool(_EXPERTS.search(c))
    if kind == "router":
        return lambda c, s: two_d_weight(c, s) and bool(_ROUTER.search(c))

    def linear(c: str, s: tuple[int, ...] | None) -> bool:
        if not matrices(c, s) or is_embedding(c):
            return False
        # without a shape, norms (1-D in practice) are excluded by name
        return s is not None or not re.search(r"norm|(^|[._])ln(_|\d|$)", module_type(c))

    return linear


def _matches(rx: re.Pattern[str]) -> Callable[[str, tuple[int, ...] | None], bool]:
    """The predicate of one regex: ``re.search`` on the canonical name (the shape plays no part)."""
    return lambda cname, shape: rx.search(cname) is not None


def _compile_one(spec: str | Sequence[str] | None, what: str) -> list[Callable[[str, tuple[int, ...] | None], bool]]:
    if spec is None:
        return []
    if isinstance(spec, str):
        items: Iterable[object] = [spec]
    elif isinstance(spec, (list, tuple, set, frozenset)):
        items = spec
    else:
        raise WeightgeoError(
            f"{what} must be a regex string, a preset {PRESETS} or a list of them, got {type(spec).__name__}"
        )
    out: list[Callable[[str, tuple[int, ...] | None], bool]] = []
    for item in items:
        if not isinstance(item, str):
            raise WeightgeoError(
                f"{what} entries must be strings (regexes or presets {PRESETS}), got {type(item).__name__} {item!r}"
            )
        if item in PRESETS:
            out.append(_preset(item))
            continue
        try:
            rx = re.compile(item)
        except re.error as e:
            raise WeightgeoError(
                f"{what} pattern {item!r} is not a valid regular expression ({e}); "
                f"fix the regex or use a preset {PRESETS}"
            ) from None
        out.append(_matches(rx))
    return out


def compile_filter(
    include: str | Sequence[str] | None = None, exclude: str | Sequence[str] | None = None
) -> Callable[..., bool]:
    """A predicate ``f(name, shape=None) -> bool`` selecting tensors by regex or preset.

    ``include``/``exclude`` are a regex, a preset or a list of them. Regexes are ``re.search``-ed on the
    canonical name; presets match 2-D ``.weight`` tensors and expert stacks ([E, out, in] under ``experts``):
    ``"attention"``, ``"mlp"`` (expert stacks included), ``"linear"`` (every 2-D weight and expert stack
    except embeddings and ``lm_head``), ``"experts"`` (routed experts, per-expert weights or stacks; not
    ``shared_experts``), ``"router"`` (an MoE block's ``gate`` / ``router`` weight, Qwen2-MoE's
    ``shared_expert_gate``). A tensor is kept when it matches some include (or ``include`` is None) and no
    exclude. Pass the shape; without one, the 2-D test is skipped and ``"linear"`` excludes norms by name.

    >>> keep = compile_filter("attention", exclude=r"layers\\.0\\.")
    >>> keep("model.layers.1.self_attn.q_proj.weight", (16, 16)), keep("model.layers.0.self_attn.q_proj.weight", (16, 16))
    (True, False)
    >>> compile_filter("linear")("model.embed_tokens.weight", (40, 16))
    False
    >>> keep = compile_filter(["experts", "router"])
    >>> keep("layers.0.mlp.experts.down_proj", (4, 16, 8)), keep("layers.0.mlp.gate.weight", (4, 16))
    (True, True)
    >>> keep("layers.0.mlp.shared_experts.down_proj.weight", (16, 8)), keep("layers.0.mlp.gate_proj.weight", (8, 16))
    (False, False)
    """
    inc = _compile_one(include, "include")
    exc = _compile_one(exclude, "exclude")

    def keep(name: str, shape: tuple[int, ...] | None = None) -> bool:
        c = canonical_name(name)
        s = tuple(shape) if shape is not None else None
        if inc and not any(f(c, s) for f in inc):
            return False
        return not any(f(c, s) for f in exc)

    return keep


# transformers' ``Conv1D`` (GPT-2 and the architectures built from its blocks) stores y = x W + b with W [in, out].
_CONV1D_MODEL_TYPES = frozenset({"gpt2", "imagegpt", "decision_transformer"})
_CONV1D_MODULES = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})
# MoE stacks applied as x @ W[e] ([E, in, out]): gpt-oss's experts.gate_up_proj / down_proj
_IN_OUT_EXPERT_MODEL_TYPES = frozenset({"gpt_oss"})


def stored_in_out(name: str, config: Mapping[str, Any]) -> bool:
    """True for a weight stored [in, out] (a transformers ``Conv1D``; per expert, gpt-oss's expert stacks), judged
    from ``config.json``'s model_type.

    Their stored right singular side is the *output* side: ``side="left"`` gives the input side there.

    >>> stored_in_out("transformer.h.0.attn.c_attn.weight", {"model_type": "gpt2"})
    True
    >>> stored_in_out("model.layers.0.self_attn.q_proj.weight", {"model_type": "llama"})
    False
    >>> stored_in_out("model.layers.0.mlp.experts.gate_up_proj", {"model_type": "gpt_oss"})  # x @ W per expert
    True
    """
    if config.get("model_type") in _IN_OUT_EXPERT_MODEL_TYPES and is_expert_stack(name, None):
        return True
    return (
        config.get("model_type") in _CONV1D_MODEL_TYPES
        and name.endswith(".weight")
        and module_type(name) in _CONV1D_MODULES
    )
