"""Tensor-level metrics: thin validate + compute; one file per family, each citing its paper section.

Naming contract (docs/metrics.md): ``*_overlap`` / ``*_similarity`` in [0, 1], higher = more aligned;
``*_angles`` in degrees, ascending; ``*_sparsity`` = fraction unchanged; the same keyword names
everywhere (``k``, ``eta``, ``device``, ``dtype``, ``seed``). These functions take tensors (or NumPy arrays)
only and never read files; the checkpoint-aware verbs of the same names are ``weightgeo.<verb>``
(:mod:`weightgeo.api`). The list of all metrics, the row keys each emits and every other name: the glossary,
:mod:`.catalog`.
"""

from __future__ import annotations

from .catalog import ALL_METRICS, OUTPUTS, PAIR_METRICS
from .drift import spectral_drift, stable_rank
from .localization import Localization, update_localization
from .pair import matrix_pair_metrics
from .rotation import principal_angles, principal_overlap
from .sparsity import fp8_unchanged_count, fp8_update_mask, update_mask, update_sparsity

__all__ = [
    "ALL_METRICS",
    "Localization",
    "OUTPUTS",
    "PAIR_METRICS",
    "fp8_unchanged_count",
    "fp8_update_mask",
    "matrix_pair_metrics",
    "principal_angles",
    "principal_overlap",
    "spectral_drift",
    "stable_rank",
    "update_localization",
    "update_mask",
    "update_sparsity",
]
