"""The catalogue of bad inputs users hit, checked at the public boundary (compare, metrics, streams, CLI).

Every entry must raise a WeightgeoError whose message names the file or tensor involved and says what to do;
never a traceback from deep inside torch, never a silent skip. Format-level details (every header field, every
index rule) are covered in tests/checkpoint/test_ckpt_errors.py; this table is what a user sees.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from factories import tiny_llama_state, write_hf_checkpoint, write_lora_adapter

import weightgeo
import weightgeo.cache
from weightgeo import WeightgeoError
from weightgeo.cli import main as cli_main


def _state(seed=0):
    return tiny_llama_state(num_layers=1, hidden=8, intermediate=16, vocab=12, seed=seed)


def _good(tmp: Path, name="good", seed=0) -> Path:
    return write_hf_checkpoint(tmp / name, _state(seed))


def _truncated(tmp):
    d = _good(tmp, "trunc")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-64])
    return d, str(f)


def _bad_json_header(tmp):
    d = _good(tmp, "badjson")
    f = d / "model.safetensors"
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    f.write_bytes(raw[:8] + b"{" * n + raw[8 + n :])
    return d, str(f)


def _offsets_out_of_range(tmp):
    d = _good(tmp, "offsets")
    f = d / "model.safetensors"
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"] = [0, 10**9]
    text = json.dumps(header).encode()
    f.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])
    return d, name


def _overlapping(tmp):
    f = tmp / "overlap.safetensors"
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    text = json.dumps(header).encode()
    f.write_bytes(len(text).to_bytes(8, "little") + text + b"\0" * 12)
    return f, "overlap"


def _missing_shard(tmp):
    d = write_hf_checkpoint(tmp / "shards", _state(), shards=2)
    shard = sorted(d.glob("model-*.safetensors"))[1]
    shard.unlink()
    return d, shard.name


def _index_outside(tmp):
    d = write_hf_checkpoint(tmp / "escape", _state(), shards=2)
    idx = d / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = "../../etc/passwd"
    idx.write_text(json.dumps(data))
    return d, "../../etc/passwd"


def _empty_checkpoint(tmp):
    d = tmp / "empty"
    d.mkdir()
    text = b"{}"
    (d / "model.safetensors").write_bytes(len(text).to_bytes(8, "little") + text)
    return d, "empty"


def _no_weights_dir(tmp):
    d = tmp / "noweights"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "README.md").write_text("hi")
    return d, "noweights"


def _evil_pickle(tmp):
    d = tmp / "evil"
    d.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    with open(d / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"w": Evil()}, fh)
    return d, "pytorch_model.bin"


def _adapter_matching_nothing(tmp):
    base = _state()
    a = write_lora_adapter(tmp / "adapter", base, targets=("q_proj",), r=2, alpha=4)
    other = {k.replace("q_proj", "query"): v for k, v in base.items()}
    return write_hf_checkpoint(tmp / "other", other), a


DEEP = "[" * 100_000 + "]" * 100_000  # nested beyond any parser's recursion


def _nested_config(tmp):
    d = _good(tmp, "deepcfg")
    (d / "config.json").write_text(DEEP)
    return d, "config.json"


def _nested_index(tmp):
    d = write_hf_checkpoint(tmp / "deepidx", _state(), shards=2)
    (d / "model.safetensors.index.json").write_text('{"weight_map": ' + DEEP + "}")
    return d, "model.safetensors.index.json"


def _nested_adapter_config(tmp):
    a = write_lora_adapter(tmp / "deepadapter", _state(), targets=("q_proj",), r=2, alpha=4)
    (a / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ' + DEEP + "}")
    return a, "adapter_config.json"


def _run_folder(tmp):
    """An HF Trainer output folder: checkpoint-N folders and a stray eval.safetensors, no model at the top."""
    run = tmp / "run"
    for step in (10, 20):
        write_hf_checkpoint(run / f"checkpoint-{step}", _state(step))
        (run / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    from safetensors.torch import save_file

    save_file({"eval_loss": torch.ones(3)}, str(run / "eval.safetensors"))
    return run, "checkpoint-20"


def _other_hidden_size(tmp):
    wide = tiny_llama_state(num_layers=1, hidden=16, intermediate=16, vocab=12)
    return write_hf_checkpoint(tmp / "wide", wide), "8 vs 16"


def _beyond_memory(tmp):
    """A header announcing a 4 TiB matrix (the file is sparse: nothing is stored, nothing may be read)."""
    rows = cols = 1 << 20
    header = json.dumps(
        {
            "model.layers.0.mlp.up_proj.weight": {
                "dtype": "F32",
                "shape": [rows, cols],
                "data_offsets": [0, 4 * rows * cols],
            }
        }
    ).encode()
    paths = []
    for side in ("huge-base", "huge-ft"):
        d = tmp / side
        d.mkdir()
        f = d / "model.safetensors"
        with open(f, "wb") as fh:
            fh.write(len(header).to_bytes(8, "little") + header)
            fh.truncate(8 + len(header) + 4 * rows * cols)
        paths.append(d)
    return paths[0], paths[1], "up_proj"


# (id, builder returning (base_source, ft_source, text the message must contain))
CHECKPOINT_CASES = {
    "nested config.json": lambda t: (_good(t), *_nested_config(t)),
    "nested shard index": lambda t: (_good(t), *_nested_index(t)),
    "nested adapter_config.json": lambda t: (_good(t), *_nested_adapter_config(t)),
    "a training run folder given as the fine-tune": lambda t: (_good(t), *_run_folder(t)),
    "another hidden size (every matrix differs)": lambda t: (_good(t), *_other_hidden_size(t)),
    "a tensor larger than the memory": _beyond_memory,
    "truncated safetensors": lambda t: (_good(t), *_truncated(t)),
    "corrupt header JSON": lambda t: (_good(t), *_bad_json_header(t)),
    "offsets out of range": lambda t: (_good(t), *_offsets_out_of_range(t)),
    "overlapping data": lambda t: (_good(t), *_overlapping(t)),
    "shard listed but missing": lambda t: (_good(t), *_missing_shard(t)),
    "index pointing outside its folder": lambda t: (_good(t), *_index_outside(t)),
    "empty checkpoint": lambda t: (_good(t), *_empty_checkpoint(t)),
    "directory with no weights": lambda t: (_good(t), *_no_weights_dir(t)),
    "pickle needing code execution": lambda t: (_good(t), *_evil_pickle(t)),
    "missing path": lambda t: (_good(t), t / "nope", "nope"),
    "hub id while offline and uncached": lambda t: (
        _good(t),
        "weightgeo-test/not-cached-anywhere",
        "weightgeo-test/not-cached-anywhere",
    ),
    "LoRA targets match nothing": lambda t: (*_adapter_matching_nothing(t), "q_proj"),
    "mismatched shapes": lambda t: (
        {"layers.0.q_proj.weight": torch.ones(4, 4)},
        {"layers.0.q_proj.weight": torch.ones(4, 5)},
        "layers.0.q_proj.weight",
    ),
    "disjoint names": lambda t: ({"a.weight": torch.ones(2, 2)}, {"b.weight": torch.ones(2, 2)}, "a.weight"),
    "NaN values": lambda t: ({"w": torch.ones(3, 3)}, {"w": torch.full((3, 3), float("nan"))}, "w rows 0:3"),
    "Inf values": lambda t: ({"w": torch.full((3, 3), float("inf"))}, {"w": torch.ones(3, 3)}, "w rows 0:3"),
    "integer tensors only": lambda t: ({"ids": torch.arange(4)}, {"ids": torch.arange(4)}, "ids"),
    "quantized (int8) weights only": lambda t: (
        {"q.qweight": torch.zeros(4, 4, dtype=torch.int8)},
        {"q.qweight": torch.ones(4, 4, dtype=torch.int8)},
        "int8",
    ),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # torch, on the hostile pickle
def test_compare_rejects(case, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    base, ft, named = CHECKPOINT_CASES[case](tmp_path)
    with pytest.raises(WeightgeoError) as e:
        weightgeo.compare(base, ft, progress=False)
    assert str(named) in str(e.value), str(e.value)


TENSOR_CASES = {
    "1-D input to an SVD metric": lambda: weightgeo.principal_angles(torch.ones(4), torch.ones(4)),
    "shapes differ in a tensor metric": lambda: weightgeo.spectral_drift(torch.ones(3, 4), torch.ones(4, 3)),
    "k below 1": lambda: weightgeo.principal_angles(torch.eye(4), torch.eye(4), k=0),
    "k larger than the matrix (randomized SVD)": lambda: weightgeo.randomized_svd(torch.ones(5, 4), 9),
    "integer tensors in a tensor metric": lambda: weightgeo.update_sparsity(
        torch.ones(2, dtype=torch.int64), torch.ones(2, dtype=torch.int64)
    ),
    "NaN in a tensor metric": lambda: weightgeo.update_sparsity(torch.ones(2), torch.tensor([1.0, float("nan")])),
    "unknown metric": lambda: weightgeo.compare({"w": torch.ones(2, 2)}, {"w": torch.ones(2, 2)}, metrics=["x"]),
    "CUDA asked for but absent": lambda: weightgeo.compare(
        {"w": torch.ones(2, 2)}, {"w": torch.ones(2, 2)}, device="cuda:7"
    ),
    "invalid include regex": lambda: weightgeo.compare(
        {"w": torch.ones(2, 2)}, {"w": torch.ones(2, 2)}, include="(unclosed"
    ),
    "negative batch_bytes": lambda: weightgeo.compare({"w": torch.ones(2, 2)}, {"w": torch.ones(2, 2)}, batch_bytes=-1),
    "eta outside (0, 1)": lambda: weightgeo.update_sparsity(torch.ones(2), torch.ones(2), eta=-1.0),
    "localization alpha outside (0, 1)": lambda: weightgeo.update_localization(torch.eye(4), torch.eye(4), alpha=1.5),
}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.cuda) if "CUDA" in c else c for c in TENSOR_CASES])
def test_tensor_level_rejects(case):
    if case == "CUDA asked for but absent" and torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(WeightgeoError):
        TENSOR_CASES[case]()


OPTION_CASES = {
    "integer dtype to round to": (
        lambda t: weightgeo.compare({"w": torch.ones(2, 2)}, {"w": torch.ones(2, 2)}, dtype=torch.int8),
        "dtype=torch.int8",
    ),
    "seed that is not an integer": (
        lambda t: weightgeo.rank_curve([{"w": torch.ones(2, 2)}] * 2, seed=0.5),
        "seed=0.5",
    ),
    "infinite poll interval": (lambda t: next(weightgeo.follow(t, poll_s=float("inf"))), "poll_s=inf"),
    "follow of a missing folder": (lambda t: next(weightgeo.follow(t / "nope")), "nope does not exist"),
    "a step that is not an integer": (
        lambda t: weightgeo.rank_curve([{"w": torch.ones(2, 2)}] * 2, steps=[1, "2"]),
        "every entry of steps must be an integer",
    ),
    "unknown Tracker mode": (lambda t: weightgeo.Tracker({"w": torch.ones(2, 2)}, mode="fast"), "mode='fast'"),
    "negative cache age": (
        lambda t: weightgeo.cache.ResultCache(t / "c").prune(older_than=-1),
        "prune: older_than=-1",
    ),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_option_rejects(case, tmp_path):
    call, named = OPTION_CASES[case]
    with pytest.raises(WeightgeoError) as e:
        call(tmp_path)
    assert named in str(e.value), str(e.value)


def test_stream_with_one_checkpoint(tmp_path):
    write_hf_checkpoint(tmp_path / "run" / "checkpoint-10", _state())
    with pytest.raises(WeightgeoError, match="one checkpoint"):
        weightgeo.rank_curve(tmp_path / "run")


def test_stream_with_duplicate_steps(tmp_path):
    a = write_hf_checkpoint(tmp_path / "a", _state())
    b = write_hf_checkpoint(tmp_path / "b", _state(1))
    with pytest.raises(WeightgeoError, match="duplicate step 5"):
        weightgeo.rank_curve([a, b], steps=[5, 5])


def test_empty_stream_directory(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(WeightgeoError, match="run"):
        weightgeo.locking_onset(tmp_path / "run")


def test_cli_answers_bad_input_with_status_2(tmp_path, capsys):
    d, f = _truncated(tmp_path)
    assert cli_main(["compare", str(_good(tmp_path)), str(d), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("weightgeo: error:") and f in err and "Traceback" not in err
    assert cli_main(["compare", str(d), str(d), "--out", str(tmp_path / "r.txt")]) == 2
    assert "use a .json or .csv path" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------
# streams: trainer_state.json
def _run_with_state(tmp, state: str | None, steps=(10, 20, 30)) -> Path:
    run = tmp / "run"
    for step in steps:
        d = write_hf_checkpoint(run / f"checkpoint-{step}", _state(step))
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if state is not None:
        (run / f"checkpoint-{steps[1]}" / "trainer_state.json").write_text(state)
    return run


@pytest.mark.parametrize("value", ['"abc"', "10.5", "true", "[20]", '{"step": 20}'])
def test_trainer_state_with_a_global_step_that_is_not_an_integer(tmp_path, value):
    run = _run_with_state(tmp_path, '{"global_step": ' + value + "}")
    with pytest.raises(WeightgeoError) as e:
        weightgeo.rank_curve(run, cache=False)
    msg = str(e.value)
    assert "checkpoint-20" in msg and "trainer_state.json" in msg and "global_step" in msg and "fix or delete" in msg


def test_trainer_state_nested_too_deep_is_a_listed_skip(tmp_path):
    run = _run_with_state(tmp_path, DEEP)
    with pytest.warns(RuntimeWarning, match="checkpoint-20"):
        r = weightgeo.rank_curve(run, cache=False)
    assert r.summary["steps"] == [30]  # checkpoint-10 is the base; checkpoint-20 is left out
    (left,) = [s for s in r.skipped if s.get("kind") == "checkpoint"]
    assert left["name"] == "checkpoint-20" and "trainer_state.json" in left["reason"] and "nested" in left["reason"]


def test_a_report_file_nested_too_deep(tmp_path):
    (tmp_path / "r.json").write_text('{"rows": ' + DEEP + "}")
    with pytest.raises(WeightgeoError, match="r.json: JSON nested deeper"):
        weightgeo.Report.from_json(tmp_path / "r.json")


# --------------------------------------------------------------------------------------------------------------
# messages a command-line user gets: flags, commands and tools that exist
def test_cli_compare_on_a_training_run_folder(tmp_path, capsys):
    run, _ = _run_folder(tmp_path)
    assert cli_main(["compare", str(_good(tmp_path)), str(run), "--no-progress", "--no-cache"]) == 2
    err = capsys.readouterr().err
    assert "training run folder" in err and "checkpoint-10" in err and "checkpoint-20" in err
    assert f"weightgeo trajectory {run}" in err and "Traceback" not in err
    with pytest.raises(WeightgeoError, match=r"weightgeo\.rank_curve"):  # the Python fix in Python syntax
        weightgeo.compare(_good(tmp_path), run, cache=False)


def test_cli_shape_mismatch_names_the_hidden_sizes_once_with_a_flag(tmp_path, capsys):
    wide, _ = _other_hidden_size(tmp_path)
    assert cli_main(["compare", str(_good(tmp_path)), str(wide), "--no-progress", "--no-cache"]) == 2
    err = capsys.readouterr().err
    assert "--exclude" in err and "exclude=" not in err and err.count("8 vs 16") == 1
    assert "hidden" in err and err.count("weightgeo: error") == 1


def test_offline_hub_error_recommends_the_current_cli(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with pytest.raises(WeightgeoError) as e:
        weightgeo.compare(_good(tmp_path), "weightgeo-test/not-cached-anywhere", cache=False)
    msg = str(e.value)
    assert "hf download weightgeo-test/not-cached-anywhere" in msg and "huggingface-cli" not in msg
    cmd = msg[msg.index("`hf download") + 1 :]
    cmd = cmd[: cmd.index("`")]
    import shlex
    import shutil
    import subprocess

    hf = shutil.which("hf")
    if hf is None:
        pytest.skip("the hf command of huggingface_hub is not on PATH")
    # the suggested command parses with the installed huggingface_hub (a usage error exits 2); offline it then
    # fails to reach the hub, which is not what is checked here
    run = subprocess.run(
        [hf, *shlex.split(cmd)[1:], "--dry-run"],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert run.returncode != 2 and "No such option" not in run.stderr, run.stderr


# --------------------------------------------------------------------------------------------------------------
# cache maintenance
@pytest.mark.parametrize("gb", ["inf", "1e300"])
def test_cli_prune_with_no_size_limit(tmp_path, capsys, gb):
    cache = weightgeo.cache.ResultCache(tmp_path / "c")
    key = cache.key("pair_row", inputs=[{"f": "x"}], policy="p")
    cache.put(key, {"stable_rank": 1.0})
    assert cli_main(["cache", "prune", "--cache", str(cache.root), "--max-gb", gb]) == 0
    out = capsys.readouterr()
    assert "kept 1 entries" in out.out and "Traceback" not in out.err
    assert cache.get(key) is not None


def test_cli_prune_of_a_cache_it_cannot_change_does_not_report_success(tmp_path, capsys, monkeypatch):
    cache = weightgeo.cache.ResultCache(tmp_path / "c", code="older")  # entries of other code: to be removed
    key = cache.key("pair_row", inputs=[{"f": "x"}], policy="p")
    cache.put(key, {"stable_rank": 1.0})
    entry = cache.path(key)
    real_unlink = Path.unlink

    def read_only(self, missing_ok=False):  # a read-only cache (tests may run as root, which chmod cannot stop)
        if str(self).startswith(str(cache.root)):
            raise PermissionError(13, "Permission denied", str(self))
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", read_only)
    assert cli_main(["cache", "prune", "--cache", str(cache.root)]) == 1
    out = capsys.readouterr()
    assert entry.exists() and "FAILED to remove 1 file" in out.out + out.err
    assert "Permission denied" in out.err and str(cache.root) in out.err and "writable" in out.err


def test_a_stream_matrix_larger_than_the_memory(tmp_path):
    base, ft, _ = _beyond_memory(tmp_path)
    with pytest.raises(WeightgeoError, match=r"up_proj.*\[1048576, 1048576\].*TiB.*exclude="):
        weightgeo.rank_curve([base, ft], steps=[0, 1], cache=False)


@pytest.mark.parametrize("kind", ["loop", "dangling"])
def test_a_broken_symlink_is_named_as_one(tmp_path, kind):
    link = tmp_path / "ft"
    link.symlink_to(link if kind == "loop" else tmp_path / "gone")
    with pytest.raises(WeightgeoError, match=("loop" if kind == "loop" else "missing") + r"; fix the link"):
        weightgeo.compare(_good(tmp_path), link, cache=False)
