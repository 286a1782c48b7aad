"""verl FSDP shards and multi-chunk DCP folders written by a real FSDP2 run (2 gloo CPU processes)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from factories import write_hf_checkpoint
from native_factories import assert_same_rows, torchrun

import weightgeo
from weightgeo import WeightgeoError
from weightgeo.checkpoint import DcpCheckpoint, VerlFsdpCheckpoint, open_checkpoint
from weightgeo.checkpoint.dcp import DcpCheckpoint as _Dcp

TESTS = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")

# What verl's FSDP2 checkpoint manager does on every rank, on a tiny transformers model: fully_shard each
# decoder layer and the root, one optimizer step, then torch.save(model.state_dict()) per rank plus
# fsdp_config.json and huggingface/config.json. The same run also writes the sharded state dict with
# torch.distributed.checkpoint (HF names, as accelerate's FSDP does) and, in Megatron's layout, with every
# tensor sharded on dim 0 (one stored chunk per layer), and rank 0 keeps the full fp32 state dict
# gathered by torch's get_model_state_dict as the reference.
_SCRIPT = """
import json, os, sys, warnings
sys.path.insert(0, {tests!r})
warnings.simplefilter("ignore")
import torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
from torch.distributed.fsdp import fully_shard
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import distribute_tensor, Shard
from torch.distributed.checkpoint.state_dict import get_model_state_dict, StateDictOptions
from native_factories import tiny_hf, to_megatron
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
out = {out!r}
if rank == 0:
    tiny_hf(f"{{out}}/hf_base", "llama", dtype=torch.float32)
dist.barrier()
cfg = json.load(open(f"{{out}}/hf_base/config.json"))
import transformers
model = transformers.LlamaForCausalLM.from_pretrained(f"{{out}}/hf_base", torch_dtype=torch.float32)
mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))
for layer in model.model.layers:
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
ids = torch.arange(12).reshape(2, 6) % cfg["vocab_size"]
model(input_ids=ids, labels=ids).loss.backward()
opt.step()
actor = f"{{out}}/global_step_1/actor"
os.makedirs(f"{{actor}}/huggingface", exist_ok=True)
sd = model.state_dict()
torch.save(sd, f"{{actor}}/model_world_size_{{world}}_rank_{{rank}}.pt")
dcp.save(sd, checkpoint_id=f"{{out}}/fsdp_dcp")
full = dict(get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)))
meg = {{k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in to_megatron(full, cfg, pad_to=128).items()}}
dcp.save(meg, checkpoint_id=f"{{out}}/iter_0000001")
# inside this torchrun job each rank reads a different DCP tensor: reads must not coordinate across ranks
from weightgeo.checkpoint import DcpCheckpoint
ck = DcpCheckpoint(f"{{out}}/fsdp_dcp")
torch.save(ck.get(ck.names()[rank]), f"{{out}}/read_by_rank_{{rank}}.pt")
if rank == 0:
    torch.save(full, f"{{out}}/full.pt")
    json.dump({{"FSDP_version": 2, "world_size": world}}, open(f"{{actor}}/fsdp_config.json", "w"))
    json.dump(cfg, open(f"{{actor}}/huggingface/config.json", "w"))
dist.barrier()
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp_run")
    script = out / "run.py"
    script.write_text(textwrap.dedent(_SCRIPT.format(tests=str(TESTS), out=str(out))))
    torchrun(script)
    return out


def test_verl_shards_reassemble_the_unsharded_fp32_weights_exactly(run):
    full = torch.load(run / "full.pt", weights_only=True)
    ck = open_checkpoint(run / "global_step_1")  # the step folder opens its actor
    assert isinstance(ck, VerlFsdpCheckpoint) and ck.world_size == 2
    assert ck.config["model_type"] == "llama"  # from actor/huggingface/config.json
    assert ck.names() == sorted(full)
    for name, t in full.items():
        got = ck.get(name)
        assert got.dtype == torch.float32 and torch.equal(got, t), name
    emb = full["model.embed_tokens.weight"]  # 97 rows on 2 ranks: 49 + 48, uneven shards
    assert ck.placements("model.embed_tokens.weight").sizes == (49, 48)
    for start, stop in [(0, 97), (40, 60), (49, 52), (90, 200)]:
        assert torch.equal(ck.get_rows("model.embed_tokens.weight", start, stop), emb[start:stop])


def test_verl_actor_compares_like_its_hf_twin(run, tmp_path):
    full = torch.load(run / "full.pt", weights_only=True)
    cfg = json.loads((run / "global_step_1/actor/huggingface/config.json").read_text())
    twin = write_hf_checkpoint(tmp_path / "twin", full, config=cfg)
    base = run / "hf_base"
    opts = dict(k=4, rank=2, progress=False)
    assert_same_rows(
        weightgeo.compare(base, run / "global_step_1" / "actor", **opts), weightgeo.compare(base, twin, **opts)
    )


def test_multi_chunk_dcp_reads_only_the_chunks_it_needs(run, monkeypatch):
    full = torch.load(run / "full.pt", weights_only=True)
    ck = open_checkpoint(run / "fsdp_dcp")
    assert isinstance(ck, DcpCheckpoint)
    for rank in (0, 1):  # read in the torchrun job, a different tensor on each rank
        assert torch.equal(torch.load(run / f"read_by_rank_{rank}.pt", weights_only=True), full[ck.names()[rank]])
    name = "model.embed_tokens.weight"
    assert [c[1][0] for c in ck.stored_chunks(name)] == [49, 48]
    boxes = []
    real = _Dcp._read_box
    monkeypatch.setattr(_Dcp, "_read_box", lambda self, n, b, e: boxes.append((n, b, e)) or real(self, n, b, e))
    assert torch.equal(ck.get_rows(name, 50, 60), full[name][50:60])
    assert torch.equal(ck.get_rows(name, 60, 97), full[name][60:97])
    assert boxes == [(name, (49, 0), (97, 32))]  # rank 1's chunk only, decoded once for both reads
    for n, t in full.items():
        assert torch.equal(ck.get(n), t), n


