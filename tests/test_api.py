"""The checkpoint-aware verbs (weightgeo.api): every pair verb dispatches the same way, returns a typed result,
and agrees with the tensor-level function, degenerate cases included."""

import math

import pytest
import torch

import weightgeo
from weightgeo import WeightgeoError
from weightgeo import metrics as M

Q = "layers.0.self_attn.q_proj.weight"
Z = "layers.0.self_attn.v_proj.weight"  # all zeros in the base: numerical rank 0


@pytest.fixture(scope="module")
def pair():
    g = torch.Generator().manual_seed(0)
    base = {Q: torch.randn(12, 10, generator=g), Z: torch.zeros(12, 10), "norm.weight": torch.ones(10)}
    ft = {k: v + 1e-2 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    return base, ft


VERBS = {  # verb: (keyword options, the metric family in the report)
    "update_sparsity": ({}, "update_sparsity"),
    "principal_overlap": ({"k": 4}, "principal_overlap"),
    "principal_angles": ({"k": 4}, "principal_overlap"),
    "spectral_drift": ({}, "spectral_drift"),
    "update_localization": ({"rank": 2}, "update_localization"),
    "stable_rank": ({}, "stable_rank"),
}


@pytest.mark.parametrize("verb", list(VERBS))
def test_every_pair_verb_gives_a_report_of_its_metric_for_checkpoints(pair, verb):
    base, ft = pair
    opts, family = VERBS[verb]
    r = getattr(weightgeo, verb)(base, ft, **opts)
    assert isinstance(r, weightgeo.Report) and r.meta["metrics"] == [family]
    want = weightgeo.compare(base, ft, metrics=[verb], progress=False, **opts)
    assert r.rows == want.rows


@pytest.mark.parametrize("verb", ["update_sparsity", "principal_overlap", "spectral_drift"])
def test_report_rows_equal_the_tensor_numbers(pair, verb):
    base, ft = pair
    opts = VERBS[verb][0]
    row = getattr(weightgeo, verb)(base, ft, **opts)[Q]
    assert row[verb] == pytest.approx(getattr(weightgeo, verb)(base[Q], ft[Q], **opts), rel=1e-6)


def test_principal_angles_of_checkpoints_carry_the_angle_vectors(pair):
    base, ft = pair
    r = weightgeo.principal_angles(base, ft, k=4, side="left")
    angles = r[Q]["principal_angles"]
    assert isinstance(angles, list) and len(angles) == r[Q]["k_effective"] == 4
    want = weightgeo.principal_angles(base[Q], ft[Q], k=4, side="left")
    assert angles == pytest.approx(want.tolist(), abs=1e-6)
    assert angles == sorted(angles) and r.meta["vectors"] == ["principal_angles"]
    assert "principal_angles" not in weightgeo.principal_overlap(base, ft, k=4)[Q]
    assert [s["name"] for s in r.skipped] == ["norm.weight"]  # 1-D: no subspace, and no elementwise metric asked


def test_rank_zero_agrees_between_tensors_and_reports(pair):
    base, ft = pair
    assert math.isnan(weightgeo.principal_overlap(base[Z], ft[Z], k=4))
    assert math.isnan(weightgeo.principal_overlap(base, ft, k=4)[Z]["principal_overlap"])
    row = weightgeo.principal_angles(base, ft, k=4)[Z]
    assert row["principal_angles"] == [] and row["k_effective"] == 0 and math.isnan(row["max_principal_angle"])
    with pytest.raises(WeightgeoError, match="rank 0"):
        weightgeo.principal_angles(base[Z], ft[Z], k=4)


def test_stable_rank_of_a_pair(pair):
    base, ft = pair
    assert weightgeo.stable_rank(base[Q], ft[Q]) == pytest.approx(weightgeo.stable_rank(ft[Q] - base[Q]), rel=1e-6)
    b16, f16 = base[Q].bfloat16(), ft[Q].bfloat16()  # the difference is formed in float32: exact
    assert weightgeo.stable_rank(b16, f16) == weightgeo.stable_rank(f16.float() - b16.float())
    assert weightgeo.stable_rank(base, ft)[Q]["stable_rank"] == pytest.approx(
        weightgeo.stable_rank(base[Q], ft[Q]), rel=1e-5
    )
    with pytest.raises(WeightgeoError, match="stable_rank\\(base, ft\\)"):
        weightgeo.stable_rank(base)


def test_update_mask_of_checkpoints_is_a_lazy_mapping(pair):
    base, ft = pair
    with weightgeo.update_mask(base, ft, include="q_proj") as masks:
        assert isinstance(masks, weightgeo.UpdateMasks) and list(masks) == [Q] and len(masks) == 1
        assert torch.equal(masks[Q], weightgeo.update_mask(base[Q], ft[Q]))
        with pytest.raises(KeyError):
            masks["norm.weight"]
    with weightgeo.update_mask(base, ft) as masks:
        assert set(masks) == {Q, Z, "norm.weight"}


def test_subspace_similarity_of_checkpoints_compares_their_updates(pair):
    base, ft = pair
    other = {k: v + 2e-2 * (ft[k] - base[k]) + 1e-3 for k, v in ft.items()}
    r = weightgeo.subspace_similarity(ft, other, base=base, k=3)
    assert isinstance(r, weightgeo.Report) and r.meta["kind"] == "subspace_similarity"
    want = weightgeo.subspace_similarity(ft[Q] - base[Q], other[Q] - base[Q], k=3)
    assert r[Q]["subspace_similarity"] == pytest.approx(want, abs=1e-6)
    with pytest.raises(WeightgeoError, match="base="):
        weightgeo.subspace_similarity(ft, other, k=3)
    with pytest.raises(WeightgeoError, match="side='left'"):
        weightgeo.subspace_similarity(ft, other, base=base, k=3, side="left")


def test_checkpoint_options_with_tensors_are_an_error(pair):
    base, ft = pair
    with pytest.raises(WeightgeoError, match="include applies to checkpoint sources only"):
        weightgeo.spectral_drift(base[Q], ft[Q], include="q_proj")
    with pytest.raises(WeightgeoError, match="device, batch_bytes apply"):
        weightgeo.update_sparsity(base[Q], ft[Q], device="cpu", batch_bytes=0)


def test_tensor_level_metrics_take_tensors_only(pair):
    base, ft = pair
    for fn in (M.update_sparsity, M.spectral_drift, M.principal_overlap, M.update_localization):
        with pytest.raises(WeightgeoError, match="weightgeo.compare"):
            fn(base, ft)
