"""The format registry's contracts: every registered format recognises, opens and judges complete a sample
written by the real writer; the step-folder grammar and every file-name pattern are written once, and opening
and scanning both use them; formats never call back into the resolver; a format added to the registry (a toy
one here) is picked up by open_checkpoint, checkpoint_status and scan_run alike."""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from factories import tiny_llama_state, write_hf_checkpoint, write_lora_adapter
from native_factories import fp8_quantize, write_dcp, write_fp8

import weightgeo.checkpoint.hub as hub_module
from weightgeo.checkpoint import Checkpoint, checkpoint_status, open_checkpoint, registry, scan_run
from weightgeo.checkpoint.format import Findings, FolderFiles, Format, Run, Source
from weightgeo.checkpoint.runs import NAMINGS_TEXT, STEP_NAMINGS, step_of
from weightgeo.checkpoint.state_dict import StateDictCheckpoint
from weightgeo.errors import WeightgeoError

SRC = Path(__file__).resolve().parents[2] / "src" / "weightgeo"
CHECKPOINT = SRC / "checkpoint"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "checkpoints.md"


# --- one sample per registered format ---------------------------------------------------------------------------
@dataclass
class Sample:
    """A source of one format written by its real writer: how to open it, what it holds, how to break it."""

    source: Any  # what open_checkpoint is given
    kwargs: dict[str, Any]
    names: list[str]  # the tensor names it opens with
    folder: Path | None = None  # the folder a scan judges (None: nothing on disk)
    # damage the folder so that this format's own check (Format.complete) finds the problem named
    damage: Callable[[Path], None] | None = None
    problem: str | None = None


def _hf(tmp: Path) -> Sample:
    sd = tiny_llama_state()
    d = write_hf_checkpoint(tmp / "checkpoint-5", sd, shards=2)

    def damage(d: Path) -> None:
        next(d.glob("model-00002-of-00002.safetensors")).unlink()

    return Sample(d, {}, sorted(sd), d, damage, "missing_files")


def _lora(tmp: Path) -> Sample:
    sd = tiny_llama_state()
    base = write_hf_checkpoint(tmp / "base", sd)
    ad = write_lora_adapter(tmp / "adapter", sd)
    return Sample(ad, {"base": base}, sorted(sd), ad)


def _state_dict(tmp: Path) -> Sample:
    return Sample({"w": torch.ones(2, 2)}, {}, ["w"])


def _hub(tmp: Path) -> Sample:
    return Sample("org/tiny", {}, sorted(tiny_llama_state()))


def _verl(tmp: Path) -> Sample:
    actor = tmp / "global_step_3" / "actor"
    actor.mkdir(parents=True)
    torch.save({"w": torch.ones(3, 2)}, actor / "model_world_size_1_rank_0.pt")  # one rank: plain tensors
    (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": 1}))

    def damage(d: Path) -> None:  # the rank-0 file of a 2-rank save, without rank 1
        (d / "actor" / "model_world_size_1_rank_0.pt").rename(d / "actor" / "model_world_size_2_rank_0.pt")

    return Sample(actor.parent, {}, ["w"], actor.parent, damage, "missing_files")


def _deepspeed(tmp: Path) -> Sample:
    d = tmp / "checkpoint-7" / "global_step7"
    d.mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(2, 3)}}, d / "mp_rank_00_model_states.pt")
    (d.parent / "latest").write_text("global_step7")

    def damage(hf_folder: Path) -> None:  # DeepSpeed under the HF Trainer: `latest` is written after the tag folder
        (hf_folder / "latest").unlink()

    return Sample(d, {}, ["w"], d.parent, damage, "no_marker")


def _dcp(tmp: Path) -> Sample:
    d = write_dcp(tmp / "step-4", {"w": torch.arange(6.0).reshape(3, 2)}, extra=False)

    def damage(d: Path) -> None:
        (d / ".metadata").unlink()

    return Sample(d, {}, ["w"], d, damage, "no_marker")


def _fp8(tmp: Path) -> Sample:
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    d = write_fp8(tmp / "fp8", {"w.weight": fp8_quantize(w, (2, 2))}, block=(2, 2))
    return Sample(d, {}, ["w.weight"], d)


SAMPLES: dict[str, Callable[[Path], Sample]] = {
    "state_dict": _state_dict,
    "hub": _hub,
    "lora": _lora,
    "hf": _hf,
    "verl": _verl,
    "deepspeed": _deepspeed,
    "dcp": _dcp,
    "fp8": _fp8,
}


def test_every_registered_format_has_a_sample_and_the_three_hooks():
    names = [f.name for f in registry.FORMATS]
    assert len(set(names)) == len(names) and set(SAMPLES) == set(names), "a registered format without a sample here"
    for f in registry.FORMATS:
        assert isinstance(f, Format) and f.summary and callable(f.recognise) and callable(f.open)
        assert callable(f.complete) and not (f.wraps and f.needs_base), f.name


