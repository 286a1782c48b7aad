"""The options of a pass: each declared once, checked once, frozen.

:class:`PairOptions` holds what ``compare``, ``compare_many``, the pair verbs on checkpoints and ``weightgeo
compare`` are asked for; :class:`StreamOptions` what ``rank_curve``, ``locking_onset``, ``follow``, the
``Tracker``, ``subspace_similarity`` of checkpoints and ``weightgeo trajectory`` are asked for;
:class:`SparsityOptions` what ``sparsity_curve`` (and the sparsity curves of a stream pass or the Tracker) is
asked for. Each option is
one field: its default (from :mod:`weightgeo.defaults`, which the verbs' signatures use too), its check (in
``__post_init__``, through :mod:`weightgeo.validation`) and its role (field metadata). Everything derived from
the options is computed from the fields, never listed by hand:

- ``meta["params"]`` of a report: :meth:`params`, every field;
- the pair kernel's keyword arguments: :meth:`PairOptions.kernel`, the fields marked :data:`KERNEL`;
- the result-cache keys: the object itself (:func:`~weightgeo.cache.canonical_json` takes every field but those
  marked :func:`~weightgeo.cache.not_in_key`, each marked with the reason it cannot change a result); the key of a
  base decomposition holds the fields marked :data:`BASE` (:meth:`PairOptions.base_key`).

Adding an option is a field here (its default in defaults.py, its check in ``__post_init__``, its role in the
metadata) plus the keyword on the verbs that offer it; the report, the kernel and the cache keys follow.

>>> o = PairOptions.create(metrics=["nss", "update_sparsity"], k=4)
>>> o.metrics, o.pair_metrics, o.k
(('update_sparsity', 'spectral_drift'), frozenset({'spectral_drift'}), 4)
>>> StreamOptions.create(k=8).r, StreamOptions().device is None
(10, True)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

import torch

from .cache import not_in_key
from .checkpoint import compile_filter
from .defaults import ALPHA, ETA, HILL_K, PAIR_K, PROGRESS, RANK, SEED, SIDE, STREAM_K, THRESHOLD
from .devices import resolve_device
from .errors import WeightgeoError
from .metrics.catalog import ALIASES, ALL_METRICS, PAIR_METRICS, VECTOR_OUTPUTS
from .selection import Selector
from .validation import (
    check_batch_bytes,
    check_dtype,
    check_eta,
    check_int,
    check_k,
    check_rank_alpha,
    check_seed,
    check_side,
    check_size,
    check_threshold,
)

__all__ = [
    "PairOptions",
    "StreamOptions",
    "SparsityOptions",
    "KERNEL",
    "BASE",
    "Filter",
    "resolve_metrics",
    "default_batch_bytes",
]

Filter = str | Sequence[str] | None
O = TypeVar("O", bound="_Options")

_KERNEL, _BASE = "weightgeo_kernel", "weightgeo_base"
#: field metadata: a keyword argument of the pair kernel (:func:`~weightgeo.metrics.pair.batched_pair_metrics`)
KERNEL = {_KERNEL: True}
#: field metadata: changes the base decomposition a comparison caches per base matrix (its key holds it)
BASE = {_BASE: True}

# Why a field cannot change a result (the reasons the cache keys leave it out for).
_SELECTS = not_in_key("chooses which tensors get a row, not what a row holds")
_DEVICE = not_in_key(
    "enters every key through the numerical-policy fingerprint (the device's kind, model and capability); "
    "which of several identical devices ran it changes no result"
)
_BAR = not_in_key("a progress bar on stderr")


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


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, (tuple, frozenset)):
        return [_jsonable(v) for v in value]
    return value


class _Options:
    """What both option objects do with their fields (a mixin of frozen dataclasses)."""

    dtype: torch.dtype | None

    @classmethod
    def create(cls: type[O], **given: Any) -> O:
        """The options from a verb's keyword arguments, in any form the verb accepts (``device="cuda"``,
        ``metrics="nss"``, ...); each is checked once (``__post_init__``) and unknown names raise."""
        known = [f.name for f in fields(cls) if f.init]  # type: ignore[arg-type]
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise WeightgeoError(f"{cls.__name__}: unknown option(s) {', '.join(unknown)}; known: {', '.join(known)}")
        return cls(**given)

    def params(self) -> dict[str, Any]:
        """Every option, JSON-ready: what a report records in ``meta["params"]``."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]

    def round(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` rounded to ``dtype`` (as stored when ``dtype`` is None): what every input goes through before the
        update rule and the geometry."""
        return t if self.dtype is None or t.dtype == self.dtype else t.to(self.dtype)

    def _set(self, **values: Any) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)


@dataclass(frozen=True)
class PairOptions(_Options):
    """Everything a comparison of checkpoints is asked for, checked (:meth:`create` takes the verbs' keywords).

    Attributes:
        metrics: the metric families, in report order (:data:`~weightgeo.metrics.catalog.ALL_METRICS`; ``None``
            and aliases accepted when built).
        vectors: vector outputs asked for by name (``("principal_angles",)``: each matrix's angle vector); built
            from ``metrics`` when ``None``.
        include, exclude: the tensor filter as given (regexes or presets).
        k, side, rank, alpha, eta: the metric options (paper §3.1, §3.2); ``k`` and ``rank`` are counts or
            fractions in (0, 1) of each matrix's smaller side.
        dtype: both sides are rounded to it before the update rule and the geometry; ``None``: the stored formats.
        device: where the linear algebra runs (``None`` when built: where checkpoints are read, the CPU).
        progress: show a bar. batch_bytes: the shape-group budget as given (``None`` = :func:`default_batch_bytes`).
    """

    metrics: tuple[str, ...] = ALL_METRICS
    vectors: tuple[str, ...] | None = None
    include: Filter = field(default=None, metadata=_SELECTS)
    exclude: Filter = field(default=None, metadata=_SELECTS)
    k: int | float = field(default=PAIR_K, metadata=KERNEL)
    side: str = field(default=SIDE, metadata=KERNEL)
    rank: int | float = field(default=RANK, metadata=KERNEL)
    alpha: float = field(default=ALPHA, metadata=KERNEL)
    eta: float = field(default=ETA, metadata=KERNEL)
    dtype: torch.dtype | None = field(default=None, metadata=BASE)
    device: torch.device = field(default=torch.device("cpu"), metadata=_DEVICE)
    progress: bool = field(default=PROGRESS, metadata=_BAR)
    batch_bytes: int | None = field(
        default=None,
        metadata=not_in_key(
            "the shape-group budget: a matrix gets the same numbers bit for bit in any batch (the policy's row "
            "blocks are per matrix)"
        ),
    )

    def __post_init__(self) -> None:
        given = self.metrics
        names = [given] if isinstance(given, str) else list(given) if given is not None else []
        rank, alpha = check_rank_alpha(self.rank, self.alpha)
        compile_filter(self.include, self.exclude)  # bad regexes fail here, before anything is opened
        self._set(
            metrics=resolve_metrics(given),
            vectors=tuple(v for v in VECTOR_OUTPUTS if v in names) if self.vectors is None else tuple(self.vectors),
            k=check_size(self.k),
            side=check_side(self.side),
            rank=rank,
            alpha=alpha,
            eta=check_eta(self.eta),
            dtype=check_dtype(self.dtype),
            device=resolve_device(self.device),
            progress=bool(self.progress),
            batch_bytes=check_batch_bytes(self.batch_bytes),
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
        return "principal_angles" in (self.vectors or ())

    @property
    def needs_base(self) -> bool:
        """Whether the pair kernel needs W0's decomposition (everything but the stable rank does)."""
        return bool(self.pair_metrics & {"principal_overlap", "spectral_drift", "update_localization"})

    def budget(self) -> int:
        """The shape-group budget in bytes."""
        return default_batch_bytes(self.device) if self.batch_bytes is None else self.batch_bytes

    def selector(self, *, experts: bool = True) -> Selector:
        """The tensor selection of this comparison (:class:`~weightgeo.selection.Selector`)."""
        return Selector(
            self.include, self.exclude, elementwise=self.sparsity, svd=bool(self.pair_metrics), experts=experts
        )

    def kernel(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~weightgeo.metrics.pair.batched_pair_metrics`: the fields marked
        :data:`KERNEL`, the pair families and whether angle vectors are kept."""
        marked = {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get(_KERNEL)}
        return {**marked, "metrics": self.pair_metrics, "angles": self.angles}

    def base_key(self) -> dict[str, Any]:
        """The fields marked :data:`BASE`: what a cached base decomposition depends on besides the stored tensor."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get(_BASE)}


@dataclass(frozen=True)
class StreamOptions(_Options):
    """Everything a pass over a stream of checkpoints (or the Tracker) is asked for, checked.

    Attributes:
        include, exclude: the tensor filter as given (regexes or presets).
        k: the subspace size K of Sim_K (paper §4). hill_k: top singular values in the Hill index (≥ 2).
        seed: seeds the randomized SVD and sketches, per matrix.
        threshold: the locking threshold on Sim_K, in (0, 1].
        dtype: W0 and W_t are rounded to it before ΔW_t is formed; ``None``: the stored formats.
        device: where the linear algebra runs; ``None``: where the data is (the CPU for checkpoints, read there;
            each parameter's device in the Tracker).
        progress: show a bar.
        eta: also the sparsity curves, with this tolerance η, from the same read of each checkpoint
            (``rank_curve(..., sparsity=True)``, ``weightgeo trajectory``); ``None``: spectra only.
    """

    include: Filter = field(default=None, metadata=_SELECTS)
    exclude: Filter = field(default=None, metadata=_SELECTS)
    k: int = STREAM_K
    hill_k: int = HILL_K
    seed: int = SEED
    threshold: float = field(
        default=THRESHOLD,
        metadata=not_in_key(
            "the onset rule is applied to the Sim_K curves afterwards: no cached spectrum depends on it"
        ),
    )
    dtype: torch.dtype | None = None
    device: torch.device | None = field(default=None, metadata=_DEVICE)
    progress: bool = field(default=PROGRESS, metadata=_BAR)
    eta: float | None = field(
        default=None,
        metadata=not_in_key(
            "no spectrum depends on it; the sparsity counts of the same pass are keyed by sparsity_options(), "
            "a SparsityOptions that holds it"
        ),
    )

    def __post_init__(self) -> None:
        compile_filter(self.include, self.exclude)
        self._set(
            eta=None if self.eta is None else check_eta(self.eta),
            k=check_k(self.k),
            hill_k=check_int(self.hill_k, "hill_k", minimum=2),
            seed=check_seed(self.seed),
            threshold=check_threshold(self.threshold),
            dtype=check_dtype(self.dtype),
            device=None if self.device is None else resolve_device(self.device),
            progress=bool(self.progress),
        )

    @property
    def r(self) -> int:
        """How many top singular values each spectrum keeps (+1 for the gap): enough for Sim_K and the Hill index."""
        return max(self.k, self.hill_k)

    def where(self, data: torch.device | None = None) -> torch.device:
        """Where the linear algebra runs: ``device``, else where the data is (``data``; the CPU for checkpoints)."""
        return self.device if self.device is not None else data if data is not None else torch.device("cpu")

    def selector(self) -> Selector:
        """The tensor selection of a stream or the Tracker: matrices and expert stacks."""
        return Selector(self.include, self.exclude, elementwise=False, svd=True)

    def sparsity_options(self) -> SparsityOptions | None:
        """The options of the sparsity curves computed in the same pass (``None`` when ``eta`` is None): the
        filter, ``eta``, ``dtype`` and ``device`` of these options."""
        if self.eta is None:
            return None
        return SparsityOptions(
            include=self.include, exclude=self.exclude, eta=self.eta, dtype=self.dtype, device=self.device
        )


@dataclass(frozen=True)
class SparsityOptions(_Options):
    """Everything a sparsity-curve pass over a stream of checkpoints (``sparsity_curve``) is asked for, checked;
    its per-(tensor, step) counts are cached under keys that hold it as a whole.

    Attributes:
        include, exclude: the tensor filter as given (regexes or presets).
        eta: the bf16 rule's relative tolerance η (paper §3.1).
        dtype: every version of a tensor is rounded to it before the update rule (then the FP8 rule on stored
            codes does not apply); ``None``: the stored formats.
        device: where the counting runs; ``None``: where the data is (the CPU for checkpoints).
        progress: show a bar.
    """

    include: Filter = field(default=None, metadata=_SELECTS)
    exclude: Filter = field(default=None, metadata=_SELECTS)
    eta: float = ETA
    dtype: torch.dtype | None = None
    device: torch.device | None = field(default=None, metadata=_DEVICE)
    progress: bool = field(default=PROGRESS, metadata=_BAR)

    def __post_init__(self) -> None:
        compile_filter(self.include, self.exclude)
        self._set(
            eta=check_eta(self.eta),
            dtype=check_dtype(self.dtype),
            device=None if self.device is None else resolve_device(self.device),
            progress=bool(self.progress),
        )

    def where(self, data: torch.device | None = None) -> torch.device:
        """Where the counting runs: ``device``, else where the data is (``data``; the CPU for checkpoints)."""
        return self.device if self.device is not None else data if data is not None else torch.device("cpu")

    def selector(self) -> Selector:
        """The tensor selection of the sparsity curves: every floating tensor (an expert stack per expert)."""
        return Selector(self.include, self.exclude, elementwise=True, svd=False)
