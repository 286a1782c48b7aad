"""The Tracker's sparsity logs (weightgeo/track_sparsity.py): live equals offline on the checkpoints the run
writes, inside the reference training loop (weightgeo.train) and the HF Trainer (WeightGeoCallback); the
previous step is held exactly, in at most one more bf16 copy; a saved Tracker goes on counting."""

from __future__ import annotations

import math

import pytest
import torch

import weightgeo
from weightgeo import Tracker
from weightgeo.errors import WeightgeoError
from weightgeo.train import sft
from weightgeo.train.model import GPT, GPTConfig

try:
    import accelerate  # noqa: F401
    import transformers  # noqa: F401

    HAVE_TRAINER = True
except ImportError:  # pragma: no cover - an install without the hf extra
    HAVE_TRAINER = False


def _same_figures(logs: dict[int, dict[str, float]], offline) -> None:
    """Each logged figure equals the offline report's figure of that step (parameter-weighted, per module)."""
    for step, log in logs.items():
        by = offline.summary["by_step"][step]
        assert log["weightgeo/update_sparsity"] == by["update_sparsity"]
        assert log["weightgeo/step_sparsity"] == by["step_sparsity"]
        assert log["weightgeo/patch_bytes"] == by["patch_bytes"]
        for mod, m in by["by_module"].items():
            assert log[f"weightgeo/update_sparsity/{mod}"] == m["update_sparsity"], mod
            assert log[f"weightgeo/step_sparsity/{mod}"] == m["step_sparsity"], mod


def test_live_equals_offline_in_the_reference_training_loop(tmp_path):
    """SFT for 6 steps, bf16 checkpoints every 2 (fp32 parameters): the Tracker (every=2, told the dtype the run
    saves) logs, at the steps the run saves, the figures of sparsity_curve on those checkpoints; its report
    equals it row for row."""
    tracker: Tracker | None = None
    logs: dict[int, dict[str, float]] = {}

    def on_step(model, step):
        nonlocal tracker
        if tracker is None:  # step 0, before training: W0
            tracker = Tracker(model, every=2, step_sparsity=True, k=2, hill_k=2, dtype=torch.bfloat16)
            return
        got = tracker.update(model.named_parameters(), step)
        if got:
            logs[step] = got

    cfg = sft.SFTConfig(steps=6, batch_size=16, save_every=2, eval_n=0, lr=1e-3)
    sft.train(GPT(GPTConfig(n_layer=1, n_embd=16, n_head=2), seed=0), cfg, tmp_path / "run", on_step=on_step)
    assert tracker is not None and sorted(logs) == [2, 4, 6]
    offline = weightgeo.sparsity_curve(tmp_path / "run", cache=False)
    live = tracker.sparsity_curve()
    assert offline.summary["steps"] == [2, 4, 6] and len(live.rows) == len(offline.rows) == 3 * 12
    assert live.rows == offline.rows  # every tensor: matrices, norms, embeddings
    assert live.summary == offline.summary
    _same_figures(logs, offline)
    assert 0 < offline.summary["by_step"][6]["update_sparsity"] < 1
    # the previous step is held exactly in at most one more bf16 copy of the tracked entries
    entries = sum(r["numel"] for r in live.rows if r["step"] == 6)
    assert 0 < tracker.memory_bytes()["previous"] <= 2 * entries


