"""Outputs a colleague can read: every file weightgeo writes (reports, CSV, figures, tracker states, cache
entries) gets the mode the umask gives a new file, as ``open()`` would, and is still written atomically."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from factories import tiny_llama_state, write_hf_checkpoint

import weightgeo
from weightgeo.cache import ResultCache
from weightgeo.outputs import atomic_write_text


@pytest.fixture
def umask():
    old = os.umask(0o022)
    os.umask(old)

    def set_(mask: int) -> None:
        os.umask(mask)

    yield set_
    os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_every_output_follows_the_umask(tmp_path, umask, mask):
    umask(mask)
    want = 0o666 & ~mask
    base = tiny_llama_state(num_layers=1, hidden=8, intermediate=16, vocab=12)
    g = torch.Generator().manual_seed(0)
    ft = {k: (v.float() + 1e-2 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base.items()}
    b, f = write_hf_checkpoint(tmp_path / "b", base), write_hf_checkpoint(tmp_path / "f", ft)
    cache = ResultCache(tmp_path / "cache")
    r = weightgeo.compare(b, f, k=2, rank=2, cache=cache)
    out = tmp_path / "out"
    r.to_json(out / "r.json")
    r.to_csv(out / "r.csv")
    atomic_write_text(out / "t.txt", "x")
    curve = weightgeo.rank_curve([base, ft, base], steps=[0, 1, 2], k=2, hill_k=2, cache=False)
    pytest.importorskip("matplotlib")
    from weightgeo.plot import plot_trajectories

    plot_trajectories({"run": curve}, out / "fig.png")
    tracker = weightgeo.Tracker(base, k=2, hill_k=2)
    tracker.update(ft, 1)
    tracker.save(out / "tracker.safetensors")
    files = [out / n for n in ("r.json", "r.csv", "t.txt", "fig.png", "tracker.safetensors")]
    files += sorted(cache.root.rglob("*.safetensors"))
    assert len(files) > 6
    from weightgeo.outputs import current_umask

    assert current_umask() == mask
    for p in files:
        assert _mode(p) == want, f"{p.name}: {oct(_mode(p))}, want {oct(want)} under umask {oct(mask)}"
    assert not list(out.glob(".*tmp*")) and not list(cache.root.rglob("*.tmp"))  # still atomic: no leftovers


def test_a_rewrite_keeps_atomicity_and_gets_the_mode(tmp_path, umask):
    umask(0o027)
    p = atomic_write_text(tmp_path / "r.json", "1")
    os.chmod(p, 0o600)
    atomic_write_text(p, "2")
    assert p.read_text() == "2" and _mode(p) == 0o640
