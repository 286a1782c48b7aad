"""Pretrain the student base and the teacher on scratchpad addition, deterministically.

    python -m weightgeo.train.pretrain --out examples/assets            # base and teacher (one thread each)
    python -m weightgeo.train.pretrain --out examples/assets --only base

writes ``OUT/base/`` and ``OUT/teacher/`` (``config.json`` + bf16 ``model.safetensors`` + ``pretrain.json``
with the recipe, the stopping step, wall time and accuracy). Both stop on **T=1 accuracy** (500 fixed
prompts x 2 samples, every ``eval_every`` steps): the student base at the first evaluation with T=1
accuracy >= ``stop_acc`` (a base caught part-way up its learning curve, so that SFT at the paper's lr lands
its anchor at T=1 accuracy 0.4-0.7 and still improving; docs/reproduction.md, regime check R2), the teacher
at >= 0.98 (regime check R1 asks >= 0.95 on the held-out evaluation). Early stopping on a fixed, seeded
evaluation set is deterministic: same torch build, same thread count -> same bytes (the shipped assets were
produced by exactly this command; the thread count is part of each recipe and recorded in pretrain.json).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .loop import evaluate, make_optimizer, set_threads
from .losses import sft_loss
from .model import GPT, GPTConfig
from .task import ScratchpadAdditionTask

__all__ = ["PretrainConfig", "pretrain", "STUDENT", "TEACHER", "RECIPES"]

STUDENT = GPTConfig(n_layer=4, n_head=4, n_embd=64)  # 0.20 M parameters
TEACHER = GPTConfig(n_layer=5, n_head=4, n_embd=128)  # 0.99 M parameters: 4.9x the student (Qwen3-32B / 8B: 4x)


@dataclass
class PretrainConfig:
    model: GPTConfig = field(default_factory=GPTConfig)
    seed: int = 0  # init and data seed
    batch_size: int = 128  # demonstrations per step
    lr: float = 1e-3  # peak AdamW lr (constant after warm-up)
    warmup_steps: int = 100  # linear warm-up
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.1
    max_steps: int = 8000  # hard cap
    eval_every: int = 50  # T=1 accuracy on 500 fixed prompts x eval_samples
    eval_samples: int = 2  # T=1 samples per evaluation prompt
    stop_acc: float = 0.5  # stop at the first evaluation with T=1 accuracy >= stop_acc
    threads: int | None = 1  # torch intra-op threads (part of the determinism contract; 1 copes best with a busy box)


#: The shipped assets' recipes (``python -m weightgeo.train.pretrain`` runs these).
RECIPES = {
    "base": PretrainConfig(model=STUDENT, seed=0, stop_acc=0.3, eval_every=10),
    "teacher": PretrainConfig(model=TEACHER, seed=1, stop_acc=0.98, eval_every=100),
}


def pretrain(
    cfg: PretrainConfig,
    out_dir: str | Path,
    *,
    verbose: bool = True,
    on_eval: Callable[[GPT, int, dict], None] | None = None,
) -> dict:
    """Train ``cfg.model`` from a seeded init on correct demonstrations until T=1 accuracy >= ``cfg.stop_acc``
    (or ``max_steps``); save it to ``out_dir`` (bf16) with ``pretrain.json``; return that metadata.
    ``on_eval(model, step, metrics)`` is called at every evaluation (e.g. to keep snapshots)."""
    set_threads(cfg.threads)
    task = ScratchpadAdditionTask()
    model = GPT(cfg.model, seed=cfg.seed)
    opt = make_optimizer(model, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    data_gen = torch.Generator().manual_seed(cfg.seed + 1)
    t0 = time.perf_counter()
    history = []
    step = 0
    while step < cfg.max_steps:
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
        tokens, mask = task.demonstrations(cfg.batch_size, data_gen)
        loss = sft_loss(model(tokens[:, :-1]), tokens[:, 1:], mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % cfg.eval_every == 0:
            ev = evaluate(model, task, samples=cfg.eval_samples)
            rec = {
                "step": step,
                "loss": round(loss.item(), 4),
                "acc_greedy": ev["acc_greedy"],
                "acc_t1": ev["acc_t1"],
                "wall_s": round(time.perf_counter() - t0, 1),
            }
            history.append(rec)
            if on_eval:
                on_eval(model, step, rec)
            if verbose:
                print(
                    f"  step {step:5d} loss {loss.item():.4f} acc greedy {ev['acc_greedy']:.3f} "
                    f"T=1 {ev['acc_t1']:.3f} ({time.perf_counter() - t0:.0f}s)",
                    flush=True,
                )
            if ev["acc_t1"] >= cfg.stop_acc:
                break
    wall = time.perf_counter() - t0
    final = evaluate(model, task, n=1000, seed=999, samples=4)  # a prompt set the stopping rule never saw
    meta = {
        "recipe": asdict(cfg),
        "steps": step,
        "wall_s": round(wall, 1),
        "num_params": model.num_params(),
        "eval_1000x4": final,
        "history": history,
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    d = model.save_pretrained(out_dir)
    (d / "pretrain.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="examples/assets")
    ap.add_argument("--only", choices=sorted(RECIPES), default=None)
    args = ap.parse_args(argv)
    out = Path(args.out)
    for name, cfg in RECIPES.items():
        if args.only and name != args.only:
            continue
        print(f"pretraining {name}: {asdict(cfg.model)}", flush=True)
        meta = pretrain(cfg, out / name)
        print(
            f"{name}: {meta['num_params']:,} params, {meta['steps']} steps, {meta['wall_s']} s, "
            f"eval {meta['eval_1000x4']}",
            flush=True,
        )


if __name__ == "__main__":
    main()
