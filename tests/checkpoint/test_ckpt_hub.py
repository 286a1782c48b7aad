"""Hub resolution offline, against a hand-built huggingface_hub cache (no network in tests)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from factories import tiny_llama_state, write_hf_checkpoint

from weightgeo.checkpoint import open_checkpoint, resolve_hub
from weightgeo.checkpoint.hub import hub_offline, is_hub_id
from weightgeo.errors import WeightgeoError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def build_cache(cache: Path, repo_id: str, model_dir: Path, *, ref: str = "main", commit: str = COMMIT) -> Path:
    """Lay ``model_dir``'s files out as huggingface_hub does: blobs + snapshot symlinks + refs/<ref>."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, repo / "blobs" / digest)
        os.symlink(Path("..", "..", "blobs", digest), snap / f.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_offline_cached_sharded(tmp_path, offline, monkeypatch):
    sd = tiny_llama_state()
    src = write_hf_checkpoint(tmp_path / "src", sd, shards=2, config={"tie_word_embeddings": False})
    cache = tmp_path / "hub"
    snap = build_cache(cache, "org/tiny", src)
    assert resolve_hub("org/tiny", cache_dir=cache) == snap
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    ckpt = open_checkpoint("org/tiny")
    assert ckpt.source == "org/tiny" and ckpt.config == {"tie_word_embeddings": False}
    assert ckpt.names() == sorted(sd)
    for n, t in sd.items():
        assert torch.equal(ckpt.get(n), t)


def test_offline_cached_revision(tmp_path, offline, monkeypatch):
    sd = tiny_llama_state(num_layers=1)
    cache = tmp_path / "hub"
    build_cache(cache, "org/tiny", write_hf_checkpoint(tmp_path / "src", sd), ref="v1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert open_checkpoint("org/tiny@v1").names() == sorted(sd)
    assert open_checkpoint("org/tiny", revision="v1").names() == sorted(sd)
    with pytest.raises(WeightgeoError, match="conflicts"):
        open_checkpoint("org/tiny@v1", revision="v2")


def test_offline_uncached(tmp_path, offline, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(WeightgeoError) as e:
        open_checkpoint("someorg/not-cached")
    msg = str(e.value)
    assert "'someorg/not-cached'" in msg and "HF_HUB_OFFLINE" in msg
    assert "hf download someorg/not-cached" in msg and "local" in msg and "huggingface-cli" not in msg


def test_offline_uncached_revision(tmp_path, offline):
    cache = tmp_path / "hub"
    build_cache(cache, "org/tiny", write_hf_checkpoint(tmp_path / "src", {"w": torch.zeros(1)}))
    with pytest.raises(WeightgeoError, match="revision 'nope'"):
        resolve_hub("org/tiny", revision="nope", cache_dir=cache)


def test_cached_index_with_unsafe_shard(tmp_path, offline):
    src = write_hf_checkpoint(tmp_path / "src", tiny_llama_state(), shards=2)
    idx = src / "model.safetensors.index.json"
    obj = json.loads(idx.read_text())
    obj["weight_map"]["model.norm.weight"] = "../../../x.safetensors"
    idx.write_text(json.dumps(obj))
    cache = tmp_path / "hub"
    build_cache(cache, "org/tiny", src)
    with pytest.raises(WeightgeoError, match="not a plain file name"):
        resolve_hub("org/tiny", cache_dir=cache)


def test_bad_repo_ids():
    for bad in ["org", "a/b/c", "../x", "org/name@"]:
        assert not is_hub_id(bad)
        with pytest.raises(WeightgeoError):
            resolve_hub(bad)


def test_offline_flag_read_at_call_time(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not hub_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_offline()


def test_online_validates_index_before_shards(tmp_path, monkeypatch):
    """Online path (network mocked): the index is fetched and rejected before snapshot_download runs."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    bad = tmp_path / "model.safetensors.index.json"
    bad.write_text(json.dumps({"weight_map": {"w": "/abs/evil.safetensors"}}))
    cfg = tmp_path / "config.json"
    cfg.write_text("{}")
    calls = []
    monkeypatch.setattr(
        huggingface_hub, "hf_hub_download", lambda repo, name, **k: calls.append(name) or str(tmp_path / name)
    )
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: calls.append("snapshot") or "")
    with pytest.raises(WeightgeoError, match="not a plain file name"):
        resolve_hub("org/tiny")
    assert calls == ["config.json", "model.safetensors.index.json"]
