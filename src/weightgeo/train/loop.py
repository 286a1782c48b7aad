"""Pieces every algorithm file shares (the loop's machinery): optimizer, schedules, the checkpoint writer,
evaluation, rollouts, per-step seeding, run log, the start / step-end / finish of a run (:func:`begin_run`,
:func:`end_step`, :func:`finish_run`) and the clipped policy-gradient update of OPD and RLVR (:func:`pg_update`),
so that each algorithm file holds only what makes it that algorithm.

Checkpoint stream layout (what weightgeo's trajectory tools read)::

    run_dir/checkpoint-0/{config.json, model.safetensors, trainer_state.json}   # the starting weights (bf16)
    run_dir/checkpoint-<step>/...                                              # every save_every steps, save_at, last
    run_dir/fp32/checkpoint-<step>/...                                         # the fp32 masters (save_fp32=True)
    run_dir/log.jsonl                                                          # one JSON line per step
"""

from __future__ import annotations

import json
import math
import re
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import WeightgeoError
from .losses import clipped_pg_loss
from .model import generate, response_logprobs
from .task import ScratchpadAdditionTask

__all__ = [
    "make_optimizer",
    "lr_at",
    "CheckpointWriter",
    "evaluate",
    "correctness",
    "StepCallback",
    "rollout",
    "Rollouts",
    "step_generator",
    "attach_projection",
    "freeze_except",
    "set_threads",
    "begin_run",
    "end_step",
    "finish_run",
    "pg_update",
]

#: ``on_step(model, step)``: called after every optimizer step (and once with step 0 before training). ``model`` is
#: a ``GPT`` or an :class:`~weightgeo.train.hf.HFCausalLM` (a transformers model, under its own parameter names).
StepCallback = Callable[[nn.Module, int], None]