@pytest.mark.parametrize("name", list(SAMPLES))
def test_each_format_recognises_opens_and_judges_its_sample(name, tmp_path, monkeypatch):
    fmt = next(f for f in registry.FORMATS if f.name == name)
    sample = SAMPLES[name](tmp_path)
    if name == "hub":  # no network: the hub id resolves to a local snapshot
        snapshot = write_hf_checkpoint(tmp_path / "snapshot", tiny_llama_state())
        monkeypatch.setattr(hub_module, "resolve_hub", lambda repo, revision=None: snapshot)

    value = Path(sample.source) if isinstance(sample.source, Path) else sample.source
    source = Source(value, str(value), base=sample.kwargs.get("base"))
    if fmt.wraps:  # it recognises what another format opened
        opened = registry.recognise(source)
        assert opened is not None and opened.name != name
        inner = opened.open(source)
        assert isinstance(inner, Checkpoint) and fmt.recognise(Source(inner, inner.source))
    else:
        assert registry.recognise(source) is fmt  # the first format that recognises it is its own
    ck = open_checkpoint(sample.source, **sample.kwargs)
    assert ck.names() == sample.names
    if sample.folder is not None:
        status = checkpoint_status(sample.folder)
        assert status.complete, status.problems
    if sample.damage is not None:
        assert sample.folder is not None
        sample.damage(sample.folder)
        found = Findings()
        files = FolderFiles(
            sample.folder,
            {p: p.stat().st_size for p in sample.folder.rglob("*") if p.is_file()},
            step_of(sample.folder.name)[0],
            Run(sample.folder.parent),
        )
        fmt.complete(files, found)  # this format's own check finds it
        assert {p for p, _ in found.problems} == {sample.problem}
        assert checkpoint_status(sample.folder).problem == sample.problem


def test_recognition_order_is_documented_in_that_order():
    names = [f.name for f in registry.FORMATS]
    table = re.findall(r"^``(\w+)``", registry.__doc__ or "", re.M)
    assert table == names
    docs = DOCS.read_text()
    section = docs[docs.index("## How formats are found: the registry") :]
    documented = re.findall(r"^\d+\. `(\w+)`", section, re.M)
    assert documented == names


