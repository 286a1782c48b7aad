"""The regime a miniature must be in before any geometry is measured (docs/reproduction.md, "Regime").

Three checks on accuracy, KL and lengths only, never on the geometry being tested:

- **R1, a teacher worth distilling**: teacher parameters >= 4x the student's; teacher T=1 accuracy >= 0.95
  and >= anchor T=1 accuracy + 0.25; per-token reverse KL(anchor || teacher) on the anchor's own T=1
  samples >= 0.1 nats.
- **R2, an anchor with headroom**: SFT anchor T=1 accuracy in [0.4, 0.7], and SFT still improving at its
  last step (T=1 accuracy of the final SFT checkpoint above the one at 80% of SFT, same prompts and
  sampling seeds).
- **R3, long answers**: the anchor's sampled responses average >= 16 tokens (``<eos>`` included).

>>> checks = regime_checks({"teacher_acc_t1": 0.99, "anchor_acc_t1": 0.55, "reverse_kl_nats": 0.3,
...                         "param_ratio": 4.9, "sft_last_gain": 0.01, "response_tokens": 18.0})
>>> checks
{'R1': True, 'R2': True, 'R3': True}
>>> regime_checks({"teacher_acc_t1": 0.99, "anchor_acc_t1": 0.8, "reverse_kl_nats": 0.3, "param_ratio": 4.9,
...                "sft_last_gain": 0.01, "response_tokens": 18.0})["R2"]
False
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from .loop import correctness
from .model import generate
from .task import ScratchpadAdditionTask

__all__ = ["RegimeThresholds", "regime_checks", "reverse_kl", "accuracy_matrix", "EVAL_SEED", "EVAL_SAMPLE_SEED"]

#: The held-out evaluation every accuracy in the report uses: prompts drawn with EVAL_SEED, T=1 completions
#: with EVAL_SAMPLE_SEED (common random numbers for every model compared). Pretraining's stopping rule and the
#: training loops' own evaluations use other seeds.
EVAL_SEED, EVAL_SAMPLE_SEED = 2024, 4242


@dataclass(frozen=True)
class RegimeThresholds:
    """The regime's bounds (issue 10; fixed in docs/reproduction.md before any geometry)."""

    param_ratio_min: float = 4.0  # teacher / student parameters
    teacher_acc_t1_min: float = 0.95  # teacher T=1 accuracy
    teacher_gap_min: float = 0.25  # teacher T=1 − anchor T=1
    reverse_kl_min: float = 0.1  # nats per response token, KL(anchor || teacher) on the anchor's samples
    anchor_acc_t1_range: tuple[float, float] = (0.4, 0.7)  # SFT anchor T=1 accuracy
    sft_last_gain_min: float = 0.0  # T=1 acc(final SFT) − acc(SFT at 80%) must exceed this ("still improving")
    response_tokens_min: float = 16.0  # mean sampled response length of the anchor


def regime_checks(values: dict, thresholds: RegimeThresholds = RegimeThresholds()) -> dict[str, bool]:
    """R1 / R2 / R3 from the measured regime ``values`` (keys as :func:`measure` returns)."""
    t = thresholds
    lo, hi = t.anchor_acc_t1_range
    return {
        "R1": bool(
            values["param_ratio"] >= t.param_ratio_min
            and values["teacher_acc_t1"] >= t.teacher_acc_t1_min
            and values["teacher_acc_t1"] >= values["anchor_acc_t1"] + t.teacher_gap_min
            and values["reverse_kl_nats"] >= t.reverse_kl_min
        ),
        "R2": bool(lo <= values["anchor_acc_t1"] <= hi and values["sft_last_gain"] > t.sft_last_gain_min),
        "R3": bool(values["response_tokens"] >= t.response_tokens_min),
    }


def eval_prompts(task: ScratchpadAdditionTask, n: int = 1000) -> torch.Tensor:
    """The held-out evaluation prompts (``n`` drawn with :data:`EVAL_SEED`)."""
    return task.prompts(n, torch.Generator().manual_seed(EVAL_SEED))


def accuracy_matrix(model: nn.Module, task: ScratchpadAdditionTask, *, n: int = 1000, samples: int = 4) -> dict:
    """Correctness on the held-out evaluation: ``{"t1": [n, samples] 0/1, "greedy": [n] 0/1}`` (uint8), every
    model on the same prompts and the same sampling seed, so differences pair prompt by prompt."""
    p = eval_prompts(task, n)
    t1 = correctness(model, task, p, samples=samples, sample_seed=EVAL_SAMPLE_SEED)
    greedy = correctness(model, task, p, samples=1, temperature=0.0)[:, 0]
    return {"t1": t1.to(torch.uint8), "greedy": greedy.to(torch.uint8)}


@torch.no_grad()
def reverse_kl(
    student: nn.Module,
    teacher: nn.Module,
    task: ScratchpadAdditionTask,
    *,
    n: int = 1000,
    samples: int = 4,
    batch: int = 1000,
) -> dict[str, float | list[float]]:
    """Per-token reverse KL(student || teacher) on the student's own T=1 samples of the held-out prompts.

    ``reverse_kl_nats``: the exact KL over the vocabulary at each sampled prefix, Σ_v π_s(v) (log π_s(v) −
    log π_t(v)), averaged over response tokens (up to and including ``<eos>``); ``sampled_token_estimate``:
    the mean of log π_s(a_t) − log π_t(a_t) (OPD's per-token advantage, negated; same expectation);
    ``response_tokens``: mean response length; ``by_position``: the exact KL averaged per response position.
    """
    p = eval_prompts(task, n).repeat_interleave(samples, dim=0)
    g = torch.Generator().manual_seed(EVAL_SAMPLE_SEED)
    tot = est = cnt = 0.0
    pos_sum = torch.zeros(task.completion_len, dtype=torch.float64)
    pos_cnt = torch.zeros(task.completion_len, dtype=torch.float64)
    was = student.training, teacher.training
    student.eval(), teacher.eval()
    for i in range(0, len(p), batch):
        pr = p[i : i + batch]
        s = generate(student, pr, task.completion_len, generator=g, temperature=1.0, eos_id=task.eos_id)
        seq = torch.cat([pr, s.tokens], 1)[:, :-1]
        P = pr.shape[1] - 1
        ls = torch.log_softmax(student(seq)[:, P:].float(), -1)
        lt = torch.log_softmax(teacher(seq)[:, P:].float(), -1)
        kl = (ls.exp() * (ls - lt)).sum(-1)  # [B, N]
        tok = s.tokens.unsqueeze(-1)
        diff = (ls.gather(-1, tok) - lt.gather(-1, tok)).squeeze(-1)
        m = s.mask
        tot += (kl * m).sum().item()
        est += (diff * m).sum().item()
        cnt += m.sum().item()
        pos_sum += (kl * m).sum(0).double()
        pos_cnt += m.sum(0).double()
    student.train(was[0]), teacher.train(was[1])
    return {
        "reverse_kl_nats": tot / cnt,
        "sampled_token_estimate": est / cnt,
        "response_tokens": cnt / len(p),
        "by_position": (pos_sum / pos_cnt.clamp_min(1)).tolist(),
    }


def thresholds_dict(t: RegimeThresholds = RegimeThresholds()) -> dict:
    return asdict(t)
