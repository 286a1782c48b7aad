"""torch.distributed.checkpoint folders: listing, lazy reads, skipped entries, validation, Megatron stubs."""

from __future__ import annotations

import pickle
import sys
import types

import pytest
import torch
from native_factories import write_dcp

import weightgeo
from weightgeo import WeightgeoError
from weightgeo.checkpoint import DcpCheckpoint, open_checkpoint


@pytest.fixture
def tensors(gen):
    return {
        "model.embed_tokens.weight": torch.randn(37, 8, generator=gen).bfloat16(),
        "model.layers.0.mlp.up_proj.weight": torch.randn(12, 8, generator=gen),
        "model.norm.weight": torch.randn(8, generator=gen).bfloat16(),
        "step_count": torch.tensor(5),
    }


def test_lists_from_metadata_and_reads_each_tensor_exactly(tmp_path, tensors):
    d = write_dcp(tmp_path / "ck", tensors)
    ck = open_checkpoint(d)
    assert isinstance(ck, DcpCheckpoint)
    assert ck.names() == sorted(tensors)
    for name, t in tensors.items():
        assert ck.info(name).shape == tuple(t.shape) and ck.info(name).dtype == t.dtype
        assert torch.equal(ck.get(name), t), name
    w = tensors["model.embed_tokens.weight"]
    for start, stop in [(0, 37), (5, 9), (30, 100), (10, 10), (-5, -1)]:
        assert torch.equal(ck.get_rows("model.embed_tokens.weight", start, stop), w[start:stop]), (start, stop)


def test_training_state_is_skipped_and_listed(tmp_path, tensors):
    ck = open_checkpoint(write_dcp(tmp_path / "ck", tensors))
    reasons = {s["name"]: s["reason"] for s in ck.skipped}
    assert reasons["optimizer.state.model.embed_tokens.weight.exp_avg"] == "optimizer state"
    assert reasons["optimizer.param_groups.0.lr"] == "optimizer state"
    assert "TransformerEngine _extra_state" in reasons["decoder.layers.self_attention.linear_qkv._extra_state.fp8_meta"]
    assert reasons["train_state.step"] == "training state (train_state)"
    assert not set(reasons) & set(ck.names())


def test_compare_over_dcp_equals_compare_over_safetensors(tmp_path, tensors, gen):
    from factories import write_hf_checkpoint

    ft = {
        k: (v.float() + 1e-2 * torch.randn(v.shape, generator=gen)).to(v.dtype) if v.is_floating_point() else v
        for k, v in tensors.items()
    }
    native = weightgeo.compare(
        write_dcp(tmp_path / "b", tensors), write_dcp(tmp_path / "f", ft), k=4, rank=2, progress=False
    )
    hf = weightgeo.compare(
        write_hf_checkpoint(tmp_path / "hb", tensors),
        write_hf_checkpoint(tmp_path / "hf", ft),
        k=4,
        rank=2,
        progress=False,
    )
    assert [r["name"] for r in native.rows] == [r["name"] for r in hf.rows]
    for x, y in zip(native.rows, hf.rows):
        assert x["update_sparsity"] == y["update_sparsity"]
        if "principal_overlap" in y:
            assert x["principal_overlap"] == pytest.approx(y["principal_overlap"], rel=1e-6)


def test_regions_of_a_stacked_tensor(tmp_path, gen):
    stacked = torch.randn(3, 5, 4, generator=gen)
    ck = DcpCheckpoint(write_dcp(tmp_path / "ck", {"layers.w": stacked}, extra=False))
    assert torch.equal(ck.get_region("layers.w", (1,), (2,)), stacked[1:2])
    assert torch.equal(ck.get_region("layers.w", (2, 1), (3, 4)), stacked[2:3, 1:4])
    assert torch.equal(ck.get_region("layers.w", (0, 0, 3), (3, 5, 4)), stacked[:, :, 3:])
    assert ck.get_region("layers.w", (1, 2), (1, 2)).shape == (0, 0, 4)
    with pytest.raises(WeightgeoError, match="lies outside"):
        ck.get_region("layers.w", (2,), (4,))


