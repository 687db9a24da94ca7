"""Short training runs on the tiny Llama: a data file of reversed words, the settings of
a run that learns it in six steps, and the model and tokenizer loaded as a library user
passes them to ``train``."""

from __future__ import annotations

import json

from loralab.training.config import TrainConfig

WORDS = ["cat", "dog", "bird", "fish", "lion", "bear", "wolf", "frog", "duck", "goat"]


def data_file(tmp_path, count=64):
    records = [
        {"prompt": f"Reverse {w}{i % 3}:", "completion": f" {(w + str(i % 3))[::-1]}"}
        for i, w in enumerate(WORDS * (count // len(WORDS) + 1))
    ][:count]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def run_config(tmp_path, name="run", **overrides):
    settings = dict(
        model="unused",
        data=str(data_file(tmp_path)),
        validation_data=str(data_file(tmp_path, 16)),
        output_dir=str(tmp_path / name),
        r=4,
        lora_alpha=8,
        lora_dropout=0.1,
        target_modules=["q", "v", "o"],
        learning_rate=1e-2,
        max_steps=6,
        batch_size=4,
        max_length=32,
        eval_every=3,
        save_every=3,
        progress=False,
        seed=1,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def tiny_pair(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        AutoTokenizer.from_pretrained(tiny_model_dir),
    )
