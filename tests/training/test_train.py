"""The training loop: settings, schedule, learning, determinism, checkpoints and resume."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch
from safetensors.torch import load_file

import loralab.training.loop as train_module
from conftest import char_tokenizer, tiny_bert
from loralab.lora.config import ConfigError
from loralab.training.config import TrainConfig, config_from_file
from loralab.training.loop import TrainingInterrupted, train
from loralab.training.loss import counted_head
from loralab.training.optimizer import learning_rate_factor
from tiny_runs import WORDS, data_file, run_config, tiny_pair


def _adapter(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_learning_rate_schedules():
    linear = TrainConfig(max_steps=10, warmup_steps=4)
    assert [round(learning_rate_factor(s, linear), 3) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert learning_rate_factor(4, linear) == 1.0
    assert learning_rate_factor(7, linear) == pytest.approx(0.5)
    cosine = TrainConfig(max_steps=10, schedule="cosine")
    assert learning_rate_factor(5, cosine) == pytest.approx(0.5)
    assert learning_rate_factor(10, cosine) == pytest.approx(0.0)
    assert learning_rate_factor(9, TrainConfig(max_steps=10, schedule="constant")) == 1.0


def test_training_learns_and_writes_the_run_directory(tmp_path, tiny_model_dir):
    model, tokenizer = tiny_pair(tiny_model_dir)
    # A random tiny model's logits pass a final norm and a frozen head with tiny weights, so
    # attention updates alone hardly move them; LoRA on the head lets it learn visibly.
    config = run_config(
        tmp_path, max_steps=40, eval_every=20, save_every=20, target_modules=["q", "v", "lm_head"]
    )
    result = train(config, model=model, tokenizer=tokenizer)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert result.validation[-1][1] < result.validation[0][1]
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "adapter/adapter_config.json"):
        assert (run / name).exists(), name
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [line["step"] for line in lines if "loss" in line]
    assert steps == list(range(1, 41))
    assert {"lr", "tokens_per_s"} <= set(lines[0])
    assert config_from_file(run / "config.yaml") == config  # the run can be repeated exactly
    # only the adapter changed: the file holds exactly the LoRA factors
    assert all(".lora_" in key for key in _adapter(run))


def test_the_adapter_names_its_base_by_hub_id_and_the_run_keeps_the_alias(tmp_path, tiny_model_dir):
    """PEFT's AutoPeftModel and vLLM resolve base_model_name_or_path on the Hub; loralab's
    alias means nothing to them. (The tiny model stands in for the alias's weights.)"""
    model, tokenizer = tiny_pair(tiny_model_dir)
    config = run_config(tmp_path, model="smollm2-135m", max_steps=1, eval_every=0, save_every=0)
    train(config, model=model, tokenizer=tokenizer)
    written = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert config_from_file(tmp_path / "run" / "config.yaml").model == "smollm2-135m"


def test_same_seed_repeats_bit_for_bit(tmp_path, tiny_model_dir):
    results = []
    for name in ("a", "b"):
        model, tokenizer = tiny_pair(tiny_model_dir)
        train(run_config(tmp_path, name), model=model, tokenizer=tokenizer)
        results.append(_adapter(tmp_path / name))
    assert results[0].keys() == results[1].keys()
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_the_lean_paths_keep_the_plain_loss_curve(tmp_path, tiny_model_dir, monkeypatch):
    """The head and loss on counted positions, and LoRA dropout without a copy of its
    input, against the model's own loss and ``nn.Dropout`` (dropout 0.1, 6 steps)."""

    def plain(x, A, B, scale, dropout):
        return torch.nn.functional.linear(torch.nn.functional.linear(dropout(x), A), B) * scale

    curves = {}
    for name, chunked, dropout_path in (
        ("lean", True, None),
        ("plain-loss", False, None),
        ("plain-dropout", True, plain),
    ):
        if dropout_path is not None:
            monkeypatch.setattr("loralab.lora.layers.low_rank_path", dropout_path)
        model, tokenizer = tiny_pair(tiny_model_dir)
        assert counted_head(model) is not None  # the chunked loss applies to this model
        config = run_config(tmp_path, name, chunked_loss=chunked, save_every=0)
        curves[name] = train(config, model=model, tokenizer=tokenizer).losses
    lean = torch.tensor(curves["lean"])
    assert len(lean) == 6 and lean[-1] < lean[0]  # it learns
    for name in ("plain-loss", "plain-dropout"):
        assert torch.allclose(lean, torch.tensor(curves[name]), rtol=1e-5, atol=1e-6), name


def test_training_forwards_build_no_kv_cache(tmp_path, tiny_model_dir):
    model, tokenizer = tiny_pair(tiny_model_dir)
    seen = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("use_cache")), with_kwargs=True
    )
    train(run_config(tmp_path, max_steps=2, save_every=0), model=model, tokenizer=tokenizer)
    assert seen and all(value is False for value in seen)  # training steps and validation


