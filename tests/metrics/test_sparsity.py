"""update_sparsity / update_mask: the bf16 rule, exactly, against the bit-level NumPy reference."""

import numpy as np
import pytest
import reference as R
import torch
from cases import CASES, case

from weightgeo import WeightgeoError
from weightgeo.metrics import update_mask, update_sparsity
from weightgeo.metrics.sparsity import unchanged_count, unchanged_mask, unchanged_mask_general


@pytest.mark.parametrize("kind,upd", CASES)
def test_vs_reference_exact(kind, upd):
    b, f, b_np, f_np = case(kind, upd)
    assert update_sparsity(b, f) == R.sparsity(b_np, f_np)
    np.testing.assert_array_equal(update_mask(b, f).numpy(), ~R.unchanged_mask(b_np, f_np))


@pytest.mark.parametrize("eta", [0.0, 1e-4, 1e-3, 2.0**-9, 3e-3, 1e-2, 0.1])
def test_fp32_inputs_general_rule_vs_reference(eta):
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(4000, generator=g) * torch.logspace(-3, 3, 4000)
    w1 = w0 * (1 + 1e-2 * torch.randn(4000, generator=g))
    ref = R.unchanged_mask(w0.numpy(), w1.numpy(), eta)
    np.testing.assert_array_equal(~update_mask(w0, w1, eta=eta).numpy(), ref)


def _special_values() -> torch.Tensor:
    sub = torch.tensor([1e-40, -1e-40, 2e-40, 5e-39, 9.2e-41], dtype=torch.float32)
    return torch.cat([torch.tensor([0.0, -0.0, 1.0, -1.0, 1.00390625, 3e38, -2.5e-38]), sub])


def test_fast_path_equals_general_path():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(20000, generator=g) * torch.logspace(-30, 30, 20000)
    vals = torch.cat([x, _special_values()]).bfloat16()
    # all pairs from a pool with many exact repeats, ±0 and subnormals
    i = torch.randint(0, vals.numel(), (50000,), generator=g)
    j = torch.where(torch.rand(50000, generator=g) < 0.5, i, torch.randint(0, vals.numel(), (50000,), generator=g))
    w0, w1 = vals[i], vals[j]
    w1 = torch.where(torch.rand(50000, generator=g) < 0.2, w0.float().nextafter(torch.tensor(1e39)).bfloat16(), w1)
    for eta in (1e-3, 1e-4, 0.0):
        fast = unchanged_mask(w0, w1, eta)
        general = unchanged_mask_general(w0, w1, eta)
        assert torch.equal(fast, general)
    assert 0 < int(fast.sum()) < fast.numel()


def test_zeros():
    z = torch.tensor([0.0, 0.0, -0.0, 0.0])
    w = torch.tensor([0.0, -0.0, 0.0, 1e-30])
    assert update_mask(z, w).tolist() == [False, False, False, True]
    assert update_mask(z.bfloat16(), w.bfloat16()).tolist() == [False, False, False, True]


def test_subnormals():
    """Distinct bf16 subnormals are 'changed'; fp32 subnormals with the same bf16 value are not."""
    a = torch.tensor([1e-40, 1e-40, 1e-40, 0.0]).bfloat16()
    b = torch.tensor([1e-40, 2e-40, -1e-40, 1e-40]).bfloat16()
    assert update_mask(a, b).tolist() == [False, True, True, True]
    assert update_mask(a, b, eta=1e-2).tolist() == [False, True, True, True]
    c = torch.tensor([1.00e-39]), torch.tensor([1.0000001e-39])  # same bf16 code
    assert update_mask(*c).tolist() == [False]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_raises_with_count(bad):
    a = torch.ones(3, 4)
    b = a.clone()
    b[0, 1] = bad
    b[2, 2] = bad
    with pytest.raises(WeightgeoError, match=r"'ft.*2 non-finite"):
        update_sparsity(a, b)
    with pytest.raises(WeightgeoError, match=r"'base.*2 non-finite"):
        update_mask(b, a)


