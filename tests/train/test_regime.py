"""Regime checks R1-R3 on constructed values, and the reverse KL against an exact computation."""

import math

import pytest
import torch

from weightgeo.train.regime import RegimeThresholds, regime_checks, reverse_kl
from weightgeo.train.task import EOS, ScratchpadAdditionTask

OK = {
    "teacher_acc_t1": 0.99,
    "anchor_acc_t1": 0.55,
    "reverse_kl_nats": 0.3,
    "param_ratio": 4.9,
    "sft_last_gain": 0.01,
    "response_tokens": 18.0,
}


@pytest.mark.parametrize(
    "change, failed",
    [
        ({}, None),
        ({"param_ratio": 3.9}, "R1"),
        ({"teacher_acc_t1": 0.94}, "R1"),
        ({"teacher_acc_t1": 0.96, "anchor_acc_t1": 0.72}, "R1"),  # gap < 0.25 (and R2 fails too)
        ({"reverse_kl_nats": 0.09}, "R1"),
        ({"anchor_acc_t1": 0.39}, "R2"),
        ({"anchor_acc_t1": 0.71}, "R2"),
        ({"sft_last_gain": 0.0}, "R2"),  # SFT no longer improving
        ({"response_tokens": 15.9}, "R3"),
    ],
)
def test_regime_checks(change, failed):
    c = regime_checks({**OK, **change})
    assert set(c) == {"R1", "R2", "R3"}
    if failed is None:
        assert all(c.values())
    else:
        assert not c[failed]
    assert regime_checks({**OK, "anchor_acc_t1": 0.4})["R2"] and regime_checks({**OK, "anchor_acc_t1": 0.7})["R2"]
    assert not regime_checks(OK, RegimeThresholds(reverse_kl_min=0.5))["R1"]


class _FixedLM(torch.nn.Module):
    """Same next-token distribution at every position: softmax(logits)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.as_tensor(logits, dtype=torch.float32)

    def forward(self, seq):
        return self.logits.expand(seq.shape[0], seq.shape[1], -1).clone()


def test_reverse_kl_exact_on_fixed_distributions():
    task = ScratchpadAdditionTask()
    V = task.vocab_size
    s_logits = torch.zeros(V)
    s_logits[EOS] = -30.0  # the student never stops: every response has completion_len tokens
    t_logits = torch.arange(V, dtype=torch.float32) / V
    t_logits[EOS] = -30.0
    p, q = torch.softmax(s_logits, 0), torch.softmax(t_logits, 0)
    want = (p * (p.log() - q.log())).sum().item()
    r = reverse_kl(_FixedLM(s_logits), _FixedLM(t_logits), task, n=50, samples=2)
    assert r["reverse_kl_nats"] == pytest.approx(want, rel=1e-5)
    assert r["response_tokens"] == task.completion_len
    assert r["sampled_token_estimate"] == pytest.approx(want, abs=0.05)  # same expectation, sampling noise
    assert len(r["by_position"]) == task.completion_len
    same = reverse_kl(_FixedLM(s_logits), _FixedLM(s_logits), task, n=10, samples=1)
    assert same["reverse_kl_nats"] == pytest.approx(0.0, abs=1e-7) and math.isfinite(same["sampled_token_estimate"])