def _distcp(d):
    return next(p for p in d.iterdir() if p.suffix == ".distcp")


def test_truncated_distcp_is_refused_before_any_read(tmp_path, tensors):
    d = write_dcp(tmp_path / "ck", tensors)
    f = _distcp(d)
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(WeightgeoError, match="truncated") as e:
        open_checkpoint(d)
    assert str(f) in str(e.value) and "copy or save it again" in str(e.value)


def test_missing_distcp_is_named(tmp_path, tensors):
    d = write_dcp(tmp_path / "ck", tensors)
    f = _distcp(d)
    f.unlink()
    with pytest.raises(WeightgeoError, match="missing") as e:
        open_checkpoint(d)
    assert f.name in str(e.value)


@pytest.mark.parametrize("damage", ["cut", "garbage"])
def test_corrupt_metadata_is_an_error_naming_it(tmp_path, tensors, damage):
    d = write_dcp(tmp_path / "ck", tensors)
    meta = d / ".metadata"
    blob = meta.read_bytes()
    meta.write_bytes(blob[: len(blob) // 2] if damage == "cut" else b"\x80\x04not a pickle at all")
    with pytest.raises(WeightgeoError, match="corrupt checkpoint metadata") as e:
        open_checkpoint(d)
    assert str(meta) in str(e.value)


def test_corrupt_chunk_bytes_are_an_error_at_read(tmp_path, tensors):
    d = write_dcp(tmp_path / "ck", tensors)
    ck = open_checkpoint(d)
    name = "model.layers.0.mlp.up_proj.weight"
    at = next(v for k, v in ck.metadata.storage_data.items() if k.fqn == name)
    f = d / at.relative_path
    blob = bytearray(f.read_bytes())
    blob[at.offset : at.offset + 64] = b"\0" * 64  # the stored blob's zip header
    f.write_bytes(bytes(blob))
    with pytest.raises(WeightgeoError, match="cannot be read") as e:
        ck.get(name)
    assert repr(name) in str(e.value)


def test_metadata_pickling_other_code_is_refused(tmp_path, tensors):
    d = write_dcp(tmp_path / "ck", tensors)
    (d / ".metadata").write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    with pytest.raises(WeightgeoError, match="refused to unpickle os.system"):
        open_checkpoint(d)


def test_megatron_classes_in_metadata_are_stubbed_without_megatron(tmp_path, tensors, monkeypatch):
    # Megatron's planner attaches its own objects to the metadata; build such a pickle, then forget the class
    d = write_dcp(tmp_path / "ck", tensors)
    parts = "megatron.core.dist_checkpointing.strategies.torch".split(".")
    for i in range(1, len(parts) + 1):
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    mod = sys.modules[".".join(parts)]

    class MCoreMetadata:
        def __init__(self, shapes):
            self.shapes = shapes

    MCoreMetadata.__module__, MCoreMetadata.__qualname__ = mod.__name__, "MCoreMetadata"
    mod.MCoreMetadata = MCoreMetadata
    meta = pickle.loads((d / ".metadata").read_bytes())
    meta.mcore_data = MCoreMetadata({"decoder": (2, 3)})
    (d / ".metadata").write_bytes(pickle.dumps(meta))
    for i in range(len(parts), 0, -1):
        monkeypatch.delitem(sys.modules, ".".join(parts[:i]))
    assert "megatron" not in {m.split(".")[0] for m in sys.modules}
    ck = open_checkpoint(d)
    assert type(ck.metadata.mcore_data).__module__ == mod.__name__ and ck.metadata.mcore_data.shapes == {
        "decoder": (2, 3)
    }
    assert torch.equal(ck.get("model.norm.weight"), tensors["model.norm.weight"])
