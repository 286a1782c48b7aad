"""Round trips: every source kind returns exactly the tensors written (bitwise, bf16 included)."""

from __future__ import annotations

import json

import pytest
import torch
from factories import tiny_llama_state, write_hf_checkpoint

from weightgeo.checkpoint import Checkpoint, TensorInfo, open_checkpoint
from weightgeo.checkpoint.safetensors import SafetensorsCheckpoint
from weightgeo.checkpoint.state_dict import StateDictCheckpoint
from weightgeo.checkpoint.torch_bin import TorchBinCheckpoint


def assert_same(ckpt: Checkpoint, tensors: dict[str, torch.Tensor]) -> None:
    assert ckpt.names() == sorted(tensors)
    for name, t in tensors.items():
        got = ckpt.get(name)
        assert got.dtype == t.dtype and got.shape == t.shape, name
        assert torch.equal(got.view(torch.uint8) if got.dtype == torch.bool else got, t), name
        assert ckpt.info(name) == TensorInfo(name, tuple(t.shape), t.dtype)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("shards", [1, 3])
def test_hf_folder_round_trip(tmp_path, fmt, shards):
    sd = tiny_llama_state()
    d = write_hf_checkpoint(tmp_path / "m", sd, shards=shards, fmt=fmt, config={"tie_word_embeddings": False})
    with open_checkpoint(d) as ckpt:
        assert isinstance(ckpt, SafetensorsCheckpoint if fmt == "safetensors" else TorchBinCheckpoint)
        assert ckpt.config == {"tie_word_embeddings": False}
        assert_same(ckpt, sd)


def test_sharded_index_written_and_read(tmp_path):
    sd = tiny_llama_state()
    d = write_hf_checkpoint(tmp_path, sd, shards=4)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in sd.values())
    assert len(set(index["weight_map"].values())) == 4
    ckpt = open_checkpoint(d / "model.safetensors.index.json")
    assert_same(ckpt, sd)


