"""Training runs as they are written, for the live / interrupted-run tests (import as ``from live_factories import
...``): checkpoints saved the way the HF Trainer saves them, saves killed part-way, and a counter of tensor reads.

- ``run_state(step, **shape)``: the tiny model after ``step`` steps (a planted rank-2 update plus noise).
- ``trainer_save(folder, step)``: the weights, then ``trainer_state.json`` last (the Trainer's completion marker);
  ``write_run(root, steps)``: a run folder of ``checkpoint-<step>`` saves.
- ``truncated(folder, step)``: a save killed mid-way (half the shard, no marker).
- ``rows_json(report)`` / ``report_json(report)``: a report's rows (and summary) as its JSON holds them (for
  bit-for-bit comparisons).
- ``Reads(monkeypatch)``: counts the tensors read through any Checkpoint; ``take()`` returns and resets it.
- ``STREAM_KW`` / ``PAIR_KW``: the rank_curve / compare options of these tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from factories import tiny_llama_state, write_hf_checkpoint

from weightgeo.checkpoint import Checkpoint
from weightgeo.report import Report

STREAM_KW = dict(k=2, hill_k=2)  # rank_curve options of every stream test
PAIR_KW = dict(k=4, rank=2, progress=False)


def run_state(step: int, **shape: int) -> dict[str, torch.Tensor]:
    """The tiny model after ``step`` steps: a planted rank-2 update growing with the step, plus noise."""
    base = tiny_llama_state(**shape)
    g = torch.Generator().manual_seed(1000 + step)
    out = {}
    for name, w in base.items():
        if w.ndim == 2:
            u = torch.randn(w.shape[0], 2, generator=torch.Generator().manual_seed(len(name)))
            v = torch.randn(2, w.shape[1], generator=torch.Generator().manual_seed(len(name) + 1))
            d = 1e-3 * step * (u @ v) + 1e-4 * step**0.5 * torch.randn(w.shape, generator=g)
            w = (w.float() + d).to(w.dtype)
        out[name] = w
    return out


def trainer_save(folder: Path, step: int) -> Path:
    """What the HF Trainer writes: the weights, then ``trainer_state.json`` last (its completion marker)."""
    write_hf_checkpoint(folder, run_state(step))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def write_run(root: Path, steps) -> Path:
    for t in steps:
        trainer_save(root / f"checkpoint-{t}", t)
    return root


def truncated(folder: Path, step: int) -> None:
    """A save killed mid-way: half of the shard's bytes, no marker (the full file never appears in the run)."""
    scratch = folder.parent.parent / f"scratch-{step}"
    write_hf_checkpoint(scratch, run_state(step))
    data = (scratch / "model.safetensors").read_bytes()
    folder.mkdir(parents=True)
    (folder / "config.json").write_text((scratch / "config.json").read_text())
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def rows_json(report: Report) -> list:
    return json.loads(report.to_json())["rows"]


def report_json(report: Report) -> dict:
    """What a report's JSON holds besides its provenance: rows and summary (the bit-for-bit comparisons)."""
    data = json.loads(report.to_json())
    return {"rows": data["rows"], "summary": data["summary"]}


class Reads:
    """Counts the tensors read through any Checkpoint (``get`` calls, and tensors read in row chunks)."""

    def __init__(self, monkeypatch):
        self.names: list[tuple[int, str]] = []
        self.chunked: set[tuple[int, str]] = set()
        get, get_rows = Checkpoint.get, Checkpoint.get_rows

        def counted_get(ck, name):
            self.names.append((id(ck), name))
            return get(ck, name)

        def counted_rows(ck, name, start, stop):
            self.chunked.add((id(ck), name))
            return get_rows(ck, name, start, stop)

        monkeypatch.setattr(Checkpoint, "get", counted_get)
        monkeypatch.setattr(Checkpoint, "get_rows", counted_rows)

    def take(self) -> int:
        n = len(self.names) + len(self.chunked)
        self.names.clear()
        self.chunked.clear()
        return n
