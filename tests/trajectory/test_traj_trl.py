"""The Tracker measures what the run saves, inside real TRL trainers: ``WeightGeoCallback``'s live curves equal
``rank_curve`` of the same run's ``checkpoint-N`` folders for ``SFTTrainer``, ``GRPOTrainer`` and
``DistillationTrainer`` (TRL's on-policy distillation), on a tiny Llama and tokenizer built here, on the CPU,
offline. Two optimizer steps each, a checkpoint per step: a few seconds per trainer."""

from __future__ import annotations

import os

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

import weightgeo  # noqa: E402
from weightgeo.integrations.transformers import WeightGeoCallback  # noqa: E402

WORDS = ["<pad>", "<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(60)]
KEYS = ("delta_frobenius", "spectral_norm", "stable_rank", "hill_alpha")


def _tokenizer():
    from transformers import PreTrainedTokenizerFast

    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="</s>",
        bos_token="<s>",
        padding_side="left",
    )


def _tiny(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    model = LlamaForCausalLM(cfg)  # initialised from the global RNG (the test is marked global_rng)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # our own draw, so that the test does not depend on transformers' init
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _reward(completions, **kwargs):  # varied rewards, so that GRPO's advantages (and updates) are not zero
    return [float(sum(map(ord, c)) % 7) for c in completions]


@pytest.mark.global_rng  # the Trainer seeds the global RNGs (transformers.set_seed) and samples with them
@pytest.mark.parametrize("kind", ["sft", "grpo", "distillation"])
def test_live_curves_equal_the_checkpoints_the_trainer_saves(tmp_path, kind, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_DISABLED", "true")
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    prompts = [" ".join(f"w{int(i)}" for i in torch.randint(4, 60, (5,), generator=g)) for _ in range(8)]
    common = dict(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        save_strategy="steps",
        save_steps=1,
        save_only_model=True,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    model = _tiny(0)
    model.save_pretrained(tmp_path / "w0")  # W0, for the offline curve
    if kind == "sft":
        ds = Dataset.from_dict({"text": [p + " w1 w2" for p in prompts]})
        trainer = trl.SFTTrainer(
            model=model, args=trl.SFTConfig(**common, max_length=16), train_dataset=ds, processing_class=_tokenizer()
        )
    elif kind == "grpo":
        args = trl.GRPOConfig(**common, num_generations=2, max_completion_length=4, generation_batch_size=4)
        trainer = trl.GRPOTrainer(
            model=model,
            reward_funcs=_reward,
            args=args,
            train_dataset=Dataset.from_dict({"prompt": prompts}),
            processing_class=_tokenizer(),
        )
    else:
        trainer = trl.DistillationTrainer(
            model=model,
            teacher_model=_tiny(1),
            args=trl.DistillationConfig(**common, max_completion_length=4),
            train_dataset=Dataset.from_dict({"prompt": prompts}),
            processing_class=_tokenizer(),
        )
    cb = WeightGeoCallback.attach(trainer, every=1, k=2, hill_k=2)  # the default dtype: what the trainer saves
    trainer.train()
    assert cb.tracker.dtype is None and cb.tracker.steps == [1, 2]
    assert {"checkpoint-1", "checkpoint-2"} <= set(os.listdir(tmp_path / "run"))
    live = cb.tracker.rank_curve()
    offline = weightgeo.rank_curve(tmp_path / "run", base=tmp_path / "w0", k=2, hill_k=2, cache=False)
    assert [(r["step"], r["name"]) for r in live.rows] == [(r["step"], r["name"]) for r in offline.rows]
    assert len(live.rows) >= 2 * 7  # every 2-D weight of the model, at both steps
    for a, b in zip(live.rows, offline.rows):
        for key in KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-5), (kind, a["name"], a["step"], key)
        # both verified to the policy's RTOL = 1e-3 residual; different random test matrices
        assert a["final_subspace_similarity"] == pytest.approx(b["final_subspace_similarity"], abs=1e-3)
