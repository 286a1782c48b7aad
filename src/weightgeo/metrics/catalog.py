"""The glossary: every name weightgeo emits or accepts, one meaning each, with its range or unit.

One place names them, so the engine, the stream pass, the Tracker, the report, the docs and the tests agree
on the vocabulary: the row keys of ``compare`` / ``compare_many`` and of ``rank_curve`` / ``Tracker`` /
``follow``, the keys of their summaries and of the Tracker's logs, and the argument names of every public
signature. ``tests/test_naming_contract.py`` checks the emitted rows, summaries and logs and the public
signatures against it; the table in docs/metrics.md is :func:`glossary_markdown` (a test keeps them equal:
regenerate it with
``python -c "from weightgeo.metrics.catalog import glossary_markdown as g; print(g())"``).

Naming contract: ``*_overlap`` / ``*_similarity`` / ``*_sparsity`` lie in [0, 1] (higher = more aligned;
sparsity = fraction unchanged); ``*_angle`` / ``*_angles`` are degrees (a vector ascending); ``delta_*`` is a
property of the update ΔW = W+ − W0 where the same word of W0 also exists; one name per quantity across pair
and stream rows.

>>> ALL_METRICS
('update_sparsity', 'principal_overlap', 'spectral_drift', 'update_localization', 'stable_rank')
>>> OUTPUTS["update_localization"]
('density', 'principal_mask_overlap', 'low_magnitude_overlap')
>>> GLOSSARY["delta_spectral_gap"].bounds
(1.0, inf)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..defaults import ALPHA, ETA, HILL_K, PAIR_K, POLL_S, PROGRESS, RANK, SEED, SIDE, TEXT_WIDTH, THRESHOLD

__all__ = [
    "ALL_METRICS",
    "PAIR_METRICS",
    "ALIASES",
    "OUTPUTS",
    "VECTOR_OUTPUTS",
    "TRAJECTORY_OUTPUTS",
    "TRAJECTORY_CURVES",
    "TRACKER_OUTPUTS",
    "TRACKER_MODEL_LOGS",
    "SPARSITY_CURVES",
    "SPARSITY_OUTPUTS",
    "SUMMED",
    "COUNTS",
    "NOT_SUMMARIZED",
    "WEIGHTED",
    "RENAMED",
    "Term",
    "GLOSSARY",
    "REQUIRED",
    "PAIR",
    "STREAM",
    "SUMMARY",
    "LOG",
    "ARGUMENT",
    "FIELD",
    "TRACKER_PREFIX",
    "glossary_markdown",
]

#: where a name appears: a key of compare / compare_many rows (and of the pair verbs' reports)
PAIR = "pair row"
#: a key of rank_curve / Tracker.rank_curve / follow rows
STREAM = "stream row"
#: a key of a Report's summary (compare's model-level figures, rank_curve's per-step ones)
SUMMARY = "summary"
#: a metric of Tracker.update's log, as ``weightgeo/<name>/<group>``
LOG = "tracker log"
#: a parameter of a public signature (weightgeo.__all__, Tracker, FollowUpdate)
ARGUMENT = "argument"
#: an attribute of a public result (Localization, LockingOnset, FollowUpdate, Report)
FIELD = "result field"

#: the first component of every Tracker log key
TRACKER_PREFIX = "weightgeo"


class _Required:
    """The default of a parameter that has none (the caller always gives it)."""

    def __repr__(self) -> str:
        return "required"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Term:
    """One name of the vocabulary.

    Attributes:
        meaning: what it is, in one sentence (with the paper section where there is one).
        where: the contexts it appears in (:data:`PAIR`, :data:`STREAM`, :data:`SUMMARY`, :data:`LOG`,
            :data:`ARGUMENT`, :data:`FIELD`).
        range: its range, unit or accepted values, as the docs print it.
        bounds: for a number, the closed interval it lies in (NaN, where the meaning allows it, means
            undefined); checked on every emitted row.
        default: for an argument, its default wherever a signature gives one (:data:`REQUIRED`: none).
        family: for a pair row key, the metric family that computes it (:data:`ALL_METRICS`).
        summary: for a row key, how summaries reduce it over matrices: ``"mean"`` (unweighted),
            ``"weighted"`` (by parameter count), ``"sum"`` (counts and sizes: summed), or ``""`` (not reduced
            by :func:`~weightgeo.report.summarize_rows`: it names something, or its report sums it its own way).
    """

    meaning: str
    where: frozenset[str]
    range: str = ""
    bounds: tuple[float, float] | None = None
    default: Any = REQUIRED
    family: str | None = None
    summary: str = ""


def _t(meaning: str, *where: str, **kw: Any) -> Term:
    return Term(meaning, frozenset(where), **kw)


_INF = math.inf
_UNIT = (0.0, 1.0)

GLOSSARY: dict[str, Term] = {
    # ---- row identifiers (what a row is about) ---------------------------------------------------------------
    "name": _t(
        "the tensor's canonical (HF-style) name; for an MoE expert stack, the stack's name", PAIR, STREAM, ARGUMENT
    ),
    "expert": _t("the expert's index in its MoE stack [E, out, in] (rows of one expert)", PAIR, STREAM, range="≥ 0"),
    "shape": _t("the analysed matrix's shape, [out, in] as stored (an expert's for expert rows)", PAIR, STREAM),
    "numel": _t(
        "number of entries: of the tensor in a row, summed over the rows in a summary, n in Localization",
        PAIR,
        STREAM,
        SUMMARY,
        FIELD,
        range="≥ 1",
    ),
    "module": _t("the module type from the name (q_proj, down_proj, embed_tokens, ...)", PAIR, STREAM),
    "layer": _t("the transformer layer index from the name (None outside the layers)", PAIR, STREAM, range="≥ 0"),
    "stored_dtype": _t(
        "the stored dtype: of the base tensor (pair rows), of W_t (stream sparsity rows; the rounding dtype when "
        "one is given)",
        PAIR,
        STREAM,
    ),
    "ft_stored_dtype": _t(
        "the fine-tune's stored dtype, where it differs from the base's (stored_dtype)", PAIR, range="a float dtype"
    ),
    "compared_in": _t(
        "where base and fine-tune store a tensor in different float formats, the one it was compared in: the finer "
        "where it holds every value of the other (the stored values, nothing rounded), else both rounded to the "
        "coarser (fp16 and bf16: bf16); dtype= overrides (docs/metrics.md)",
        PAIR,
        range="a float dtype",
    ),
    "rows_compared": _t(
        "rows compared when the fine-tune added rows (grown vocabulary): the base's row count", PAIR, range="≥ 1"
    ),
    "rows_added": _t("rows the fine-tune has beyond the base (left out of every metric)", PAIR, range="≥ 1"),
    "layout": _t(
        "'in_out' for a matrix stored [in, out] (transformers Conv1D): there side='right' is the output side",
        PAIR,
        range="'in_out'",
    ),
    "update_rule": _t(
        "'fp8' where both sides are scaled FP8: sparsity and density compare stored codes and scales",
        PAIR,
        STREAM,
        range="'fp8'",
    ),
    "step": _t(
        "a training step: the one a checkpoint was saved at (stream rows, Tracker.update, FollowUpdate); "
        "LockingOnset.step is the model's onset step (None: no onset)",
        STREAM,
        ARGUMENT,
        FIELD,
        range="int ≥ 0",
    ),
    "not_measurable": _t(
        "the metrics of this row that are not measurable, each with the reason (their values are null, never 0° / "
        "1.0 / inf): k, K or the localization rank at or above the matrix's smaller side; summaries count them "
        "per metric as n_not_measurable",
        PAIR,
        STREAM,
        range="{metric: reason}",
    ),
    "method": _t(
        "how ΔW_t's spectrum was computed: verified randomized SVD, the exact policy, or the Tracker's sketch",
        STREAM,
        range="'randomized', 'exact', 'sketch'",
    ),
    # ---- pair rows: update_sparsity (paper §3.1) ------------------------------------------------------------
    "update_sparsity": _t(
        "fraction of entries unchanged under the bf16 rule |ŵ1 − ŵ0| ≤ η·max(|ŵ0|, |ŵ1|) (§3.1; the FP8 rule "
        "on codes and scales where both are FP8); in streams and Tracker logs, W_t against the base W0",
        PAIR,
        STREAM,
        SUMMARY,
        LOG,
        range="[0, 1]; 1 = nothing changed; NaN where not measurable (stream rows: meta['not_measured'])",
        bounds=_UNIT,
        family="update_sparsity",
        summary="weighted",
    ),
    # ---- stream rows: sparsity curves (docs/trajectories.md) ---------------------------------------------------
    "step_sparsity": _t(
        "fraction of entries unchanged (the update_sparsity rule) from the previous complete checkpoint to W_t "
        "(the first checkpoint: from the base); as the Tracker's argument, whether to log it",
        STREAM,
        SUMMARY,
        LOG,
        ARGUMENT,
        range="[0, 1]; 1 = nothing changed in the step; NaN where not measurable (meta['not_measured'])",
        bounds=_UNIT,
        default=False,
        summary="weighted",
    ),
    "update_unchanged": _t(
        "entries unchanged from the base to W_t: update_sparsity × numel",
        STREAM,
        SUMMARY,
        range="count in [0, numel]; None where not measurable",
        summary="sum",
    ),
    "step_unchanged": _t(
        "entries unchanged from the previous checkpoint to W_t: step_sparsity × numel",
        STREAM,
        SUMMARY,
        range="count in [0, numel]; None where not measurable",
        summary="sum",
    ),
    "patch_bytes": _t(
        "bytes of a sparse patch carrying the entries changed since the previous checkpoint: per tensor the "
        "smallest of 4-byte indices + values, a bitmask + values, the tensor whole (metrics/stepwise.py)",
        STREAM,
        SUMMARY,
        LOG,
        range="bytes ≥ 0; 0 = nothing changed",
        summary="sum",
    ),
    "dense_bytes": _t(
        "bytes of the same tensors sent whole: numel × the stored element size (FP8: the codes)",
        STREAM,
        SUMMARY,
        range="bytes ≥ 0",
        summary="sum",
    ),
    # ---- pair rows: update_mask_overlap (MUK: subnetworks of two fine-tunes) --------------------------------
    "updated_a": _t(
        "|A|: entries the first fine-tune updated (its update mask)", PAIR, SUMMARY, FIELD, range="count ≥ 0"
    ),
    "updated_b": _t("|B|: entries the second fine-tune updated", PAIR, SUMMARY, FIELD, range="count ≥ 0"),
    "updated_both": _t("|A ∩ B|: entries both fine-tunes updated", PAIR, SUMMARY, FIELD, range="count ≥ 0"),
    "mask_jaccard": _t(
        "Jaccard index |A ∩ B| / |A ∪ B| of two fine-tunes' update masks (the model figure pools every tensor)",
        PAIR,
        SUMMARY,
        FIELD,
        range="[0, 1]; NaN when neither updated anything",
        bounds=_UNIT,
    ),
    "mask_overlap": _t(
        "overlap coefficient |A ∩ B| / min(|A|, |B|) of two fine-tunes' update masks (1: one holds the other)",
        PAIR,
        SUMMARY,
        FIELD,
        range="[0, 1]; NaN when either updated nothing",
        bounds=_UNIT,
    ),
    "random_mask_jaccard": _t(
        "expected mask_jaccard of independent uniformly random masks of the same sizes (hypergeometric, exact per "
        "tensor)",
        PAIR,
        SUMMARY,
        FIELD,
        range="[0, 1]; NaN when neither updated anything",
        bounds=_UNIT,
    ),
    "random_mask_overlap": _t(
        "expected mask_overlap of independent uniformly random masks of the same sizes: max(|A|, |B|) / n",
        PAIR,
        SUMMARY,
        FIELD,
        range="[0, 1]; NaN when either updated nothing",
        bounds=_UNIT,
    ),
    # ---- pair rows: principal_overlap (§3.1) -----------------------------------------------------------------
    "principal_overlap": _t(
        "mean cos² of the principal angles between the top-k singular subspaces of W0 and W+ on `side` (§3.1)",
        PAIR,
        SUMMARY,
        range="[0, 1]; 1 = same subspace; NaN when W0 or W+ has rank 0; null (not_measurable) when k ≥ the smaller side",
        bounds=_UNIT,
        family="principal_overlap",
        summary="mean",
    ),
    "max_principal_angle": _t(
        "the largest of those principal angles",
        PAIR,
        SUMMARY,
        range="degrees in [0, 90]; NaN at rank 0; null (not_measurable) when k ≥ the smaller side",
        bounds=(0.0, 90.0),
        family="principal_overlap",
        summary="mean",
    ),
    "mean_principal_angle": _t(
        "the mean of those principal angles",
        PAIR,
        SUMMARY,
        range="degrees in [0, 90]; NaN at rank 0; null (not_measurable) when k ≥ the smaller side",
        bounds=(0.0, 90.0),
        family="principal_overlap",
        summary="mean",
    ),
    "k_effective": _t(
        "the k the angles used: min(k, out, in, numerical rank of W0 and of W+)",
        PAIR,
        range="count in [0, k]",
        bounds=(0.0, _INF),
        family="principal_overlap",
    ),
    "spectral_gap": _t(
        "σ_k/σ_{k+1} of W0 at k = k_effective: angles mean something only where it is clearly above 1",
        PAIR,
        SUMMARY,
        range="≥ 1; NaN at rank 0; null (not_measurable) when k ≥ the smaller side",
        bounds=(1.0, _INF),
        family="principal_overlap",
        summary="mean",
    ),
    "principal_angles": _t(
        "the principal angles themselves (asked for by metrics='principal_angles')",
        PAIR,
        range="list of k_effective degrees in [0, 90], ascending; null (not_measurable) when k ≥ the smaller side",
        bounds=(0.0, 90.0),
    ),
    # ---- pair rows: spectral_drift (App. C.3) ----------------------------------------------------------------
    "spectral_drift": _t(
        "NSS, the normalized spectral shift ‖σ(W+) − σ(W0)‖₂ / ‖σ(W0)‖₂ over all singular values (App. C.3)",
        PAIR,
        SUMMARY,
        range="≥ 0; 0 = no drift; inf for a zero W0 and nonzero W+",
        bounds=(0.0, _INF),
        family="spectral_drift",
        summary="mean",
    ),
    # ---- pair rows: update_localization (§3.2) ---------------------------------------------------------------
    "density": _t(
        "fraction of entries updated, |M_upd| / n (1 − update_sparsity of that matrix) (§3.2)",
        PAIR,
        SUMMARY,
        FIELD,
        range="[0, 1]",
        bounds=_UNIT,
        family="update_localization",
        summary="mean",
    ),
    "principal_mask_overlap": _t(
        "|M_princ ∩ M_upd| / |M_upd|: share of updated entries among the top floor(α·n) of |rank-r W0| (§3.2)",
        PAIR,
        SUMMARY,
        FIELD,
        range="[0, 1]; α for random updates; NaN when nothing was updated; null (not_measurable) when rank ≥ the "
        "smaller side",
        bounds=_UNIT,
        family="update_localization",
        summary="mean",
    ),
    "low_magnitude_overlap": _t(
        "|M_low ∩ M_upd| / |M_upd|: share of updated entries among the bottom floor(α·n) of |W0| (§3.2)",
        PAIR,
        SUMMARY,
        FIELD,
        range="[0, 1]; α for random updates; NaN when nothing was updated",
        bounds=_UNIT,
        family="update_localization",
        summary="mean",
    ),
    # ---- the update's spectrum: pair rows (stable_rank family) and stream rows (§4) --------------------------
    "stable_rank": _t(
        "‖ΔW‖_F² / ‖ΔW‖₂² of the update ΔW = W+ − W0 (of ΔW_t in stream rows) (§4)",
        PAIR,
        STREAM,
        SUMMARY,
        LOG,
        range="[1, rank of ΔW]; 0 for a zero update",
        bounds=(0.0, _INF),
        family="stable_rank",
        summary="mean",
    ),
    "delta_frobenius": _t(
        "‖ΔW‖_F, the Frobenius norm of the update (float64 accumulation)",
        PAIR,
        STREAM,
        SUMMARY,
        LOG,
        range="≥ 0",
        bounds=(0.0, _INF),
        family="stable_rank",
        summary="mean",
    ),
    "spectral_norm": _t(
        "‖ΔW_t‖₂ = σ₁(ΔW_t), the update's largest singular value",
        STREAM,
        SUMMARY,
        LOG,
        range="≥ 0",
        bounds=(0.0, _INF),
        summary="mean",
    ),
    "hill_alpha": _t(
        "Hill tail index [(1/(h−1)) Σ_{i<h} log(σ_i/σ_h)]⁻¹ of ΔW_t's top h = hill_k singular values (§2 of "
        "the notes); heavier tail = smaller",
        STREAM,
        SUMMARY,
        LOG,
        range="> 0; inf when the top values are equal; NaN when σ_h = 0 or h < 2",
        bounds=(0.0, _INF),
        summary="mean",
    ),
    "delta_spectral_gap": _t(
        "σ_K/σ_{K+1} of the update ΔW_t at K = k: Sim_K means little where it is near 1",
        STREAM,
        SUMMARY,
        range="≥ 1; inf when σ_{K+1} = 0; NaN when σ_K = 0; null (not_measurable) when K ≥ the smaller side",
        bounds=(1.0, _INF),
        summary="mean",
    ),
    "final_subspace_similarity": _t(
        "Sim_K(t, t_end) = ‖V_K(t)ᵀ V_K(t_end)‖_F² / K, the top-K input-side subspace of ΔW_t against the final "
        "step's (§4, Fig. 4)",
        STREAM,
        SUMMARY,
        range="[0, 1]; K/in for random subspaces; NaN where ΔW_t or ΔW_end is zero; null (not_measurable) when "
        "K ≥ the smaller side",
        bounds=_UNIT,
        summary="mean",
    ),
    "subspace_similarity": _t(
        "Sim_K between the top-K input-side subspaces of two updates from one base (subspace_similarity's rows)",
        PAIR,
        SUMMARY,
        range="[0, 1]; NaN where either update is zero; null (not_measurable) when K ≥ the smaller side",
        bounds=_UNIT,
        summary="mean",
    ),
    "previous_subspace_similarity": _t(
        "Sim_K(t, t_prev) of the top-K input-side subspaces of ΔW_t and of the previous tracked step's ΔW",
        LOG,
        range="[0, 1]",
        bounds=_UNIT,
    ),
    "n_matrices": _t("matrices with a nonzero update at this step (a Tracker log count)", LOG, range="count ≥ 0"),
    # ---- summaries -------------------------------------------------------------------------------------------
    "n_tensors": _t("rows summarized", SUMMARY, range="count ≥ 0"),
    "max_principal_angle_overall": _t(
        "the largest max_principal_angle over the matrices summarized", SUMMARY, range="degrees in [0, 90]"
    ),
    "by_module": _t("the same summary per module type", SUMMARY, range="{module: summary}"),
    "experts": _t("per MoE expert tensor, the summary over its experts", SUMMARY, range="{tensor: summary}"),
    "by_step": _t("per step, the summary over that step's rows", SUMMARY, range="{step: summary}"),
    "curves": _t(
        "per metric, its by_step figure as a list over `steps` (TRAJECTORY_CURVES, SPARSITY_CURVES)",
        SUMMARY,
        range="{metric: list}",
    ),
    "steps": _t(
        "the training steps of a stream: of a sequence (argument), those with rows (summary)",
        ARGUMENT,
        SUMMARY,
        range="strictly increasing ints",
        default=None,
    ),
    "final_step": _t("t_end, the last step of the stream: the one Sim_K compares to", SUMMARY, FIELD, range="int"),
    # ---- arguments: what to compare ---------------------------------------------------------------------------
    "base": _t(
        "the base model W0 updates are measured from: a tensor, checkpoint source or LoRA's base model "
        "(streams: default the first complete checkpoint)",
        ARGUMENT,
        default=None,
    ),
    "ft": _t("the fine-tuned model W+: a tensor [out, in] or a checkpoint source", ARGUMENT),
    "ft_a": _t("the first of two fine-tunes of one base (a tensor or a checkpoint source)", ARGUMENT),
    "ft_b": _t("the second of two fine-tunes of one base (a tensor or a checkpoint source)", ARGUMENT),
    "fts": _t("several fine-tuned models of one base (compare_many)", ARGUMENT, range="a sequence of sources"),
    "delta": _t("an update ΔW [out, in] (stable_rank; with ft given, the base)", ARGUMENT),
    "delta_a": _t("the first of two updates (or fine-tunes measured from base=)", ARGUMENT),
    "delta_b": _t("the second of two updates (or fine-tunes measured from base=)", ARGUMENT),
    "source": _t("a checkpoint source: folder, file, hub id, Mapping[str, Tensor], nn.Module, LoRA adapter", ARGUMENT),
    "stream": _t("a run directory of checkpoint folders or a sequence of checkpoint sources", ARGUMENT),
    "run_dir": _t("the run directory a trainer writes its checkpoint folders into (follow)", ARGUMENT),
    "model": _t("the model at the start of training, W0 (nn.Module, mapping or (name, tensor) pairs)", ARGUMENT),
    "named_parameters": _t("the tracked model's current (name, tensor) pairs", ARGUMENT),
    "A": _t("the matrix (or batch of matrices) to decompose", ARGUMENT, range="[..., m, n] floating"),
    "metrics": _t("the metric families to compute (aliases accepted, ALIASES); None = all", ARGUMENT, default=None),
    "include": _t(
        "regexes or presets (attention, mlp, linear, experts, router) of the tensors to analyse; None = all",
        ARGUMENT,
        default=None,
    ),
    "exclude": _t("regexes or presets of tensors to leave out; None = none", ARGUMENT, default=None),
    "revision": _t("the hub revision (branch, tag or commit) of a hub id", ARGUMENT, default=None),
    "config": _t(
        "the model's HF config (config.json path, folder or dict) for native folders that need it",
        ARGUMENT,
        default=None,
    ),
    # ---- arguments: metric options ---------------------------------------------------------------------------
    "k": _t(
        "subspace dimension: how many top singular directions a subspace holds (K in Sim_K). For the principal "
        "subspaces of weights a count or a fraction of each matrix's smaller side, default 0.125 (an eighth: the "
        "paper's 512 of 4096, §3.1); the verbs on updates (stream verbs, Tracker, subspace_similarity) take a "
        "count, default 16, the paper's K (§4)",
        ARGUMENT,
        SUMMARY,
        FIELD,
        range="int ≥ 1, or (pair metrics) a fraction in (0, 1) of the smaller side; metrics are null where it reaches "
        "the smaller side",
        default=PAIR_K,
    ),
    "side": _t(
        "which singular subspace: 'right' = V (input side of [out, in]), 'left' = U (output side)",
        ARGUMENT,
        range="'right', 'left'",
        default=SIDE,
    ),
    "rank": _t(
        "r, the rank of W0's reconstruction whose largest entries form the principal mask (§3.2)",
        ARGUMENT,
        FIELD,
        range="int ≥ 1, or a fraction in (0, 1) of the smaller side; principal_mask_overlap is null where it reaches "
        "the smaller side",
        default=RANK,
    ),
    "alpha": _t(
        "α, the fraction of entries in each localization mask: floor(α·n) of them (§3.2)",
        ARGUMENT,
        FIELD,
        range="(0, 1]",
        default=ALPHA,
    ),
    "eta": _t("η, the bf16 rule's relative tolerance (§3.1)", ARGUMENT, range="≥ 0", default=ETA),
    "hill_k": _t(
        "h, the number of top singular values in the Hill estimator", ARGUMENT, range="int ≥ 2", default=HILL_K
    ),
    "threshold": _t(
        "the Sim_K level a matrix must stay at or above to count as locked",
        ARGUMENT,
        FIELD,
        range="(0, 1]",
        default=THRESHOLD,
    ),
    # ---- arguments: how to compute ---------------------------------------------------------------------------
    "device": _t(
        "where the linear algebra runs (None = where the data already is: the CPU for checkpoint sources and "
        "NumPy arrays, each parameter's own device in the Tracker); reading is on CPU",
        ARGUMENT,
        range="None, 'cpu', 'cuda', 'cuda:N', torch.device",
        default=None,
    ),
    "dtype": _t(
        "the float format weights are compared in (both sides rounded to it; None = as stored)",
        ARGUMENT,
        range="None or a floating torch.dtype",
        default=None,
    ),
    "seed": _t(
        "seeds every random draw (randomized SVD test matrices, per matrix); results do not depend on batching",
        ARGUMENT,
        range="int",
        default=SEED,
    ),
    "generator": _t("a torch.Generator to draw from instead of seed", ARGUMENT, default=None),
    "progress": _t("show a progress bar (tqdm)", ARGUMENT, range="bool", default=PROGRESS),
    "cache": _t(
        "the result cache: None = WEIGHTGEO_CACHE or the default folder, False = off, a folder, a ResultCache",
        ARGUMENT,
        default=None,
    ),
    "batch_bytes": _t(
        "the byte budget of one shape group (None = a quarter of free GPU memory, 64 MiB on CPU)",
        ARGUMENT,
        range="bytes ≥ 0",
        default=None,
    ),
    "sparsity": _t(
        "also the sparsity curves (update_sparsity, step_sparsity, patch_bytes) from the same read of each checkpoint",
        ARGUMENT,
        range="bool",
        default=False,
    ),
    "strict": _t(
        "fail on a checkpoint that is not completely written instead of leaving it out", ARGUMENT, default=False
    ),
    "n_iter": _t("power iterations of the randomized SVD", ARGUMENT, range="count ≥ 0", default=2),
    "oversample": _t("extra columns of the randomized SVD's test matrix (None = k)", ARGUMENT, default=None),
    "pass_dtype": _t(
        "the dtype of the randomized SVD's passes (None = the numerical policy's)", ARGUMENT, default=None
    ),
    # ---- arguments: streams and the Tracker ------------------------------------------------------------------
    "every": _t("track the steps that are multiples of this", ARGUMENT, range="int ≥ 1", default=1),
    "mode": _t(
        "the Tracker's memory mode: 'exact' (a copy of W0) or 'sketch' (random sketches)",
        ARGUMENT,
        range="'exact', 'sketch'",
        default="exact",
    ),
    "sketch_rank": _t(
        "s, the sketch's range size (None = 2·max(k, hill_k) + 1)",
        ARGUMENT,
        range="int > max(k, hill_k)",
        default=None,
    ),
    "base_device": _t("where the Tracker keeps its W0 copy or sketches", ARGUMENT, default="cpu"),
    "gather": _t(
        "gather DTensor parameters with full_tensor() (a collective: every rank calls update)",
        ARGUMENT,
        default=False,
    ),
    "until": _t("the last step follow analyses (None = no end)", ARGUMENT, range="int ≥ 0", default=None),
    "poll_s": _t("seconds between scans of the run directory", ARGUMENT, range="≥ 0", default=POLL_S),
    "idle_s": _t(
        "stop after this many seconds without a new complete checkpoint (None = never)",
        ARGUMENT,
        range="≥ 0",
        default=None,
    ),
    # ---- arguments: reading and writing ----------------------------------------------------------------------
    "start": _t("the first row of a row range (None = 0)", ARGUMENT, default=None),
    "stop": _t("the end of a row range, exclusive (None = all rows)", ARGUMENT, default=None),
    "path": _t("a file to write or read", ARGUMENT),
    "columns": _t("the columns of a text table (None = all)", ARGUMENT, default=None),
    "max_rows": _t("the most rows a text table shows (None = all)", ARGUMENT, default=None),
    "indent": _t("JSON indentation", ARGUMENT, default=2),
    "width": _t(
        "the characters a printed table or summary may take (None = every column at full width)",
        ARGUMENT,
        range="int ≥ 40 or None",
        default=TEXT_WIDTH,
    ),
    "label": _t("a run's name on a page or in a legend (None = from its source's path)", ARGUMENT, default=None),
    "title": _t("the title of a page or figure (None = from the runs' labels)", ARGUMENT, default=None),
    "reports": _t("reports to show side by side, keyed by their run labels", ARGUMENT, range="{label: Report}"),
    # ---- result fields ---------------------------------------------------------------------------------------
    "rows": _t("a Report's rows: one dict per analysed tensor (and step)", FIELD),
    "summary": _t(
        "a Report's model-level figures (the SUMMARY keys); as an argument (to_pandas(summary=True)), ask for them "
        "instead of the per-tensor rows",
        FIELD,
        ARGUMENT,
        default=False,
    ),
    "meta": _t("provenance: version, sources, options, hardware, what was skipped and why", FIELD, default={}),
    "report": _t("a FollowUpdate's rank_curve Report over every complete checkpoint so far", FIELD),
    "skipped": _t("what was left out, each with its reason", FIELD),
    "n_updated": _t("|M_upd|, the entries updated", FIELD, range="count ≥ 0"),
    "per_matrix": _t("per matrix name, its locking onset step (None: no onset)", FIELD),
    "similarity": _t("per matrix name, its Sim_K(step, t_end) curve", FIELD, range="[0, 1] each", bounds=_UNIT),
    "mean_similarity": _t(
        "per step, the mean over matrices of Sim_K(step, t_end)", FIELD, range="[0, 1] each", bounds=_UNIT
    ),
}

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

#: the scalar row keys of each family, in the order rows carry them (from the glossary's ``family``)
OUTPUTS: dict[str, tuple[str, ...]] = {
    family: tuple(n for n, t in GLOSSARY.items() if t.family == family) for family in ALL_METRICS
}

#: vector row keys (lists), each emitted by one family when asked for by name
VECTOR_OUTPUTS: dict[str, str] = {"principal_angles": "principal_overlap"}

#: the scalar row keys of a trajectory report (rank_curve, Tracker.rank_curve, follow)
TRAJECTORY_OUTPUTS: tuple[str, ...] = tuple(n for n, t in GLOSSARY.items() if STREAM in t.where and t.summary == "mean")

#: the per-step means a trajectory summary also lists as curves over its steps (``summary["curves"]``)
TRAJECTORY_CURVES: tuple[str, ...] = (
    "stable_rank",
    "delta_frobenius",
    "spectral_norm",
    "hill_alpha",
    "final_subspace_similarity",
)

#: the metrics of Tracker.update's log, each as ``weightgeo/<metric>/<mean | module type>``
TRACKER_OUTPUTS: tuple[str, ...] = ("stable_rank", "delta_frobenius", "spectral_norm", "hill_alpha")

#: Tracker log names logged for the whole model without a group (``weightgeo/<name>``): counts and the
#: parameter-weighted sparsities (these two also per module type, ``weightgeo/<name>/<module type>``)
TRACKER_MODEL_LOGS: tuple[str, ...] = ("n_matrices", "update_sparsity", "step_sparsity", "patch_bytes")

#: the row keys of the sparsity curves (sparsity_curve, rank_curve(sparsity=True), Tracker.sparsity_curve)
SPARSITY_OUTPUTS: tuple[str, ...] = (
    "update_sparsity",
    "update_unchanged",
    "step_sparsity",
    "step_unchanged",
    "patch_bytes",
    "dense_bytes",
)

#: the per-step figures a sparsity summary also lists as curves over its steps (``summary["curves"]``)
SPARSITY_CURVES: tuple[str, ...] = ("update_sparsity", "step_sparsity", "patch_bytes")

#: row keys that count something (integers stored as numbers) rather than measure it
COUNTS: frozenset[str] = frozenset({"k_effective"})

#: numeric row keys that summaries do not average (they name or count, they do not measure)
NOT_SUMMARIZED: frozenset[str] = frozenset(n for n, t in GLOSSARY.items() if t.where & {PAIR, STREAM} and not t.summary)

#: row keys summarized as parameter-count weighted means (fractions of the model's entries)
WEIGHTED: frozenset[str] = frozenset(n for n, t in GLOSSARY.items() if t.summary == "weighted")

#: row keys summarized as sums (counts of entries, byte sizes)
SUMMED: frozenset[str] = frozenset(n for n, t in GLOSSARY.items() if t.summary == "sum")

#: names renamed before 0.2, old -> (new, where the old name was used); Report.from_json reads old files with
#: them (with a DeprecationWarning); CHANGELOG.md lists them
RENAMED: dict[str, tuple[str, str]] = {
    "frobenius_norm": ("delta_frobenius", STREAM),
    "spectral_gap": ("delta_spectral_gap", STREAM),  # the pair rows' spectral_gap (of W0) keeps its name
    "dtype": ("stored_dtype", PAIR),
}


def glossary_markdown() -> str:
    """The glossary as the Markdown table docs/metrics.md carries (a test keeps the two equal).

    >>> glossary_markdown().splitlines()[0]
    '| name | meaning | range / unit | where | default |'
    """
    lines = ["| name | meaning | range / unit | where | default |", "|---|---|---|---|---|"]
    order = (PAIR, STREAM, SUMMARY, LOG, FIELD, ARGUMENT)
    for name, t in GLOSSARY.items():
        where = ", ".join(f"{w} ({t.family})" if w == PAIR and t.family else w for w in order if w in t.where)
        default = "" if t.default is REQUIRED or ARGUMENT not in t.where else f"`{t.default!r}`"
        cells = (f"`{name}`", t.meaning, t.range, where, default)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")  # | inside a cell: \|
    return "\n".join(lines)
