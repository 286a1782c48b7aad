"""One test per bad input: each raises WeightgeoError naming the file or tensor and the fix."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from factories import tiny_llama_state, write_hf_checkpoint, write_lora_adapter

from weightgeo.checkpoint import open_checkpoint
from weightgeo.errors import WeightgeoError


def write_raw(path, header: dict | bytes, data: bytes = b"", *, length: int | None = None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def raises(match, fn, *a, **k):
    with pytest.raises(WeightgeoError, match=match) as e:
        fn(*a, **k)
    return str(e.value)


def test_missing_path():
    msg = raises("no such file or directory", open_checkpoint, "/nonexistent/dir/x.safetensors")
    assert "/nonexistent/dir/x.safetensors" in msg and "hub id" in msg


def test_truncated_safetensors(tmp_path):
    d = write_hf_checkpoint(tmp_path, {"w": torch.ones(64, 64)})
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    msg = raises("outside the data section", open_checkpoint, f)
    assert str(f) in msg and "'w'" in msg and "re-download or re-save" in msg


def test_file_shorter_than_length_prefix(tmp_path):
    f = tmp_path / "tiny.safetensors"
    f.write_bytes(b"\x01\x02")
    assert str(f) in raises("truncated", open_checkpoint, f)


def test_corrupt_header_json(tmp_path):
    f = write_raw(tmp_path / "bad.safetensors", b'{"w": {"dtype": "F32", ', b"\x00" * 8)
    msg = raises("not valid UTF-8 JSON", open_checkpoint, f)
    assert str(f) in msg and "re-download" in msg


def test_header_not_an_object(tmp_path):
    f = write_raw(tmp_path / "list.safetensors", b"[1, 2]")
    assert str(f) in raises("JSON object", open_checkpoint, f)


def test_header_length_beyond_file(tmp_path):
    f = write_raw(tmp_path / "long.safetensors", {"w": entry()}, b"\x00" * 8, length=10_000)
    assert str(f) in raises("exceeds the file", open_checkpoint, f)


def test_offsets_out_of_range(tmp_path):
    f = write_raw(tmp_path / "oob.safetensors", {"w": entry(offsets=(4, 12))}, b"\x00" * 8)
    msg = raises("outside the data section", open_checkpoint, f)
    assert "'w'" in msg and str(f) in msg


def test_offsets_size_mismatch(tmp_path):
    f = write_raw(tmp_path / "size.safetensors", {"w": entry(shape=(3,), offsets=(0, 8))}, b"\x00" * 12)
    assert "'w'" in raises("needs 12", open_checkpoint, f)


def test_offsets_overlapping(tmp_path):
    f = write_raw(tmp_path / "ov.safetensors", {"a": entry(offsets=(0, 8)), "b": entry(offsets=(4, 12))}, b"\x00" * 12)
    msg = raises("overlap", open_checkpoint, f)
    assert "'a'" in msg and "'b'" in msg and str(f) in msg


def test_unknown_dtype(tmp_path):
    f = write_raw(tmp_path / "dt.safetensors", {"w": entry(dtype="F4")}, b"\x00" * 8)
    msg = raises("unknown or unsupported dtype 'F4'", open_checkpoint, f)
    assert "'w'" in msg and str(f) in msg


@pytest.mark.parametrize(
    "bad",
    [
        {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]},
        {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [1], "data_offsets": [0]},
        {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]},
        "not an object",
    ],
)
def test_malformed_entries(tmp_path, bad):
    f = write_raw(tmp_path / "m.safetensors", {"w": bad}, b"\x00" * 4)
    assert "'w'" in raises(str(f), open_checkpoint, f)


def test_bad_metadata(tmp_path):
    f = write_raw(tmp_path / "meta.safetensors", {"__metadata__": {"a": 1}, "w": entry()}, b"\x00" * 8)
    assert str(f) in raises("__metadata__", open_checkpoint, f)


def test_shard_listed_but_missing(tmp_path):
    d = write_hf_checkpoint(tmp_path, tiny_llama_state(), shards=3)
    (d / "model-00002-of-00003.safetensors").unlink()
    msg = raises("does not exist", open_checkpoint, d)
    assert "model-00002-of-00003.safetensors" in msg and "index.json" in msg


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/x.safetensors", ".."])
def test_index_pointing_outside_folder(tmp_path, shard):
    d = write_hf_checkpoint(tmp_path / "m", tiny_llama_state(), shards=2)
    write_hf_checkpoint(tmp_path, {"x": torch.zeros(1)})
    (tmp_path / "outside.safetensors").write_bytes((tmp_path / "model.safetensors").read_bytes())
    idx = d / "model.safetensors.index.json"
    obj = json.loads(idx.read_text())
    obj["weight_map"]["model.norm.weight"] = shard
    idx.write_text(json.dumps(obj))
    msg = raises("not a plain file name", open_checkpoint, d)
    assert repr(shard) in msg and str(idx) in msg


def test_symlink_escaping_folder(tmp_path):
    d = write_hf_checkpoint(tmp_path / "m", tiny_llama_state(), shards=2)
    outside = tmp_path / "elsewhere.safetensors"
    shard = d / "model-00002-of-00002.safetensors"
    shard.rename(outside)
    os.symlink(outside, shard)
    msg = raises("symlink", open_checkpoint, d)
    assert "model-00002-of-00002.safetensors" in msg


def test_index_tensor_not_in_its_shard(tmp_path):
    d = write_hf_checkpoint(tmp_path, tiny_llama_state(), shards=2)
    idx = d / "model.safetensors.index.json"
    obj = json.loads(idx.read_text())
    obj["weight_map"]["model.ghost.weight"] = "model-00001-of-00002.safetensors"
    idx.write_text(json.dumps(obj))
    msg = raises("does not\\s+hold", open_checkpoint, d)
    assert "'model.ghost.weight'" in msg and "model-00001-of-00002.safetensors" in msg


def test_corrupt_index_json(tmp_path):
    d = write_hf_checkpoint(tmp_path, tiny_llama_state(), shards=2)
    (d / "model.safetensors.index.json").write_text("{ nope")
    assert "model.safetensors.index.json" in raises("not valid UTF-8 JSON", open_checkpoint, d)


def test_dir_with_no_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "checkpoint-10").mkdir()
    (tmp_path / "README.md").write_text("hi")
    msg = raises("no weights found", open_checkpoint, tmp_path)
    assert "README.md" in msg and "checkpoint-10/" in msg and str(tmp_path) in msg


def test_unknown_file_type(tmp_path):
    f = tmp_path / "weights.npz"
    f.write_bytes(b"x")
    assert str(f) in raises("unknown checkpoint file type", open_checkpoint, f)


def test_adapter_without_base(tmp_path):
    ad = write_lora_adapter(tmp_path / "ad", tiny_llama_state())
    msg = raises("pass the base model", open_checkpoint, ad)
    assert str(ad) in msg and "base=" in msg


def test_adapter_matching_nothing(tmp_path):
    ad = write_lora_adapter(tmp_path / "ad", tiny_llama_state())
    other = {"transformer.h.0.attn.c_attn.weight": torch.zeros(48, 16)}
    msg = raises("match no base tensor", open_checkpoint, ad, base=other)
    assert "layers.0.self_attn.q_proj" in msg and "transformer.h.0.attn.c_attn.weight" in msg


def test_adapter_shape_mismatch(tmp_path):
    ad = write_lora_adapter(tmp_path / "ad", tiny_llama_state(hidden=16))
    msg = raises("shape", open_checkpoint, ad, base=tiny_llama_state(hidden=8, intermediate=8))
    assert "q_proj" in msg


def test_dora_refused(tmp_path):
    ad = write_lora_adapter(tmp_path / "ad", tiny_llama_state())
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    assert "adapter_config.json" in raises("DoRA not supported", open_checkpoint, ad, base=tiny_llama_state())


def test_adapter_rank_disagrees_with_config(tmp_path):
    ad = write_lora_adapter(tmp_path / "ad", tiny_llama_state(), r=4)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["r"] = 8
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    assert "rank 4" in raises("r=8", open_checkpoint, ad, base=tiny_llama_state())


def test_pickle_needing_code_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    f = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(1), "evil": Evil()}, f)
    msg = raises("refused: weights_only", open_checkpoint, tmp_path)
    assert str(f) in msg and "safetensors" in msg


def test_corrupt_bin(tmp_path):
    f = tmp_path / "pytorch_model.bin"
    f.write_bytes(b"PK\x03\x04garbage")
    assert str(f) in raises("re-download or re-save", open_checkpoint, f)


def test_bin_non_tensor_entries(tmp_path):
    f = tmp_path / "x.pt"
    torch.save({"w": torch.zeros(1), "step": 3}, f)
    assert "'step'" in raises("not named tensors", open_checkpoint, f)


def test_state_dict_with_non_tensor():
    assert "'w'" in raises("not \\(str name, Tensor\\)", open_checkpoint, {"w": [1, 2]})


def test_unsupported_source_type():
    raises("cannot open a int", open_checkpoint, 3)


def test_missing_tensor_name(tmp_path):
    ckpt = open_checkpoint({"w": torch.zeros(1)})
    assert "'nope'" in raises("no tensor named", ckpt.get, "nope")


def test_file_truncated_after_open(tmp_path):
    d = write_hf_checkpoint(tmp_path, {"w": torch.ones(64, 64)})
    ckpt = open_checkpoint(d)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    msg = raises("truncated", ckpt.get, "w")
    assert str(f) in msg and "'w'" in msg


def test_invalid_config_json(tmp_path):
    d = write_hf_checkpoint(tmp_path, {"w": torch.ones(2)})
    (d / "config.json").write_text("{")
    assert "config.json" in raises("not valid UTF-8 JSON", open_checkpoint, d)


def test_duplicate_tensor_across_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "a.safetensors"))
    save_file({"w": torch.zeros(1)}, str(tmp_path / "b.safetensors"))
    assert "'w'" in raises("stored twice", open_checkpoint, tmp_path)
