"""Each loss / advantage function against values computed by hand."""

import math

import pytest
import torch

from weightgeo.errors import WeightgeoError
from weightgeo.train.losses import (
    advantage_share,
    centered_rewards,
    clipped_pg_loss,
    grpo_advantages,
    mix_advantages,
    opd_advantages,
    permute_advantages,
    sft_loss,
    sparsify_tokens,
)


def test_sft_loss_hand_values():
    # two tokens; logits chosen so softmax probabilities are exact: [ln 1, ln 3] -> p = (1/4, 3/4)
    logits = torch.log(torch.tensor([[[1.0, 3.0], [1.0, 1.0]]]))
    targets = torch.tensor([[1, 0]])
    ce = [-math.log(3 / 4), -math.log(1 / 2)]
    assert sft_loss(logits, targets, torch.tensor([[1.0, 1.0]])).item() == pytest.approx(sum(ce) / 2, abs=1e-6)
    assert sft_loss(logits, targets, torch.tensor([[0.0, 1.0]])).item() == pytest.approx(ce[1], abs=1e-6)
    # normalised by a passed-in count, not the mask
    assert sft_loss(logits, targets, torch.tensor([[1.0, 1.0]]), num_tokens=4).item() == pytest.approx(
        sum(ce) / 4, abs=1e-6
    )


def test_opd_advantages_hand_values():
    s = torch.tensor([[-0.1, -2.0, -0.7]])
    t = torch.tensor([[-0.3, -0.5, -0.7]])
    m = torch.tensor([[1.0, 1.0, 0.0]])
    a = opd_advantages(s, t, m)
    assert torch.allclose(a, torch.tensor([[-0.2, 1.5, 0.0]]))
    # detached: no gradient path into the student log-probs
    s2 = s.clone().requires_grad_(True)
    assert not opd_advantages(s2, t, m).requires_grad


def test_grpo_group_stats_and_zero_variance_skip():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    adv, keep = grpo_advantages(r, 4, eps=0.0)
    # group 1: mean 0.5, sample std sqrt(1/3): ±0.5 / 0.57735 = ±0.866025
    g1 = 0.5 / math.sqrt(1 / 3)
    # group 3: mean 0.75, sample std 0.5: 0.25/0.5 = 0.5, -0.75/0.5 = -1.5
    want = torch.tensor([g1, -g1, -g1, g1, 0, 0, 0, 0, 0.5, 0.5, 0.5, -1.5])
    assert torch.allclose(adv, want, atol=1e-6)
    assert keep.tolist() == [True] * 4 + [False] * 4 + [True] * 4
    # all-ones group is skipped too
    _, keep2 = grpo_advantages(torch.ones(8), 8)
    assert not keep2.any()
    # advantages sum to zero inside each kept group
    assert torch.allclose(adv.view(3, 4).sum(1), torch.zeros(3), atol=1e-6)
    # without std normalisation: r - mean
    adv3, _ = grpo_advantages(r, 4, normalize_std=False)
    assert torch.allclose(adv3[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    with pytest.raises(WeightgeoError, match=r"shape \(7,\) for group_size=4"):
        grpo_advantages(torch.ones(7), 4)


def test_centered_rewards_and_mix():
    assert torch.allclose(
        centered_rewards(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4), torch.tensor([0.75, -0.25, -0.25, -0.25])
    )
    a_opd = torch.tensor([[0.4, -0.2]])
    assert torch.allclose(mix_advantages(a_opd, torch.tensor([1.0]), 0.75), torch.tensor([[0.55, 0.1]]))
    assert torch.allclose(mix_advantages(a_opd, torch.tensor([1.0]), 1.0), a_opd)


def test_clipped_pg_loss_hand_values():
    # token 1: ratio 1.5 > 1.28, A=+1 -> min(1.5, 1.28) = 1.28 -> loss -1.28
    # token 2: ratio 0.5 < 0.8,  A=-1 -> min(-0.5, -0.8) = -0.8 -> loss +0.8
    # token 3: ratio 1.1 (inside), A=+2 -> 2.2 -> loss -2.2
    # token 4: ratio 0.5, A=+1 -> min(0.5, 0.8)=0.5 -> loss -0.5 (pessimistic side unclipped)
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.5]]))
    adv = torch.tensor([[1.0, -1.0, 2.0, 1.0]])
    mask = torch.ones(1, 4)
    want = (-1.28 + 0.8 - 2.2 - 0.5) / 4
    assert clipped_pg_loss(logp, old, adv, mask).item() == pytest.approx(want, abs=1e-6)
    # a masked token does not count; normaliser from num_tokens
    mask2 = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert clipped_pg_loss(logp, old, adv, mask2, num_tokens=10).item() == pytest.approx(
        (-1.28 + 0.8 - 2.2) / 10, abs=1e-6
    )
    # per-sequence advantages broadcast over tokens
    lp = torch.log(torch.tensor([[0.5, 0.25], [0.5, 0.5]]))
    l1 = clipped_pg_loss(lp, lp, torch.tensor([1.0, -1.0]), torch.ones(2, 2))
    assert l1.item() == pytest.approx((-1 - 1 + 1 + 1) / 4)