def test_ctrl_c_leaves_a_checkpoint_that_resumes_to_the_same_adapter(
    tmp_path, tiny_model_dir, monkeypatch
):
    model, tokenizer = tiny_pair(tiny_model_dir)
    train(run_config(tmp_path, "straight", save_every=0), model=model, tokenizer=tokenizer)

    real_step, calls = train_module._optimizer_step, []

    def step_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # Ctrl-C arrives in the middle of the fourth step
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "_optimizer_step", step_then_interrupt)
    model, tokenizer = tiny_pair(tiny_model_dir)
    with pytest.raises(TrainingInterrupted, match=r"interrupted at step 4 of 6.*--resume"):
        train(run_config(tmp_path, "stopped", save_every=0), model=model, tokenizer=tokenizer)
    monkeypatch.setattr(train_module, "_optimizer_step", real_step)
    assert not (tmp_path / "stopped" / "adapter").exists()

    model, tokenizer = tiny_pair(tiny_model_dir)
    train(
        run_config(tmp_path, "stopped", save_every=0, resume=True), model=model, tokenizer=tokenizer
    )
    straight, resumed = _adapter(tmp_path / "straight"), _adapter(tmp_path / "stopped")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    steps = [
        json.loads(x)["step"]
        for x in (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [s for s in steps] == sorted(steps) and steps.count(4) >= 1


def test_resume_refuses_changed_settings_and_a_missing_checkpoint(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(run_config(tmp_path, "nothing", resume=True))
    model, tokenizer = tiny_pair(tiny_model_dir)
    train(run_config(tmp_path, "run", max_steps=6, save_every=3), model=model, tokenizer=tokenizer)
    with pytest.raises(ConfigError, match=r"settings differ from the checkpoint \(learning_rate"):
        train(run_config(tmp_path, "run", resume=True, learning_rate=0.5))


def test_bf16_autocast_and_tensorboard(tmp_path, tiny_model_dir):
    model, tokenizer = tiny_pair(tiny_model_dir)
    result = train(
        run_config(tmp_path, bf16=True, tensorboard=True), model=model, tokenizer=tokenizer
    )
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert any(
        p.name.startswith("events.out.tfevents")
        for p in (tmp_path / "run" / "tensorboard").iterdir()
    )


def test_bf16_on_a_cpu_without_bf16_kernels_warns(tmp_path, tiny_model_dir, monkeypatch):
    model, tokenizer = tiny_pair(tiny_model_dir)
    monkeypatch.setattr(train_module, "cpu_has_bf16_kernels", lambda: False)
    with pytest.warns(UserWarning, match="--bf16 on a CPU without bf16 matrix instructions"):
        train(run_config(tmp_path, bf16=True, max_steps=1), model=model, tokenizer=tokenizer)
    monkeypatch.setattr(train_module, "cpu_has_bf16_kernels", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model, tokenizer = tiny_pair(tiny_model_dir)
        train(
            run_config(tmp_path, "native", bf16=True, max_steps=1), model=model, tokenizer=tokenizer
        )


def test_classifier_training_trains_the_new_head(tmp_path):
    path = _classification_file(tmp_path)
    model, tokenizer = tiny_bert(), char_tokenizer()
    model.resize_token_embeddings(len(tokenizer))
    head_before = model.classifier.weight.detach().clone()
    config = run_config(
        tmp_path,
        data=str(path),
        validation_data=None,
        model_kind="classification",
        target_modules=["q", "v"],
        max_steps=5,
    )
    result = train(config, model=model, tokenizer=tokenizer)
    adapter = _adapter(tmp_path / "run")
    assert "base_model.model.classifier.weight" in adapter
    assert not torch.equal(adapter["base_model.model.classifier.weight"], head_before)
    assert result.steps == 5


def test_same_seed_draws_the_same_new_classifier_head(tmp_path):
    # The head is new: the saved model is the bare encoder. PyTorch seeds itself at random
    # in every process; two runs after different global seeds stand in for two processes.
    encoder, tokenizer = tiny_bert(), char_tokenizer()
    encoder.resize_token_embeddings(len(tokenizer))
    encoder.bert.save_pretrained(tmp_path / "encoder")
    tokenizer.save_pretrained(tmp_path / "encoder")
    path = _classification_file(tmp_path)
    heads = []
    for name, global_seed in (("a", 1), ("b", 2)):
        torch.manual_seed(global_seed)
        config = run_config(
            tmp_path,
            name,
            model=str(tmp_path / "encoder"),
            data=str(path),
            validation_data=None,
            model_kind="classification",
            target_modules=["q", "v"],
            max_steps=2,
        )
        train(config)
        heads.append(_adapter(tmp_path / name)["base_model.model.classifier.weight"])
    assert torch.equal(heads[0], heads[1])


def _classification_file(tmp_path):
    records = [
        {"text": f"{w} is {'big' if len(w) > 3 else 'small'}", "label": int(len(w) > 3)}
        for w in WORDS * 4
    ]
    path = tmp_path / "cls.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _cli(*args, cwd):
    return subprocess.Popen(
        [sys.executable, "-m", "loralab", "train", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_sigkill_then_resume_ends_with_the_same_adapter(tmp_path, tiny_model_dir):
    data = data_file(tmp_path)
    common = [
        *("--model", str(tiny_model_dir), "--data", str(data)),
        *shlex.split("--max-steps 150 --save-every 2 --batch-size 4 --max-length 32 --r 4"),
        *shlex.split("--learning-rate 0.01 --lora-dropout 0.1 --no-progress --seed 3"),
    ]
    straight = _cli(*common, "--output-dir", str(tmp_path / "straight"), cwd=tmp_path)
    assert straight.wait(timeout=300) == 0, straight.stdout.read()

    killed = _cli(*common, "--output-dir", str(tmp_path / "killed"), cwd=tmp_path)
    state = tmp_path / "killed" / "checkpoint" / "state.pt"
    deadline = time.time() + 240
    while time.time() < deadline and not state.exists():
        time.sleep(0.05)
    time.sleep(0.2)  # land somewhere in the middle of later steps (150 take seconds)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    assert not (tmp_path / "killed" / "adapter").exists(), "the run finished before the kill"

    resumed = _cli(*common, "--output-dir", str(tmp_path / "killed"), "--resume", cwd=tmp_path)
    output = resumed.stdout.read()
    assert resumed.wait(timeout=300) == 0, output
    a, b = _adapter(tmp_path / "straight"), _adapter(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_adalora_training_prunes_to_the_target_and_reports_the_ranks(tmp_path, tiny_model_dir):
    from loralab.methods.adalora.report import final_ranks

    model, tokenizer = tiny_pair(tiny_model_dir)
    config = run_config(
        tmp_path,
        method="adalora",
        r=6,
        target_r=2,
        adalora_tinit=2,
        adalora_tfinal=2,
        max_steps=10,
        save_every=0,
        target_modules=["q", "v"],
    )
    train(config, model=model, tokenizer=tokenizer)
    ranks = final_ranks(model)
    assert len(ranks) == 4 and sum(ranks.values()) == 2 * 4  # the total budget, spread
    for name in ("adalora_ranks.txt", "adalora_ranks.json", "adalora_ranks.png"):
        assert (tmp_path / "run" / name).exists(), name


def test_a_classifier_head_can_take_its_own_learning_rate(tmp_path):
    """After one step AdamW moves every parameter by lr × its normalised moment: the head
    ten times as far at ten times the rate, and LoRA exactly as far as without it."""
    path = _classification_file(tmp_path)
    trained = {}
    for name, head_rate in (("same", None), ("faster", 1e-2)):
        torch.manual_seed(0)  # the same base and head in both runs
        model, tokenizer = tiny_bert(), char_tokenizer()
        model.resize_token_embeddings(len(tokenizer))
        head_before = model.classifier.weight.detach().clone()
        config = run_config(
            tmp_path,
            name,
            data=str(path),
            validation_data=None,
            model_kind="classification",
            target_modules=["q", "v"],
            max_steps=1,
            warmup_steps=0,
            learning_rate=1e-3,
            head_learning_rate=head_rate,
            seed=3,
        )
        train(config, model=model, tokenizer=tokenizer)
        adapter = _adapter(tmp_path / name)
        trained[name] = (adapter, adapter["base_model.model.classifier.weight"] - head_before)
    (same, moved_same), (faster, moved_faster) = trained["same"], trained["faster"]
    lora = [k for k in same if ".lora_" in k]
    assert lora and all(torch.equal(same[k], faster[k]) for k in lora)
    assert torch.allclose(moved_faster, 10 * moved_same, rtol=1e-4, atol=1e-9)
    with pytest.raises(ConfigError, match="head_learning_rate is for a classifier's new head"):
        run_config(tmp_path, "lm", head_learning_rate=1e-2)
    for bad, words in (
        ({"fsdp": True}, "fsdp trains every parameter at one learning rate"),
        ({"head_learning_rate": 0}, r"head_learning_rate must be a number in \(0, 1\)"),
    ):
        with pytest.raises(ConfigError, match=words):
            run_config(
                tmp_path, "bad", model_kind="classification", **{"head_learning_rate": 1e-2, **bad}
            )


def test_ctrl_c_is_acknowledged_skips_a_due_validation_and_twice_stops_at_once(
    tmp_path, tiny_model_dir, monkeypatch, capsys
):
    real_step, calls = train_module._optimizer_step, []
    presses = {4: 1}  # Ctrl-C once in the fourth step, where a validation falls due

    def step_then_interrupt(*args, **kwargs):
        calls.append(1)
        for _ in range(presses.get(len(calls), 0)):
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "_optimizer_step", step_then_interrupt)
    model, tokenizer = tiny_pair(tiny_model_dir)
    config = run_config(tmp_path, "once", eval_every=2, save_every=0)
    with pytest.raises(TrainingInterrupted, match="interrupted at step 4 of 6"):
        train(config, model=model, tokenizer=tokenizer)
    assert "SIGINT: stopping after this step, with a checkpoint" in capsys.readouterr().err
    lines = [json.loads(x) for x in (tmp_path / "once" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "validation_loss" in x] == [2]  # not 4: it stopped

    calls.clear()
    presses.clear()
    presses[3] = 2  # twice in the third step: out at once, one line, the last checkpoint kept
    model, tokenizer = tiny_pair(tiny_model_dir)
    config = run_config(tmp_path, "twice", eval_every=0, save_every=2)
    with pytest.raises(TrainingInterrupted, match="stopped at once by a second signal, in step 3"):
        train(config, model=model, tokenizer=tokenizer)
    saved = torch.load(tmp_path / "twice" / "checkpoint" / "state.pt", weights_only=True)
    assert saved["step"] == 2


def test_a_bf16_base_trains_fp32_factors_that_learn(tmp_path, tiny_model_dir):
    config = run_config(
        tmp_path,
        "bf16",
        model=str(tiny_model_dir),
        dtype="bf16",
        max_steps=40,
        eval_every=20,
        save_every=0,
        target_modules=["q", "v", "lm_head"],
    )
    result = train(config)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    dtypes = {p.dtype for n, p in result.model.named_parameters() if ".lora." not in f".{n}"}
    assert dtypes == {torch.bfloat16}  # the frozen base: half the memory
    assert {p.dtype for p in result.model.parameters() if p.requires_grad} == {torch.float32}
    with pytest.raises(ConfigError, match="dtype must be one of fp32, bf16, fp16, auto"):
        run_config(tmp_path, dtype="half")
