"""Pieces every algorithm file shares (the loop's machinery): optimizer, schedules, checkpoint stream, evaluation,
rollouts, per-step seeding, run log, the start / step-end / finish of a run (:func:`begin_run`, :func:`end_step`,
:func:`finish_run`) and the clipped policy-gradient update of OPD and RLVR (:func:`pg_update`), so that each
algorithm file holds only what makes it that algorithm.

Checkpoint stream layout (what weightgeo's trajectory tools read)::

    run_dir/checkpoint-0/{config.json, model.safetensors, trainer_state.json}   # the starting weights
    run_dir/checkpoint-<step>/...                                              # every save_every steps + last
    run_dir/log.jsonl                                                          # one JSON line per step
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from .losses import clipped_pg_loss
from .model import generate, response_logprobs
from .task import AdditionTask

__all__ = ["make_optimizer", "lr_at", "CheckpointStream", "evaluate", "StepCallback", "rollout", "Rollouts",
           "step_generator", "attach_projection", "set_threads", "begin_run", "end_step", "finish_run", "pg_update"]

#: ``on_step(model, step)``: called after every optimizer step (and once with step 0 before training). ``model`` is
#: a ``GPT`` or an :class:`~weightgeo.train.hf.HFCausalLM` (a transformers model, under its own parameter names).
StepCallback = Callable[[nn.Module, int], None]


def make_optimizer(model: nn.Module, *, lr: float, betas: tuple[float, float], weight_decay: float,
                   eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW on fp32 master weights. Decoupled weight decay on 2-D tensors (matrices and embeddings) only;
    norm gains are not decayed (nanoGPT's convention; the paper does not say)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # foreach=False: the single-tensor path; identical results, and deterministic ordering is obvious.
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=False)


def lr_at(step: int, *, total: int, lr: float, schedule: str, warmup_frac: float = 0.0,
          min_lr: float = 0.0) -> float:
    """Learning rate for optimizer step ``step`` (0-based). ``schedule``: "constant" or "cosine" (linear
    warm-up over ``warmup_frac * total`` steps, then cosine from ``lr`` to ``min_lr`` at the last step)."""
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise ValueError(f"schedule {schedule!r}: use 'constant' or 'cosine'")
    warm = max(1, round(warmup_frac * total)) if warmup_frac > 0 else 0
    if step < warm:
        return lr * (step + 1) / warm
    span = max(1, total - warm - 1)
    progress = min(1.0, (step - warm) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


class CheckpointStream:
    """Writes ``checkpoint-<step>`` folders (bf16, HF layout) and ``log.jsonl`` into ``run_dir``."""

    def __init__(self, run_dir: str | Path, *, save_every: int, total_steps: int, config: dict,
                 dtype: torch.dtype = torch.bfloat16):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.save_every, self.total, self.dtype = save_every, total_steps, dtype
        self.config = config
        self.log_path = self.dir / "log.jsonl"
        self.log_path.write_text("")
        (self.dir / "run_config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        self.t0 = time.perf_counter()
        self.saved: list[int] = []

    def should_save(self, step: int) -> bool:
        return step == 0 or step == self.total or (self.save_every > 0 and step % self.save_every == 0)

    def save(self, model: nn.Module, step: int, metrics: dict | None = None) -> Path:
        d = self.dir / f"checkpoint-{step}"
        model.save_pretrained(d, dtype=self.dtype)
        state = {"global_step": step, "max_steps": self.total, "metrics": metrics or {}}
        (d / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
        self.saved.append(step)
        return d

    def log(self, record: dict) -> None:
        record = {**record, "wall_s": round(time.perf_counter() - self.t0, 3)}
        with self.log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def maybe_save(self, model: nn.Module, step: int, metrics: dict | None = None) -> None:
        if self.should_save(step):
            self.save(model, step, metrics)


@torch.no_grad()
def evaluate(model: nn.Module, task: AdditionTask, *, n: int = 500, seed: int = 1234,
             sample_seed: int = 4321, temperatures: Iterable[float] = (0.0, 1.0)) -> dict[str, float]:
    """Accuracy (mean binary reward) on ``n`` fixed held-out prompts, greedy (``acc_greedy``) and sampled
    at T=1 (``acc_t1``), each with its binomial standard error (``*_se``)."""
    prompts = task.prompts(n, torch.Generator().manual_seed(seed))
    out = {}
    for temp in temperatures:
        g = torch.Generator().manual_seed(sample_seed)
        s = generate(model, prompts, task.completion_len, generator=g, temperature=temp, eos_id=task.eos_id)
        acc = task.rewards(prompts, s.tokens).mean().item()
        key = "acc_greedy" if temp == 0 else f"acc_t{temp:g}"
        out[key] = acc
        out[key + "_se"] = math.sqrt(max(acc * (1 - acc), 1e-12) / n)
    return out


def set_threads(n: int | None) -> None:
    """Pin intra-op threads (bitwise determinism holds for one machine and one thread count)."""
    if n:
        torch.set_num_threads(n)


class Rollouts(dict):
    """prompts [B, P], tokens [B, N], mask [B, N], rewards [B] (B = n_prompts * group_size, prompt-major)."""


@torch.no_grad()
def rollout(policy: nn.Module, task: AdditionTask, n_prompts: int, group_size: int, *, data_gen: torch.Generator,
            sample_gen: torch.Generator, temperature: float = 1.0) -> Rollouts:
    """Sample ``group_size`` completions per prompt from ``policy`` and score them with the verifier."""
    prompts = task.prompts(n_prompts, data_gen).repeat_interleave(group_size, dim=0)
    s = generate(policy, prompts, task.completion_len, generator=sample_gen, temperature=temperature,
                 eos_id=task.eos_id)
    return Rollouts(prompts=prompts, tokens=s.tokens, mask=s.mask, rewards=task.rewards(prompts, s.tokens))


def step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    """A fresh generator for (run seed, optimizer step, stream): 0 = data, 1 = sampling, 2 = token selection.

    Per-step seeding makes a run's randomness independent of what happened before the step, so two runs
    that branch at step s (e.g. projected vs not) see the same prompts afterwards."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 8 + stream)


