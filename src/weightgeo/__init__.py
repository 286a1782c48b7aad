"""weightgeo: the geometry of fine-tuning in parameter space.

Point it at a base checkpoint and a fine-tuned one (or a stream of training checkpoints) and get, per weight
matrix and for the whole model: how many weights changed, how far the principal singular subspaces rotated,
how the spectrum drifted, where the update lands, and how the rank of the cumulative update evolves.
Definitions follow "On the Geometry of On-Policy Distillation" (arXiv 2606.07082); see docs/metrics.md.

Naming contract (stated once, used everywhere):

- ``*_overlap`` / ``*_similarity`` lie in [0, 1]; higher means more aligned.
- ``*_angle`` / ``*_angles`` are in degrees (a vector ascending).
- ``*_sparsity`` is the fraction of entries unchanged.
- ``delta_*`` is a property of the update ΔW where the same word of W0 exists (``delta_spectral_gap``).
- One name per quantity in every row; the same keyword names everywhere (``k``, ``eta``, ``device``,
  ``dtype``, ``seed``), one meaning each: the glossary, :mod:`weightgeo.metrics.catalog` (docs/metrics.md).

Tensors in, numbers out; checkpoint sources (paths, hub ids, mappings, modules) in, a :class:`Report` out
(:mod:`weightgeo.api`). Layers, one way: docs/architecture.md.

>>> import torch, weightgeo
>>> w = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
>>> weightgeo.principal_overlap(w, w, k=8)
1.0
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:  # the names below, imported on first use (``python -m weightgeo --help`` needs no torch)
    from .api import (
        UpdateMasks,
        principal_angles,
        principal_overlap,
        spectral_drift,
        stable_rank,
        subspace_similarity,
        update_localization,
        update_mask,
        update_mask_overlap,
        update_sparsity,
    )
    from .checkpoint import Checkpoint, open_checkpoint
    from .engine import compare, compare_many
    from .errors import WeightgeoError
    from .follow import FollowUpdate, follow
    from .linalg.rsvd import randomized_svd
    from .metrics import Localization
    from .metrics.mask_overlap import MaskOverlap
    from .metrics.trajectory import LockingOnset
    from .render.html import write_html
    from .report import Report
    from .track import Tracker
    from .trajectory import locking_onset, rank_curve, sparsity_curve

#: where each public name lives; imported the first time it is read (PEP 562)
_HOMES = {
    **dict.fromkeys(
        (
            "UpdateMasks",
            "principal_angles",
            "principal_overlap",
            "spectral_drift",
            "stable_rank",
            "subspace_similarity",
            "update_localization",
            "update_mask",
            "update_mask_overlap",
            "update_sparsity",
        ),
        ".api",
    ),
    "Checkpoint": ".checkpoint",
    "open_checkpoint": ".checkpoint",
    "compare": ".engine",
    "compare_many": ".engine",
    "WeightgeoError": ".errors",
    "FollowUpdate": ".follow",
    "follow": ".follow",
    "randomized_svd": ".linalg.rsvd",
    "Localization": ".metrics",
    "MaskOverlap": ".metrics.mask_overlap",
    "LockingOnset": ".metrics.trajectory",
    "Report": ".report",
    "write_html": ".render.html",
    "Tracker": ".track",
    "locking_onset": ".trajectory",
    "rank_curve": ".trajectory",
    "sparsity_curve": ".trajectory",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'weightgeo' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value  # once: later reads are plain attribute lookups
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "Checkpoint",
    "FollowUpdate",
    "Localization",
    "LockingOnset",
    "MaskOverlap",
    "Report",
    "Tracker",
    "UpdateMasks",
    "WeightgeoError",
    "__version__",
    "compare",
    "compare_many",
    "follow",
    "locking_onset",
    "open_checkpoint",
    "principal_angles",
    "principal_overlap",
    "randomized_svd",
    "rank_curve",
    "sparsity_curve",
    "spectral_drift",
    "stable_rank",
    "subspace_similarity",
    "update_localization",
    "update_mask",
    "update_mask_overlap",
    "update_sparsity",
    "write_html",
]
