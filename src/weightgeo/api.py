"""The verbs users call, one floor above the engine: tensors in, numbers out; checkpoints in, a Report out.

Every pair verb takes either two tensors (torch or NumPy: the tensor-level function of :mod:`weightgeo.metrics`
computes the number) or two checkpoint sources (local folders or files, hub ids, ``Mapping[str, Tensor]``,
``nn.Module``, :class:`~weightgeo.checkpoint.Checkpoint`, a LoRA adapter folder as ``ft``): then
:func:`weightgeo.compare` streams both checkpoints and the verb returns its :class:`~weightgeo.report.Report`,
one row per analysed tensor, restricted to that verb's metric. The checkpoint-only keywords (``include``,
``exclude``, ``device``, ``batch_bytes``, ``progress``, ``cache``) are those of :func:`~weightgeo.compare`;
``dtype`` applies to both forms (``None``: the stored formats; a floating dtype: both sides rounded to it first).

Degenerate cases agree between the two forms: a matrix of numerical rank 0 gives a NaN ``principal_overlap``
in both, and where :func:`principal_angles` of two tensors raises (no subspace), its report row has an empty
``principal_angles`` list and ``k_effective`` 0.

>>> import torch, weightgeo
>>> w = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
>>> weightgeo.spectral_drift(w, 2 * w)
1.0
>>> r = weightgeo.principal_angles({"layers.0.q_proj.weight": w}, {"layers.0.q_proj.weight": 2 * w}, k=2)
>>> r.rows[0]["principal_angles"]
[0.0, 0.0]
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from . import metrics
from .cache import ResultCache
from .checkpoint import open_checkpoint
from .defaults import ALPHA, ETA, PAIR_K, PROGRESS, RANK, SEED, SIDE, STREAM_K
from .engine import compare, plan_pair
from .engine.overlap import mask_overlaps
from .errors import WeightgeoError
from .linalg.policy import compute_dtype, same_compute_dtype
from .metrics import trajectory as trajectory_kernels
from .metrics.localization import Localization
from .metrics.mask_overlap import MaskOverlap, mask_overlap
from .metrics.sparsity import fp8_update_mask, unchanged_mask
from .options import PairOptions, StreamOptions
from .report import Report, summarize_rows
from .selection import tensor_uid
from .stream import open_stream
from .trajectory import stream_report
from .validation import as_tensor, check_dtype, check_finite, check_pair, is_tensor_like

__all__ = [
    "update_sparsity",
    "update_mask",
    "update_mask_overlap",
    "UpdateMasks",
    "principal_angles",
    "principal_overlap",
    "spectral_drift",
    "stable_rank",
    "update_localization",
    "subspace_similarity",
]

Filter = str | Sequence[str] | None
Device = str | torch.device | None
Dtype = torch.dtype | str | None
Cache = bool | str | os.PathLike[str] | ResultCache | None


def _tensors(*xs: Any) -> bool:
    return all(is_tensor_like(x) for x in xs)


def _rounded(dtype: Dtype, *xs: Any) -> tuple[Any, ...]:
    """Tensors rounded to ``dtype`` (as given when ``None``): the tensor form of every verb's ``dtype=``."""
    d = check_dtype(dtype)
    if d is None:
        return xs
    return tuple(as_tensor(x, name).to(d) for x, name in zip(xs, ("base", "ft")))


def _no_checkpoint_options(verb: str, **given: Any) -> None:
    used = [k for k, v in given.items() if v is not None]
    if used:
        raise WeightgeoError(
            f"{verb}: {', '.join(used)} appl{'y' if len(used) > 1 else 'ies'} to checkpoint "
            f"sources only; with tensors, slice or move them yourself"
        )


