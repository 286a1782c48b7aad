"""Every default value of an option, written once.

The verbs' signatures (pairs, streams, tensors), the option objects (:mod:`weightgeo.options`), the command line
and its help read their defaults from here; this module imports nothing of weightgeo, so every layer can (the
tensor-level metrics in ``metrics/`` and ``linalg/`` too). docs/metrics.md explains each choice.

>>> PAIR_K, STREAM_K, ETA, PROGRESS
(0.125, 16, 0.001, False)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "PAIR_K",
    "SIDE",
    "RANK",
    "ALPHA",
    "ETA",
    "STREAM_K",
    "HILL_K",
    "SEED",
    "THRESHOLD",
    "PROGRESS",
    "TRACKER_DTYPE",
    "POLL_S",
    "TEXT_WIDTH",
]

#: ``k`` of the pair metrics: the top-k singular subspace compared by the principal angles and overlap, as a
#: fraction of each matrix's smaller side: an eighth, the paper's 512 of an 8B model's 4096 (§3.1), which keeps
#: every matrix of every model size measurable (docs/metrics.md: "Choosing k", measured on real shapes)
PAIR_K = 0.125
#: ``side``: the singular side the rotation metrics compare, ``"right"`` = V, the input side (paper §3.1)
SIDE = "right"
#: ``rank``: update localization's reconstruction rank r (paper §3.2)
RANK = 64
#: ``alpha``: update localization's mask fraction α (paper §3.2; its Fig. 3 uses 0.3)
ALPHA = 0.5
#: ``eta``: the bf16 update rule's relative tolerance η (paper §3.1, App. C.3)
ETA = 1e-3
#: ``k`` of the trajectory metrics: the size K of the top-K input subspace of ΔW_t in Sim_K (paper §4: 16)
STREAM_K = 16
#: ``hill_k``: the top singular values of ΔW_t in the Hill tail index (our choice; the paper is silent)
HILL_K = 10
#: ``seed``: seeds every random test matrix (randomized SVD, sketches), per matrix
SEED = 0
#: ``threshold``: Sim_K(t, t_end) at and above which a subspace counts as locked (our choice)
THRESHOLD = 0.9
#: ``progress``: one rule for every verb: no bar from Python unless asked for; the command line shows one
#: (``--no-progress`` hides it)
PROGRESS = False
#: the Tracker's rounding ``dtype``: ``None``, each parameter's own dtype, which is the format a trainer's
#: checkpoints hold (``save_pretrained`` writes the parameters as they are: HF Trainer, TRL), so that the live
#: numbers equal ``rank_curve`` of the run's checkpoints; a loop that saves in another format (weightgeo.train
#: writes bf16 from fp32 masters) passes that ``dtype=``. The stream verbs round nothing either (stored formats).
TRACKER_DTYPE: torch.dtype | None = None
#: ``poll_s``: seconds between two scans of a followed run directory
POLL_S = 10.0
#: ``width``: the characters a printed table or summary may take (a terminal of 120 columns)
TEXT_WIDTH = 120