@pytest.mark.global_rng  # Trainer seeds the global RNGs (transformers.set_seed) and shuffles with them
@pytest.mark.skipif(not HAVE_TRAINER, reason="transformers and accelerate are not installed")
def test_live_equals_offline_through_the_hf_trainer_callback(tmp_path):  # pragma: no cover - needs transformers
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from weightgeo.integrations.transformers import WeightGeoCallback

    cfg = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path / "w0")  # W0: the Trainer saves no step 0
    ids = torch.randint(0, 32, (8, 8), generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(
        str(tmp_path / "run"),
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="steps",
        save_steps=2,
        use_cpu=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=[{"input_ids": x, "labels": x} for x in ids])
    # the run saves float32: the Tracker rounds to what it saves
    cb = WeightGeoCallback.attach(trainer, every=2, k=2, hill_k=2, dtype=None, step_sparsity=True)
    trainer.train()
    offline = weightgeo.sparsity_curve(tmp_path / "run", base=tmp_path / "w0", cache=False)
    assert offline.summary["steps"] == [2, 4]
    assert cb.tracker.sparsity_curve().rows == offline.rows
    logged = [h for h in trainer.state.log_history if "weightgeo/update_sparsity" in h]
    assert [h["weightgeo/update_sparsity"] for h in logged] == offline.summary["curves"]["update_sparsity"]


def test_a_step_where_nothing_changes_and_the_modes(gen, tmp_path):
    w0 = {"layers.0.q_proj.weight": torch.randn(8, 8, generator=gen), "layers.0.norm.weight": torch.ones(8)}
    tr = Tracker(w0, step_sparsity=True, k=2, hill_k=2)
    w1 = {k: v.clone() for k, v in w0.items()}
    w1["layers.0.q_proj.weight"][0, :3] += 1.0
    first = tr.update(w1, 1)
    assert first["weightgeo/update_sparsity"] == first["weightgeo/step_sparsity"] == (72 - 3) / 72
    # float32 parameters, rounded to their own dtype: an 8-byte bitmask (< 12 bytes of indices) + 3 float32 values
    assert first["weightgeo/patch_bytes"] == 8 + 3 * 4
    same = tr.update(w1, 2)  # nothing changed: no spectra change either, counts recorded
    assert same["weightgeo/step_sparsity"] == 1.0 and same["weightgeo/patch_bytes"] == 0.0
    assert same["weightgeo/update_sparsity"] == first["weightgeo/update_sparsity"]
    w3 = {k: v.clone() for k, v in w1.items()}
    w3["layers.0.q_proj.weight"][0, 0] = w0["layers.0.q_proj.weight"][0, 0]  # back to W0
    w3["layers.0.norm.weight"][1] = 2.0
    third = tr.update(w3, 3)
    assert third["weightgeo/update_sparsity"] == (72 - 3) / 72 and third["weightgeo/step_sparsity"] == 70 / 72
    assert third["weightgeo/update_sparsity/norm"] == 7 / 8 and third["weightgeo/step_sparsity/q_proj"] == 63 / 64
    path = tr.save(tmp_path / "t.safetensors")
    back = Tracker.load(path)
    assert back.sparsity_curve().rows == tr.sparsity_curve().rows
    w4 = {k: v.clone() for k, v in w3.items()}
    w4["layers.0.q_proj.weight"][5, 5] += 1.0
    assert back.update(w4, 4) == tr.update(w4, 4)  # the held previous step travelled with the file
    plain = Tracker(w0, k=2, hill_k=2)  # update sparsity only: no memory beyond W0
    assert "weightgeo/step_sparsity" not in plain.update(w1, 1) and plain.memory_bytes()["previous"] == 0
    assert "step_sparsity" not in plain.sparsity_curve().rows[0]
    with pytest.raises(WeightgeoError, match="mode='exact'"):
        Tracker(w0, mode="sketch", step_sparsity=True)
    with pytest.raises(WeightgeoError, match="mode='exact'"):
        Tracker(w0, mode="sketch", k=2, hill_k=2).sparsity_curve()
    sketch = Tracker(w0, mode="sketch", k=2, hill_k=2)
    assert not any("sparsity" in k for k in sketch.update(w1, 1))
    bad = {k: v.clone() for k, v in w1.items()}
    bad["layers.0.norm.weight"][0] = math.nan
    with pytest.raises(WeightgeoError, match="norm.weight.*non-finite"):
        Tracker(w0, k=2, hill_k=2).update(bad, 1)