def _dispatch(
    verb: str,
    tensor_fn: Any,
    base: Any,
    ft: Any,
    *,
    include: Filter,
    exclude: Filter,
    dtype: Dtype,
    device: Device,
    batch_bytes: int | None,
    progress: bool,
    cache: Cache,
    **params: Any,
) -> Any:
    """``tensor_fn(base, ft, **params)`` for two tensors (rounded to ``dtype`` first); else the Report of
    ``compare`` restricted to ``verb``."""
    if _tensors(base, ft):
        _no_checkpoint_options(
            verb, include=include, exclude=exclude, device=device, batch_bytes=batch_bytes, cache=cache
        )
        return tensor_fn(*_rounded(dtype, base, ft), **params)
    return compare(
        base,
        ft,
        metrics=[verb],
        include=include,
        exclude=exclude,
        dtype=dtype,
        device=device,
        batch_bytes=batch_bytes,
        progress=progress,
        cache=cache,
        **params,
    )


def update_sparsity(
    base: Any,
    ft: Any,
    *,
    eta: float = ETA,
    include: Filter = None,
    exclude: Filter = None,
    dtype: Dtype = None,
    device: Device = None,
    batch_bytes: int | None = None,
    progress: bool = PROGRESS,
    cache: Cache = None,
) -> float | Report:
    """Fraction of entries unchanged under the bf16 rule (paper §3.1, App. C.3; PNT Def. 2.2).

    >>> update_sparsity(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 2.0, 3.0, 4.1]))
    0.75

    Args:
        base, ft: two tensors of one shape, or two checkpoint sources (module docstring).
        eta: relative tolerance η (default 1e-3, ``weightgeo.defaults.ETA``).
        dtype: ``None`` (default): the stored formats; a floating dtype: both sides rounded to it first.
        include, exclude, device, batch_bytes, progress, cache: for checkpoint sources, as
            :func:`~weightgeo.compare`.

    Returns:
        tensors: a float in [0, 1] (1 = nothing changed; :func:`weightgeo.metrics.update_sparsity`).
        checkpoints: a :class:`~weightgeo.report.Report` with ``update_sparsity`` per tensor and, in its
        summary, the parameter-weighted model figure. Reported: SFT 0.081, OPD 0.516, RLVR 0.772 (Qwen3-8B).
    """
    return _dispatch(
        "update_sparsity",
        metrics.update_sparsity,
        base,
        ft,
        include=include,
        exclude=exclude,
        dtype=dtype,
        device=device,
        batch_bytes=batch_bytes,
        progress=progress,
        cache=cache,
        eta=eta,
    )


def principal_angles(
    base: Any,
    ft: Any,
    *,
    k: int | float = PAIR_K,
    side: str = SIDE,
    include: Filter = None,
    exclude: Filter = None,
    dtype: Dtype = None,
    device: Device = None,
    batch_bytes: int | None = None,
    progress: bool = PROGRESS,
    cache: Cache = None,
) -> torch.Tensor | Report:
    """Principal angles (degrees, ascending) between the top-k singular subspaces of W0 and W+ (§1.2).

    >>> W0 = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    >>> principal_angles(W0, W0, k=2)
    tensor([0., 0.], dtype=torch.float64)

    Args:
        base, ft: two [out, in] tensors, or two checkpoint sources (module docstring).
        k, side: subspace dimension (default 512, capped per matrix at its effective k) and side ("right" = V,
            the input side; "left" = U).
        dtype: ``None`` (default): the stored formats; a floating dtype: both sides rounded to it first.
        include, exclude, device, batch_bytes, progress, cache: for checkpoint sources, as
            :func:`~weightgeo.compare`.

    Returns:
        tensors: [k_eff] float64 degrees in [0, 90] (:func:`weightgeo.metrics.principal_angles`; raises for a
        matrix of numerical rank 0). checkpoints: a :class:`~weightgeo.report.Report` whose matrix rows carry
        the angle vector ``principal_angles`` (a list, ascending, length ``k_effective``; empty for rank 0)
        next to the "principal_overlap" statistics.
    """
    return _dispatch(
        "principal_angles",
        metrics.principal_angles,
        base,
        ft,
        include=include,
        exclude=exclude,
        dtype=dtype,
        device=device,
        batch_bytes=batch_bytes,
        progress=progress,
        cache=cache,
        k=k,
        side=side,
    )


