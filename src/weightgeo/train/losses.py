"""Pure loss and advantage functions (no model, no state), each tested against hand-computed values.

Token-level normalisation under gradient accumulation: every loss here *sums* its masked per-token terms
and divides by ``num_tokens``, the number of response tokens in the **whole accumulated batch** (all
micro-batches of one optimizer step). Pass it in; then the micro-batch losses add up to exactly the
full-batch loss, and so do their gradients. Left as ``None`` it is this call's own ``mask.sum()`` (right
only when there is no accumulation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import WeightgeoError

__all__ = [
    "sft_loss",
    "opd_advantages",
    "grpo_advantages",
    "clipped_pg_loss",
    "sparsify_tokens",
    "mix_advantages",
    "centered_rewards",
    "permute_advantages",
    "advantage_share",
]


def _denominator(mask: torch.Tensor, num_tokens: float | int | torch.Tensor | None) -> torch.Tensor:
    n = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=mask.dtype)
    return n.clamp_min(1.0)


def sft_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    *,
    num_tokens: float | int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy summed over masked targets / ``num_tokens``.

    logits [B, T, V], targets [B, T] (token ids), mask [B, T] (1 = a response token to learn).

    >>> logits = torch.zeros(1, 2, 4)              # uniform over 4 tokens: CE = log 4 per token
    >>> round(sft_loss(logits, torch.tensor([[1, 2]]), torch.tensor([[0., 1.]])).item(), 4)
    1.3863
    """
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    mask = mask.float()
    return (ce.view_as(mask) * mask).sum() / _denominator(mask, num_tokens)


