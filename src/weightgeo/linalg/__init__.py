"""The numerical core shared by every metric: decompositions (policy in :mod:`.svd`), angles, spectra.

Pure tensor math, batched over leading dimensions; never reads files, never touches the global RNG.
"""

from __future__ import annotations

from .angles import subspace_angles
from .spectra import hill_tail_index, spectral_shift, stable_rank_from_values
from .svd import (
    Decomposition,
    compute_dtype,
    decompose,
    exact_svd,
    numerical_rank,
    singular_values,
    to_compute_dtype,
    top_singular_vectors,
)

__all__ = [
    "Decomposition",
    "compute_dtype",
    "decompose",
    "exact_svd",
    "hill_tail_index",
    "numerical_rank",
    "singular_values",
    "spectral_shift",
    "stable_rank_from_values",
    "subspace_angles",
    "to_compute_dtype",
    "top_singular_vectors",
]