def principal_overlap(
    base: Any,
    ft: Any,
    *,
    k: int | float = PAIR_K,
    side: str = SIDE,
    include: Filter = None,
    exclude: Filter = None,
    dtype: Dtype = None,
    device: Device = None,
    batch_bytes: int | None = None,
    progress: bool = PROGRESS,
    cache: Cache = None,
) -> float | Report:
    """Mean cos² of the principal angles between the top-k singular subspaces (§1.2; = Sim_k of §2).

    >>> principal_overlap(torch.eye(3), torch.eye(3), k=2)
    1.0

    Args:
        base, ft: two [out, in] tensors, or two checkpoint sources (module docstring).
        k, side: as :func:`principal_angles`.
        dtype: ``None`` (default): the stored formats; a floating dtype: both sides rounded to it first.
        include, exclude, device, batch_bytes, progress, cache: for checkpoint sources, as
            :func:`~weightgeo.compare`.

    Returns:
        tensors: a float in [0, 1] (1 = same subspace; NaN for a matrix of numerical rank 0). checkpoints: a
        :class:`~weightgeo.report.Report` with ``principal_overlap``, ``max_principal_angle``,
        ``mean_principal_angle``, ``k_effective`` and ``spectral_gap`` per matrix.
    """
    return _dispatch(
        "principal_overlap",
        metrics.principal_overlap,
        base,
        ft,
        include=include,
        exclude=exclude,
        dtype=dtype,
        device=device,
        batch_bytes=batch_bytes,
        progress=progress,
        cache=cache,
        k=k,
        side=side,
    )


def spectral_drift(
    base: Any,
    ft: Any,
    *,
    include: Filter = None,
    exclude: Filter = None,
    dtype: Dtype = None,
    device: Device = None,
    batch_bytes: int | None = None,
    progress: bool = PROGRESS,
    cache: Cache = None,
) -> float | Report:
    """Normalized spectral shift ``‖σ(W+) − σ(W0)‖₂ / ‖σ(W0)‖₂`` over all singular values (§1.3).

    >>> spectral_drift(torch.diag(torch.tensor([3.0, 4.0])), torch.diag(torch.tensor([3.0, 4.5])))
    0.1

    Args:
        base, ft: two [out, in] tensors, or two checkpoint sources (module docstring).
        dtype: ``None`` (default): the stored formats; a floating dtype: both sides rounded to it first.
        include, exclude, device, batch_bytes, progress, cache: for checkpoint sources, as
            :func:`~weightgeo.compare`.

    Returns:
        tensors: a float ≥ 0 (:func:`weightgeo.metrics.spectral_drift`). checkpoints: a
        :class:`~weightgeo.report.Report` with ``spectral_drift`` per matrix.
    """
    return _dispatch(
        "spectral_drift",
        metrics.spectral_drift,
        base,
        ft,
        include=include,
        exclude=exclude,
        dtype=dtype,
        device=device,
        batch_bytes=batch_bytes,
        progress=progress,
        cache=cache,
    )