def attach_projection(model: nn.Module, initial: dict[str, torch.Tensor], k: int):
    """Compute V_k of ΔW = bf16(W_now) − W_0 for the block matrices and register the gradient projector."""
    from .projector import SubspaceProjector, subspace_bases

    current = {n: p.detach().to(torch.bfloat16).float() for n, p in model.named_parameters()}
    return SubspaceProjector(model, subspace_bases(current, initial, k=k))


def begin_run(model: nn.Module, cfg: Any, run_dir: str | Path, *, algorithm: str, task: AdditionTask,
              on_step: StepCallback | None) -> tuple[CheckpointStream, torch.optim.AdamW, dict[str, torch.Tensor], dict]:
    """What every algorithm does before its first step: threads, the checkpoint stream, AdamW, a copy of the
    starting weights (for ``project_at``), the start evaluation, ``checkpoint-0`` and ``on_step(model, 0)``.

    Returns ``(stream, optimizer, initial weights, summary)``; ``summary["start"]`` holds the evaluation.
    """
    set_threads(cfg.threads)
    stream = CheckpointStream(run_dir, save_every=cfg.save_every, total_steps=cfg.steps,
                              config={"algorithm": algorithm, **asdict(cfg)})
    opt = make_optimizer(model, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    summary: dict = {"start": evaluate(model, task, n=cfg.eval_n) if cfg.eval_n else {}}
    stream.save(model, 0, summary["start"])
    if on_step:
        on_step(model, 0)
    return stream, opt, initial, summary


def end_step(stream: CheckpointStream, model: nn.Module, step: int, record: dict, *,
             on_step: StepCallback | None, saved: dict | None = None) -> None:
    """After optimizer step ``step`` (1-based): log ``record``, call ``on_step``, save a checkpoint when due
    (with ``saved``, default ``record``, as its metrics; the last step is saved by :func:`finish_run`)."""
    stream.log(record)
    if on_step:
        on_step(model, step)
    if step != stream.total:
        stream.maybe_save(model, step, record if saved is None else saved)


def finish_run(model: nn.Module, cfg: Any, task: AdditionTask, stream: CheckpointStream, proj: Any, summary: dict,
               last: dict) -> dict:
    """The end evaluation, the last checkpoint (metrics ``last`` plus the evaluation), the projector's hooks
    removed; returns ``summary`` with ``end``, ``checkpoints`` and ``run_dir``."""
    summary["end"] = evaluate(model, task, n=cfg.eval_n) if cfg.eval_n else {}
    stream.save(model, cfg.steps, {**last, **summary["end"]})
    if proj:
        proj.remove()
    summary.update(checkpoints=stream.saved, run_dir=str(stream.dir))
    return summary


def pg_update(policy: nn.Module, opt: torch.optim.Optimizer, prompts: torch.Tensor, tokens: torch.Tensor,
              old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, *, micro_batch: int, updates: int,
              clip_low: float, clip_high: float) -> float:
    """``updates`` optimizer steps of the clipped policy-gradient loss on one batch of rollouts (OPD and GRPO),
    accumulated over micro-batches; the loss is normalised by the whole batch's token count, so accumulation
    does not change it. Returns the last update's summed loss."""
    n_tok = mask.sum()
    loss_sum = 0.0
    for _ in range(updates):
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for i in range(0, len(prompts), micro_batch):
            sl = slice(i, i + micro_batch)
            logp = response_logprobs(policy, prompts[sl], tokens[sl])
            loss = clipped_pg_loss(logp, old_logp[sl], adv[sl], mask[sl], clip_low=clip_low, clip_high=clip_high,
                                   num_tokens=n_tok)
            loss.backward()
            loss_sum += loss.item()
        opt.step()
    return loss_sum
