"""The numerical core shared by every metric: the policy (:mod:`.policy`), decompositions (:mod:`.svd`),
the randomized SVD (:mod:`.rsvd`), the pair method (:mod:`.pairwise`), angles and spectra.

Pure tensor math, batched over leading dimensions; never reads files, never touches the global RNG.
"""

from __future__ import annotations

from . import spectra
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


# deprecated names (``spectral_shift`` until 0.3) resolve through the module that renamed them, warning
__getattr__ = spectra.__getattr__
