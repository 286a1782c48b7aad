"""On-policy distillation (paper App. C): the student samples, the teacher scores the sampled tokens.

Per step: ``n_prompts`` prompts x ``group_size`` samples at temperature 1 from the student; per-token
advantage A_t = −(log π_s(a_t|s_t) − log π_t(a_t|s_t)) (sampled-token reverse-KL estimator); clipped
policy-gradient loss, token-level normalised. Recipe relations kept from the paper: constant lr 10x below
SFT's, AdamW (0.9, 0.98), weight decay 0.1, 8 samples per prompt.

The paper's §5 controls are switches of this one loop:
- ``keep_ratio`` < 1: token sparsification, ``keep_mode`` "topk" (largest |log π_s − log π_t|) or "random",
  advantages rescaled r̃_t = (T / Σm) m_t r_t;
- ``rollout_source="teacher"``: off-policy rollouts sampled from the teacher (still scored as above; no
  importance correction, ratio = 1);
- ``rlvr_alpha`` < 1: A = α A_OPD + (1 − α) A_RLVR with A_RLVR = r − mean_group(r) (no std normalisation);
  the realised OPD share Σ|α A_OPD| / (Σ|α A_OPD| + Σ|(1 − α) A_RLVR|) is logged per step (``opd_share``).

and so are the miniature's controls:
- ``permute_advantages=True``: the null run, every advantage shuffled across the batch's response tokens
  (same values, no signal; applied last, after any of the switches above);
- ``trainable``: a regex of the parameters that train (the head-only control trains lm_head and the
  embeddings only).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import WeightgeoError
from .hf import as_policy
from .loop import StepCallback, attach_projection, begin_run, end_step, finish_run, pg_update, rollout, step_generator
from .losses import (
    advantage_share,
    centered_rewards,
    mix_advantages,
    opd_advantages,
    permute_advantages,
    sparsify_tokens,
)
from .model import GPT, response_logprobs
from .task import ScratchpadAdditionTask

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["OPDConfig", "train"]


@dataclass
class OPDConfig:
    steps: int = 300  # optimizer steps (paper: 299)
    n_prompts: int = 16  # prompts per step
    group_size: int = 8  # samples per prompt (paper: 8)
    temperature: float = 1.0  # sampling temperature (paper: 1)
    micro_batch_size: int | None = None  # sequences per backward pass (None: the whole batch)
    updates_per_batch: int = 1  # optimizer steps per rollout batch (1: strictly on-policy, ratio = 1)
    lr: float = 1e-6  # constant (paper: 1e-6, 10x below SFT)
    betas: tuple[float, float] = (0.9, 0.98)  # paper
    weight_decay: float = 0.1  # paper; decoupled, on 2-D tensors only
    clip_low: float = 0.2  # ratio clip 1 - clip_low (only active if updates_per_batch > 1)
    clip_high: float = 0.28  # ratio clip 1 + clip_high
    rollout_source: str = "student"  # "teacher": off-policy control (paper §5)
    keep_ratio: float = 1.0  # token sparsification ρ (paper §5: 0.25, 0.5); 1.0 = off
    keep_mode: str = "topk"  # "topk" (top-KL) or "random"
    rlvr_alpha: float = 1.0  # advantage mix α·A_OPD + (1−α)·A_RLVR (paper §5); 1.0 = pure OPD
    permute_advantages: bool = False  # null run: advantages shuffled across the batch's tokens (no signal)
    project_at: int | None = None  # from this step on, project gradients onto V_k of ΔW (paper §4.2)
    project_k: int = 16  # K (paper: 16)
    save_every: int = 64  # checkpoint cadence (paper: 64); step 0 and the last always saved
    save_at: tuple[int, ...] = ()  # extra checkpoint steps besides the cadence (e.g. a mid-run reading)
    save_fp32: bool = False  # also write the fp32 masters to run_dir/fp32/checkpoint-<step>
    trainable: str | None = None  # regex of the parameters that train (None: all; the rest are frozen)
    eval_n: int = 500  # held-out prompts evaluated at start and end (0: skip)
    eval_samples: int = 1  # T=1 samples per evaluation prompt
    seed: int = 0  # prompt / sampling seed
    threads: int | None = None  # torch intra-op threads (None: leave as is)


def train(
    student: GPT | PreTrainedModel,
    teacher: GPT | PreTrainedModel,
    cfg: OPDConfig,
    run_dir: str | Path,
    *,
    task: ScratchpadAdditionTask | None = None,
    on_step: StepCallback | None = None,
) -> dict:
    """Distil ``teacher`` into ``student`` in place; write ``run_dir/checkpoint-<step>``; return a summary.

    Either model may be a transformers causal LM (``AutoModelForCausalLM``) on the task's vocabulary, and
    they need not share an architecture; it runs through :class:`~weightgeo.train.hf.HFCausalLM` (which
    ``on_step`` then receives, with the HF model's parameter names).
    """
    student, teacher = as_policy(student), as_policy(teacher)
    if cfg.rollout_source not in ("student", "teacher"):
        raise WeightgeoError(
            f"OPDConfig(rollout_source={cfg.rollout_source!r}): use rollout_source='student' (on-policy) or "
            f"'teacher' (off-policy)"
        )
    task = task or ScratchpadAdditionTask()
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    writer, opt, initial, summary = begin_run(student, cfg, run_dir, algorithm="opd", task=task, on_step=on_step)
    proj = None
    mb = cfg.micro_batch_size or cfg.n_prompts * cfg.group_size
    rec: dict = {}
    shares: list[float] = []
    for step in range(cfg.steps):
        if cfg.project_at is not None and step == cfg.project_at:
            proj = attach_projection(student, initial, cfg.project_k)
        policy = student if cfg.rollout_source == "student" else teacher
        ro = rollout(
            policy,
            task,
            cfg.n_prompts,
            cfg.group_size,
            data_gen=step_generator(cfg.seed, step, 0),
            sample_gen=step_generator(cfg.seed, step, 1),
            temperature=cfg.temperature,
        )
        prompts, tokens, mask = ro["prompts"], ro["tokens"], ro["mask"]
        with torch.no_grad():
            old_logp = response_logprobs(student, prompts, tokens)
            teacher_logp = response_logprobs(teacher, prompts, tokens)
        adv = opd_advantages(old_logp, teacher_logp, mask)
        if cfg.keep_ratio < 1.0:
            adv = adv * sparsify_tokens(
                (old_logp - teacher_logp).abs(),
                mask,
                cfg.keep_ratio,
                mode=cfg.keep_mode,
                generator=step_generator(cfg.seed, step, 2),
            )
        share = None
        if cfg.rlvr_alpha < 1.0:
            a_rlvr = centered_rewards(ro["rewards"], cfg.group_size)
            share = advantage_share(adv, a_rlvr, cfg.rlvr_alpha, mask)
            adv = mix_advantages(adv, a_rlvr, cfg.rlvr_alpha) * mask
        if cfg.permute_advantages:
            adv = permute_advantages(adv, mask, step_generator(cfg.seed, step, 3))
        student.train()
        loss_sum = pg_update(
            student,
            opt,
            prompts,
            tokens,
            old_logp,
            adv,
            mask,
            micro_batch=mb,
            updates=cfg.updates_per_batch,
            clip_low=cfg.clip_low,
            clip_high=cfg.clip_high,
        )
        rec = {
            "step": step + 1,
            "loss": loss_sum,
            "reward": ro["rewards"].mean().item(),
            "reverse_kl": ((old_logp - teacher_logp) * mask).sum().item() / mask.sum().item(),
        }
        if share is not None:
            rec["opd_share"] = share
            shares.append(share)
        end_step(writer, student, step + 1, rec, on_step=on_step)
    summary = finish_run(student, cfg, task, writer, proj, summary, rec)
    if shares:  # the realised OPD share of the mixed advantage, averaged over steps
        summary["opd_share_mean"] = sum(shares) / len(shares)
    return summary
