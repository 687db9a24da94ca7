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


# -- GRPO on prompts with a reward of the user's --------------------------------------

REWARD = """
def share_of_a(prompts, completions, target, **_):
    return [c.count(t) / max(len(c), 1) for c, t in zip(completions, target)]

def fussy(prompts, completions, **_):
    if any("b" in c for c in completions):
        raise ValueError("no b, please")
    return [1.0 for c in completions]
"""


def prompts_file(tmp_path, count=16):
    records = [{"prompt": f"Say a {i}:", "target": "a"} for i in range(count)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    (tmp_path / "reward.py").write_text(REWARD, encoding="utf-8")
    return path


def grpo_config(tmp_path, name="run", **overrides):
    settings = dict(
        data=str(prompts_file(tmp_path)),
        validation_data=None,
        objective="grpo",
        reward=f"{tmp_path / 'reward.py'}:share_of_a",
        target_modules=["q", "v", "lm_head"],
        lora_dropout=0.0,
        learning_rate=3e-2,
        batch_size=4,
        num_generations=4,
        max_new_tokens=8,
    )
    settings.update(overrides)
    return run_config(tmp_path, name, **settings)
