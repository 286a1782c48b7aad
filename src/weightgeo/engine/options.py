"""The options of one comparison, validated once and frozen: what every part of the pass reads.

>>> o = Options.create(metrics=["nss", "update_sparsity"], k=4)
>>> o.metrics, o.pair_metrics, o.k
(('update_sparsity', 'spectral_drift'), frozenset({'spectral_drift'}), 4)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..checkpoint import compile_filter
from ..devices import resolve_device
from ..errors import WeightgeoError
from ..metrics.catalog import ALIASES, ALL_METRICS, PAIR_METRICS, VECTOR_OUTPUTS
from ..validation import check_batch_bytes, check_eta, check_k, check_rank_alpha, check_side

__all__ = ["Options", "resolve_metrics", "default_batch_bytes"]

Filter = str | Sequence[str] | None


def resolve_metrics(metrics: str | Iterable[str] | None) -> tuple[str, ...]:
    """Validate metric names (aliases allowed) before anything is read; ``None`` means all.

    >>> resolve_metrics(["nss", "update_sparsity"])
    ('update_sparsity', 'spectral_drift')
    >>> resolve_metrics("bogus")
    Traceback (most recent call last):
    ...
    weightgeo.errors.WeightgeoError: unknown metric 'bogus'; choose from update_sparsity, ...
    """
    if metrics is None:
        return ALL_METRICS
    names = [metrics] if isinstance(metrics, str) else list(metrics)
    if not names:
        raise WeightgeoError(f"metrics=[] asks for nothing; pass None for all, or some of {', '.join(ALL_METRICS)}")
    chosen = set()
    for m in names:
        canonical = ALIASES.get(m, m)
        if canonical not in ALL_METRICS:
            raise WeightgeoError(
                f"unknown metric {m!r}; choose from {', '.join(ALL_METRICS)} (aliases: {', '.join(sorted(ALIASES))})"
            )
        chosen.add(canonical)
    return tuple(m for m in ALL_METRICS if m in chosen)


def default_batch_bytes(device: torch.device) -> int:
    """The shape-group budget when ``batch_bytes=None``: a quarter of the free memory on CUDA, 64 MiB on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(256 << 20, free // 4)
    # On CPU, LAPACK loops over a batch anyway: larger groups measured no faster and only raise the peak
    # (all metrics on Qwen2.5-0.5B: 0 -> 47.9 s / 1.12 GB, 64 MiB -> 45.5 s / 1.23 GB, 256 MiB -> 49 s / 1.64 GB).
    return 64 << 20


@dataclass(frozen=True)
class Options:
    """Everything a comparison is asked for, checked (build with :meth:`create`).

    Attributes:
        metrics: the metric families, in report order (:data:`~weightgeo.metrics.catalog.ALL_METRICS`).
        vectors: vector outputs asked for by name (``("principal_angles",)``: each matrix's angle vector).
        include, exclude: the tensor filter as given (regexes or presets).
        k, side, rank, alpha, eta: the metric options (paper §3.1, §3.2).
        device: where the linear algebra runs. progress: show a bar. batch_bytes: the shape-group budget as
            given (``None`` = :func:`default_batch_bytes`).
    """

    metrics: tuple[str, ...]
    vectors: tuple[str, ...] = ()
    include: Filter = None
    exclude: Filter = None
    k: int = 512
    side: str = "right"
    rank: int = 64
    alpha: float = 0.5
    eta: float = 1e-3
    device: torch.device = torch.device("cpu")
    progress: bool = True
    batch_bytes: int | None = None

    @classmethod
    def create(
        cls,
        *,
        metrics: str | Sequence[str] | None = None,
        include: Filter = None,
        exclude: Filter = None,
        k: int = 512,
        side: str = "right",
        rank: int = 64,
        alpha: float = 0.5,
        eta: float = 1e-3,
        device: str | torch.device | None = None,
        progress: bool = True,
        batch_bytes: int | None = None,
    ) -> Options:
        """Validate every option (metric names, k, side, rank/alpha, eta, device, budget, filters) at once."""
        names = [metrics] if isinstance(metrics, str) else list(metrics) if metrics is not None else []
        vectors = tuple(v for v in VECTOR_OUTPUTS if v in names)
        rank, alpha = check_rank_alpha(rank, alpha)
        compile_filter(include, exclude)  # bad regexes fail here, before anything is opened
        return cls(
            metrics=resolve_metrics(metrics),
            vectors=vectors,
            include=include,
            exclude=exclude,
            k=check_k(k),
            side=check_side(side),
            rank=rank,
            alpha=alpha,
            eta=check_eta(eta),
            device=resolve_device(device),
            progress=bool(progress),
            batch_bytes=check_batch_bytes(batch_bytes),
        )

    @property
    def pair_metrics(self) -> frozenset[str]:
        """The families the batched pair kernel computes."""
        return frozenset(m for m in self.metrics if m in PAIR_METRICS)

    @property
    def sparsity(self) -> bool:
        """Whether update_sparsity is asked for (the elementwise family)."""
        return "update_sparsity" in self.metrics

    @property
    def angles(self) -> bool:
        """Whether each matrix's principal-angle vector goes into its row."""
        return "principal_angles" in self.vectors

    @property
    def needs_base(self) -> bool:
        """Whether the pair kernel needs W0's decomposition (everything but the stable rank does)."""
        return bool(self.pair_metrics & {"principal_overlap", "spectral_drift", "update_localization"})

    def budget(self) -> int:
        """The shape-group budget in bytes."""
        return default_batch_bytes(self.device) if self.batch_bytes is None else self.batch_bytes

    def keep(self):  # -> Callable[[str, tuple[int, ...] | None], bool]
        """The include/exclude predicate."""
        return compile_filter(self.include, self.exclude)

    def params(self) -> dict[str, Any]:
        """The parameters as the report's ``meta["params"]`` records them."""
        return {
            "k": self.k,
            "side": self.side,
            "rank": self.rank,
            "alpha": self.alpha,
            "eta": self.eta,
            "include": self.include,
            "exclude": self.exclude,
            "batch_bytes": self.batch_bytes,
        }

    def kernel(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~weightgeo.metrics.pair.batched_pair_metrics`."""
        return dict(
            metrics=self.pair_metrics,
            k=self.k,
            side=self.side,
            rank=self.rank,
            alpha=self.alpha,
            eta=self.eta,
            angles=self.angles,
        )
