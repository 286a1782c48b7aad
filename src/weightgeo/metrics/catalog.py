"""The list of all metrics: the families a comparison computes and the row keys each one emits.

One place names them, so the engine, the report, the docs and the tests (the property table and the naming
contract, ``tests/test_properties.py``, ``tests/test_naming_contract.py``) agree on the vocabulary.

>>> ALL_METRICS
('update_sparsity', 'principal_overlap', 'spectral_drift', 'update_localization', 'stable_rank')
>>> OUTPUTS["update_localization"]
('density', 'principal_mask_overlap', 'low_magnitude_overlap')
"""

from __future__ import annotations

__all__ = ["ALL_METRICS", "PAIR_METRICS", "ALIASES", "OUTPUTS", "VECTOR_OUTPUTS", "TRAJECTORY_OUTPUTS", "COUNTS"]

#: metrics computed per matrix by the pair kernel (the engine streams update_sparsity in row chunks itself)
PAIR_METRICS: tuple[str, ...] = ("principal_overlap", "spectral_drift", "update_localization", "stable_rank")
#: every metric family a comparison accepts, in report order
ALL_METRICS: tuple[str, ...] = ("update_sparsity",) + PAIR_METRICS

#: alternative spellings users reach for; each maps to the family that computes it
ALIASES: dict[str, str] = {
    "principal_angles": "principal_overlap",  # also keeps each matrix's angle vector (VECTOR_OUTPUTS)
    "max_principal_angle": "principal_overlap",
    "rotation": "principal_overlap",
    "nss": "spectral_drift",
    "drift": "spectral_drift",
    "localization": "update_localization",
    "density": "update_localization",
    "sparsity": "update_sparsity",
}

#: the scalar row keys of each family, in the order rows carry them
OUTPUTS: dict[str, tuple[str, ...]] = {
    "update_sparsity": ("update_sparsity",),
    "principal_overlap": (
        "principal_overlap",
        "max_principal_angle",
        "mean_principal_angle",
        "k_effective",
        "spectral_gap",
    ),
    "spectral_drift": ("spectral_drift",),
    "update_localization": ("density", "principal_mask_overlap", "low_magnitude_overlap"),
    "stable_rank": ("stable_rank", "delta_frobenius"),
}

#: vector row keys (lists), each emitted by one family when asked for by name
VECTOR_OUTPUTS: dict[str, str] = {"principal_angles": "principal_overlap"}

#: the scalar row keys of a trajectory report (rank_curve, Tracker.rank_curve), in row order
TRAJECTORY_OUTPUTS: tuple[str, ...] = (
    "frobenius_norm",
    "spectral_norm",
    "stable_rank",
    "hill_alpha",
    "spectral_gap",
    "final_subspace_similarity",
)

#: row keys that count something (integers stored as numbers) rather than measure it
COUNTS: frozenset[str] = frozenset({"k_effective"})
