"""checkpoint_status / scan_run on folders written by the real writers (HF Trainer, save_pretrained, DCP), then
damaged the ways a killed or still-running job leaves them."""

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from weightgeo.checkpoint.completeness import PROBLEMS, checkpoint_status, scan_run, step_of
from weightgeo.errors import WeightgeoError


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory) -> Path:
    """A real transformers.Trainer run of 2 steps on a tiny Llama, saving at every step (about 1 s)."""
    pytest.importorskip("accelerate")
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    out = tmp_path_factory.mktemp("trainer") / "run"
    cfg = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(cfg)  # the weights do not matter here, only the files the Trainer writes
    ids = torch.randint(0, 32, (4, 8), generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(
        str(out),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="steps",
        save_steps=1,
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(model=model, args=args, train_dataset=[{"input_ids": x, "labels": x} for x in ids]).train()
    return out


@pytest.fixture
def run(trainer_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(trainer_run, dst)
    return dst


def _truncate(path: Path, keep: float = 0.5) -> None:
    with open(path, "r+b") as f:
        f.truncate(int(path.stat().st_size * keep))


def test_a_real_trainer_run_is_complete(run):
    scan = scan_run(run)
    assert [s.step for s in scan.checkpoints] == [1, 2] and len(scan.complete) == 2
    s = scan.newest
    assert s.complete and s.marker == "trainer_state.json" and s.problem is None and s.naming == "checkpoint-N"
    assert {"hf_trainer", "safetensors", "torch"} <= set(s.formats)
    assert (scan.in_progress, scan.corrupt, scan.abandoned) == ((), (), ())
    assert json.dumps(s.as_dict()) and s.age_s() < 3600


def test_a_save_in_progress_is_the_newest_and_a_damaged_older_one_is_corrupt(run):
    (run / "checkpoint-2" / "trainer_state.json").unlink()  # killed before the Trainer's last write
    scan = scan_run(run)
    assert [(s.step, s.problem) for s in scan.in_progress] == [(2, "no_marker")] and scan.corrupt == ()
    assert "trainer_state.json" in scan.in_progress[0].reason
    _truncate(run / "checkpoint-1" / "model.safetensors")
    scan = scan_run(run)
    assert [(s.step, s.problem) for s in scan.corrupt] == [(1, "bad_file")]
    assert "truncated" in scan.corrupt[0].reason or "outside the data section" in scan.corrupt[0].reason


def test_truncated_torch_files_and_unreadable_marker(run):
    _truncate(run / "checkpoint-1" / "optimizer.pt", 0.9)  # torch writes the zip directory last
    (run / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2, "log_hist')  # half written
    scan = scan_run(run)
    assert scan.corrupt[0].problem == "bad_file" and "optimizer.pt" in scan.corrupt[0].reason
    assert scan.in_progress[0].problem == "no_marker" and "not valid UTF-8 JSON" in scan.in_progress[0].reason


def test_sibling_trainer_checkpoints_require_the_marker_of_a_bare_folder(run):
    # The weights of step 3 are written; the Trainer has not yet written anything else.
    (run / "checkpoint-3").mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(run / "checkpoint-2" / f, run / "checkpoint-3" / f)
    s = scan_run(run).newest
    assert (s.step, s.problem) == (3, "no_marker")
    assert checkpoint_status(run / "checkpoint-3").problem == "no_marker"  # run root defaults to the parent
    alone = run.parent / "alone" / "checkpoint-3"
    shutil.copytree(run / "checkpoint-3", alone)
    assert checkpoint_status(alone).complete  # a plain save_pretrained folder has no marker to wait for


def test_empty_temporary_and_weightless_folders(run):
    (run / "checkpoint-4").mkdir()  # the Trainer has just created it
    (run / "tmp-checkpoint-3").mkdir()  # transformers 4.36-4.38 staged saves here
    shutil.copy(run / "checkpoint-2" / "config.json", run / "tmp-checkpoint-3" / "config.json")
    (run / "checkpoint-0").mkdir()
    (run / "checkpoint-0" / "config.json").write_text("{}")
    (run / "logs").mkdir()
    scan = scan_run(run)
    assert [s.step for s in scan.checkpoints] == [0, 1, 2, 3, 4]
    assert [(s.step, s.problem) for s in scan.in_progress] == [(4, "empty")]
    assert [(s.step, s.problem) for s in scan.abandoned] == [(3, "temporary")]
    assert [(s.step, s.problem) for s in scan.corrupt] == [(0, "no_weights")]
    assert scan.abandoned[0].temporary and [p for p, _ in scan.abandoned[0].problems] == ["temporary", "no_weights"]
    assert checkpoint_status(run / "nope").problem == "missing"
    with pytest.raises(WeightgeoError, match="not a directory"):
        scan_run(run / "nope")


def test_sharded_save_pretrained(tmp_path):
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    folder = tmp_path / "checkpoint-5"
    with torch.random.fork_rng(devices=[]):  # transformers initialises from the global RNG: leave it untouched
        model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder, max_shard_size="20KB")
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and checkpoint_status(folder).complete
    index = folder / "model.safetensors.index.json"
    text = index.read_text()
    index.write_text(text[: len(text) // 2])  # the index is written after the shards, in one go
    assert checkpoint_status(folder).problem == "bad_file"
    index.unlink()  # shards written, index not yet
    s = checkpoint_status(folder)
    assert s.problem == "missing_files" and "no index" in s.reason
    index.write_text(text)
    shards[1].unlink()
    s = checkpoint_status(folder)
    assert s.problem == "missing_files" and shards[1].name in s.reason
    assert [p for p, _ in s.problems].count("missing_files") == 2  # the index and the shard set both say so


def test_dcp_folder(tmp_path):
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "step-10"
    g = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(
            {"w": torch.randn(64, 32, generator=g), "b": torch.randn(8, generator=g).bfloat16(), "n": 3},
            checkpoint_id=str(folder),
        )
    s = checkpoint_status(folder)
    assert s.complete and s.marker == ".metadata" and "dcp" in s.formats
    data = sorted(folder.glob("*.distcp"))[0]
    _truncate(data, 0.7)
    s = checkpoint_status(folder)
    assert s.problem == "bad_file" and "records data up to byte" in s.reason
    (folder / ".metadata").rename(folder / ".metadata.tmp")  # DCP renames it into place last
    s = checkpoint_status(folder)
    assert s.problem == "no_marker" and "being written" in s.reason
    (folder / ".metadata.tmp").write_bytes(b"\x80\x04garbage")
    (folder / ".metadata.tmp").rename(folder / ".metadata")
    assert checkpoint_status(folder).problem == "bad_file"


def test_dcp_metadata_is_read_without_running_its_pickle(tmp_path):
    import os
    import pickle

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    folder = tmp_path / "step-1"
    folder.mkdir()
    (folder / ".metadata").write_bytes(pickle.dumps(Boom()))
    (folder / "__0_0.distcp").write_bytes(b"x")
    s = checkpoint_status(folder)
    assert s.problem == "bad_file" and not (tmp_path / "pwned").exists()


def _torch_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"w": torch.ones(4, 4)}, path)


def test_tracker_files_of_megatron_verl_and_deepspeed(tmp_path):
    meg = tmp_path / "megatron"
    for it in (10, 20):
        _torch_file(meg / f"iter_{it:07d}" / "mp_rank_00" / "model_optim_rng.pt")
    (meg / "latest_checkpointed_iteration.txt").write_text("10")
    scan = scan_run(meg)
    assert scan.checkpoints[0].complete and scan.checkpoints[0].marker.startswith("latest_checkpointed_iteration")
    assert [(s.step, s.problem) for s in scan.in_progress] == [(20, "no_marker")]
    (meg / "latest_checkpointed_iteration.txt").write_text("20")
    assert len(scan_run(meg).complete) == 2
    (meg / "latest_checkpointed_iteration.txt").write_text("")  # being rewritten
    assert not scan_run(meg).complete

    verl = tmp_path / "verl"
    for step in (5, 10):
        for rank in (0, 1):
            _torch_file(verl / f"global_step_{step}" / "actor" / f"model_world_size_2_rank_{rank}.pt")
    (verl / "global_step_5" / "actor" / "model_world_size_2_rank_1.pt").unlink()
    (verl / "latest_checkpointed_iteration.txt").write_text("10\n")
    scan = scan_run(verl)
    assert [(s.step, s.problem) for s in scan.corrupt] == [(5, "missing_files")] and scan.newest.complete
    assert "ranks [1] of 2" in scan.corrupt[0].reason and "verl" in scan.corrupt[0].formats

    ds = tmp_path / "deepspeed"
    for step in (100, 200):
        _torch_file(ds / f"global_step{step}" / "mp_rank_00_model_states.pt")
    (ds / "latest").write_text("global_step100")
    scan = scan_run(ds)
    assert [s.complete for s in scan.checkpoints] == [True, False] and scan.in_progress[0].step == 200

    hf_ds = tmp_path / "hf_ds" / "checkpoint-7"  # DeepSpeed under the HF Trainer
    _torch_file(hf_ds / "global_step7" / "mp_rank_00_model_states.pt")
    assert checkpoint_status(hf_ds).problem == "no_marker"
    (hf_ds / "latest").write_text("global_step7")
    assert checkpoint_status(hf_ds).complete


def test_step_names_and_problem_order():
    assert step_of("global_step_40") == (40, "global_step_N", False)
    assert step_of("global_step40") == (40, "global_stepN", False)
    assert step_of("step-40.tmp") == (40, "step-N", True)
    assert step_of("checkpoint-x") == (None, None, False)
    assert PROBLEMS[0] == "missing" and PROBLEMS[-1] == "no_marker"
