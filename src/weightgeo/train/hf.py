"""The optional transformers path: a Hugging Face causal LM as student or teacher of the training loops.

``HFCausalLM`` wraps a ``transformers`` ``PreTrainedModel`` (``AutoModelForCausalLM``) so that it offers
exactly what the loops use from :class:`~weightgeo.train.model.GPT`: ``forward(idx) -> fp32 logits``,
``save_pretrained(dir, *, dtype)`` (HF layout, bf16 ``model.safetensors``), ``parameters`` /
``named_parameters`` under the HF model's own names, ``train`` / ``eval``. Sampling and response log-probs
are then the loop's own :func:`~weightgeo.train.model.generate` and
:func:`~weightgeo.train.model.response_logprobs` (explicit ``torch.Generator``, never ``model.generate``
nor the global RNG), so a run is seeded exactly like a GPT run. ``sft.train``, ``opd.train`` and
``rlvr.train`` wrap a ``PreTrainedModel`` themselves (:func:`as_policy`); ``tiny_hf_model`` builds a small
Llama on the task's vocabulary.

This module imports ``transformers`` only inside the functions that need it: ``weightgeo.train`` imports
without it, and asking for the HF path without it raises :class:`~weightgeo.errors.WeightgeoError`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from ..errors import WeightgeoError
from .task import ScratchpadAdditionTask

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["HFCausalLM", "as_policy", "tiny_hf_model"]


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise WeightgeoError(
            "the Hugging Face path of weightgeo.train needs transformers, which is not installed; "
            "pip install 'weightgeo[hf]' (or pip install 'transformers>=4.40')"
        ) from e
    return transformers


class HFCausalLM(nn.Module):
    """A ``transformers`` causal LM behind the interface the training loops use from ``GPT``.

    ``forward(idx [B, T]) -> logits [B, T, vocab]`` in fp32 on ``idx``'s device: the input moves to the
    model's device and the logits come back, so the loop (prompts, sampling with a CPU generator, losses)
    stays where it is while the model runs on, e.g., CUDA (with the task's 14-token vocabulary the round
    trip is a few kilobytes). ``named_parameters()`` and ``state_dict()`` carry the HF model's own names,
    so ``weightgeo.Tracker`` on the HF model and ``rank_curve`` on the checkpoints see the same matrices.
    ``save_pretrained(dir, *, dtype=torch.bfloat16)`` writes ``config.json`` + ``model.safetensors`` with
    the weights cast to ``dtype`` (round-to-nearest-even, as ``GPT.save_pretrained``); the in-memory
    weights stay fp32 masters. The HF model itself is ``.hf``; training updates it in place.
    """

    hf: PreTrainedModel  # the wrapped model, kept out of the registered submodules (see __init__)

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        tf = _transformers()
        if not isinstance(model, tf.PreTrainedModel):
            raise WeightgeoError(
                f"HFCausalLM wraps a transformers PreTrainedModel (AutoModelForCausalLM); got {type(model).__name__}"
            )
        if next(model.named_parameters(recurse=False), None) is not None:
            raise WeightgeoError(
                f"{type(model).__name__} holds parameters outside its submodules; HFCausalLM cannot mirror its names"
            )
        # Not a registered submodule: that would prefix every name with "hf."; registering the HF model's
        # children under their own names keeps parameter and checkpoint names identical to the HF model's.
        self.__dict__["hf"] = model
        for name, child in model.named_children():
            self.add_module(name, child)
        self.training = model.training

    def train(self, mode: bool = True) -> HFCausalLM:
        # Through the HF model so its top-level flag follows too (its forward may read self.training).
        self.hf.train(mode)
        self.training = mode
        return self

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        out = self.hf(input_ids=idx.to(self.hf.device), use_cache=False)
        return out.logits.float().to(idx.device)

    def save_pretrained(self, directory: str | Path, *, dtype: torch.dtype = torch.bfloat16) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (weights cast to ``dtype``) through the HF model's
        own ``save_pretrained``, so ``AutoModelForCausalLM.from_pretrained`` and weightgeo both read it."""
        d = Path(directory)
        state: dict[str, torch.Tensor] = {}
        cast: dict[tuple, torch.Tensor] = {}
        for name, t in self.hf.state_dict().items():
            if not t.is_floating_point():
                state[name] = t
                continue
            # Tied weights share storage; keeping them one tensor lets transformers drop the duplicate as usual.
            key = (t.data_ptr(), tuple(t.shape))
            if key not in cast:  # on the host: a checkpoint of a GPU model costs no GPU memory
                cast[key] = t.detach().to(device="cpu", dtype=dtype)
            state[name] = cast[key]
        hf_logging = _transformers().utils.logging
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # one "Writing model shards" bar per checkpoint is noise in a run
        try:
            self.hf.save_pretrained(d, state_dict=state)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        # transformers records the in-memory dtype (fp32); the file holds `dtype`.
        cfg_path = d / "config.json"
        config = json.loads(cfg_path.read_text())
        for k in ("dtype", "torch_dtype"):  # transformers 5 / 4 spelling
            if k in config:
                config[k] = str(dtype).removeprefix("torch.")
        cfg_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return d


def as_policy(model: Any) -> Any:
    """The model the loops drive: a transformers ``PreTrainedModel`` wrapped in :class:`HFCausalLM`;
    ``GPT``, an ``HFCausalLM`` or any other module whose ``forward(idx)`` returns logits, unchanged.

    A ``PreTrainedModel`` implies transformers is already imported, so this never imports it.

    >>> from weightgeo.train.model import GPT, GPTConfig
    >>> m = GPT(GPTConfig(n_layer=1, n_embd=16, n_head=2))
    >>> as_policy(m) is m
    True
    """
    tf = sys.modules.get("transformers")
    if tf is not None and not isinstance(model, HFCausalLM) and isinstance(model, tf.PreTrainedModel):
        return HFCausalLM(model)
    return model


def tiny_hf_model(
    task: ScratchpadAdditionTask | None = None,
    *,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate_size: int | None = None,
    seed: int = 0,
) -> PreTrainedModel:
    """A small ``transformers`` ``LlamaForCausalLM`` on the task's vocabulary, fp32, seeded.

    ``intermediate_size`` defaults to ``2 * hidden_size``; embeddings and ``lm_head`` are untied (as in
    ``GPT``); ``eos_token_id`` is the task's ``<eos>`` and there is no BOS or padding token (sequences
    have fixed length). Weights are drawn from a ``torch.Generator`` seeded with ``seed`` (N(0, 0.02) for
    matrices, ones for the RMSNorm gains, Llama's scheme), and building the model leaves the global RNG
    untouched, so two calls with one seed give identical models.
    """
    tf = _transformers()
    task = task or ScratchpadAdditionTask()
    cfg = tf.LlamaConfig(
        vocab_size=task.vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=task.prompt_len + task.completion_len,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=task.eos_id,
        pad_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):  # transformers initialises from the global RNG; keep it as it was
        model = tf.LlamaForCausalLM(cfg).float()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():  # fixed order -> deterministic, whatever transformers' own init
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, cfg.initializer_range, generator=g)
    return model