def test_many_dtypes_bitwise(tmp_path, gen):
    sd = {
        "bf16": torch.randn(5, 3, generator=gen).bfloat16(),
        "f16": torch.randn(4, generator=gen).half(),
        "f32": torch.randn(2, 2, 2, generator=gen),
        "f64": torch.randn(3, generator=gen).double(),
        "i64": torch.arange(-3, 3),
        "i8": torch.arange(-4, 4, dtype=torch.int8),
        "u8": torch.arange(7, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "f8": torch.randn(6, generator=gen).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }
    sd["bf16_special"] = torch.tensor([float("nan"), float("inf"), -0.0, 1e-40], dtype=torch.bfloat16)
    ckpt = open_checkpoint(write_hf_checkpoint(tmp_path, sd) / "model.safetensors")
    for name, t in sd.items():
        got = ckpt.get(name)
        assert got.dtype == t.dtype and got.shape == t.shape, name
        # compare raw bytes: bitwise, NaN payloads and -0.0 included
        assert got.reshape(-1).view(torch.uint8).tolist() == t.reshape(-1).view(torch.uint8).tolist(), name


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_get_rows_equals_slicing(tmp_path, fmt):
    sd = tiny_llama_state(vocab=37)
    ckpt = open_checkpoint(write_hf_checkpoint(tmp_path, sd, fmt=fmt, shards=2))
    w = sd["model.embed_tokens.weight"]
    for start, stop in [(0, 37), (5, 9), (30, 100), (10, 10), (12, 3), (-5, -1), (0, 1)]:
        got = ckpt.get_rows("model.embed_tokens.weight", start, stop)
        assert torch.equal(got, w[start:stop]), (start, stop)
    norm = sd["model.norm.weight"]
    assert torch.equal(ckpt.get_rows("model.norm.weight", 3, 7), norm[3:7])


def test_safetensors_rows_read_only_their_bytes(tmp_path, monkeypatch):
    sd = {"w": torch.arange(1000 * 8, dtype=torch.float32).reshape(1000, 8)}
    ckpt = open_checkpoint(write_hf_checkpoint(tmp_path, sd))
    import weightgeo.checkpoint.safetensors as st

    sizes = []
    real = st._read_bytes
    monkeypatch.setattr(st, "_read_bytes", lambda p, s, n, name: sizes.append(n) or real(p, s, n, name))
    assert torch.equal(ckpt.get_rows("w", 100, 110), sd["w"][100:110])
    assert sizes == [10 * 8 * 4]


def test_state_dict_and_module(gen):
    sd = tiny_llama_state()
    ckpt = open_checkpoint(sd)
    assert isinstance(ckpt, StateDictCheckpoint) and ckpt.source == "state_dict"
    assert_same(ckpt, sd)
    with torch.random.fork_rng(devices=[]):  # nn.Linear initialises from the global RNG: leave it untouched
        lin = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    with torch.no_grad():
        lin[0].weight.copy_(torch.randn(4, 3, generator=gen))
    m = open_checkpoint(lin)
    assert m.source == "Sequential"
    assert "1.running_mean" in m.names()  # buffers too
    w = m.get("0.weight")
    assert not w.requires_grad and torch.equal(w, lin[0].weight.detach())
    assert open_checkpoint(m) is m


def test_single_safetensors_file_gets_folder_config(tmp_path):
    sd = tiny_llama_state(num_layers=1)
    d = write_hf_checkpoint(tmp_path, sd, config={"tie_word_embeddings": True, "hidden_size": 16})
    ckpt = open_checkpoint(str(d / "model.safetensors"))
    assert ckpt.config["hidden_size"] == 16
    assert "params=" in repr(ckpt)


def test_bin_file_and_pt_file(tmp_path):
    sd = tiny_llama_state(num_layers=1)
    torch.save(sd, tmp_path / "weights.pt")
    assert_same(open_checkpoint(tmp_path / "weights.pt"), sd)
    torch.save({"state_dict": sd, "step": 3}, tmp_path / "nested.pt")
    assert_same(open_checkpoint(tmp_path / "nested.pt"), sd)


def test_trainer_checkpoint_folder(tmp_path):
    sd = tiny_llama_state(num_layers=1)
    run = tmp_path / "run"
    d = write_hf_checkpoint(run / "checkpoint-100", sd)
    (d / "trainer_state.json").write_text("{}")
    torch.save({"lr": 1.0}, d / "training_args.bin")
    torch.save({"x": torch.zeros(1)}, d / "optimizer.pt")
    assert_same(open_checkpoint(d), sd)


def test_nonstandard_safetensors_names_in_folder(tmp_path):
    sd = tiny_llama_state(num_layers=1)
    from safetensors.torch import save_file

    save_file({k: v for k, v in sd.items() if "layers" in k}, str(tmp_path / "a.safetensors"))
    save_file({k: v for k, v in sd.items() if "layers" not in k}, str(tmp_path / "b.safetensors"))
    assert_same(open_checkpoint(tmp_path), sd)


def test_safetensors_preferred_over_bin(tmp_path):
    sd = tiny_llama_state(num_layers=1)
    write_hf_checkpoint(tmp_path, sd)
    torch.save({"other": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    assert isinstance(open_checkpoint(tmp_path), SafetensorsCheckpoint)


def test_torch_bin_keeps_one_shard_open(tmp_path):
    sd = tiny_llama_state()
    ckpt = open_checkpoint(write_hf_checkpoint(tmp_path, sd, shards=3, fmt="bin"))
    loads = []
    import weightgeo.checkpoint.torch_bin as tb

    real = tb.load_state_file
    tb_load = lambda p: loads.append(p.name) or real(p)
    try:
        tb.load_state_file = tb_load
        for name in ckpt.names():
            ckpt.get(name)
    finally:
        tb.load_state_file = real
    assert len(loads) == len(set(loads)) <= 3  # names sorted => shards visited once each at most
    assert ckpt._open is not None and isinstance(ckpt._open[1], dict)
    ckpt.close()
    assert ckpt._open is None
