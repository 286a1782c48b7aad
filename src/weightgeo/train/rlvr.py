"""RLVR with GRPO (paper App. C): binary verifiable reward, group-normalised advantages, clipped PG.

Per step: ``n_prompts`` prompts x ``group_size`` (8) samples at T=1; advantage (r − mean_g)/(std_g + eps)
broadcast over the sequence's tokens; groups whose rewards are all equal are skipped (dropped from the
batch and from the token normaliser; a step with no group left makes no optimizer update); clip
ε_low 0.2 / ε_high 0.28; no KL term; constant lr equal to OPD's; AdamW (0.9, 0.98), weight decay 0.1
(the paper gives RLVR's lr only; betas and decay follow OPD's, our choice).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .hf import as_policy
from .loop import (CheckpointStream, StepCallback, attach_projection, evaluate, make_optimizer, rollout,
                   set_threads, step_generator)
from .losses import clipped_pg_loss, grpo_advantages
from .model import GPT, response_logprobs
from .task import AdditionTask

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
    eval_n: int = 500  # held-out prompts evaluated at start and end (0: skip)
    seed: int = 0  # prompt / sampling seed
    threads: int | None = None


def train(model: GPT | PreTrainedModel, cfg: RLVRConfig, run_dir: str | Path, *, task: AdditionTask | None = None,
          on_step: StepCallback | None = None) -> dict:
    """GRPO on ``model`` in place; write ``run_dir/checkpoint-<step>``; return a summary dict.

    ``model`` may be a transformers causal LM (``AutoModelForCausalLM``); it is trained through
    :class:`~weightgeo.train.hf.HFCausalLM`, which ``on_step`` then receives (same parameter names).
    """
    model = as_policy(model)
    set_threads(cfg.threads)
    task = task or AdditionTask()
    stream = CheckpointStream(run_dir, save_every=cfg.save_every, total_steps=cfg.steps,
                              config={"algorithm": "rlvr", **asdict(cfg)})
    opt = make_optimizer(model, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    proj = None
    summary: dict = {"start": evaluate(model, task, n=cfg.eval_n) if cfg.eval_n else {}}
    stream.save(model, 0, summary["start"])
    if on_step:
        on_step(model, 0)
    skipped_steps = 0
    rec: dict = {}
    for step in range(cfg.steps):
        if cfg.project_at is not None and step == cfg.project_at:
            proj = attach_projection(model, initial, cfg.project_k)
        ro = rollout(model, task, cfg.n_prompts, cfg.group_size, data_gen=step_generator(cfg.seed, step, 0),
                     sample_gen=step_generator(cfg.seed, step, 1), temperature=cfg.temperature)
        adv, keep = grpo_advantages(ro["rewards"], cfg.group_size, eps=cfg.std_eps)
        idx = keep.nonzero().squeeze(1)
        rec = {"step": step + 1, "reward": ro["rewards"].mean().item(),
               "kept_groups": int(keep.sum().item()) // cfg.group_size, "loss": 0.0}
        if len(idx):
            prompts, tokens, mask, adv = ro["prompts"][idx], ro["tokens"][idx], ro["mask"][idx], adv[idx]
            n_tok = mask.sum()
            with torch.no_grad():
                old_logp = response_logprobs(model, prompts, tokens)
            mb = cfg.micro_batch_size or len(idx)
            model.train()
            for _ in range(cfg.updates_per_batch):
                opt.zero_grad(set_to_none=True)
                loss_sum = 0.0
                for i in range(0, len(idx), mb):
                    sl = slice(i, i + mb)
                    logp = response_logprobs(model, prompts[sl], tokens[sl])
                    loss = clipped_pg_loss(logp, old_logp[sl], adv[sl], mask[sl], clip_low=cfg.clip_low,
                                           clip_high=cfg.clip_high, num_tokens=n_tok)
                    loss.backward()
                    loss_sum += loss.item()
                opt.step()
            rec["loss"] = loss_sum
        else:
            skipped_steps += 1
        stream.log(rec)
        if on_step:
            on_step(model, step + 1)
        if step + 1 != cfg.steps:
            stream.maybe_save(model, step + 1, rec)
    summary["end"] = evaluate(model, task, n=cfg.eval_n) if cfg.eval_n else {}
    stream.save(model, cfg.steps, {**rec, **summary["end"]})
    if proj:
        proj.remove()
    summary.update(checkpoints=stream.saved, run_dir=str(stream.dir), steps_without_update=skipped_steps)
    return summary
