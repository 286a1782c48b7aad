"""DeepSpeed ZeRO checkpoints written by real DeepSpeed runs (2 gloo CPU processes), and the missing-extra path."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch
from native_factories import torchrun

from weightgeo import WeightgeoError
from weightgeo.checkpoint import DeepSpeedCheckpoint, open_checkpoint
from weightgeo.checkpoint.deepspeed import EXTRA

# OpenRLHF-style: a model wrapped by deepspeed.initialize, one bf16 step, engine.save_checkpoint(dir, tag).
# ZeRO-2 keeps the whole 16-bit model in mp_rank_00_model_states.pt; ZeRO-3 partitions it. References: the
# module's own bf16 weights (ZeRO-2), DeepSpeed's eager get_fp32_state_dict_from_zero_checkpoint (ZeRO-3).
_SCRIPT = """
import os, warnings
warnings.simplefilter("ignore")
import torch, deepspeed
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
out = {out!r}
for stage in (2, 3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 6), torch.nn.Linear(6, 5), torch.nn.LayerNorm(5))
    cfg = {{"train_micro_batch_size_per_gpu": 1, "bf16": {{"enabled": True}}, "zero_optimization": {{"stage": stage}},
           "optimizer": {{"type": "AdamW", "params": {{"lr": 1e-2, "torch_adam": True}}}}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    loss = engine(torch.randint(0, 11, (1, 4))).float().pow(2).mean()
    engine.backward(loss)
    engine.step()
    engine.save_checkpoint(f"{{out}}/zero{{stage}}", tag="global_step1")
    if stage == 2:
        ref = {{k: v.detach().clone() for k, v in engine.module.state_dict().items()}}
    else:
        ref = get_fp32_state_dict_from_zero_checkpoint(f"{{out}}/zero{{stage}}", tag="global_step1")
    if int(os.environ["RANK"]) == 0:
        torch.save(ref, f"{{out}}/ref{{stage}}.pt")
"""


@pytest.fixture(scope="module")
def zero(tmp_path_factory) -> Path:
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("zero")
    script = out / "run.py"
    script.write_text(textwrap.dedent(_SCRIPT.format(out=str(out))))
    torchrun(script)
    return out


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_checkpoint_reads_the_reference_weights(zero, stage):
    ref = torch.load(zero / f"ref{stage}.pt", weights_only=True)
    ck = open_checkpoint(zero / f"zero{stage}" / "global_step1")
    assert isinstance(ck, DeepSpeedCheckpoint) and ck.zero_stage == ("0-2" if stage == 2 else "3")
    assert ck.names() == sorted(ref)
    for name, t in ref.items():
        got = ck.get(name)
        assert got.dtype == (torch.bfloat16 if stage == 2 else torch.float32) and torch.equal(got, t), name
    w = ref["0.weight"]
    assert torch.equal(ck.get_rows("0.weight", 3, 9), w[3:9])


def test_zero12_needs_no_deepspeed(zero, monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    ck = open_checkpoint(zero / "zero2" / "global_step1")
    assert ck.get("1.weight").shape == (5, 6)


def test_zero3_without_deepspeed_names_the_extra(tmp_path, monkeypatch):
    # the import-error path runs whether or not DeepSpeed is installed here
    d = tmp_path / "global_step7"
    d.mkdir()
    for r in (0, 1):
        torch.save({"module": {}}, d / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    monkeypatch.setitem(sys.modules, "deepspeed.utils", None)
    monkeypatch.setitem(sys.modules, "deepspeed.utils.zero_to_fp32", None)
    with pytest.raises(WeightgeoError, match="ZeRO-3") as e:
        open_checkpoint(d)
    assert EXTRA in str(e.value) and "weightgeo[deepspeed]" in str(e.value)


def test_missing_zero3_rank_and_model_parallel_saves(tmp_path):
    d = tmp_path / "global_step3"
    d.mkdir()
    torch.save({"module": {}}, d / "zero_pp_rank_1_mp_rank_00_model_states.pt")
    with pytest.raises(WeightgeoError, match=r"zero_pp_rank_\[0\]"):
        open_checkpoint(d)
    mp = tmp_path / "global_step4"
    mp.mkdir()
    for m in (0, 1):
        torch.save({"module": {"w": torch.ones(2)}}, mp / f"mp_rank_0{m}_model_states.pt")
    with pytest.raises(WeightgeoError, match="model-parallel"):
        open_checkpoint(mp)


def test_deepspeed_run_folder_points_at_its_step(tmp_path):
    run = tmp_path / "_actor"
    (run / "global_step10").mkdir(parents=True)
    (run / "latest").write_text("global_step10")
    with pytest.raises(WeightgeoError, match="latest: 'global_step10'"):
        open_checkpoint(run)


@pytest.mark.parametrize("stage", [2, 3])
def test_identity_names_the_files_read_and_changes_when_one_is_rewritten(zero, stage, tmp_path):
    import shutil
    import time

    step = tmp_path / "global_step1"
    shutil.copytree(zero / f"zero{stage}" / "global_step1", step)
    first = DeepSpeedCheckpoint(step).identity("0.weight")
    assert first == DeepSpeedCheckpoint(step).identity("0.weight") and first["zero_stage"] == (
        "0-2" if stage == 2 else "3"
    )
    assert DeepSpeedCheckpoint(step).identity("1.weight") != first
    time.sleep(0.05)  # file times are taken from a coarse clock
    target = sorted(step.glob("*model_states.pt"))[-1]
    target.write_bytes(target.read_bytes())
    assert DeepSpeedCheckpoint(step).identity("0.weight") != first