def test_bf16_overflow_raises():
    with pytest.raises(WeightgeoError, match="non-finite"):
        update_sparsity(torch.tensor([3.4e38]), torch.tensor([3.4e38]))


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), ()])
def test_any_shape(shape):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(shape, generator=g)
    b = a.clone()
    b.view(-1)[0] += 1.0
    n = max(1, a.numel())
    assert update_sparsity(a, b) == (n - 1) / n
    assert update_mask(a, b).shape == a.shape


def test_chunks_sum_to_whole(gen):
    a = torch.randn(37, 11, generator=gen).bfloat16()
    b = (a.float() + 1e-2 * torch.randn(37, 11, generator=gen)).bfloat16()
    total = sum(unchanged_count(a[i : i + 8], b[i : i + 8], 1e-3) for i in range(0, 37, 8))
    assert total == round(update_sparsity(a, b) * a.numel())


def test_numpy_and_mixed_dtypes():
    a = np.linspace(-2, 2, 50, dtype=np.float32)
    b = a.copy()
    b[:5] *= 1.5
    assert update_sparsity(a, b) == 0.9
    assert update_sparsity(torch.from_numpy(a).bfloat16(), torch.from_numpy(b)) == 0.9
    assert update_sparsity(a.astype(np.float64), b.astype(np.float64)) == 0.9


def test_errors():
    with pytest.raises(WeightgeoError, match=r"\(3, 4\) vs \(4, 3\)"):
        update_sparsity(torch.ones(3, 4), torch.ones(4, 3))
    with pytest.raises(WeightgeoError, match="floating"):
        update_sparsity(torch.ones(3, dtype=torch.int64), torch.ones(3, dtype=torch.int64))
    with pytest.raises(WeightgeoError, match="floating"):
        update_sparsity(np.ones(3, dtype=np.int32), np.ones(3, dtype=np.int32))
    with pytest.raises(WeightgeoError, match="empty"):
        update_sparsity(torch.ones(0), torch.ones(0))
    with pytest.raises(WeightgeoError, match="eta"):
        update_sparsity(torch.ones(2), torch.ones(2), eta=-1)


def test_never_touches_global_rng(gen):
    state = torch.get_rng_state()
    a = torch.randn(10, 10, generator=gen)
    update_sparsity(a, a * 1.01)
    assert torch.equal(state, torch.get_rng_state())


def test_dispatch_to_engine():
    """Checkpoint sources go through weightgeo.update_sparsity to the engine: a Report whose rows hold the
    tensor-level numbers; the tensor-level function itself takes tensors only and says where to go."""
    import weightgeo

    a = {"w": torch.ones(4, 4)}
    b = {"w": torch.ones(4, 4) * 2}
    r = weightgeo.update_sparsity(a, b)
    assert isinstance(r, weightgeo.Report) and r.meta["metrics"] == ["update_sparsity"]
    assert [row["name"] for row in r.rows] == ["w"]
    assert r.rows[0]["update_sparsity"] == update_sparsity(a["w"], b["w"]) == 0.0
    half = {"w": torch.cat([torch.ones(2, 4), 2 * torch.ones(2, 4)])}
    assert weightgeo.update_sparsity(a, half).summary["update_sparsity"] == 0.5
    with pytest.raises(WeightgeoError, match=r"weightgeo\.update_sparsity\(base, ft\)"):
        update_sparsity(a, b)


def test_cpu_bits_path_matches_the_rule_on_signed_zeros_subnormals_and_ties():
    from weightgeo.metrics.sparsity import unchanged_count, unchanged_mask_general

    g = torch.Generator().manual_seed(5)
    a = (torch.randn(4096, generator=g) * 0.02).to(torch.bfloat16)
    b = (a.float() * (1 + 5e-3 * torch.randn(4096, generator=g))).to(torch.bfloat16)
    a[:8] = 0.0
    b[:4] = -0.0  # +0 vs -0: unchanged
    b[4:8] = 1e-40  # 0 vs subnormal: changed
    a[8:12] = -0.0
    b[8:12] = -0.0
    expected = int(unchanged_mask_general(a, b, 1e-3).sum())
    assert unchanged_count(a, b, 1e-3) == expected
    assert unchanged_count(a.float(), b.float(), 1e-3) == expected  # the torch path agrees
    b[100] = float("nan")
    with pytest.raises(WeightgeoError, match="non-finite"):
        unchanged_count(a, b, 1e-3, name="w")
