"""RLVR with GRPO (paper App. C): binary verifiable reward, group-normalised advantages, clipped PG.

Per step: ``n_prompts`` prompts x ``group_size`` (8) samples at T=1; advantage (r − mean_g)/(std_g + eps)
broadcast over the sequence's tokens; groups whose rewards are all equal are skipped (dropped from the
batch and from the token normaliser; a step with no group left makes no optimizer update); clip
ε_low 0.2 / ε_high 0.28; no KL term; constant lr equal to OPD's; AdamW (0.9, 0.98), weight decay 0.1
(the paper gives RLVR's lr only; betas and decay follow OPD's, our choice).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .hf import as_policy
from .loop import StepCallback, attach_projection, begin_run, end_step, finish_run, pg_update, rollout, step_generator
from .losses import grpo_advantages
from .model import GPT, response_logprobs
from .task import ScratchpadAdditionTask

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["RLVRConfig", "train"]


@dataclass
class RLVRConfig:
    steps: int = 1000  # optimizer steps (paper: about 1k)
    n_prompts: int = 16  # prompts per step
    group_size: int = 8  # GRPO group (paper: 8)
    temperature: float = 1.0  # sampling temperature
    micro_batch_size: int | None = None  # sequences per backward pass (None: the whole kept batch)
    updates_per_batch: int = 1  # optimizer steps per rollout batch (1: on-policy, ratio = 1)
    lr: float = 1e-6  # constant (paper: 1e-6, same as OPD)
    betas: tuple[float, float] = (0.9, 0.98)  # as OPD (paper silent for RLVR)
    weight_decay: float = 0.1  # as OPD
    clip_low: float = 0.2  # paper ε
    clip_high: float = 0.28  # paper ε_high
    std_eps: float = 1e-6  # (r − mean)/(std + eps)
    project_at: int | None = None  # from this step on, project gradients onto V_k of ΔW (paper §4.2)
    project_k: int = 16
    save_every: int = 64  # checkpoint cadence; step 0 and the last always saved
    save_at: tuple[int, ...] = ()  # extra checkpoint steps besides the cadence (e.g. a mid-run reading)
    save_fp32: bool = False  # also write the fp32 masters to run_dir/fp32/checkpoint-<step>
    trainable: str | None = None  # regex of the parameters that train (None: all; the rest are frozen)
    eval_n: int = 500  # held-out prompts evaluated at start and end (0: skip)
    eval_samples: int = 1  # T=1 samples per evaluation prompt
    seed: int = 0  # prompt / sampling seed
    threads: int | None = None


def train(
    model: GPT | PreTrainedModel,
    cfg: RLVRConfig,
    run_dir: str | Path,
    *,
    task: ScratchpadAdditionTask | None = None,
    on_step: StepCallback | None = None,
) -> dict:
    """GRPO on ``model`` in place; write ``run_dir/checkpoint-<step>``; return a summary dict.

    ``model`` may be a transformers causal LM (``AutoModelForCausalLM``); it is trained through
    :class:`~weightgeo.train.hf.HFCausalLM`, which ``on_step`` then receives (same parameter names).
    """
    model = as_policy(model)
    task = task or ScratchpadAdditionTask()
    writer, opt, initial, summary = begin_run(model, cfg, run_dir, algorithm="rlvr", task=task, on_step=on_step)
    proj = None
    skipped_steps = 0
    rec: dict = {}
    for step in range(cfg.steps):
        if cfg.project_at is not None and step == cfg.project_at:
            proj = attach_projection(model, initial, cfg.project_k)
        ro = rollout(
            model,
            task,
            cfg.n_prompts,
            cfg.group_size,
            data_gen=step_generator(cfg.seed, step, 0),
            sample_gen=step_generator(cfg.seed, step, 1),
            temperature=cfg.temperature,
        )
        adv, keep = grpo_advantages(ro["rewards"], cfg.group_size, eps=cfg.std_eps)
        idx = keep.nonzero().squeeze(1)
        rec = {
            "step": step + 1,
            "reward": ro["rewards"].mean().item(),
            "kept_groups": int(keep.sum().item()) // cfg.group_size,
            "loss": 0.0,
        }
        if len(idx):
            prompts, tokens, mask, adv = ro["prompts"][idx], ro["tokens"][idx], ro["mask"][idx], adv[idx]
            with torch.no_grad():
                old_logp = response_logprobs(model, prompts, tokens)
            model.train()
            rec["loss"] = pg_update(
                model,
                opt,
                prompts,
                tokens,
                old_logp,
                adv,
                mask,
                micro_batch=cfg.micro_batch_size or len(idx),
                updates=cfg.updates_per_batch,
                clip_low=cfg.clip_low,
                clip_high=cfg.clip_high,
            )
        else:
            skipped_steps += 1
        end_step(writer, model, step + 1, rec, on_step=on_step)
    summary = finish_run(model, cfg, task, writer, proj, summary, rec)
    summary["steps_without_update"] = skipped_steps
    return summary
