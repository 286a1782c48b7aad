"""Confidence intervals and the verdict rule of the miniature's claims (docs/reproduction.md, "Verdicts").

- :func:`paired_bootstrap`: the difference in accuracy of two models evaluated on the **same** prompts
  with the same sampling seeds, resampled prompt by prompt (the pairing removes the prompt-difficulty
  variance, and common random numbers remove most of the sampling variance).
- :func:`cluster_bootstrap`: a statistic over training seeds and items (weight matrices, or prompts),
  resampled at both levels: seeds with replacement, and one resample of the items shared by every seed
  and every method in a replicate (the same matrix names, or the same prompts, stay paired).
- :func:`verdict`: *reproduced* when the paper's ordering (statistic > 0) holds in every seed and the 95 %
  CI excludes 0; *contradicted* when the reverse holds the same way; *untestable* when a precondition
  failed; *inconclusive* otherwise.

>>> import numpy as np
>>> a = np.array([[1, 0], [0, 0], [1, 1], [0, 1]])      # 4 prompts x 2 samples, model A
>>> b = np.array([[1, 1], [0, 1], [1, 1], [1, 1]])      # model B, same prompts and sampling seeds
>>> r = paired_bootstrap(a, b, n_boot=2000, seed=0)
>>> r["diff"], r["ci95"][0] > 0
(0.375, True)
>>> verdict([0.2, 0.1, 0.3], (0.05, 0.3)), verdict([0.2, -0.1, 0.3], (-0.05, 0.3)), verdict([-1.0], (-2, -0.5))
('reproduced', 'inconclusive', 'contradicted')
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from ..errors import WeightgeoError

__all__ = ["paired_bootstrap", "cluster_bootstrap", "bootstrap_links", "verdict", "VERDICTS", "N_BOOT"]

VERDICTS = ("reproduced", "contradicted", "inconclusive", "untestable")
N_BOOT = 2000  # bootstrap replicates (percentile intervals)


def _per_prompt(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x.mean(axis=1) if x.ndim == 2 else x


def paired_bootstrap(a, b, *, n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95) -> dict:
    """Mean of b − a over prompts, with a percentile bootstrap CI resampling prompts.

    Args:
        a, b: correctness [n_prompts] or [n_prompts, n_samples] (0/1) of two models on the same prompts and
            sampling seeds (row i of ``a`` and of ``b`` is the same prompt).
        n_boot: replicates. seed: the bootstrap's own RNG. level: CI coverage.

    Returns:
        ``{"diff", "ci95": (lo, hi), "a", "b", "n_prompts"}``: ``diff`` = acc(b) − acc(a).
    """
    pa, pb = _per_prompt(a), _per_prompt(b)
    if pa.shape != pb.shape:
        raise WeightgeoError(
            f"paired_bootstrap: the two models were evaluated on different prompt sets "
            f"({pa.shape} vs {pb.shape}); evaluate both on the same prompts and sampling seeds"
        )
    d = pb - pa
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(n_boot, len(d)))
    reps = d[idx].mean(axis=1)
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return {
        "diff": float(d.mean()),
        "ci95": (float(lo), float(hi)),
        "a": float(pa.mean()),
        "b": float(pb.mean()),
        "n_prompts": int(len(d)),
    }


def cluster_bootstrap(
    stat: Callable[[int, np.ndarray], float],
    n_seeds: int,
    n_items: int,
    *,
    n_boot: int = N_BOOT,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """A statistic over seeds and items with a two-level percentile bootstrap.

    ``stat(s, idx)`` returns the statistic of training seed ``s`` computed on items ``idx`` (an int array of
    indices into the items, with repeats); the point estimate is the mean over seeds of ``stat(s, all)``.
    Each replicate draws ``n_seeds`` seeds with replacement and one item resample used for all of them.

    >>> import numpy as np
    >>> x = np.array([[1.0, 2.0, 3.0], [2.0, 3.0, 4.0]])      # 2 seeds x 3 matrices
    >>> r = cluster_bootstrap(lambda s, idx: x[s, idx].mean(), 2, 3, n_boot=500)
    >>> r["statistic"], r["per_seed"], r["ci95"][0] >= 1.0
    (2.5, [2.0, 3.0], True)

    Returns:
        ``{"statistic", "per_seed", "ci95": (lo, hi)}``.
    """
    full = np.arange(n_items)
    per_seed = [float(stat(s, full)) for s in range(n_seeds)]
    rng = np.random.default_rng(seed)
    reps = np.empty(n_boot)
    for b in range(n_boot):
        seeds = rng.integers(0, n_seeds, size=n_seeds)
        idx = rng.integers(0, n_items, size=n_items)
        reps[b] = np.mean([stat(int(s), idx) for s in seeds])
    reps = reps[np.isfinite(reps)]
    if not len(reps):
        return {"statistic": float(np.mean(per_seed)), "per_seed": per_seed, "ci95": None}
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return {"statistic": float(np.mean(per_seed)), "per_seed": per_seed, "ci95": (float(lo), float(hi))}


def bootstrap_links(
    links: dict[str, Callable[[int, np.ndarray], float]],
    n_seeds: int,
    n_items: int,
    *,
    n_boot: int = N_BOOT,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[dict, dict[str, dict]]:
    """:func:`cluster_bootstrap` of a claim made of several links (each oriented so that > 0 is the claim's
    direction) and of its statistic, the smallest link: ``(claim, {link: result})``, each result as
    :func:`cluster_bootstrap` returns. One set of resamples serves every link, and each link is evaluated once
    per (replicate, drawn seed), so the claim's interval and its links' come from the same replicates.

    >>> import numpy as np
    >>> x = np.array([[1.0, 2.0], [3.0, 4.0]])                  # 2 seeds x 2 matrices
    >>> claim, links = bootstrap_links({"a": lambda s, i: x[s, i].mean(), "b": lambda s, i: 2.0}, 2, 2, n_boot=200)
    >>> claim["per_seed"], links["a"]["statistic"], links["b"]["ci95"]
    ([1.5, 2.0], 2.5, (2.0, 2.0))
    """
    names = list(links)
    full = np.arange(n_items)
    per = np.array([[float(links[n](s, full)) for n in names] for s in range(n_seeds)])  # [seed, link]
    rng = np.random.default_rng(seed)
    reps = np.empty((n_boot, len(names)))
    reps_min = np.empty(n_boot)
    for b in range(n_boot):
        seeds = rng.integers(0, n_seeds, size=n_seeds)
        idx = rng.integers(0, n_items, size=n_items)
        cache = {int(s): np.array([float(links[n](int(s), idx)) for n in names]) for s in set(seeds.tolist())}
        vals = np.array([cache[int(s)] for s in seeds])  # [drawn seed, link]
        reps[b] = vals.mean(0)
        reps_min[b] = vals.min(1).mean()
    q = [(1 - level) / 2, (1 + level) / 2]

    def result(point_per_seed: np.ndarray, r: np.ndarray) -> dict:
        r = r[np.isfinite(r)]
        ci = tuple(float(v) for v in np.quantile(r, q)) if len(r) else None
        return {"statistic": float(np.mean(point_per_seed)), "per_seed": [float(v) for v in point_per_seed], "ci95": ci}

    return result(per.min(1), reps_min), {n: result(per[:, j], reps[:, j]) for j, n in enumerate(names)}


def verdict(per_seed: Sequence[float], ci95: tuple[float, float] | None, *, testable: bool = True) -> str:
    """The claim verdict from the per-seed statistics (paper's ordering = positive) and the 95 % CI.

    ``untestable`` when ``testable`` is False (a regime precondition failed); ``reproduced`` when every seed
    is > 0 and the CI's lower end is > 0; ``contradicted`` when every seed is < 0 and the upper end < 0;
    ``inconclusive`` otherwise (including no data or a NaN).
    """
    if not testable:
        return "untestable"
    vals = [float(v) for v in per_seed]
    if not vals or ci95 is None or any(not math.isfinite(v) for v in vals) or not all(map(math.isfinite, ci95)):
        return "inconclusive"
    if all(v > 0 for v in vals) and ci95[0] > 0:
        return "reproduced"
    if all(v < 0 for v in vals) and ci95[1] < 0:
        return "contradicted"
    return "inconclusive"