def test_megatron_layer_read_touches_one_layer_chunk(run, monkeypatch):
    full = torch.load(run / "full.pt", weights_only=True)
    ck = open_checkpoint(run / "iter_0000001", config=run / "global_step_1/actor/huggingface")
    for n, t in full.items():
        assert torch.equal(ck.get(n), t), n
    boxes = []
    real = _Dcp._read_box
    monkeypatch.setattr(_Dcp, "_read_box", lambda self, n, b, e: boxes.append((n, b, e)) or real(self, n, b, e))
    ck.get("model.layers.1.self_attn.q_proj.weight")
    ck.get("model.layers.1.mlp.up_proj.weight")
    ck.get("model.layers.1.mlp.gate_proj.weight")
    qkv, fc1 = "decoder.layers.self_attention.linear_qkv.weight", "decoder.layers.mlp.linear_fc1.weight"
    # layer 1's stored chunk of each, never the stacked tensor; the fc1 chunk is decoded once for both halves
    assert boxes == [(qkv, (1, 0, 0), (2, 64, 32)), (fc1, (1, 0, 0), (2, 96, 32))]


# --- bad inputs: everything is checked before a tensor is read ------------------------------------------
@pytest.fixture
def actor(run, tmp_path) -> Path:
    import shutil

    d = tmp_path / "actor"
    shutil.copytree(run / "global_step_1" / "actor", d)
    return d


def test_missing_rank_file(actor):
    (actor / "model_world_size_2_rank_1.pt").unlink()
    with pytest.raises(WeightgeoError, match=r"missing \['model_world_size_2_rank_1.pt'\]"):
        VerlFsdpCheckpoint(actor)


def test_mismatched_world_size(actor):
    (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": 4}))
    with pytest.raises(WeightgeoError, match="world_size 4 but the rank files say world size 2"):
        open_checkpoint(actor)
    (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": 2}))
    (actor / "model_world_size_2_rank_1.pt").rename(actor / "model_world_size_3_rank_1.pt")
    with pytest.raises(WeightgeoError, match="several world sizes"):
        open_checkpoint(actor)


def _rewrite_placements(path: Path, placement) -> None:
    import torch.distributed.tensor
    from torch.distributed.tensor import DTensor

    sd = torch.load(path, weights_only=True)
    name = "model.norm.weight"
    v = sd[name]
    sd[name] = DTensor.from_local(
        v.to_local(), v.device_mesh, [placement], run_check=False, shape=v.shape, stride=v.stride()
    )
    torch.save(sd, path)


@pytest.mark.parametrize("which", ["partial", "unknown"])
def test_partial_and_unknown_placements_are_refused(actor, which):
    from torch.distributed.tensor import Partial
    from torch.distributed.tensor.placement_types import _StridedShard

    placement = Partial() if which == "partial" else _StridedShard(0, split_factor=2)
    for r in (0, 1):
        _rewrite_placements(actor / f"model_world_size_2_rank_{r}.pt", placement)
    match = "Partial tensor holds per-rank partial sums" if which == "partial" else "unknown placement"
    with pytest.raises(WeightgeoError, match=match) as e:
        VerlFsdpCheckpoint(actor)
    assert "'model.norm.weight'" in str(e.value)


def test_ranks_from_different_saves(actor, run):
    sd = torch.load(actor / "model_world_size_2_rank_1.pt", weights_only=True)
    del sd["model.norm.weight"]
    torch.save(sd, actor / "model_world_size_2_rank_1.pt")
    with pytest.raises(WeightgeoError, match="other tensors than rank 0"):
        VerlFsdpCheckpoint(actor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_actor_huggingface_weights_are_used_when_as_precise(actor, run, dtype):
    from weightgeo.checkpoint import SafetensorsCheckpoint

    full = torch.load(run / "full.pt", weights_only=True)
    cfg = json.loads((actor / "huggingface" / "config.json").read_text())
    write_hf_checkpoint(actor / "huggingface", {k: v.to(dtype) for k, v in full.items()}, config=cfg)
    ck = open_checkpoint(actor)
    # verl's 'hf_model' save in fp32 is the same weights, cheaper to read; a bf16 copy would lose the update
    assert isinstance(ck, SafetensorsCheckpoint if dtype == torch.float32 else VerlFsdpCheckpoint)
    assert all(torch.equal(ck.get(n), t) for n, t in full.items())


def test_identity_names_the_rank_files_and_changes_when_one_is_rewritten(run, tmp_path):
    import shutil
    import time

    actor = tmp_path / "actor"
    shutil.copytree(run / "global_step_1" / "actor", actor)
    name = "model.embed_tokens.weight"
    first = VerlFsdpCheckpoint(actor).identity(name)
    assert first == VerlFsdpCheckpoint(actor).identity(name)  # stable across opens
    assert first["dim"] == 0 and first["sizes"] == [49, 48] and len(first["files"]) == 2
    assert VerlFsdpCheckpoint(actor).identity("model.norm.weight") != first
    time.sleep(0.05)  # file times are taken from a coarse clock
    rank1 = actor / "model_world_size_2_rank_1.pt"
    rank1.write_bytes(rank1.read_bytes())
    again = VerlFsdpCheckpoint(actor).identity(name)
    assert again != first and again["files"][0] == first["files"][0]  # only rank 1's file changed
