"""The options of a pass (weightgeo/options.py, weightgeo/defaults.py): every option keyed, every default one value.

The result-cache keys are computed from the option objects as a whole: perturbing any field changes the key
unless the field is marked as unable to change a result (cache.not_in_key), and then it must not. A field added
without a perturbation here fails the test, so no option can reach a kernel without reaching the key.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

import weightgeo
from weightgeo import defaults, metrics
from weightgeo.cache import NOT_IN_KEY, ResultCache, in_key
from weightgeo.engine.cached import base_key, row_key
from weightgeo.engine.plan import Job
from weightgeo.errors import WeightgeoError
from weightgeo.metrics.pair import batched_pair_metrics
from weightgeo.options import BASE, KERNEL, PairOptions, SparsityOptions, StreamOptions
from weightgeo.stream_sparsity import count_key
from weightgeo.track import Tracker
from weightgeo.trajectory import spectrum_key

IDENT = {"format": "safetensors", "file": {"path": "/m/a.safetensors", "size": 10, "mtime_ns": 1}, "tensor": "w"}
JOB = Job("layers.0.q_proj.weight", "w", "w", (8, 8), 8, 0, torch.bfloat16, torch.bfloat16)

# one other valid value per field; the tests below require an entry for every field of each class
PAIR_PERTURB = {
    "metrics": ("spectral_drift",),
    "vectors": ("principal_angles",),
    "include": "q_proj",
    "exclude": "k_proj",
    "k": 8,
    "side": "left",
    "rank": 8,
    "alpha": 0.3,
    "eta": 0.0,
    "dtype": torch.float16,
    "device": torch.device("meta"),
    "progress": True,
    "batch_bytes": 0,
}
STREAM_PERTURB = {
    "include": "q_proj",
    "exclude": "k_proj",
    "k": 8,
    "hill_k": 3,
    "seed": 1,
    "threshold": 0.5,
    "dtype": torch.bfloat16,
    "device": torch.device("meta"),
    "progress": True,
    "eta": 1e-3,
}
SPARSITY_PERTURB = {
    "include": "q_proj",
    "exclude": "k_proj",
    "eta": 0.0,
    "dtype": torch.bfloat16,
    "device": torch.device("meta"),
    "progress": True,
}


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


@pytest.fixture
def cache(tmp_path):
    return ResultCache(tmp_path, version="0.0.0")


def test_every_pair_option_reaches_the_row_key_unless_marked(cache):
    _every_field_reaches(PairOptions, PAIR_PERTURB, lambda o: row_key(cache, o, JOB, [IDENT, IDENT], policy="p").digest)


def test_the_base_decomposition_key_holds_exactly_the_base_fields(cache):
    o = PairOptions()
    want = {f.name for f in dataclasses.fields(PairOptions) if f.metadata.get(next(iter(BASE)))}
    assert want == {"dtype"}
    for f in dataclasses.fields(PairOptions):
        other = dataclasses.replace(o, **{f.name: PAIR_PERTURB[f.name]})
        changed = base_key(cache, other, IDENT, 8, policy="p") != base_key(cache, o, IDENT, 8, policy="p")
        assert changed == (f.name in want), f.name


def _every_field_reaches(cls, perturb, key) -> None:
    """Perturbing any field of ``cls`` changes ``key(options)`` unless the field is marked not_in_key, with a reason."""
    assert set(perturb) == _fields(cls), f"give every {cls.__name__} field a perturbation here"
    o = cls()
    for f in dataclasses.fields(cls):
        other = dataclasses.replace(o, **{f.name: perturb[f.name]})
        assert getattr(other, f.name) != getattr(o, f.name), f.name
        if in_key(f):
            assert key(other) != key(o), f"{f.name} does not reach the cache key"
        else:
            assert key(other) == key(o), f"{f.name} is marked as unable to change a result but changes the key"
            assert f.metadata[NOT_IN_KEY], f"{f.name}: say why it cannot change a result"


def test_every_stream_option_reaches_the_spectrum_key_unless_marked():
    _every_field_reaches(
        StreamOptions, STREAM_PERTURB, lambda o: spectrum_key(o, o.r, IDENT, IDENT, "w", policy="p").digest
    )


def test_every_sparsity_option_reaches_the_count_key_unless_marked():
    _every_field_reaches(SparsityOptions, SPARSITY_PERTURB, lambda o: count_key(o, IDENT, IDENT, "w").digest)


def test_a_stream_pass_keys_its_sparsity_counts_by_its_sparsity_options():
    """StreamOptions.eta stays out of the spectrum keys (no spectrum depends on it) but reaches the count keys of
    the same pass, through sparsity_options(); so does every field those keys hold."""
    assert StreamOptions().sparsity_options() is None
    o = StreamOptions.create(eta=1e-3, dtype="bfloat16", include="q_proj")
    sp = o.sparsity_options()
    assert sp == SparsityOptions.create(eta=1e-3, dtype="bfloat16", include="q_proj")
    moved = dataclasses.replace(o, eta=0.0).sparsity_options()
    assert count_key(moved, IDENT, IDENT, "w").digest != count_key(sp, IDENT, IDENT, "w").digest
    rounded = dataclasses.replace(o, dtype=None).sparsity_options()
    assert count_key(rounded, IDENT, IDENT, "w").digest != count_key(sp, IDENT, IDENT, "w").digest
    assert count_key(sp, IDENT, IDENT, "w[0]").digest != count_key(sp, IDENT, IDENT, "w[1]").digest  # experts


def test_params_and_kernel_come_from_the_fields():
    o = PairOptions.create(metrics="principal_angles", k=4, dtype="bfloat16")
    assert set(o.params()) == _fields(PairOptions)
    assert o.params()["dtype"] == "bfloat16" and o.params()["device"] == "cpu" and o.params()["k"] == 4
    kernel = o.kernel()
    marked = {f.name for f in dataclasses.fields(PairOptions) if f.metadata.get(next(iter(KERNEL)))}
    assert marked <= set(kernel) <= set(inspect.signature(batched_pair_metrics).parameters)
    assert kernel["angles"] and kernel["metrics"] == frozenset({"principal_overlap"})
    assert set(StreamOptions().params()) == _fields(StreamOptions)


def test_options_are_checked_once_and_unknown_names_refused():
    with pytest.raises(WeightgeoError, match="dtype"):
        PairOptions.create(dtype=torch.int8)
    with pytest.raises(WeightgeoError, match="hill_k"):
        StreamOptions.create(hill_k=1)
    with pytest.raises(WeightgeoError, match="unknown option.*bogus"):
        StreamOptions.create(bogus=1)
    with pytest.raises(WeightgeoError, match="k must be"):
        dataclasses.replace(PairOptions(), k=0)  # a copy is checked again


PAIR_VERBS = [
    weightgeo.compare,
    weightgeo.compare_many,
    weightgeo.update_sparsity,
    weightgeo.update_mask,
    weightgeo.principal_angles,
    weightgeo.principal_overlap,
    weightgeo.spectral_drift,
    weightgeo.stable_rank,
    weightgeo.update_localization,
    metrics.update_sparsity,
    metrics.update_mask,
    metrics.principal_angles,
    metrics.principal_overlap,
    metrics.update_localization,
]
STREAM_VERBS = [
    weightgeo.rank_curve,
    weightgeo.locking_onset,
    weightgeo.follow,
    weightgeo.subspace_similarity,
    weightgeo.sparsity_curve,
]


def _defaults(fn) -> dict:
    return {n: p.default for n, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


@pytest.mark.parametrize("fn", PAIR_VERBS, ids=lambda f: f"{f.__module__}.{f.__name__}")
def test_pair_verbs_take_their_defaults_from_one_place(fn):
    o = PairOptions()
    for name, default in _defaults(fn).items():
        if name in ("k", "side", "rank", "alpha", "eta", "progress"):
            assert default == getattr(o, name), (fn.__name__, name)
        if name in ("dtype", "device", "batch_bytes", "include", "exclude"):
            assert default is None, (fn.__name__, name)
    assert o.k == defaults.PAIR_K and o.eta == defaults.ETA and o.progress is defaults.PROGRESS is False


@pytest.mark.parametrize("fn", [*STREAM_VERBS, Tracker.__init__], ids=lambda f: f.__qualname__)
def test_stream_verbs_take_their_defaults_from_one_place(fn):
    o = StreamOptions()
    for name, default in _defaults(fn).items():
        if name in ("k", "hill_k", "seed", "threshold", "progress"):
            assert default == getattr(o, name), (fn.__qualname__, name)
        if name == "dtype":  # the Tracker rounds to its own documented default
            assert default is (defaults.TRACKER_DTYPE if fn is Tracker.__init__ else None), fn.__qualname__
        if name == "device":
            assert default is None, fn.__qualname__
        if name == "eta":
            assert default == defaults.ETA, fn.__qualname__
    assert o.k == defaults.STREAM_K and o.threshold == defaults.THRESHOLD


def test_device_none_means_where_the_data_is(gen):
    assert PairOptions.create(device=None).device == torch.device("cpu")  # checkpoints are read on the CPU
    s = StreamOptions.create(device=None)
    assert s.device is None and s.where() == torch.device("cpu") and s.where(torch.device("meta")).type == "meta"
    tr = Tracker({"layers.0.q_proj.weight": torch.randn(6, 8, generator=gen)}, k=2, hill_k=2)
    assert tr.device is None  # each parameter's own device


def test_dtype_rounds_both_sides_first(gen):
    a = {"layers.0.q_proj.weight": torch.randn(12, 10, generator=gen), "norm.weight": torch.randn(10, generator=gen)}
    b = {n: w + 1e-3 * torch.randn(w.shape, generator=gen) for n, w in a.items()}
    bf = lambda sd: {n: w.bfloat16() for n, w in sd.items()}
    rounded = weightgeo.compare(a, b, k=4, rank=4, dtype=torch.bfloat16)
    stored = weightgeo.compare(bf(a), bf(b), k=4, rank=4)
    strip = lambda r: [{k: v for k, v in row.items() if k != "stored_dtype"} for row in r.rows]
    assert strip(rounded) == strip(stored) and rounded.meta["params"]["dtype"] == "bfloat16"
    assert strip(weightgeo.compare(a, b, k=4, rank=4)) != strip(stored)  # default: the stored float32 values
    q = "layers.0.q_proj.weight"
    assert weightgeo.update_sparsity(a[q], b[q], dtype="bfloat16") == weightgeo.update_sparsity(bf(a)[q], bf(b)[q])
    with pytest.raises(WeightgeoError, match="dtype"):
        weightgeo.compare(a, b, dtype=torch.int32)


def test_stream_dtype_rounds_w0_and_wt_first(gen):
    w0 = {"layers.0.self_attn.q_proj.weight": torch.randn(12, 10, generator=gen)}
    u = torch.randn(12, 2, generator=gen) @ torch.randn(2, 10, generator=gen)
    cks = [{n: w + c * u for n, w in w0.items()} for c in (0.01, 0.02)]
    bf = lambda sd: {n: w.bfloat16() for n, w in sd.items()}
    rounded = weightgeo.rank_curve(cks, base=w0, k=2, hill_k=2, dtype="bfloat16")
    stored = weightgeo.rank_curve([bf(c) for c in cks], base=bf(w0), k=2, hill_k=2)
    assert rounded.rows == stored.rows and rounded.meta["params"]["dtype"] == "bfloat16"
