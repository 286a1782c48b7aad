"""Fuzzing the safetensors reader: any bytes give a valid checkpoint or WeightgeoError, never another error."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from weightgeo.checkpoint.safetensors import SafetensorsCheckpoint
from weightgeo.errors import WeightgeoError

_VALID = save(
    {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.ones(4, dtype=torch.bfloat16),
        "c": torch.tensor([1, 2], dtype=torch.int64),
    },
    metadata={"format": "pt"},
)
_DIR = Path(tempfile.mkdtemp(prefix="wg-fuzz-"))


def _check(blob: bytes) -> None:
    f = _DIR / "f.safetensors"
    f.write_bytes(blob)
    try:
        ckpt = SafetensorsCheckpoint([f])
    except WeightgeoError as e:
        assert str(f) in str(e)
        return
    for name in ckpt.names():  # a header that validates must read back without surprises
        t = ckpt.get(name)
        assert tuple(t.shape) == ckpt.info(name).shape
        if t.ndim:
            ckpt.get_rows(name, 0, 1)


_settings = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@_settings
@given(st.binary(max_size=200))
def test_random_bytes(blob):
    _check(blob)


@_settings
@given(st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)), min_size=1, max_size=6))
def test_mutated_valid_file(edits):
    blob = bytearray(_VALID)
    for pos, val in edits:
        blob[pos] = val
    _check(bytes(blob))


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 40) | st.sampled_from(["F32", "BF16", "I64", "X"]),
    lambda c: (
        st.lists(c, max_size=3)
        | st.dictionaries(st.sampled_from(["dtype", "shape", "data_offsets", "__metadata__", "a"]), c, max_size=4)
    ),
    max_leaves=12,
)


@_settings
@given(st.dictionaries(st.sampled_from(["a", "b", "__metadata__"]), _json, max_size=3), st.integers(0, 64))
def test_mutated_headers(header, n_data):
    raw = json.dumps(header).encode()
    _check(struct.pack("<Q", len(raw)) + raw + bytes(n_data))


@_settings
@given(st.integers(0, len(_VALID)))
def test_truncations(cut):
    _check(_VALID[:cut])