def stable_rank(
    delta: Any,
    ft: Any = None,
    *,
    include: Filter = None,
    exclude: Filter = None,
    dtype: Dtype = None,
    device: Device = None,
    batch_bytes: int | None = None,
    progress: bool = PROGRESS,
    cache: Cache = None,
) -> float | Report:
    """Stable rank ``‖Δ‖_F² / ‖Δ‖₂²`` of an update (notes §2): of ``delta``, or of ``ft − base``.

    >>> stable_rank(torch.diag(torch.tensor([2.0, 2.0, 1.0])))
    2.25
    >>> stable_rank(torch.zeros(3, 3), torch.diag(torch.tensor([2.0, 2.0, 1.0])))
    2.25

    Args:
        delta: the update Δ [out, in] (one argument), or the base W0 when ``ft`` is given: a tensor (then Δ =
            ``ft − base`` in the compute dtype, exact for bf16 pairs) or a checkpoint source.
        ft: W+ (a tensor or a checkpoint source), or ``None``.
        dtype: ``None`` (default): the stored formats; a floating dtype: both sides rounded to it first.
        include, exclude, device, batch_bytes, progress, cache: for checkpoint sources, as
            :func:`~weightgeo.compare`.

    Returns:
        tensors: a float in [1, rank(Δ)], 0.0 for Δ = 0 (:func:`weightgeo.metrics.stable_rank`). checkpoints: a
        :class:`~weightgeo.report.Report` with ``stable_rank`` and ``delta_frobenius`` per matrix.
    """
    if ft is None:
        if not is_tensor_like(delta):
            raise WeightgeoError(
                f"stable_rank(delta) takes an update tensor; for checkpoints pass both: "
                f"stable_rank(base, ft) (got a {type(delta).__name__})"
            )
        _no_checkpoint_options(
            "stable_rank", include=include, exclude=exclude, device=device, batch_bytes=batch_bytes, cache=cache
        )
        return metrics.stable_rank(*_rounded(dtype, delta))
    return _dispatch(
        "stable_rank",
        _stable_rank_of_pair,
        delta,
        ft,
        include=include,
        exclude=exclude,
        dtype=dtype,
        device=device,
        batch_bytes=batch_bytes,
        progress=progress,
        cache=cache,
    )


def _stable_rank_of_pair(base: Any, ft: Any) -> float:
    """The stable rank of ``ft − base``, formed in the pair's compute dtype (exact for bf16 pairs)."""
    b, f = same_compute_dtype(*check_pair(base, ft, matrix=True, what="stable_rank"))
    cd = compute_dtype(b.dtype)
    return metrics.stable_rank(f.to(cd) - b.to(cd))


def update_localization(
    base: Any,
    ft: Any,
    *,
    rank: int | float = RANK,
    alpha: float = ALPHA,
    eta: float = ETA,
    include: Filter = None,
    exclude: Filter = None,
    dtype: Dtype = None,
    device: Device = None,
    batch_bytes: int | None = None,
    progress: bool = PROGRESS,
    cache: Cache = None,
) -> Localization | Report:
    """Density of the visible update and its overlap with the principal and low-magnitude masks (§1.4).

    >>> W0 = torch.tensor([[4.0, 0.1], [0.2, 3.0]])
    >>> update_localization(W0, W0 + torch.tensor([[0.0, 0.5], [0.0, 0.0]]), rank=1).low_magnitude_overlap
    1.0

    Args:
        base, ft: two [out, in] tensors, or two checkpoint sources (module docstring).
        rank, alpha, eta: reconstruction rank r, mask fraction α and bf16 tolerance η.
        dtype: ``None`` (default): the stored formats; a floating dtype: both sides rounded to it first.
        include, exclude, device, batch_bytes, progress, cache: for checkpoint sources, as
            :func:`~weightgeo.compare`.

    Returns:
        tensors: a :class:`~weightgeo.metrics.localization.Localization`. checkpoints: a
        :class:`~weightgeo.report.Report` with ``density``, ``principal_mask_overlap`` and
        ``low_magnitude_overlap`` per matrix.
    """
    return _dispatch(
        "update_localization",
        metrics.update_localization,
        base,
        ft,
        include=include,
        exclude=exclude,
        dtype=dtype,
        device=device,
        batch_bytes=batch_bytes,
        progress=progress,
        cache=cache,
        rank=rank,
        alpha=alpha,
        eta=eta,
    )


