"""Preference objectives in a training run: DPO starts at ln 2 and learns the choice, a
run from a trained (SFT) adapter compares with that adapter, a stopped run resumes bit
for bit, and bad settings or data are refused in one line."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

import loralab.training.loop as train_module
from loralab.data.records import DataError
from loralab.lora.config import ConfigError
from loralab.training.loop import TrainingInterrupted, train
from tiny_runs import WORDS, data_file, run_config, tiny_pair


def pairs_file(tmp_path, count=40, name="pairs.jsonl"):
    records = [
        {"prompt": f"Reverse {word}:", "chosen": f" {word[::-1]}", "rejected": f" {word}"}
        for word in (f"{w}{i % 3}" for i, w in enumerate(WORDS * (count // len(WORDS) + 1)))
    ][:count]
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def preference_config(tmp_path, name="run", **overrides):
    settings = dict(
        data=str(pairs_file(tmp_path)),
        validation_data=str(pairs_file(tmp_path, 8, "validation.jsonl")),
        objective="dpo",
        target_modules=["q", "v", "lm_head"],
        lora_dropout=0.0,
        learning_rate=2e-2,
    )
    settings.update(overrides)
    return run_config(tmp_path, name, **settings)


def _metrics(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "loss" in line]


def test_dpo_run_starts_at_ln2_learns_the_choice_and_logs_trls_metrics(tmp_path, tiny_model_dir):
    model, tokenizer = tiny_pair(tiny_model_dir)
    config = preference_config(tmp_path, max_steps=30, beta=0.5, eval_every=15, save_every=0)
    result = train(config, model=model, tokenizer=tokenizer)
    steps = _metrics(tmp_path / "run")
    assert abs(steps[0]["loss"] - math.log(2)) < 1e-6
    assert steps[0]["rewards/margins"] == 0.0
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen"} <= set(
        steps[0]
    )
    late = steps[-5:]
    assert sum(s["rewards/accuracies"] for s in late) / 5 > 0.9
    assert sum(s["loss"] for s in late) / 5 < 0.5 * math.log(2)
    assert result.validation[-1][1] < result.validation[0][1] or result.validation[0][1] < 0.69
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("objective", ["ipo", "simpo", "orpo", "kto"])
def test_each_objective_trains_and_its_reward_margin_grows(tmp_path, tiny_model_dir, objective):
    model, tokenizer = tiny_pair(tiny_model_dir)
    config = preference_config(tmp_path, objective=objective, max_steps=20, save_every=0)
    train(config, model=model, tokenizer=tokenizer)
    # KTO logs a margin for batches holding both kinds of completion (as TRL does)
    margins = [s["rewards/margins"] for s in _metrics(tmp_path / "run") if "rewards/margins" in s]
    early, late = sum(margins[:3]) / 3, sum(margins[-3:]) / 3
    assert late > early, (early, late)


def test_from_an_sft_adapter_the_reference_is_that_adapter(tmp_path, tiny_model_dir):
    model, tokenizer = tiny_pair(tiny_model_dir)
    sft = run_config(tmp_path, "sft", max_steps=6, save_every=0, lora_dropout=0.0)
    train(sft, model=model, tokenizer=tokenizer)
    start = tmp_path / "sft" / "adapter"

    model, tokenizer = tiny_pair(tiny_model_dir)
    config = preference_config(tmp_path, "dpo", start_adapter=str(start), max_steps=4, save_every=0)
    train(config, model=model, tokenizer=tokenizer)
    steps = _metrics(tmp_path / "dpo")
    assert abs(steps[0]["loss"] - math.log(2)) < 1e-6  # the policy starts as its reference
    started, trained = (
        load_file(str(start / "adapter_model.safetensors")),
        load_file(str(tmp_path / "dpo" / "adapter" / "adapter_model.safetensors")),
    )
    assert started.keys() == trained.keys()  # the same adapter, trained further
    assert any(not torch.equal(started[k], trained[k]) for k in started)

    model, tokenizer = tiny_pair(tiny_model_dir)
    against_base = preference_config(
        tmp_path, "base", start_adapter=str(start), reference="base", max_steps=1, save_every=0
    )
    train(against_base, model=model, tokenizer=tokenizer)
    assert abs(_metrics(tmp_path / "base")[0]["loss"] - math.log(2)) > 1e-4


def test_a_stopped_dpo_run_resumes_bit_for_bit(tmp_path, tiny_model_dir, monkeypatch):
    model, tokenizer = tiny_pair(tiny_model_dir)
    train(preference_config(tmp_path, "straight", save_every=0), model=model, tokenizer=tokenizer)

    real_step, calls = train_module._optimizer_step, []

    def step_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "_optimizer_step", step_then_interrupt)
    model, tokenizer = tiny_pair(tiny_model_dir)
    with pytest.raises(TrainingInterrupted, match="interrupted at step 3 of 6"):
        stopped = preference_config(tmp_path, "stopped", save_every=0)
        train(stopped, model=model, tokenizer=tokenizer)
    monkeypatch.setattr(train_module, "_optimizer_step", real_step)
    model, tokenizer = tiny_pair(tiny_model_dir)
    config = preference_config(tmp_path, "stopped", save_every=0, resume=True)
    train(config, model=model, tokenizer=tokenizer)
    straight = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    resumed = load_file(str(tmp_path / "stopped" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    losses = {s["step"]: s["loss"] for s in _metrics(tmp_path / "straight")}
    assert {s["step"]: s["loss"] for s in _metrics(tmp_path / "stopped")} == losses


def test_bad_settings_and_data_are_refused_in_one_line(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match=r"objective must be one of 'sft', 'dpo'.*got 'dpp'"):
        preference_config(tmp_path, objective="dpp")
    from loralab.training.config import OBJECTIVES
    from loralab.training.objectives import OBJECTIVE_NAMES

    assert OBJECTIVES == OBJECTIVE_NAMES
    with pytest.raises(ConfigError, match="method='bitfit' changes the model otherwise"):
        preference_config(tmp_path, method="bitfit")
    preference_config(tmp_path, method="bitfit", objective="simpo")  # no reference needed
    with pytest.raises(ConfigError, match="init='olora' rewrites the base weights"):
        preference_config(tmp_path, init="olora")
    with pytest.raises(ConfigError, match="batch_size must be at least 2"):
        preference_config(tmp_path, objective="kto", batch_size=1)
    with pytest.raises(ConfigError, match="use --reference base"):
        preference_config(tmp_path, method="adalora", start_adapter="x", target_r=2)
    with pytest.raises(ConfigError, match="packing is for supervised fine-tuning"):
        preference_config(tmp_path, packing=True)
    with pytest.raises(ConfigError, match=r"beta=0\.2 is a preference objective's setting"):
        run_config(tmp_path, beta=0.2)
    with pytest.raises(ConfigError, match="beta"):
        preference_config(tmp_path, beta=0)

    model, tokenizer = tiny_pair(tiny_model_dir)
    sft_data = data_file(tmp_path)
    with pytest.raises(DataError, match=r"train.jsonl: a preference objective trains on .* pairs"):
        train(preference_config(tmp_path, data=str(sft_data)), model=model, tokenizer=tokenizer)
    with pytest.raises(DataError, match=r"pairs.jsonl: these are preference records"):
        sft = run_config(tmp_path, data=str(pairs_file(tmp_path)))
        train(sft, model=model, tokenizer=tokenizer)
    with pytest.raises(ConfigError, match="task 'sql' has none"):
        train(preference_config(tmp_path, data=None, task="sql"), model=model, tokenizer=tokenizer)

    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"prompt": "a", "chosen": " b", "rejected": " c"})
        + "\n"
        + json.dumps({"prompt": "a", "chosen": " b", "rejected": " b"})
        + "\n"
    )
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: 'chosen' and 'rejected' are the same"):
        train(preference_config(tmp_path, data=str(bad)), model=model, tokenizer=tokenizer)


def test_the_command_line_trains_dpo_on_the_e2e_pairs(tmp_path, tiny_model_dir, capsys):
    from loralab.cli import main

    run = tmp_path / "cli"
    argv = ["train", "--model", str(tiny_model_dir), "--objective", "dpo", "--beta", "0.2"]
    argv += ["--task", "e2e", "--train-size", "16", "--max-steps", "2", "--batch-size", "2"]
    argv += ["--output-dir", str(run), "--r", "2", "--validation-size", "4", "--max-length", "256"]
    assert main([*argv, "--no-progress"]) == 0
    steps = _metrics(run)
    assert len(steps) == 2 and abs(steps[0]["loss"] - math.log(2)) < 1e-6


def test_kto_trains_on_completions_marked_desirable_or_not(tmp_path, tiny_model_dir):
    records = [
        {"prompt": f"Reverse {w}:", "completion": f" {w[::-1] if good else w}", "label": good}
        for w in ("cat0", "dog1", "bird2", "fish0", "lion1", "bear2")
        for good in (True, False)
    ]
    path = tmp_path / "unpaired.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    model, tokenizer = tiny_pair(tiny_model_dir)
    config = preference_config(
        tmp_path, objective="kto", data=str(path), validation_data=str(path), save_every=0
    )
    result = train(config, model=model, tokenizer=tokenizer)
    steps = _metrics(tmp_path / "run")
    assert len(steps) == 6 and all("kl" in s for s in steps)
    assert result.validation[-1][1] < result.validation[0][1] + 1e-6
    with pytest.raises(DataError, match="they train with --objective kto"):
        train(run_config(tmp_path, "sft", data=str(path)), model=model, tokenizer=tokenizer)
    with pytest.raises(DataError, match="they train with --objective kto"):
        dpo = preference_config(tmp_path, "dpo", data=str(path), validation_data=None)
        train(dpo, model=model, tokenizer=tokenizer)
