"""GRPO in a training run: the reward rises, a reward that fails for some completions
skips them and the run goes on, a stopped run resumes bit for bit (the same completions
sampled), and bad settings or data are refused in one line."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

import loralab.training.loop as train_module
from conftest import char_tokenizer, tiny_gpt2
from loralab.data.records import DataError
from loralab.lora.config import ConfigError
from loralab.training.loop import TrainingInterrupted, train
from tiny_runs import grpo_config, prompts_file, run_config, tiny_pair


def _steps(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "reward" in line]


def test_grpo_raises_the_reward_and_logs_what_trl_users_read(tmp_path, tiny_model_dir):
    model, tokenizer = tiny_pair(tiny_model_dir)
    train(grpo_config(tmp_path, max_steps=20, save_every=0), model=model, tokenizer=tokenizer)
    steps = _steps(tmp_path / "run")
    assert len(steps) == 20
    first = sum(s["reward"] for s in steps[:3]) / 3
    last = sum(s["reward"] for s in steps[-3:]) / 3
    assert first < 0.3 and last > 0.8, (first, last)
    keys = {"reward_std", "rewards/skipped", "completion_length", "rollout_tokens_per_s"}
    assert keys | {"clip_ratio/low_mean", "frac_reward_zero_std"} <= set(steps[0])
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()


def test_a_reward_that_raises_for_some_completions_skips_them(tmp_path, tiny_model_dir):
    model, tokenizer = tiny_pair(tiny_model_dir)
    config = grpo_config(
        tmp_path, reward=f"{tmp_path / 'reward.py'}:fussy", max_steps=3, save_every=0
    )
    with pytest.warns(UserWarning, match="no b, please"):
        train(config, model=model, tokenizer=tokenizer)
    steps = _steps(tmp_path / "run")
    assert len(steps) == 3  # the run went on
    assert sum(s["rewards/skipped"] for s in steps) > 0


@pytest.mark.parametrize("accumulation", [1, 2])
def test_a_stopped_grpo_run_resumes_bit_for_bit(
    tmp_path, tiny_model_dir, monkeypatch, accumulation
):
    """With the completions split into micro-batches too: a step draws one batch of
    prompts however many micro-batches it runs."""

    def config(name, **overrides):
        return grpo_config(tmp_path, name, gradient_accumulation=accumulation, **overrides)

    model, tokenizer = tiny_pair(tiny_model_dir)
    train(config("straight", save_every=0), model=model, tokenizer=tokenizer)

    real_step, calls = train_module._grpo_optimizer_step, []

    def step_then_interrupt(run):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(run)

    monkeypatch.setattr(train_module, "_grpo_optimizer_step", step_then_interrupt)
    model, tokenizer = tiny_pair(tiny_model_dir)
    with pytest.raises(TrainingInterrupted, match="interrupted at step 3 of 6"):
        train(config("stopped", save_every=0), model=model, tokenizer=tokenizer)
    monkeypatch.setattr(train_module, "_grpo_optimizer_step", real_step)
    model, tokenizer = tiny_pair(tiny_model_dir)
    resumed = config("stopped", save_every=0, resume=True)
    train(resumed, model=model, tokenizer=tokenizer)
    straight = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    again = load_file(str(tmp_path / "stopped" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(straight[k], again[k]) for k in straight)
    rewards = {s["step"]: s["reward"] for s in _steps(tmp_path / "straight")}
    assert {s["step"]: s["reward"] for s in _steps(tmp_path / "stopped")} == rewards


def test_bad_grpo_settings_and_data_are_refused_in_one_line(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="num_generations"):
        grpo_config(tmp_path, num_generations=1)
    with pytest.raises(ConfigError, match="num_generations=4 is a GRPO setting"):
        run_config(tmp_path, num_generations=4)
    with pytest.raises(ConfigError, match="loss_type"):
        grpo_config(tmp_path, loss_type="ppo")
    with pytest.raises(ConfigError, match="method='bitfit' changes the model otherwise"):
        grpo_config(tmp_path, method="bitfit", beta=0.05)
    grpo_config(tmp_path, method="bitfit")  # β = 0: no reference needed

    model, tokenizer = tiny_pair(tiny_model_dir)
    with pytest.raises(ConfigError, match="has no function 'nothing'"):
        config = grpo_config(tmp_path, reward=f"{tmp_path / 'reward.py'}:nothing")
        train(config, model=model, tokenizer=tokenizer)
    with pytest.raises(ConfigError, match="no such file"):
        train(grpo_config(tmp_path, reward="missing.py:f"), model=model, tokenizer=tokenizer)
    with pytest.raises(ConfigError, match="task 'nli' has none built in"):
        train(
            grpo_config(tmp_path, data=None, task="nli", reward=None),
            model=model,
            tokenizer=tokenizer,
        )
    sft = run_config(tmp_path, data=str(prompts_file(tmp_path)), validation_data=None)
    with pytest.raises(
        DataError, match=r"prompts\.jsonl: these records have a prompt and no completion"
    ):
        train(sft, model=model, tokenizer=tokenizer)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "a", "chosen": " b", "rejected": " c"}) + "\n")
    with pytest.raises(DataError, match="objective grpo samples completions for"):
        train(grpo_config(tmp_path, data=str(pairs)), model=model, tokenizer=tokenizer)


def test_settings_grpo_cannot_train_with_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="does not run method='preembed'"):
        grpo_config(tmp_path, method="preembed")
    with pytest.raises(ConfigError, match="AdaLoRA's budget"):
        grpo_config(tmp_path, method="adalora")
    with pytest.raises(ConfigError, match="init='pissa' rewrites the base weights"):
        grpo_config(tmp_path, init="pissa", beta=0.05)
    grpo_config(tmp_path, init="pissa")  # β = 0: no reference


def test_a_chat_prompt_s_completions_reach_the_reward_as_messages(tmp_path, tiny_model_dir):
    records = [{"prompt": [{"role": "user", "content": f"Say a {i}"}]} for i in range(8)]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    reward = tmp_path / "chat_reward.py"
    reward.write_text(
        "def share_of_a(prompts, completions, **_):\n"
        "    return [c[0]['content'].count('a') / 8 for c in completions]\n"
    )
    model, tokenizer = tiny_pair(tiny_model_dir)
    config = grpo_config(tmp_path, data=str(path), reward=f"{reward}:share_of_a", max_steps=2)
    train(config, model=model, tokenizer=tokenizer)
    assert all(s["rewards/skipped"] == 0 for s in _steps(tmp_path / "run"))


def test_a_model_the_engine_cannot_run_is_refused(tmp_path):
    model, tokenizer = tiny_gpt2(), char_tokenizer()
    config = grpo_config(tmp_path, target_modules=["c_attn"])
    with pytest.raises(ConfigError, match="objective grpo samples through loralab's engine"):
        train(config, model=model, tokenizer=tokenizer)


def test_the_command_line_runs_grpo_on_sql_with_its_reward(tmp_path, tiny_model_dir):
    from loralab.cli import main

    run = tmp_path / "cli"
    argv = ["train", "--model", str(tiny_model_dir), "--objective", "grpo", "--task", "sql"]
    argv += ["--train-size", "8", "--max-steps", "2", "--batch-size", "2", "--num-generations"]
    argv += ["2", "--max-new-tokens", "4", "--output-dir", str(run), "--r", "2"]
    argv += ["--max-length", "256"]
    assert main([*argv, "--no-progress"]) == 0
    steps = _steps(run)
    assert len(steps) == 2 and all(s["reward"] == 0.0 for s in steps)  # a random model
