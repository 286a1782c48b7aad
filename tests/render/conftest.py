"""One real tiny run per session, made through the command line as a user would: a base and two fine-tunes
(a dense SFT-like update and a sparse low-rank RL-like one) compared side by side, and a checkpoint stream
followed by ``weightgeo trajectory``; each writes its JSON and its HTML page, and ``weightgeo report`` puts
the saved reports side by side."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from factories import tiny_llama_state, write_hf_checkpoint

from weightgeo.cli import main

LABELS = ("SFT", "RLVR")


@dataclass(frozen=True)
class TinyRun:
    root: Path
    pair_json: list[Path]  # one per fine-tune, in LABELS order
    pair_page: Path  # `compare ... --html` (both fine-tunes side by side)
    traj_json: Path
    traj_page: Path  # `trajectory ... --html`
    side_page: Path  # `report R1.json R2.json R3.json --labels ...`
    side_labels: tuple[str, ...]
    compare_out: str  # what `compare` printed


def _fine_tune(base: dict, g: torch.Generator, *, scale: float, rank: int | None) -> dict:
    out = {}
    for name, w in base.items():
        x = w.float()
        if x.ndim == 2:
            m, n = x.shape
            d = (
                torch.randn(m, n, generator=g)
                if rank is None
                else torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g)
            )
            x = x + scale * x.std() * d
        out[name] = x.to(w.dtype)
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> TinyRun:
    root = tmp_path_factory.mktemp("tiny_run")
    g = torch.Generator().manual_seed(0)
    base = tiny_llama_state(num_layers=3, hidden=32, intermediate=64, vocab=48)
    b = write_hf_checkpoint(root / "base", base)
    fts = [
        write_hf_checkpoint(root / "sft", _fine_tune(base, g, scale=2e-2, rank=None)),
        write_hf_checkpoint(root / "rlvr", _fine_tune(base, g, scale=2e-3, rank=2)),
    ]
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert (
            main(
                [
                    "compare",
                    str(b),
                    *map(str, fts),
                    "--k",
                    "8",
                    "--rank",
                    "4",
                    "--labels",
                    *LABELS,
                    "--no-progress",
                    "--no-cache",
                    "--out",
                    str(root / "pair.json"),
                    "--html",
                    str(root / "pair.html"),
                ]
            )
            == 0
        )
    # a stream: a consistent low-rank drift plus noise, checkpoints every 10 steps
    w0 = tiny_llama_state(num_layers=2, hidden=32, intermediate=64, vocab=48, dtype=torch.float32, seed=1)
    drift = {
        k: torch.randn(v.shape[0], 2, generator=g) @ torch.randn(2, v.shape[1], generator=g)
        for k, v in w0.items()
        if v.ndim == 2
    }
    for step in range(0, 60, 10):
        write_hf_checkpoint(
            root / "run" / f"checkpoint-{step}",
            {
                k: v
                + (1e-3 * step * drift[k] + 3e-3 * torch.randn(v.shape, generator=g) * (step > 0) if v.ndim == 2 else 0)
                for k, v in w0.items()
            },
        )
    with contextlib.redirect_stdout(io.StringIO()):
        assert (
            main(
                [
                    "trajectory",
                    str(root / "run"),
                    "--k",
                    "2",
                    "--no-progress",
                    "--no-cache",
                    "--out",
                    str(root / "traj.json"),
                    "--html",
                    str(root / "traj.html"),
                ]
            )
            == 0
        )
    pair_json = [root / "pair-1.json", root / "pair-2.json"]
    side_labels = ("SFT", "RLVR", "OPD run")
    with contextlib.redirect_stdout(io.StringIO()):
        assert (
            main(
                [
                    "report",
                    *map(str, pair_json),
                    str(root / "traj.json"),
                    "--labels",
                    *side_labels,
                    "--out",
                    str(root / "side.html"),
                ]
            )
            == 0
        )
    return TinyRun(
        root,
        pair_json,
        root / "pair.html",
        root / "traj.json",
        root / "traj.html",
        root / "side.html",
        side_labels,
        buf.getvalue(),
    )
