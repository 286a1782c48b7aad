"""Supervised fine-tuning: next-token cross-entropy on correct demonstrations (paper App. C).

Recipe relations kept from the paper: cosine schedule with 10% linear warm-up from ``lr`` down to
``lr / 10``; AdamW (0.9, 0.95), weight decay 0.1; fp32 master weights, bf16 checkpoints.

>>> import tempfile
>>> from weightgeo.train.model import GPT, GPTConfig
>>> m = GPT(GPTConfig(n_layer=1, n_embd=16, n_head=2))
>>> out = train(m, SFTConfig(steps=2, batch_size=4, save_every=1, eval_n=0), tempfile.mkdtemp())
>>> out["checkpoints"]
[0, 1, 2]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .hf import as_policy
from .loop import StepCallback, attach_projection, begin_run, end_step, finish_run, lr_at, step_generator
from .losses import sft_loss
from .model import GPT
from .task import ScratchpadAdditionTask

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["SFTConfig", "train"]


@dataclass
class SFTConfig:
    steps: int = 300  # optimizer steps
    batch_size: int = 128  # demonstrations per optimizer step
    micro_batch_size: int | None = None  # gradient accumulation chunk (None: whole batch at once)
    lr: float = 1e-5  # peak lr (paper: 1e-5)
    min_lr: float = 1e-6  # cosine floor (paper: 1e-6, i.e. lr / 10)
    warmup_frac: float = 0.1  # linear warm-up fraction (paper: 10%)
    betas: tuple[float, float] = (0.9, 0.95)  # paper
    weight_decay: float = 0.1  # paper; decoupled, on 2-D tensors only
    save_every: int = 64  # checkpoint cadence in steps (paper's OPD cadence); step 0 and the last always saved
    save_at: tuple[int, ...] = ()  # extra checkpoint steps besides the cadence (e.g. a mid-run reading)
    save_fp32: bool = False  # also write the fp32 masters to run_dir/fp32/checkpoint-<step>
    trainable: str | None = None  # regex of the parameters that train (None: all; the rest are frozen)
    project_at: int | None = None  # from this step on, project gradients onto V_k of ΔW (paper §4.2); None: never
    project_k: int = 16  # K of the projection subspace (paper: 16)
    eval_n: int = 500  # held-out prompts evaluated at start and end (0: skip)
    eval_samples: int = 1  # T=1 samples per evaluation prompt
    seed: int = 0  # data seed
    threads: int | None = None  # torch intra-op threads (None: leave as is)


def train(
    model: GPT | PreTrainedModel,
    cfg: SFTConfig,
    run_dir: str | Path,
    *,
    task: ScratchpadAdditionTask | None = None,
    on_step: StepCallback | None = None,
) -> dict:
    """Fine-tune ``model`` in place; write ``run_dir/checkpoint-<step>``; return a summary dict.

    With ``cfg.project_at = s``, the run is identical to the unprojected one up to step s (same seeds), then
    computes V_K of ΔW (bf16 weights at step s minus the start) and projects every later gradient of the
    block matrices onto it (projector.py; the AdamW state is kept).

    ``model`` may be a transformers causal LM (``AutoModelForCausalLM``); it is trained through
    :class:`~weightgeo.train.hf.HFCausalLM`, which ``on_step`` then receives (same parameter names).
    """
    model = as_policy(model)
    task = task or ScratchpadAdditionTask()
    writer, opt, initial, summary = begin_run(model, cfg, run_dir, algorithm="sft", task=task, on_step=on_step)
    proj = None
    mb = cfg.micro_batch_size or cfg.batch_size
    model.train()
    loss_sum = float("nan")
    for step in range(cfg.steps):
        if cfg.project_at is not None and step == cfg.project_at:
            proj = attach_projection(model, initial, cfg.project_k)
        lr = lr_at(step, total=cfg.steps, lr=cfg.lr, schedule="cosine", warmup_frac=cfg.warmup_frac, min_lr=cfg.min_lr)
        for g in opt.param_groups:
            g["lr"] = lr
        tokens, mask = task.demonstrations(cfg.batch_size, step_generator(cfg.seed, step, 0))
        n_tok = mask.sum()  # normaliser over the whole accumulated batch
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for i in range(0, cfg.batch_size, mb):
            t, m = tokens[i : i + mb], mask[i : i + mb]
            loss = sft_loss(model(t[:, :-1]), t[:, 1:], m, num_tokens=n_tok)
            loss.backward()
            loss_sum += loss.item()
        opt.step()
        end_step(
            writer,
            model,
            step + 1,
            {"step": step + 1, "lr": lr, "loss": loss_sum},
            on_step=on_step,
            saved={"loss": loss_sum},
        )
    summary = finish_run(model, cfg, task, writer, proj, summary, {"loss": loss_sum})
    summary["final_loss"] = loss_sum
    return summary