def opd_advantages(student_logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """On-policy distillation advantage A_t = −(log π_s(a_t|s_t) − log π_t(a_t|s_t)), 0 where mask is 0.

    The sampled-token reverse-KL estimator (paper App. C): positive where the teacher likes the sampled
    token more than the student does. Detached: it is a reward, not a path for gradients.

    >>> opd_advantages(torch.tensor([[-1.0, -2.0]]), torch.tensor([[-0.5, -3.0]]), torch.tensor([[1., 0.]]))
    tensor([[0.5000, 0.0000]])
    """
    return (-(student_logp.detach() - teacher_logp.detach()) * mask).float()


def grpo_advantages(
    rewards: torch.Tensor, group_size: int, *, eps: float = 1e-6, normalize_std: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-normalised advantages (r − mean_g) / (std_g + eps) and a keep mask of groups with reward variance.

    ``rewards`` [G * group_size], groups contiguous (prompt-major). Returns ``(advantages [N], keep [N] bool)``;
    ``keep`` is False for every sample of a group whose rewards are all equal (zero variance: no signal, and
    DAPO/the paper skip them); their advantages are 0. std is the sample std (Bessel, as in verl's and TRL's
    GRPO; the paper does not say). ``normalize_std=False`` gives r − mean_g (Dr. GRPO; used for mixing).

    >>> adv, keep = grpo_advantages(torch.tensor([1., 0., 0., 0., 1., 1., 1., 1.]), 4)
    >>> adv, keep
    (tensor([ 1.5000, -0.5000, -0.5000, -0.5000,  0.0000,  0.0000,  0.0000,  0.0000]), tensor([ True,  True,  True,  True, False, False, False, False]))
    """
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise WeightgeoError(
            f"grpo_advantages: rewards of shape {tuple(rewards.shape)} for group_size={group_size}; pass a 1-D tensor "
            f"of G * group_size rewards, the group_size samples of each prompt contiguous"
        )
    r = rewards.float().view(-1, group_size)
    mean = r.mean(1, keepdim=True)
    std = r.std(1, keepdim=True, unbiased=True) if group_size > 1 else torch.zeros_like(mean)
    keep = (r.max(1, keepdim=True).values > r.min(1, keepdim=True).values).expand_as(r)
    adv = r - mean
    if normalize_std:
        adv = adv / (std + eps)
    adv = torch.where(keep, adv, torch.zeros_like(adv))
    return adv.reshape(-1), keep.reshape(-1)


def centered_rewards(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """r − mean over the group, no std normalisation (the RLVR part of the OPD+RLVR mix, paper §5).

    >>> centered_rewards(torch.tensor([1., 0., 1., 1.]), 2)
    tensor([ 0.5000, -0.5000,  0.0000,  0.0000])
    """
    r = rewards.float().view(-1, group_size)
    return (r - r.mean(1, keepdim=True)).reshape(-1)


def clipped_pg_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    num_tokens: float | int | torch.Tensor | None = None,
) -> torch.Tensor:
    """PPO/GRPO clipped surrogate, token-level normalised (DAPO): Σ_t m_t · −min(ρ_t A_t, clip(ρ_t) A_t) / N.

    logp, old_logp, mask [B, T]; advantages [B, T] (per token, OPD) or [B] (per sequence, GRPO; broadcast
    over tokens). ρ_t = exp(logp − old_logp), clipped to [1 − clip_low, 1 + clip_high]. ``num_tokens`` = N,
    the response tokens of the whole accumulated batch. On-policy with one update per batch, ρ = 1 and the
    gradient is the plain policy gradient −A_t ∇ log π / N.

    >>> lp = torch.log(torch.tensor([[0.5, 0.5]]))
    >>> clipped_pg_loss(lp, lp, torch.tensor([2.0]), torch.ones(1, 2))   # ρ = 1: −(2 + 2) / 2
    tensor(-2.)
    """
    if advantages.ndim == 1:
        advantages = advantages[:, None].expand_as(logp)
    mask = mask.float()
    adv = advantages.detach().float()
    ratio = torch.exp(logp.float() - old_logp.detach().float())
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    return (per_token * mask).sum() / _denominator(mask, num_tokens)


def sparsify_tokens(
    scores: torch.Tensor,
    mask: torch.Tensor,
    keep_ratio: float,
    *,
    mode: str = "topk",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Token-sparsification control (paper §5): keep a fraction ρ of each sequence's response tokens and
    rescale so the sequence's total weight is unchanged: returns weights w_t = (T / Σm) · m_t, where T is the
    sequence's response-token count and m the keep mask; multiply the advantages by it (r̃_t = w_t r_t).

    ``mode="topk"`` keeps the ceil(ρ T) tokens with the largest ``scores`` (pass |log π_s − log π_t|, the
    per-token KL magnitude: "top-KL"; using the magnitude of the sampled-token estimate is our choice);
    ``mode="random"`` keeps a uniformly random ceil(ρ T) subset (needs ``generator``).

    >>> sparsify_tokens(torch.tensor([[0.1, 0.9, 0.5, 0.2]]), torch.ones(1, 4), 0.5)
    tensor([[0., 2., 2., 0.]])
    """
    if not 0 < keep_ratio <= 1:
        raise WeightgeoError(
            f"sparsify_tokens(keep_ratio={keep_ratio!r}): pass a fraction of the response tokens in (0, 1]"
        )
    mask = mask.float()
    if mode == "topk":
        s = scores.detach().float()
    elif mode == "random":
        if generator is None:
            raise WeightgeoError(
                "sparsify_tokens(mode='random') got generator=None: pass generator=torch.Generator().manual_seed(...) "
                "(the global RNG is never used)"
            )
        s = torch.rand(mask.shape, generator=generator)
    else:
        raise WeightgeoError(f"sparsify_tokens(mode={mode!r}): use mode='topk' or mode='random'")
    s = torch.where(mask > 0, s, torch.full_like(s, float("-inf")))
    T = mask.sum(1, keepdim=True)
    k = torch.ceil(keep_ratio * T - 1e-9)
    order = torch.argsort(
        torch.argsort(s, dim=1, descending=True, stable=True), dim=1, stable=True
    )  # rank of each token
    keep = (order < k).float() * mask
    return keep * (T / keep.sum(1, keepdim=True).clamp_min(1.0))


def mix_advantages(a_opd: torch.Tensor, a_rlvr: torch.Tensor, alpha: float) -> torch.Tensor:
    """A = α · A_OPD + (1 − α) · A_RLVR (paper §5; no std normalisation). a_opd [B, T], a_rlvr [B] or [B, T].

    >>> mix_advantages(torch.tensor([[1.0, -1.0]]), torch.tensor([2.0]), 0.25)
    tensor([[1.7500, 1.2500]])
    """
    if a_rlvr.ndim == 1:
        a_rlvr = a_rlvr[:, None].expand_as(a_opd)
    return alpha * a_opd + (1.0 - alpha) * a_rlvr


def permute_advantages(adv: torch.Tensor, mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The null run's advantages: the values at response tokens (``mask`` > 0) shuffled across the whole batch.

    Same multiset of magnitudes and signs as ``adv``, no relation left between a token and its advantage: an
    update driven by it is Adam's noise floor at this lr, batch and advantage scale. 0 where mask is 0.

    >>> a = torch.tensor([[1.0, 2.0, 0.0], [3.0, 4.0, 5.0]])
    >>> m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    >>> p = permute_advantages(a, m, torch.Generator().manual_seed(0))
    >>> sorted(p[m > 0].tolist()), p[0, 2].item()
    ([1.0, 2.0, 3.0, 4.0, 5.0], 0.0)
    """
    keep = mask > 0
    vals = adv[keep]
    out = torch.zeros_like(adv)
    out[keep] = vals[torch.randperm(vals.numel(), generator=generator)]
    return out


def advantage_share(a_opd: torch.Tensor, a_rlvr: torch.Tensor, alpha: float, mask: torch.Tensor) -> float:
    """Realised OPD share of a mixed advantage: Σ|α A_OPD| / (Σ|α A_OPD| + Σ|(1 − α) A_RLVR|) over response
    tokens (paper §5's mix has no std normalisation, so the nominal α is not the share of the signal).
    a_opd [B, T]; a_rlvr [B] (per sequence) or [B, T]; NaN when both are 0.

    >>> advantage_share(torch.tensor([[0.1, -0.1]]), torch.tensor([0.5]), 0.5, torch.ones(1, 2))
    0.1666...
    """
    if a_rlvr.ndim == 1:
        a_rlvr = a_rlvr[:, None].expand_as(a_opd)
    m = mask.float()
    o = (alpha * a_opd.abs() * m).sum().item()
    r = ((1.0 - alpha) * a_rlvr.abs() * m).sum().item()
    return o / (o + r) if o + r > 0 else float("nan")