def update_mask(
    base: Any, ft: Any, *, eta: float = ETA, dtype: Dtype = None, include: Filter = None, exclude: Filter = None
) -> torch.Tensor | UpdateMasks:
    """Mask of visibly updated entries under the bf16 rule (True = updated), paper §3.1 / PNT Def. 2.1.

    >>> update_mask(torch.tensor([1.0, 0.0, 1024.001]), torch.tensor([1.5, -0.0, 1024.002]))
    tensor([ True, False, False])
    >>> with update_mask({"w": torch.ones(2)}, {"w": torch.tensor([1.0, 2.0])}) as masks:
    ...     list(masks), masks["w"]
    (['w'], tensor([False,  True]))

    Args:
        base, ft: two tensors of one shape, or two checkpoint sources (module docstring).
        eta: relative tolerance η (default 1e-3, ``weightgeo.defaults.ETA``).
        dtype: ``None`` (default): the stored formats; a floating dtype: both sides rounded to it first.
        include, exclude: for checkpoint sources, which tensors (as :func:`~weightgeo.compare`).

    Returns:
        tensors: a bool tensor of ``base``'s shape. checkpoints: an :class:`UpdateMasks` mapping, canonical
        tensor name → mask, that reads each pair of tensors when its mask is asked for (a whole checkpoint of
        masks is never held).
    """
    if _tensors(base, ft):
        _no_checkpoint_options("update_mask", include=include, exclude=exclude)
        return metrics.update_mask(*_rounded(dtype, base, ft), eta=eta)
    return UpdateMasks(base, ft, eta=eta, dtype=dtype, include=include, exclude=exclude)


def update_mask_overlap(
    base: Any,
    ft_a: Any,
    ft_b: Any,
    *,
    eta: float = ETA,
    include: Filter = None,
    exclude: Filter = None,
    dtype: Dtype = None,
    device: Device = None,
    progress: bool = PROGRESS,
) -> MaskOverlap | Report:
    """Do two fine-tunes of one base update the same entries? Their update masks' overlap, against chance.

    >>> base = torch.zeros(8)
    >>> a = base.clone(); a[:4] = 1
    >>> b = base.clone(); b[2:6] = 1
    >>> m = update_mask_overlap(base, a, b)
    >>> m.updated_both, m.mask_jaccard, m.mask_overlap, m.random_mask_overlap
    (2, 0.3333333333333333, 0.5, 0.5)

    The masks follow the bf16 rule (:func:`update_mask`; the FP8 rule where the base and a fine-tune both store a
    weight as scaled FP8). Definitions, the random baseline and where they differ from Mukherjee et al.
    (arXiv 2505.11711): :mod:`weightgeo.metrics.mask_overlap` and docs/metrics.md.

    Args:
        base: W0, a tensor, or a checkpoint source.
        ft_a, ft_b: two fine-tunes of ``base``: tensors of its shape, or checkpoint sources.
        eta: relative tolerance η of the bf16 rule (default 1e-3).
        dtype: ``None`` (default): the stored formats; a floating dtype: all three rounded to it first.
        include, exclude, device, progress: for checkpoint sources: which tensors (every floating tensor by
            default), where the masks are counted, a progress bar.

    Returns:
        tensors: a :class:`~weightgeo.metrics.mask_overlap.MaskOverlap` (``mask_jaccard``, ``mask_overlap``, their
        ``random_*`` expectations, the counts ``updated_a``, ``updated_b``, ``updated_both``, ``numel``).
        checkpoints: a :class:`~weightgeo.report.Report` with those keys per tensor (an expert stack per expert)
        and, in its summary, the model figure (every tensor's masks pooled: weighted by entries) and
        ``by_module``. Each tensor of each checkpoint is read once, in row chunks.
    """
    if _tensors(base, ft_a, ft_b):
        _no_checkpoint_options("update_mask_overlap", include=include, exclude=exclude, device=device)
        d = check_dtype(dtype)
        w0, a, b = (
            (base, ft_a, ft_b)
            if d is None
            else tuple(as_tensor(x, n).to(d) for x, n in zip((base, ft_a, ft_b), ("base", "ft_a", "ft_b")))
        )
        return mask_overlap(metrics.update_mask(w0, a, eta=eta), metrics.update_mask(w0, b, eta=eta))
    options = PairOptions.create(
        metrics="update_sparsity",
        include=include,
        exclude=exclude,
        eta=eta,
        dtype=dtype,
        device=device,
        progress=progress,
    )
    return mask_overlaps(base, [ft_a, ft_b], options)[(0, 1)]