def test_a_folder_no_format_recognises_is_reported_with_what_it_holds(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    assert registry.recognise(Source(tmp_path, str(tmp_path))) is None
    with pytest.raises(WeightgeoError, match=r"no weights found \(contents: \['notes.txt'\]\)"):
        open_checkpoint(tmp_path)


# --- the step grammar, used by opening and scanning alike ------------------------------------------------------
@pytest.mark.parametrize("naming", [n for n, _ in STEP_NAMINGS])
def test_every_step_naming_is_known_to_opening_and_scanning(naming, tmp_path):
    """One table (runs.STEP_NAMINGS): the run-folder hint of open_checkpoint and scan_run read the same names
    (step_N was known to scanning only before the registry)."""
    run = tmp_path / "run"
    folders = [run / naming.replace("N", str(step)) for step in (10, 20)]
    for d in folders:
        write_hf_checkpoint(d, {"w": torch.ones(2, 2)})
    assert [step_of(d.name)[:2] for d in folders] == [(10, naming), (20, naming)]
    scan = scan_run(run)
    assert [(s.step, s.naming, s.complete) for s in scan.checkpoints] == [(10, naming, True), (20, naming, True)]
    with pytest.raises(WeightgeoError, match="training run folder") as e:
        open_checkpoint(run)
    assert f"e.g. {folders[-1]}" in str(e.value)
    assert naming in NAMINGS_TEXT


def _constants(path: Path) -> list[tuple[str, int]]:
    """Every string constant of a module that is neither a docstring nor a piece of an f-string (messages), with
    its line."""
    tree = ast.parse(path.read_text())
    docs = {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and n.body
        and isinstance(n.body[0], ast.Expr)
        and isinstance(n.body[0].value, ast.Constant)
    }
    docs |= {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
    return [
        (n.value, n.lineno)
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs
    ]


# file names and suffixes that are matched or joined (exact string constants), and the one module that writes
# each; messages that mention them in a sentence are prose, not patterns
OWNERS = {
    "checkpoint/hf.py": [
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
        "trainer_state.json",
        "training_args.bin",
    ],
    "checkpoint/_files.py": ["config.json", ".index.json"],
    "checkpoint/safetensors.py": [".safetensors"],
    "checkpoint/torch_bin.py": [".bin", ".pt", ".pth"],
    "checkpoint/runs.py": ["latest_checkpointed_iteration.txt", "latest"],
    "checkpoint/dcp.py": [".metadata", ".distcp"],
    "checkpoint/verl.py": ["fsdp_config.json", "actor", "huggingface", "model_world_size_*"],
    "checkpoint/deepspeed.py": ["mp_rank_00_model_states.pt", "zero_pp_rank_*"],
    "checkpoint/lora.py": ["adapter_config.json"],
    "checkpoint/megatron.py": ["metadata.json", "common.pt"],
}
# regex fragments of file and folder names, and the module that compiles them
PATTERN_OWNERS = {
    r"checkpoint-|global_step|iter_|step[-_]|tmp|\(\\d\+\)\$": "checkpoint/runs.py",
    r"model_world_size": "checkpoint/verl.py",
    r"-of-": "checkpoint/hf.py",
    r"zero_pp_rank": "checkpoint/deepspeed.py",
}
# writers of these files, outside the readers: the reference training loop (train/) and the result cache's own
# entries (cache/: safetensors files of its own)
NOT_READERS = ("train/", "cache/")


def _modules():
    for p in sorted(SRC.rglob("*.py")):
        rel = p.relative_to(SRC).as_posix()
        if not rel.startswith(NOT_READERS):
            yield rel, p


def test_every_file_name_is_written_in_one_module():
    owner = {name: module for module, names in OWNERS.items() for name in names}
    bad = []
    for rel, path in _modules():
        for value, line in _constants(path):
            if value in owner and owner[value] != rel:
                bad.append(f"{rel}:{line} writes {value!r}, which {owner[value]} owns: import it from there")
    assert not bad, "\n".join(bad)


def test_every_file_name_pattern_is_compiled_in_one_module():
    bad, seen = [], {}
    for rel, path in _modules():
        tree = ast.parse(path.read_text())
        for n in ast.walk(tree):
            if (
                isinstance(n, ast.Call)
                and isinstance(n.func, ast.Attribute)
                and n.func.attr == "compile"
                and n.args
                and isinstance(n.args[0], ast.Constant)
                and isinstance(n.args[0].value, str)
            ):
                pattern = n.args[0].value
                if pattern in seen and seen[pattern] != rel:
                    bad.append(f"{rel}:{n.lineno} compiles {pattern!r} again (first in {seen[pattern]})")
                seen.setdefault(pattern, rel)
                for fragment, module in PATTERN_OWNERS.items():
                    if re.search(fragment, pattern) and rel != module:
                        bad.append(f"{rel}:{n.lineno} compiles {pattern!r}, a pattern {module} owns")
    assert "checkpoint/runs.py" in seen.values()
    assert not bad, "\n".join(bad)


def test_formats_never_call_back_into_the_resolver():
    """Opening is a loop in resolve.py over registry.FORMATS; no format module imports the resolver, the registry
    or the completeness scan, or calls open_checkpoint (a format holding another format's folder calls that
    format's own opener: verl -> hf.open_folder), so the import rules see every dependency."""
    loopers = {"resolve", "registry", "completeness"}
    bad = []
    for path in sorted(CHECKPOINT.glob("*.py")):
        if path.stem in loopers | {"__init__"}:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                mods = [node.module] if node.module else [a.name for a in node.names]
                bad += [f"{path.name}:{node.lineno} imports .{m}" for m in mods if m and m.split(".")[0] in loopers]
            if isinstance(node, ast.Name) and node.id == "open_checkpoint":
                bad.append(f"{path.name}:{node.lineno} calls open_checkpoint")
    assert not bad, "\n".join(bad)


# --- the registry is open: a toy format, registered in one line ------------------------------------------------
_TOY = "weights.toy.json"


def _toy_recognise(source: Source) -> bool:
    return source.folder is not None and (source.folder / _TOY).is_file()


def _toy_open(source: Source) -> Checkpoint:
    assert source.folder is not None
    data = json.loads((source.folder / _TOY).read_text())
    return StateDictCheckpoint({k: torch.tensor(v) for k, v in data.items()}, source=source.text)


def _toy_complete(folder: FolderFiles, found: Findings) -> None:
    for p in folder.sizes:
        if p.name == _TOY:
            found.saw("toy")
            found.weights = True
            try:
                json.loads(p.read_text())
            except ValueError as e:
                found.add("bad_file", f"{p}: not JSON ({e})")


TOY = Format("toy", f"{_TOY}: {{name: nested lists}}", _toy_recognise, _toy_open, _toy_complete)


def test_a_new_format_is_one_module_and_one_registry_line(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "FORMATS", (*registry.FORMATS[:-1], TOY, registry.FORMATS[-1]))
    run = tmp_path / "run"
    for step in (1, 2):
        (run / f"step_{step}").mkdir(parents=True)
        (run / f"step_{step}" / _TOY).write_text(json.dumps({"w": [[float(step), 0.0], [0.0, 1.0]]}))
    ck = open_checkpoint(run / "step_2")
    assert ck.names() == ["w"] and ck.get("w")[0, 0].item() == 2.0
    (run / "step_2" / _TOY).write_text('{"w": [[2.0')  # cut short
    scan = scan_run(run)
    assert [s.complete for s in scan.checkpoints] == [True, False] and "toy" in scan.checkpoints[0].formats
    assert scan.in_progress[0].problem == "bad_file" and "not JSON" in scan.in_progress[0].reason
