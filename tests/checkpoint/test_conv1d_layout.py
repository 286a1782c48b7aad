"""GPT-2-style Conv1D weights (stored [in, out]) are flagged in the rows and the summary text."""

import pytest
import torch
from factories import tiny_llama_state, write_hf_checkpoint

import weightgeo
from weightgeo.checkpoint import open_checkpoint


def _gpt2(transformers, seed):
    """A tiny GPT-2 whose weights come from our own generator (its constructor's draws from the global RNG are
    discarded, and the global state is restored)."""
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    with torch.random.fork_rng(devices=[]):
        model = transformers.GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return model


def test_saved_gpt2_checkpoint_flags_conv1d_weights(tmp_path):
    transformers = pytest.importorskip("transformers")
    base, ft = _gpt2(transformers, 0), _gpt2(transformers, 0)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(1e-2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    base.save_pretrained(tmp_path / "b")
    ft.save_pretrained(tmp_path / "f")
    r = weightgeo.compare(tmp_path / "b", tmp_path / "f", k=4, rank=2, progress=False)
    layouts = {row["module"]: row.get("layout") for row in r.rows if len(row["shape"]) == 2}
    assert layouts["c_attn"] == layouts["c_fc"] == layouts["c_proj"] == "in_out"
    assert layouts["wte"] is None and layouts["wpe"] is None
    assert "stored [in, out]" in r.summary_text()
    # The same flag from the module classes when the source is the model itself.
    assert open_checkpoint(base).in_out_layout("transformer.h.0.attn.c_attn.weight")


def test_linear_checkpoints_are_not_flagged(tmp_path):
    state = tiny_llama_state(num_layers=1, hidden=8, intermediate=16, vocab=20)
    b = write_hf_checkpoint(tmp_path / "b", state)
    r = weightgeo.compare(b, b, k=2, rank=2, progress=False)
    assert not any("layout" in row for row in r.rows)
    assert "stored [in, out]" not in r.summary_text()


def test_trajectory_meta_lists_conv1d_matrices(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = _gpt2(transformers, 0)
    g = torch.Generator().manual_seed(2)
    direction = {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
    for step in (0, 5, 10):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.add_(1e-3 * step * direction[n])
        model.save_pretrained(tmp_path / "run" / f"checkpoint-{step}")
    r = weightgeo.rank_curve(tmp_path / "run", include="attention", k=2, hill_k=2)
    assert r.meta["in_out_layout"] and all("c_attn" in n or "c_proj" in n for n in r.meta["in_out_layout"])