class UpdateMasks(Mapping[str, torch.Tensor]):
    """The update masks of two checkpoints, one tensor at a time: ``masks[name]`` reads that tensor of both.

    Keys are the canonical names of the floating tensors both hold (in checkpoint order), as in
    :func:`~weightgeo.compare`'s rows; a vocabulary matrix that gained rows (added tokens) gets the mask of the
    rows both share. A weight both store as scaled FP8 gets the FP8 update rule's mask (stored codes and
    scales, docs/checkpoints.md) unless ``dtype`` rounds both sides first; ``skipped`` lists what gets none.
    Close it (or use it as a context manager) to release the files.
    """

    def __init__(
        self,
        base: Any,
        ft: Any,
        *,
        eta: float = ETA,
        dtype: Dtype = None,
        include: Filter = None,
        exclude: Filter = None,
    ) -> None:
        self.options = PairOptions.create(
            metrics="update_sparsity", eta=eta, dtype=dtype, include=include, exclude=exclude
        )
        self._b = open_checkpoint(base)
        self._f = open_checkpoint(ft, base=self._b)
        try:
            self.plan = plan_pair(
                self._b, self._f, self.options.selector(experts=False), fp8=self.options.dtype is None
            )  # a stack's mask is its whole [E, out, in]
        except BaseException:
            self.close()
            raise
        self._jobs = {job.key: job for job in self.plan.jobs}

    @property
    def eta(self) -> float:
        """The bf16 rule's relative tolerance η."""
        return self.options.eta

    @property
    def skipped(self) -> list[dict[str, str]]:
        """Tensors both hold that get no mask (non-floating, empty), then what each source holds that is not a
        weight (``side`` ``"base"`` / ``"ft"``), as ``Report.meta["skipped"]`` lists them."""
        return self.plan.skipped + self.plan.source_skipped()

    def __getitem__(self, name: str) -> torch.Tensor:
        job = self._jobs[name]
        if job.fp8:  # both stored as scaled FP8: the FP8 rule on codes and scales (docs/checkpoints.md)
            a, b = self._b.fp8_weight(job.base_name, 0, job.rows), self._f.fp8_weight(job.ft_name, 0, job.rows)
            assert a is not None and b is not None
            return fp8_update_mask(
                a.codes, a.scales, b.codes, b.scales, a.block, block1=b.block, eta=self.eta, rows=a.rows, name=name
            )
        w0 = self.options.round(self._b.get_rows(job.base_name, 0, job.rows))
        w1 = self.options.round(self._f.get_rows(job.ft_name, 0, job.rows))
        check_finite(w0, f"{name}: base")
        check_finite(w1, f"{name}: ft")
        return ~unchanged_mask(w0, w1, self.eta, name=name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._jobs)

    def __len__(self) -> int:
        return len(self._jobs)

    def close(self) -> None:
        """Release both checkpoints' files (safe to call twice)."""
        self._b.close()
        self._f.close()

    def __enter__(self) -> UpdateMasks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"UpdateMasks({self._b.source!r} -> {self._f.source!r}, tensors={len(self)}, eta={self.eta})"


