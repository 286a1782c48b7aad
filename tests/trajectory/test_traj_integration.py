"""The transformers callback: import guard, logic with a stand-in TrainerCallback, real Trainer if installed."""

from __future__ import annotations

import importlib
import subprocess
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from weightgeo.errors import WeightgeoError

HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
# transformers' Trainer refuses to start without accelerate
HAVE_TRAINER = HAVE_TRANSFORMERS and importlib.util.find_spec("accelerate") is not None


def test_import_weightgeo_does_not_import_transformers():
    code = (
        "import sys, weightgeo, weightgeo.track, weightgeo.integrations; "
        "assert 'transformers' not in sys.modules, 'transformers imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.skipif(HAVE_TRANSFORMERS, reason="transformers is installed")
def test_clear_import_error_without_transformers():
    with pytest.raises(ImportError, match="pip install transformers"):
        from weightgeo.integrations.transformers import WeightGeoCallback  # noqa: F401


@pytest.fixture
def stub_callback(monkeypatch):
    """WeightGeoCallback built on a stand-in ``transformers.TrainerCallback`` (no transformers needed)."""
    fake = types.ModuleType("transformers")
    fake.TrainerCallback = type(
        "TrainerCallback", (), {"on_step_end": lambda self, *a, **k: None, "on_log": lambda self, *a, **k: None}
    )
    monkeypatch.setitem(sys.modules, "transformers", fake)
    monkeypatch.delitem(sys.modules, "weightgeo.integrations.transformers", raising=False)
    mod = importlib.import_module("weightgeo.integrations.transformers")
    yield mod.WeightGeoCallback
    sys.modules.pop("weightgeo.integrations.transformers", None)


def _model(gen):
    m = torch.nn.Sequential()
    with torch.random.fork_rng(devices=[]):  # nn.Linear initialises from the global RNG; its values are replaced
        m.add_module("q_proj", torch.nn.Linear(24, 20, bias=False))
    with torch.no_grad():
        m.q_proj.weight.copy_(torch.randn(20, 24, generator=gen))
    return m


def _step(model, gen):
    with torch.no_grad():
        model.q_proj.weight.add_(0.05 * torch.randn(20, 3, generator=gen) @ torch.randn(3, 24, generator=gen))


def test_callback_logs_through_trainer_log(stub_callback, gen, tmp_path):
    assert issubclass(stub_callback, sys.modules["transformers"].TrainerCallback)
    model = _model(gen)
    logged = []
    trainer = SimpleNamespace(log=logged.append, add_callback=lambda cb: None)
    cb = stub_callback.attach(trainer, every=2, k=2, hill_k=2, save_path=str(tmp_path / "t.safetensors"))
    state = SimpleNamespace(global_step=0, is_world_process_zero=True, log_history=[])
    cb.on_train_begin(None, state, None, model=model)
    for step in (1, 2, 3, 4):
        _step(model, gen)
        state.global_step = step
        cb.on_step_end(None, state, None, model=model)
    assert len(logged) == 2 and "weightgeo/stable_rank/mean" in logged[0]
    assert cb.tracker.steps == [2, 4]
    cb.on_train_end(None, state, None)
    from weightgeo.track import Tracker

    assert Tracker.load(tmp_path / "t.safetensors").steps == [2, 4]


def test_callback_without_trainer_merges_into_on_log(stub_callback, gen):
    model = _model(gen)
    cb = stub_callback(k=2, hill_k=2)
    state = SimpleNamespace(global_step=0, is_world_process_zero=True, log_history=[])
    cb.on_train_begin(None, state, None, model=model)
    _step(model, gen)
    state.global_step = 1
    cb.on_step_end(None, state, None, model=model)
    logs = {"loss": 1.0}
    cb.on_log(None, state, None, logs=logs)
    assert logs["loss"] == 1.0 and "weightgeo/delta_frobenius/mean" in logs
    assert state.log_history[0]["step"] == 1
    other = SimpleNamespace(global_step=0, is_world_process_zero=False, log_history=[])
    idle = stub_callback(k=2)
    idle.on_train_begin(None, other, None, model=model)
    assert idle.tracker is None  # only the main process computes
    with pytest.raises(WeightgeoError, match="no model"):
        stub_callback().on_train_begin(None, state, None)


@pytest.mark.global_rng  # Trainer seeds the global RNGs (transformers.set_seed) and shuffles with them
@pytest.mark.skipif(not HAVE_TRAINER, reason="transformers and accelerate are not installed")
def test_real_trainer_tiny_model(tmp_path):  # pragma: no cover - needs transformers
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from weightgeo.integrations.transformers import WeightGeoCallback

    cfg = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    torch_gen = torch.Generator().manual_seed(0)
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 32, (8, 8), generator=torch_gen)
    ds = [{"input_ids": x, "labels": x} for x in ids]
    args = TrainingArguments(
        str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=ds)
    cb = WeightGeoCallback.attach(trainer, every=2, include="attention", k=2, hill_k=2, dtype=None)
    trainer.train()
    assert cb.tracker.steps == [2, 4]
    assert any("weightgeo/stable_rank/mean" in h for h in trainer.state.log_history)
