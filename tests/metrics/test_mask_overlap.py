"""Subnetwork overlap (weightgeo/metrics/mask_overlap.py, weightgeo.update_mask_overlap): the Jaccard index and
overlap coefficient against a float64/NumPy reference, and their random baselines against the exact
hypergeometric law and against simulation (explicit generators)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from factories import tiny_llama_state, write_hf_checkpoint
from hypothesis import given, settings
from hypothesis import strategies as st

import weightgeo
from weightgeo.errors import WeightgeoError
from weightgeo.metrics.mask_overlap import (
    expected_jaccard,
    mask_overlap,
    overlap_from_counts,
    pairwise_counts,
    pooled_overlap,
)


def _reference(base: np.ndarray, a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """float64 NumPy: the bf16 rule at η < 2**-9 is 'the bf16 values differ' (±0 equal); then the set algebra."""

    def bf16(x):  # round to nearest even, as torch does, through the bits
        return torch.from_numpy(x).float().bfloat16().float().numpy().astype(np.float64)

    ma, mb = bf16(a) != bf16(base), bf16(b) != bf16(base)
    na, nb, nx = int(ma.sum()), int(mb.sum()), int((ma & mb).sum())
    return {
        "updated_a": na,
        "updated_b": nb,
        "updated_both": nx,
        "mask_jaccard": nx / (na + nb - nx) if na + nb - nx else math.nan,
        "mask_overlap": nx / min(na, nb) if min(na, nb) else math.nan,
    }


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), pa=st.floats(0, 1), pb=st.floats(0, 1))
def test_tensor_overlap_equals_a_float64_numpy_reference(seed, pa, pb):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(400).astype(np.float32)
    a = np.where(rng.random(400) < pa, base + rng.standard_normal(400).astype(np.float32), base)
    b = np.where(rng.random(400) < pb, base * 1.5, base)
    got = weightgeo.update_mask_overlap(base, a, b)
    want = _reference(base, a, b)
    for key, v in want.items():
        g = getattr(got, key)
        assert (math.isnan(g) and math.isnan(v)) or g == pytest.approx(v, rel=1e-12), key
    assert got.numel == 400


def _brute_jaccard(n: int, a: int, b: int) -> float:
    total = math.comb(n, b)
    return (
        sum(
            math.comb(a, x) * math.comb(n - a, b - x) * x / (a + b - x) for x in range(max(0, a + b - n), min(a, b) + 1)
        )
        / total
    )


@pytest.mark.parametrize("n,a,b", [(4, 2, 2), (10, 3, 7), (30, 1, 29), (50, 17, 23), (64, 64, 5), (7, 0, 3)])
def test_expected_jaccard_is_the_hypergeometric_expectation(n, a, b):
    assert expected_jaccard(n, a, b) == pytest.approx(_brute_jaccard(n, a, b), rel=1e-12)


def test_random_baselines_match_simulation():
    """Independent uniformly random masks of the observed sizes (explicit generator): the simulated means lie
    within 4 standard errors of the expectations."""
    g = torch.Generator().manual_seed(0)
    n, a, b, trials = 500, 60, 140, 4000
    jac, ovl = [], []
    for _ in range(trials):
        ma = torch.zeros(n, dtype=torch.bool)
        mb = torch.zeros(n, dtype=torch.bool)
        ma[torch.randperm(n, generator=g)[:a]] = True
        mb[torch.randperm(n, generator=g)[:b]] = True
        m = mask_overlap(ma, mb)
        jac.append(m.mask_jaccard)
        ovl.append(m.mask_overlap)
    want = overlap_from_counts(n, a, b, 0)
    for sims, exp in ((jac, want.random_mask_jaccard), (ovl, want.random_mask_overlap)):
        se = float(np.std(sims, ddof=1)) / math.sqrt(trials)
        assert abs(float(np.mean(sims)) - exp) < 4 * se, (np.mean(sims), exp, se)
    assert want.random_mask_overlap == b / n  # max(a, b) / n exactly


def test_edge_cases_are_undefined_not_zero():
    none = overlap_from_counts(10, 0, 0, 0)
    assert math.isnan(none.mask_jaccard) and math.isnan(none.mask_overlap) and math.isnan(none.random_mask_jaccard)
    one = overlap_from_counts(10, 0, 4, 0)
    assert one.mask_jaccard == 0.0 and math.isnan(one.mask_overlap) and one.random_mask_jaccard == 0.0
    full = overlap_from_counts(10, 10, 10, 10)
    assert full.mask_jaccard == full.random_mask_jaccard == full.mask_overlap == 1.0
    with pytest.raises(WeightgeoError, match="inconsistent"):
        overlap_from_counts(10, 2, 3, 4)


def test_pairwise_counts_and_pooling():
    masks = torch.tensor([[1, 1, 0, 0, 1], [1, 0, 1, 0, 1], [0, 0, 0, 1, 0]], dtype=torch.bool)
    c = pairwise_counts(masks)
    assert c.tolist() == [[3, 2, 0], [2, 3, 0], [0, 0, 1]]
    p = pooled_overlap([overlap_from_counts(5, 3, 3, 2), overlap_from_counts(5, 1, 0, 0)])
    assert (p.numel, p.updated_a, p.updated_b, p.updated_both) == (10, 4, 3, 2)
    assert p.mask_jaccard == 2 / 5 and p.mask_overlap == 2 / 3
    ex = 3 * 3 / 5 + 0
    assert p.random_mask_jaccard == pytest.approx(ex / (7 - ex)) and p.random_mask_overlap == pytest.approx(ex / 3)


def test_checkpoints_give_a_report_per_tensor_and_the_pooled_model_figure(tmp_path):
    base = tiny_llama_state(num_layers=1, hidden=16, intermediate=32, vocab=40)
    g = torch.Generator().manual_seed(1)

    def moved(p):
        return {
            k: torch.where(torch.rand(v.shape, generator=g) < p, (v.float() + 0.5).to(v.dtype), v)
            for k, v in base.items()
        }

    fa, fb = moved(0.2), moved(0.6)
    b, a, c = (write_hf_checkpoint(tmp_path / n, sd) for n, sd in (("b", base), ("a", fa), ("c", fb)))
    rep = weightgeo.update_mask_overlap(b, a, c)
    assert {r["name"] for r in rep.rows} == {weightgeo.checkpoint.canonical_name(k) for k in base}
    for r in rep.rows:
        key = next(k for k in base if weightgeo.checkpoint.canonical_name(k) == r["name"])
        want = _reference(base[key].float().numpy(), fa[key].float().numpy(), fb[key].float().numpy())
        assert {k: r[k] for k in ("updated_a", "updated_b", "updated_both")} == {
            k: want[k] for k in ("updated_a", "updated_b", "updated_both")
        }
    pooled = pooled_overlap(
        [overlap_from_counts(r["numel"], r["updated_a"], r["updated_b"], r["updated_both"]) for r in rep.rows]
    )
    assert rep.summary["mask_jaccard"] == pooled.mask_jaccard and rep.summary["numel"] == pooled.numel
    assert set(rep.summary["by_module"]) == {r["module"] for r in rep.rows}
    assert rep.meta["kind"] == "update_mask_overlap" and rep.meta["ft_a"].endswith("a")


def test_fp8_checkpoints_take_the_fp8_rules_masks(tmp_path):
    from native_factories import fp8_quantize, write_fp8

    from weightgeo.metrics.sparsity import fp8_update_mask

    block = (4, 8)
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))
    codes, scales = fp8_quantize(w, block)
    a, b = codes.float().clone(), codes.float().clone()
    a[0, :4] *= 2  # 4 codes move in one fine-tune (in range: 448 is e4m3's largest)
    b[0, 2:6] *= 2  # 4 in the other, 2 of them the same
    s_b = scales.clone()
    s_b[1, 1] *= 2  # and the other's block (1, 1) is rescaled: its nonzero entries change
    name = "model.layers.0.mlp.down_proj.weight"
    sources = [
        write_fp8(tmp_path / n, {name: (c.to(torch.float8_e4m3fn), s)}, block=block)
        for n, c, s in (("base", codes.float(), scales), ("a", a, scales), ("b", b, s_b))
    ]
    row = weightgeo.update_mask_overlap(*sources).rows[0]
    ma = fp8_update_mask(codes, scales, a.to(torch.float8_e4m3fn), scales, block)
    mb = fp8_update_mask(codes, scales, b.to(torch.float8_e4m3fn), s_b, block)
    assert (row["updated_a"], row["updated_b"], row["updated_both"]) == (
        int(ma.sum()),
        int(mb.sum()),
        int((ma & mb).sum()),
    )
    assert row["updated_both"] == 2 and row["updated_b"] > 4
