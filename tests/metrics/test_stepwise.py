"""The kernels of the sparsity curves (weightgeo/metrics/stepwise.py): changed counts under the bf16 rule on both
backends (the numpy one CPU runs, the torch one CUDA runs: the same code path tested here on CPU), the FP8 rule,
the sparse patch's size derived by hand, and the Tracker's exact hold of a previous version."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from weightgeo.checkpoint import Fp8Weight
from weightgeo.errors import WeightgeoError
from weightgeo.metrics.sparsity import unchanged_mask_general
from weightgeo.metrics.stepwise import (
    bf16_bits,
    changed_against,
    changed_count,
    checked_bf16,
    finite_bf16_cpu,
    fp8_changed,
    hold,
    index_bytes,
    pack_bits,
    patch_bytes,
    patch_encoding,
    restore,
    unpack_bits,
)


def _bf16_bits(bits: list[int]) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.int16).view(torch.bfloat16)


def test_patch_bytes_by_hand():
    # n = 1000 entries: bitmask 125 B; indices 4 B each, so the index wins up to 31 changed entries; past
    # 937 of them (bf16) the whole tensor (2000 B) is smaller than a bitmask and the values
    assert patch_bytes(0, 1000, 2) == 0 and patch_encoding(0, 1000, 2) is None
    assert patch_bytes(31, 1000, 2) == 31 * 4 + 31 * 2 and patch_encoding(31, 1000, 2) == "index"
    assert patch_bytes(32, 1000, 2) == 125 + 32 * 2 and patch_encoding(32, 1000, 2) == "bitmask"
    assert patch_bytes(937, 1000, 2) == 125 + 937 * 2 and patch_encoding(937, 1000, 2) == "bitmask"
    assert patch_bytes(938, 1000, 2) == 2000 and patch_encoding(938, 1000, 2) == "dense"
    assert patch_bytes(1000, 1000, 4) == 4000  # fp32 values, all changed: the tensor whole
    assert patch_bytes(3, 17, 2) == 3 + 6  # ceil(17/8) = 3 B of bitmask < 12 B of indices
    assert patch_bytes(2, 1000, 1, scales=64) == 8 + 2 + 64  # FP8 codes plus the changed scales
    assert index_bytes(2**32) == 4 and index_bytes(2**32 + 1) == 8
    assert patch_bytes(1, 2**33, 2) == 8 + 2  # beyond 2**32 entries the index takes 8 bytes
    with pytest.raises(WeightgeoError):
        patch_bytes(11, 10, 2)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 5000), frac=st.floats(0, 1))
def test_patch_is_the_smaller_encoding(n, frac):
    c = round(frac * n)
    got = patch_bytes(c, n, 2)
    if c == 0:
        assert got == 0
    else:
        assert got == min(6 * c, math.ceil(n / 8) + 2 * c, 2 * n)
        assert got <= 2 * n  # never more than the tensor whole


def test_changed_count_backends_agree_on_the_edge_values(gen):
    # +0 / -0, subnormals, the smallest normals, large values, a NaN-free mixture
    a = _bf16_bits([0, -32768, 1, 2, 0x0080, 0x7F7F, 0x4000, 0x3F80, 0x3F81, 0x0001])
    b = _bf16_bits([-32768, 0, 1, 3, 0x0080, 0x7F7E, 0x4000, 0x3F80, 0x3F80, -32767])
    for eta in (1e-3, 0.0, 2**-9, 0.01, 0.5):
        want = int(torch.count_nonzero(~unchanged_mask_general(a, b, eta)))
        assert changed_count(a, b, eta, backend="torch") == want, eta
        if eta < 2**-9:
            assert changed_count(a, b, eta, backend="numpy") == want, eta
    assert changed_count(a, b, 1e-3) == 4  # ±0 equal; 2 vs 3, 7F7F vs 7F7E, 3F81 vs 3F80, 1 vs -1 subnormals


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), p=st.floats(0, 1), eta=st.sampled_from([0.0, 1e-3, 4e-3, 0.05]))
def test_changed_count_equals_the_reference_rule(seed, p, eta):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(257, generator=g).bfloat16()
    moved = torch.rand(257, generator=g) < p
    b = torch.where(moved, (a.float() * (1 + 0.01 * torch.randn(257, generator=g))).bfloat16(), a)
    want = int(torch.count_nonzero(~unchanged_mask_general(a, b, eta)))
    assert changed_count(a, b, eta) == want
    assert changed_count(a, b, eta, backend="torch") == want
    if eta < 2**-9:  # the bit path of the stream pass: one blocked pass against every reference
        counts, bits = changed_against(b, [a, b], check=[True, True, False])
        assert counts == [want, 0] and bits[0] == bf16_bits(b) and bits[1] == bf16_bits(a) and bits[2] is None


def test_changed_count_refuses_what_it_cannot_count():
    a = torch.zeros(3, dtype=torch.bfloat16)
    with pytest.raises(WeightgeoError, match="numpy backend"):
        changed_count(a, a, 0.01, backend="numpy")
    with pytest.raises(WeightgeoError, match="backend"):
        changed_count(a, a, 1e-3, backend="jax")
    with pytest.raises(WeightgeoError, match="shapes"):
        changed_count(a, a[:2], 1e-3)
    with pytest.raises(WeightgeoError, match="non-finite"):
        checked_bf16(torch.tensor([1.0, float("nan")]), "w at step 3")
    with pytest.raises(WeightgeoError, match="non-finite"):
        checked_bf16(torch.tensor([1e39]), "w")  # beyond the bf16 range: inf there
    assert bf16_bits(torch.tensor([1.0, float("nan")]).bfloat16()) == (False, False)
    assert bf16_bits(torch.tensor([-0.0, 3.0]).bfloat16()) == (True, True)


def test_fp8_changed_counts_the_stored_codes_and_reports_moved_scales():
    codes = torch.tensor([[1.0, 2.0, 4.0, 0.5], [3.0, 0.0, 1.0, 2.0]]).to(torch.float8_e4m3fn)
    same = Fp8Weight(codes, torch.ones(1, 2), (2, 2))
    assert fp8_changed(same, same, 1e-3) == (0, False)
    moved_codes = codes.float().clone()
    moved_codes[0, 0] = 1.5
    other = Fp8Weight(moved_codes.to(torch.float8_e4m3fn), torch.ones(1, 2), (2, 2))
    assert fp8_changed(same, other, 1e-3) == (1, False)
    rescaled = Fp8Weight(codes, torch.tensor([[1.0, 2.0]]), (2, 2))  # the right block doubles: 3 nonzero entries
    assert fp8_changed(same, rescaled, 1e-3) == (4, True)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 300), seed=st.integers(0, 2**31 - 1))
def test_bits_round_trip(n, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, generator=g) < 0.3
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n / 8)
    assert torch.equal(unpack_bits(packed, n), mask)
    assert np.array_equal(packed.numpy(), np.packbits(mask.numpy(), bitorder="little"))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), p=st.floats(0, 1))
def test_a_held_version_restores_bit_for_bit_and_is_never_larger_than_a_copy(seed, p):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(37, 5, generator=g).bfloat16()
    moved = torch.rand(37, 5, generator=g) < p
    cur = torch.where(moved, torch.randn(37, 5, generator=g).bfloat16(), ref)
    cur[0, 0] = -0.0 if ref[0, 0] == 0 else cur[0, 0]
    h = hold(ref, cur)
    back = restore(ref, h)
    assert torch.equal(back.view(torch.int16), cur.view(torch.int16))
    c = int(torch.count_nonzero(ref.view(torch.int16) != cur.view(torch.int16)))
    assert h.nbytes == min(2 * ref.numel(), math.ceil(ref.numel() / 8) + 2 * c)


def test_the_fast_finiteness_check_is_exact_on_every_bf16_pattern():
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    finite = torch.isfinite(every.float())
    assert finite_bf16_cpu(every[finite]) and finite_bf16_cpu(torch.empty(0, dtype=torch.bfloat16))
    for i in torch.nonzero(~finite).flatten().tolist():  # each NaN/Inf pattern alone among finite values
        assert not finite_bf16_cpu(torch.cat([every[finite][:3], every[i : i + 1]])), hex(i - 32768)


def test_the_blocked_pass_agrees_across_blocks_and_threads(gen):
    """Over 2**20 entries the pass runs in two threads and many blocks: ±0 pairs, changes and a NaN anywhere."""
    n = (1 << 20) + 12345
    base = torch.randn(n, generator=gen).bfloat16()
    base[::7919] = 0.0
    prev = base.clone()
    prev[5:n:13] += 1.0
    cur = prev.clone()
    cur[::7919] = -0.0  # +0 -> -0: unchanged under the rule
    cur[n - 50 :] += 1.0  # changes in the last block of the second half
    want = [int(torch.count_nonzero(~unchanged_mask_general(r, cur, 1e-3))) for r in (base, prev)]
    counts, bits = changed_against(cur, [base, prev], check=[True, True, True])
    assert counts == want and bits == [(True, True), (True, False), (True, False)]
    # what is known of each tensor's −0 spares the blocks' tests, not the ±0 pairs
    known = changed_against(cur, [base, prev], check=[False, False, False], negative_zero=[True, True, False])
    assert known == (want, [None, None, None])
    cur[n - 3] = float("nan")
    assert changed_against(cur, [base], check=[True, False])[1][0] == (False, True)
