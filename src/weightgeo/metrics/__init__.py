"""Tensor-level metrics: thin validate + dispatch; one file per family, each citing its paper section.

Naming contract (docs/metrics.md): ``*_overlap`` / ``*_similarity`` in [0, 1], higher = more aligned;
``*_angles`` in degrees, ascending; ``*_sparsity`` = fraction unchanged; the same keyword names
everywhere (``k``, ``eta``, ``device``, ``dtype``, ``seed``). Called with checkpoint sources instead of
tensors, each metric returns ``weightgeo.engine.compare(base, ft, metrics=[...])``.
"""

from __future__ import annotations

from .drift import spectral_drift, stable_rank
from .localization import Localization, update_localization
from .pair import ALL_METRICS, PAIR_METRICS, matrix_pair_metrics
from .rotation import principal_angles, principal_overlap
from .sparsity import update_mask, update_sparsity

__all__ = [
    "ALL_METRICS",
    "Localization",
    "PAIR_METRICS",
    "matrix_pair_metrics",
    "principal_angles",
    "principal_overlap",
    "spectral_drift",
    "stable_rank",
    "update_localization",
    "update_mask",
    "update_sparsity",
]