def test_clipped_pg_gradient_is_policy_gradient_on_policy():
    logp = torch.log(torch.tensor([[0.2, 0.7, 0.4]])).requires_grad_(True)
    adv = torch.tensor([[1.0, -2.0, 0.5]])
    clipped_pg_loss(logp, logp.detach(), adv, torch.ones(1, 3)).backward()
    assert torch.allclose(logp.grad, -adv / 3)


def test_gradient_accumulation_invariance():
    g = torch.Generator().manual_seed(0)
    B, T = 12, 5
    w = torch.randn(B, T, generator=g).requires_grad_(True)  # stands in for per-token log-probs
    old = w.detach() + 0.1 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).float()  # ragged response lengths
    full = clipped_pg_loss(w, old, adv, mask)
    (gfull,) = torch.autograd.grad(full, w)
    n = mask.sum()
    parts, grads = 0.0, torch.zeros_like(w)
    for sl in (slice(0, 5), slice(5, 7), slice(7, 12)):  # uneven micro-batches
        lp = clipped_pg_loss(w[sl], old[sl], adv[sl], mask[sl], num_tokens=n)
        (gp,) = torch.autograd.grad(lp, w)
        parts += lp.item()
        grads += gp
    assert parts == pytest.approx(full.item(), abs=1e-6)
    assert torch.allclose(grads, gfull, atol=1e-7)
    # the naive per-micro-batch mean would not match
    naive = sum(
        clipped_pg_loss(w[sl], old[sl], adv[sl], mask[sl]).item() for sl in (slice(0, 5), slice(5, 7), slice(7, 12))
    )
    assert abs(naive / 3 - full.item()) > 1e-4
    # same property for sft_loss
    logits = torch.randn(B, T, 7, generator=g)
    tgt = torch.randint(0, 7, (B, T), generator=g)
    f = sft_loss(logits, tgt, mask)
    p = sum(sft_loss(logits[sl], tgt[sl], mask[sl], num_tokens=n) for sl in (slice(0, 5), slice(5, 12)))
    assert p.item() == pytest.approx(f.item(), abs=1e-6)


def test_sparsify_tokens():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.2], [3.0, 1.0, 2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])  # T = 4 and 3
    w = sparsify_tokens(scores, mask, 0.5)
    # row 0: keep ceil(2)=2 largest (0.9, 0.5), weight 4/2 = 2
    assert w[0].tolist() == [0.0, 2.0, 2.0, 0.0]
    # row 1: T=3, keep ceil(1.5)=2 largest among unmasked (3.0, 2.0), weight 3/2; masked token never kept
    assert torch.allclose(w[1], torch.tensor([1.5, 0.0, 1.5, 0.0]))
    # total weight per sequence preserved (r̃ = T/Σm · m · r)
    assert torch.allclose(w.sum(1), mask.sum(1))
    wr = sparsify_tokens(scores, mask, 0.25, mode="random", generator=torch.Generator().manual_seed(0))
    assert ((wr > 0).sum(1) == torch.tensor([1, 1])).all() and torch.allclose(wr.sum(1), mask.sum(1))
    assert wr[1, 3] == 0
    assert torch.equal(sparsify_tokens(scores, mask, 1.0), mask)
    with pytest.raises(WeightgeoError, match="generator=None"):
        sparsify_tokens(scores, mask, 0.5, mode="random")
    with pytest.raises(WeightgeoError, match=r"keep_ratio=1\.5"):
        sparsify_tokens(scores, mask, 1.5)
    with pytest.raises(WeightgeoError, match="mode='topk' or mode='random'"):
        sparsify_tokens(scores, mask, 0.5, mode="top-kl")


def test_permute_advantages_is_a_null():
    g = torch.Generator().manual_seed(0)
    adv = torch.randn(16, 12, generator=g)
    mask = (torch.rand(16, 12, generator=g) > 0.25).float()
    adv = adv * mask
    p = permute_advantages(adv, mask, torch.Generator().manual_seed(1))
    # same values (magnitudes and signs) at the response tokens, zeros elsewhere
    assert torch.equal(p[mask > 0].sort().values, adv[mask > 0].sort().values)
    assert (p[mask == 0] == 0).all()
    # the token -> advantage relation is gone: most tokens get another token's value, across sequences too
    moved = (p != adv)[mask > 0].float().mean().item()
    assert moved > 0.9
    assert not torch.equal(p.sum(1), adv.sum(1))  # values crossed sequence boundaries
    # deterministic given the generator, different for another seed
    assert torch.equal(p, permute_advantages(adv, mask, torch.Generator().manual_seed(1)))
    assert not torch.equal(p, permute_advantages(adv, mask, torch.Generator().manual_seed(2)))


def test_advantage_share():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    a_opd = torch.tensor([[0.2, -0.2, 9.0]])  # the masked 9.0 does not count
    assert advantage_share(a_opd, torch.tensor([0.0]), 0.5, mask) == pytest.approx(1.0)
    # |0.5 * 0.2| * 2 = 0.2 vs |0.5 * 1.0| * 2 = 1.0 -> 0.2 / 1.2
    assert advantage_share(a_opd, torch.tensor([1.0]), 0.5, mask) == pytest.approx(0.2 / 1.2)
    # α = 0.05: the nominal share is 5 %, the realised one depends on the scales
    assert advantage_share(a_opd, torch.tensor([1.0]), 0.05, mask) == pytest.approx(0.02 / (0.02 + 1.9))
    assert math.isnan(advantage_share(torch.zeros(1, 3), torch.zeros(1), 0.5, mask))