def make_optimizer(
    model: nn.Module, *, lr: float, betas: tuple[float, float], weight_decay: float, eps: float = 1e-8
) -> torch.optim.AdamW:
    """AdamW on the fp32 master weights that require grad. Decoupled weight decay on 2-D tensors (matrices and
    embeddings) only; norm gains are not decayed (nanoGPT's convention; the paper does not say)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # foreach=False: the single-tensor path; identical results, and deterministic ordering is obvious.
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=False)


def lr_at(step: int, *, total: int, lr: float, schedule: str, warmup_frac: float = 0.0, min_lr: float = 0.0) -> float:
    """Learning rate for optimizer step ``step`` (0-based). ``schedule``: "constant" or "cosine" (linear
    warm-up over ``warmup_frac * total`` steps, then cosine from ``lr`` to ``min_lr`` at the last step)."""
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise WeightgeoError(f"lr_at(schedule={schedule!r}): use schedule='constant' or schedule='cosine'")
    warm = max(1, round(warmup_frac * total)) if warmup_frac > 0 else 0
    if step < warm:
        return lr * (step + 1) / warm
    span = max(1, total - warm - 1)
    progress = min(1.0, (step - warm) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def _save_pretrained(model: nn.Module, directory: Path, dtype: torch.dtype) -> None:
    """``model.save_pretrained(directory, dtype=dtype)``: GPT and HFCausalLM write config.json and
    model.safetensors; a module without it is an error that says what to train instead."""
    save = getattr(model, "save_pretrained", None)
    if not callable(save):
        raise WeightgeoError(
            f"CheckpointWriter.save: {type(model).__name__} has no save_pretrained(directory, dtype=); train a "
            f"weightgeo.train.model.GPT, or wrap a transformers model with weightgeo.train.hf.as_policy(model)"
        )
    save(directory, dtype=dtype)


class CheckpointWriter:
    """Writes ``checkpoint-<step>`` folders (bf16, HF layout), optionally the fp32 masters beside them
    (``fp32/checkpoint-<step>``), and ``log.jsonl`` into ``run_dir``.

    Saved steps: 0, every ``save_every`` steps, each step in ``save_at``, and ``total_steps``.

    >>> import tempfile
    >>> w = CheckpointWriter(tempfile.mkdtemp(), save_every=0, total_steps=30, config={}, save_at=(10,))
    >>> [s for s in range(31) if w.should_save(s)]
    [0, 10, 30]
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        save_every: int,
        total_steps: int,
        config: dict,
        dtype: torch.dtype = torch.bfloat16,
        save_at: Sequence[int] = (),
        save_fp32: bool = False,
    ):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.save_every, self.total, self.dtype = save_every, total_steps, dtype
        self.save_at, self.save_fp32 = frozenset(int(s) for s in save_at), save_fp32
        self.config = config
        self.log_path = self.dir / "log.jsonl"
        self.log_path.write_text("")
        (self.dir / "run_config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        self.t0 = time.perf_counter()
        self.saved: list[int] = []

    def should_save(self, step: int) -> bool:
        return (
            step == 0
            or step == self.total
            or step in self.save_at
            or (self.save_every > 0 and step % self.save_every == 0)
        )

    def save(self, model: nn.Module, step: int, metrics: dict | None = None) -> Path:
        state = {"global_step": step, "max_steps": self.total, "metrics": metrics or {}}
        dirs = [(self.dir / f"checkpoint-{step}", self.dtype)]
        if self.save_fp32:
            dirs.append((self.dir / "fp32" / f"checkpoint-{step}", torch.float32))
        for d, dtype in dirs:
            _save_pretrained(model, d, dtype)
            (d / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
        self.saved.append(step)
        return dirs[0][0]

    def log(self, record: dict) -> None:
        record = {**record, "wall_s": round(time.perf_counter() - self.t0, 3)}
        with self.log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def maybe_save(self, model: nn.Module, step: int, metrics: dict | None = None) -> None:
        if self.should_save(step):
            self.save(model, step, metrics)


def __getattr__(name: str) -> Any:
    if name == "CheckpointStream":  # renamed: weightgeo.stream.CheckpointStream is the *reader* of a stream
        warnings.warn(
            "weightgeo.train.loop.CheckpointStream is deprecated and will be removed in the next release; "
            "use CheckpointWriter (the same class)",
            DeprecationWarning,
            stacklevel=2,
        )
        return CheckpointWriter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@torch.no_grad()
def correctness(
    model: nn.Module,
    task: ScratchpadAdditionTask,
    prompts: torch.Tensor,
    *,
    samples: int = 1,
    sample_seed: int = 4321,
    temperature: float = 1.0,
    batch: int = 4096,
) -> torch.Tensor:
    """Verifier reward of ``samples`` completions per prompt: [n_prompts, samples] float 0/1.

    The random stream depends only on ``sample_seed``, the prompts and ``samples`` (completions are drawn in
    fixed chunks of ``batch`` sequences), so two models evaluated with the same arguments are compared on the
    same prompts with common random numbers, the pairing a paired bootstrap needs. ``temperature=0``: greedy
    (then ``samples`` identical columns; pass ``samples=1``)."""
    rep = prompts.repeat_interleave(samples, dim=0)
    g = torch.Generator().manual_seed(sample_seed)
    out = []
    for i in range(0, len(rep), batch):
        p = rep[i : i + batch]
        s = generate(
            model,
            p,
            task.completion_len,
            generator=g if temperature > 0 else None,
            temperature=temperature,
            eos_id=task.eos_id,
        )
        out.append(task.rewards(p, s.tokens))
    return torch.cat(out).view(len(prompts), samples)


def evaluate(
    model: nn.Module,
    task: ScratchpadAdditionTask,
    *,
    n: int = 500,
    seed: int = 1234,
    sample_seed: int = 4321,
    temperatures: Iterable[float] = (0.0, 1.0),
    samples: int = 1,
) -> dict[str, float]:
    """Accuracy (mean binary reward) on ``n`` fixed held-out prompts, greedy (``acc_greedy``) and sampled at
    T=1 (``acc_t1``, ``samples`` completions per prompt), each with its standard error over prompts (``*_se``)."""
    prompts = task.prompts(n, torch.Generator().manual_seed(seed))
    out = {}
    for temp in temperatures:
        c = correctness(
            model, task, prompts, samples=samples if temp > 0 else 1, sample_seed=sample_seed, temperature=temp
        ).mean(1)
        key = "acc_greedy" if temp == 0 else f"acc_t{temp:g}"
        out[key] = c.mean().item()
        out[key + "_se"] = max(c.std().item(), 1e-6) / math.sqrt(n) if n > 1 else float("nan")
    return out


def set_threads(n: int | None) -> None:
    """Pin intra-op threads (bitwise determinism holds for one machine and one thread count)."""
    if n:
        torch.set_num_threads(n)


class Rollouts(dict):
    """prompts [B, P], tokens [B, N], mask [B, N], rewards [B] (B = n_prompts * group_size, prompt-major)."""


@torch.no_grad()
def rollout(
    policy: nn.Module,
    task: ScratchpadAdditionTask,
    n_prompts: int,
    group_size: int,
    *,
    data_gen: torch.Generator,
    sample_gen: torch.Generator,
    temperature: float = 1.0,
) -> Rollouts:
    """Sample ``group_size`` completions per prompt from ``policy`` and score them with the verifier."""
    prompts = task.prompts(n_prompts, data_gen).repeat_interleave(group_size, dim=0)
    s = generate(
        policy, prompts, task.completion_len, generator=sample_gen, temperature=temperature, eos_id=task.eos_id
    )
    return Rollouts(prompts=prompts, tokens=s.tokens, mask=s.mask, rewards=task.rewards(prompts, s.tokens))


def step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    """A fresh generator for (run seed, optimizer step, stream): 0 = data, 1 = sampling, 2 = token selection,
    3 = the null's advantage permutation.

    Per-step seeding makes a run's randomness independent of what happened before the step, so two runs
    that branch at step s (e.g. projected vs not) see the same prompts afterwards."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 8 + stream)


def attach_projection(model: nn.Module, initial: dict[str, torch.Tensor], k: int):
    """Compute V_k of ΔW = bf16(W_now) − W_0 for every trained 2-D weight and register the gradient projector."""
    from .projector import SubspaceProjector, subspace_bases

    current = {n: p.detach().to(torch.bfloat16).float() for n, p in model.named_parameters() if p.requires_grad}
    return SubspaceProjector(model, subspace_bases(current, initial, k=k))


def freeze_except(model: nn.Module, trainable: str | None) -> list[str]:
    """``requires_grad=False`` on every parameter whose name does not match the regex ``trainable`` (None: keep
    all); returns the names left trainable. Raises :class:`~weightgeo.errors.WeightgeoError` when nothing matches."""
    if trainable is None:
        return [n for n, _ in model.named_parameters()]
    pat = re.compile(trainable)
    kept = [n for n, p in model.named_parameters() if pat.search(n)]
    if not kept:
        raise WeightgeoError(
            f"trainable={trainable!r} matches no parameter (names look like {next(model.named_parameters())[0]!r}); "
            f"pass a regex that matches some parameter names, or trainable=None to train all"
        )
    for n, p in model.named_parameters():
        p.requires_grad_(n in kept)
    return kept


def begin_run(
    model: nn.Module,
    cfg: Any,
    run_dir: str | Path,
    *,
    algorithm: str,
    task: ScratchpadAdditionTask,
    on_step: StepCallback | None,
) -> tuple[CheckpointWriter, torch.optim.AdamW, dict[str, torch.Tensor], dict]:
    """What every algorithm does before its first step: threads, the parameters left trainable
    (``cfg.trainable``), the checkpoint writer, AdamW, a copy of the starting weights (for ``project_at``), the
    start evaluation, ``checkpoint-0`` and ``on_step(model, 0)``.

    Returns ``(writer, optimizer, initial weights, summary)``; ``summary["start"]`` holds the evaluation.
    """
    set_threads(cfg.threads)
    vocab = getattr(getattr(getattr(model, "hf", model), "config", None), "vocab_size", None)
    if isinstance(vocab, int) and vocab < task.vocab_size:
        raise WeightgeoError(
            f"the model's vocabulary ({vocab}) is smaller than the task's ({task.vocab_size}); "
            f"build the model with vocab_size={task.vocab_size}"
        )
    freeze_except(model, getattr(cfg, "trainable", None))
    writer = CheckpointWriter(
        run_dir,
        save_every=cfg.save_every,
        total_steps=cfg.steps,
        config={"algorithm": algorithm, **asdict(cfg)},
        save_at=getattr(cfg, "save_at", ()),
        save_fp32=getattr(cfg, "save_fp32", False),
    )
    opt = make_optimizer(model, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    summary: dict = {"start": _eval(model, task, cfg)}
    writer.save(model, 0, summary["start"])
    if on_step:
        on_step(model, 0)
    return writer, opt, initial, summary


def _eval(model: nn.Module, task: ScratchpadAdditionTask, cfg: Any) -> dict:
    return evaluate(model, task, n=cfg.eval_n, samples=getattr(cfg, "eval_samples", 1)) if cfg.eval_n else {}


def end_step(
    writer: CheckpointWriter,
    model: nn.Module,
    step: int,
    record: dict,
    *,
    on_step: StepCallback | None,
    saved: dict | None = None,
) -> None:
    """After optimizer step ``step`` (1-based): log ``record``, call ``on_step``, save a checkpoint when due
    (with ``saved``, default ``record``, as its metrics; the last step is saved by :func:`finish_run`)."""
    writer.log(record)
    if on_step:
        on_step(model, step)
    if step != writer.total:
        writer.maybe_save(model, step, record if saved is None else saved)


def finish_run(
    model: nn.Module,
    cfg: Any,
    task: ScratchpadAdditionTask,
    writer: CheckpointWriter,
    proj: Any,
    summary: dict,
    last: dict,
) -> dict:
    """The end evaluation, the last checkpoint (metrics ``last`` plus the evaluation), the projector's hooks
    removed; returns ``summary`` with ``end``, ``checkpoints`` and ``run_dir``."""
    summary["end"] = _eval(model, task, cfg)
    writer.save(model, cfg.steps, {**last, **summary["end"]})
    if proj:
        proj.remove()
    summary.update(checkpoints=writer.saved, run_dir=str(writer.dir))
    return summary


def pg_update(
    policy: nn.Module,
    opt: torch.optim.Optimizer,
    prompts: torch.Tensor,
    tokens: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    *,
    micro_batch: int,
    updates: int,
    clip_low: float,
    clip_high: float,
) -> float:
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
            loss = clipped_pg_loss(
                logp, old_logp[sl], adv[sl], mask[sl], clip_low=clip_low, clip_high=clip_high, num_tokens=n_tok
            )
            loss.backward()
            loss_sum += loss.item()
        opt.step()
    return loss_sum