def subspace_similarity(
    delta_a: Any,
    delta_b: Any,
    *,
    k: int = STREAM_K,
    side: str = SIDE,
    seed: int = SEED,
    base: Any = None,
    include: Filter = None,
    exclude: Filter = None,
    dtype: Dtype = None,
    device: Device = None,
    progress: bool = PROGRESS,
    cache: Cache = None,
) -> float | Report:
    """Sim_K = ‖V_K(a)ᵀ V_K(b)‖_F² / K between the top-``k`` singular subspaces of two updates (paper §4).

    >>> g = torch.Generator().manual_seed(0)
    >>> a = torch.randn(64, 8, generator=g) @ torch.randn(8, 80, generator=g)
    >>> round(subspace_similarity(a, 3 * a, k=8), 4)
    1.0

    Args:
        delta_a, delta_b: two updates [out, in] (tensors), or two checkpoints whose updates from ``base`` are
            compared (then ``base`` is required; matrix by matrix, ΔW = W − W0).
        k: subspace size K (default 16, the paper's). side: "right" (V, input side) or, for tensors, "left".
        seed: seeds the randomized SVD of large matrices (results are verified, see
            :mod:`weightgeo.metrics.trajectory`).
        dtype: ``None`` (default): the stored formats; a floating dtype: the inputs rounded to it first (for
            checkpoints, W0 and each W before ΔW is formed).
        base, include, exclude, device, progress, cache: for checkpoint sources, as :func:`~weightgeo.rank_curve`.

    Returns:
        tensors: a float in [0, 1] (1 = same subspace). checkpoints: a :class:`~weightgeo.report.Report` with
        ``subspace_similarity`` per matrix (and per expert of an expert stack; NaN where either update is zero).
    """
    if _tensors(delta_a, delta_b):
        _no_checkpoint_options(
            "subspace_similarity", base=base, include=include, exclude=exclude, device=device, cache=cache
        )
        a, b = _rounded(dtype, delta_a, delta_b)
        return trajectory_kernels.subspace_similarity(a, b, k=k, side=side, seed=seed)
    if base is None:
        raise WeightgeoError(
            "subspace_similarity of two checkpoints compares their updates from a base: pass "
            "base=<the model both were trained from>"
        )
    if side != "right":
        raise WeightgeoError(
            f"subspace_similarity(side={side!r}) of checkpoints: only side='right' (the input "
            f"side, the paper's) is computed from checkpoints; pass tensors for side='left'"
        )
    # hill_k=2: the fewest singular values the pass keeps; Sim_K needs the top-K vectors only
    options = StreamOptions.create(
        include=include, exclude=exclude, k=k, hill_k=2, seed=seed, dtype=dtype, device=device, progress=progress
    )
    curve = stream_report(open_stream([delta_a, delta_b], base=base, steps=[1, 2]), options, cache=cache)
    sims = curve.meta["similarity"]
    first: dict[str, dict[str, Any]] = {}
    for row in curve.rows:
        first.setdefault(tensor_uid(row["name"], row.get("expert")), row)
    keys = ("name", "expert", "shape", "numel", "module", "layer")
    rows = [
        {key: first[uid][key] for key in keys if key in first[uid]} | _similarity(first[uid], sims[uid][1])
        for uid in sims
        if uid in first
    ]
    meta = {
        **{key: v for key, v in curve.meta.items() if key not in ("similarity", "steps", "base_step")},
        "kind": "subspace_similarity",
        "a": _source(delta_a),
        "b": _source(delta_b),
        "params": {**options.params(), "side": side},
    }
    return Report(rows=rows, summary=summarize_rows(rows), meta=meta)


def _similarity(row: dict[str, Any], sim: float) -> dict[str, Any]:
    """A subspace_similarity row's value: Sim_K, or null with the reason where K reaches the smaller side."""
    why = (row.get("not_measurable") or {}).get("final_subspace_similarity")
    if why is None:
        return {"subspace_similarity": sim}
    return {"subspace_similarity": None, "not_measurable": {"subspace_similarity": why}}


def _source(x: Any) -> str:
    return str(x) if isinstance(x, (str, bytes)) or hasattr(x, "__fspath__") else type(x).__name__
