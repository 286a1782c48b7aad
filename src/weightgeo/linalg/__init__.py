"""The numerical core shared by every metric: the policy (:mod:`.policy`), decompositions (:mod:`.svd`),
the randomized SVD (:mod:`.rsvd`), the pair method (:mod:`.pairwise`), angles and spectra.

Pure tensor math, batched over leading dimensions; never reads files, never touches the global RNG.
"""

from __future__ import annotations

import warnings
from typing import Any

from .angles import subspace_angles
from .policy import REFINE_BELOW, ROW_BLOCK, compute_dtype, numerical_rank, row_blocks, to_compute_dtype
from .spectra import hill_tail_index, spectral_drift_from_values, stable_rank_from_values
from .svd import Decomposition, decompose, exact_svd, singular_values, top_singular_vectors

__all__ = [
    "Decomposition",
    "REFINE_BELOW",
    "ROW_BLOCK",
    "compute_dtype",
    "decompose",
    "exact_svd",
    "hill_tail_index",
    "numerical_rank",
    "row_blocks",
    "singular_values",
    "spectral_drift_from_values",
    "stable_rank_from_values",
    "subspace_angles",
    "to_compute_dtype",
    "top_singular_vectors",
]


def __getattr__(name: str) -> Any:
    """Deprecated names (PEP 562): ``spectral_shift`` is :func:`spectral_drift_from_values` until 0.3."""
    if name == "spectral_shift":
        warnings.warn(
            "weightgeo.linalg.spectral_shift is deprecated: use spectral_drift_from_values (spectral drift has one "
            "name); the alias goes in weightgeo 0.3",
            DeprecationWarning,
            stacklevel=2,
        )
        return spectral_drift_from_values
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
