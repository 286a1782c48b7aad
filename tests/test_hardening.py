"""Issue-6 hardening: fuzzed shard indexes never open a path outside the checkpoint folder, and the same
inputs give bit-identical reports in two separate processes."""

from __future__ import annotations

import builtins
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from factories import tiny_llama_state, write_hf_checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import weightgeo
from weightgeo import WeightgeoError

_SHARD_NAMES = st.one_of(
    st.sampled_from(
        [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "../model-00001-of-00002.safetensors",
            "/etc/passwd",
            "..",
            ".",
            "",
            "sub/../../x.safetensors",
            "model.safetensors.index.json",
            "nul\x00.safetensors",
        ]
    ),
    st.text(max_size=40),
)
_VALUES = st.one_of(_SHARD_NAMES, st.integers(), st.none(), st.lists(st.text(max_size=5), max_size=2))


def _audit_opens(folder: Path):
    """Record every path os.open / builtins.open / io.open is asked for while the body runs."""
    seen: list[str] = []
    real_open, real_os_open, real_io_open = builtins.open, os.open, io.open

    def spy(path, *a, **k):
        if isinstance(path, (str, os.PathLike)):
            seen.append(os.path.realpath(path))
        return real_open(path, *a, **k)

    def spy_os(path, *a, **k):
        if isinstance(path, (str, os.PathLike)):
            seen.append(os.path.realpath(path))
        return real_os_open(path, *a, **k)

    class Ctx:
        def __enter__(self):
            builtins.open, os.open, io.open = spy, spy_os, spy
            return seen

        def __exit__(self, *exc):
            builtins.open, os.open, io.open = real_open, real_os_open, real_io_open

    return Ctx()


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    edits=st.dictionaries(
        st.sampled_from(["model.embed_tokens.weight", "lm_head.weight", "extra.weight", "model.norm.weight"]),
        _VALUES,
        max_size=3,
    ),
    drop_metadata=st.booleans(),
)
def test_fuzzed_index_gives_a_checkpoint_or_a_weightgeo_error_and_never_escapes(tmp_path_factory, edits, drop_metadata):
    folder = write_hf_checkpoint(
        tmp_path_factory.mktemp("ck") / "m", tiny_llama_state(num_layers=1, hidden=4, intermediate=8, vocab=6), shards=2
    )
    idx = folder / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    data["weight_map"].update(edits)
    if drop_metadata:
        data.pop("metadata")
    idx.write_text(json.dumps(data))
    root = os.path.realpath(folder)
    with _audit_opens(folder) as seen:
        try:
            ck = weightgeo.open_checkpoint(folder)
            for name in ck.names():
                ck.get(name)
        except WeightgeoError:
            pass
    outside = [p for p in seen if not (p == root or p.startswith(root + os.sep))]
    assert not outside, outside


def test_reports_are_bit_identical_across_two_processes(tmp_path):
    base = tiny_llama_state(num_layers=2, hidden=32, intermediate=64, vocab=40)
    g = torch.Generator().manual_seed(7)
    ft = {k: (v.float() + 1e-3 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base.items()}
    b, f = write_hf_checkpoint(tmp_path / "b", base), write_hf_checkpoint(tmp_path / "f", ft)
    script = textwrap.dedent(f"""
        import json, sys, weightgeo
        r = weightgeo.compare({str(b)!r}, {str(f)!r}, k=16, rank=8, progress=False, cache=sys.argv[1] == "on")
        data = json.loads(r.to_json())
        for key in ("seconds", "processes", "cache"):
            data["meta"].pop(key)
        sys.stdout.write(json.dumps(data, sort_keys=True))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WEIGHTGEO_CACHE": str(tmp_path / "cache")}
    # computed twice without the cache, then computed into the cache and served from it: all bit-identical
    outs = [
        subprocess.run(
            [sys.executable, "-c", script, cache], capture_output=True, text=True, env=env, check=True
        ).stdout
        for cache in ("off", "off", "on", "on")
    ]
    assert outs[0] == outs[1] == outs[2] == outs[3] and len(outs[0]) > 1000
