"""The command line on a tiny local model: train (flags and YAML), eval, generate, merge, info."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import assert_one_line_error, run_cli, save_random_adalora
from loralab.cli import main
from loralab.lora.config import ConfigError
from loralab.training.config import TrainConfig

WORDS = ["cat", "dog", "bird", "fish", "lion", "bear", "wolf", "frog"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """One short CLI training run (settings from YAML, one flag overriding it)."""
    root = tmp_path_factory.mktemp("cli")
    data = root / "train.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"Say {w}:", "completion": f" {w}"}) + "\n" for w in WORDS * 4
        )
    )
    config = root / "run.yaml"
    config.write_text(
        f"model: {tiny_model_dir}\ndata: {data}\noutput_dir: {root / 'run'}\n"
        "r: 4\ntarget_modules: [q, v, lm_head]\nmax_steps: 4\nbatch_size: 4\nmax_length: 32\n"
        "learning_rate: 0.01\nprogress: false\n"
    )
    assert main(["train", "--config", str(config), "--max-steps", "6"]) == 0
    return root


def test_train_from_yaml_with_a_flag_overriding_it(trained):
    saved = (trained / "run" / "config.yaml").read_text()
    assert "max_steps: 6" in saved and "r: 4" in saved
    metrics = (trained / "run" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(metrics[-1])["step"] == 6


def test_info_describes_the_adapter(trained, capsys):
    assert main(["info", str(trained / "run" / "adapter")]) == 0
    out = capsys.readouterr().out
    assert "r = 4" in out and "adapted modules: 5" in out
    assert "model.layers.0.self_attn.q_proj  r=4" in out and "file size:" in out


def test_merge_writes_a_plain_transformers_model(trained, tiny_model_dir, capsys):
    output = trained / "merged"
    adapter = trained / "run" / "adapter"
    assert (
        main(
            [
                "merge",
                "--model",
                str(tiny_model_dir),
                "--adapter",
                str(adapter),
                "--output",
                str(output),
            ]
        )
        == 0
    )
    merged = AutoModelForCausalLM.from_pretrained(output).eval()  # no loralab involved
    tokens = torch.tensor([[5, 6, 7, 8]])
    import loralab

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    adapted = loralab.load_adapter(base, adapter)
    with torch.no_grad():
        torch.testing.assert_close(
            merged(tokens).logits, adapted(tokens).logits, atol=1e-5, rtol=1e-5
        )
    assert AutoTokenizer.from_pretrained(output).eos_token == "<eos>"
    (trained / "plain").touch()
    plain = (trained / "plain").stat().st_mode & 0o777  # what a plain write gives here
    modes = {p.name: p.stat().st_mode & 0o777 for p in output.iterdir()}
    assert modes["model.safetensors"] == plain, modes  # Transformers staged it 0600


def test_generate_and_eval(trained, tiny_model_dir, capsys):
    adapter = str(trained / "run" / "adapter")
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_model_dir),
                "--adapter",
                adapter,
                "--max-new-tokens",
                "5",
                "Say cat:",
                "Say dog:",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "### Say cat:" in out and "### Say dog:" in out
    assert main(["eval", "--model", str(tiny_model_dir), "--task", "nli", "--size", "8"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["task"] == "nli" and result["examples"] == 8 and 0 <= result["accuracy"] <= 100


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--task", "nope"], "unknown task 'nope'"),
        (["train", "--r", "0"], "r must be an integer ≥ 1, got 0"),
        (["train", "--data", "missing.jsonl"], "missing.jsonl: no such data file"),
        (["train", "--model", "no-such-model", "--data", "{data}"], "not an embedded model"),
        (["info", "nowhere"], "nowhere is not an adapter directory"),
        (
            ["eval", "--task", "e2e", "--size", "999999", "--model", "{model}"],
            "the maximum is 1200",
        ),
    ],
)
def test_bad_input_is_one_clear_line(argv, message, trained, tiny_model_dir, capsys):
    argv = [a.format(data=trained / "train.jsonl", model=tiny_model_dir) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("loralab: error: ") and message in err
    assert "Traceback" not in err


# -- every error a user can cause: one line, exit status 2, refused before slow work --------


@pytest.fixture
def nothing_loads(monkeypatch):
    """Loading a model, or training, fails the test: the error must come before."""

    def slow_work(*args, **kwargs):
        raise AssertionError("slow work started before the bad input was refused")

    import loralab.experiments.runs
    import loralab.models.loading

    monkeypatch.setattr(loralab.models.loading, "load_model", slow_work)
    monkeypatch.setattr(loralab.experiments.runs, "train_and_score", slow_work)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--data", "{data}", "--output-dir", "{file}"], "is an existing file"),
        (
            ["train", "--data", "{data}", "--output-dir", "{file}/run"],
            "is a file, so no directory can go there",
        ),
        (["merge", "--adapter", "{adapter}", "--output", "{file}"], "is an existing file"),
        (
            ["merge", "--adapter", "{adapter}", "--output", "{full}"],
            "is a directory that is not empty; name a new directory (nothing in it was touched)",
        ),
        (["demo", "--output-dir", "{file}"], "--output-dir {file} is an existing file"),
        (["demo", "--steps", "0"], "argument --steps: must be an integer ≥ 1, got 0"),
        (["reproduce", "ranks", "--quick", "--output-dir", "{file}"], "is an existing file"),
        (["eval", "--batch-size", "0"], "argument --batch-size: must be an integer ≥ 1"),
        (["eval", "--split", "dev"], "argument --split: invalid choice: 'dev'"),
        (["eval", "--task", "e2e", "--chat-shots", "-1"], "--chat-shots must be ≥ 0, got -1"),
        (["eval"], "what to score? name --task (e2e, sql, nli, pydoc) or --data FILE"),
        (["eval", "--adapter", "{adapter}"], "the adapter was trained on"),
        (["eval", "--data", "{data}", "--task", "e2e"], "give one"),
        (["eval", "--task", "e2e", "--model-kind", "classification"], "e2e is a generation"),
        (["generate", "--max-new-tokens", "0", "hi"], "must be an integer ≥ 1, got 0"),
        (["train", "--config", "{full}"], "a directory, not a config file"),
        (["train", "--config", "{broken_yaml}"], "line 2, column 1: malformed YAML (while"),
        (["train", "--data", "{full}"], "a directory, not a data file"),
        (
            ["train", "--data", "{data}", "--model-kind", "classification"],
            "model_kind 'classification' trains on {{text, label}} records; these are "
            "prompt_completion records",
        ),
        (["train", "--data", "{labelled}"], "{{text, label}} records train a classifier"),
        (["generate", "--adapter", "{file}/nowhere", "hi"], "nowhere: no such directory"),
        (["eval", "--adapter", "{full}"], "holds neither adapter_config.json nor method.json"),
        (["merge", "--adapter", "{full}", "--output", "{file}2"], "holds neither"),
    ],
)
def test_bad_input_is_refused_in_one_line_before_any_slow_work(
    argv, message, trained, tmp_path, nothing_loads, capsys
):
    paths = {
        "data": trained / "train.jsonl",
        "adapter": trained / "run" / "adapter",
        "file": tmp_path / "a-file",
        "full": tmp_path / "full",
        "broken_yaml": tmp_path / "run.yaml",
        "labelled": tmp_path / "labelled.jsonl",
    }
    paths["file"].write_text("mine")
    paths["full"].mkdir()
    (paths["full"] / "keep.txt").write_text("mine")
    paths["broken_yaml"].write_text("r: [\n")
    paths["labelled"].write_text('{"text": "good", "label": 1}\n')
    argv = [a.format(**paths) for a in argv]
    status, lines = run_cli(argv, capsys)
    assert_one_line_error(status, lines, message.format(**paths))
    assert (
        paths["file"].read_text() == "mine" and (paths["full"] / "keep.txt").read_text() == "mine"
    )
    assert sorted(p.name for p in paths["full"].iterdir()) == ["keep.txt"]


@pytest.mark.parametrize(
    "value, words",
    [
        (float("nan"), ".weight' holds NaN or infinite values"),  # refused when read
        (1e30, "has a non-finite ΔW (NaN or Inf) in 'lm_head'; nothing was merged"),
    ],
    ids=["nan factor", "overflowing product"],
)
def test_merge_of_an_adapter_with_a_nan_is_one_line_and_writes_nothing(
    trained, tiny_model_dir, tmp_path, capsys, value, words
):
    from safetensors.torch import load_file, save_file

    adapter = tmp_path / "nan-adapter"
    shutil.copytree(trained / "run" / "adapter", adapter)
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = value
    tensors[key.replace("lora_B", "lora_A")][0, 0] = value
    save_file(tensors, adapter / "adapter_model.safetensors")
    output = tmp_path / "merged"
    argv = ["merge", "--model", str(tiny_model_dir), "--adapter", str(adapter)]
    status, lines = run_cli([*argv, "--output", str(output)], capsys)
    assert_one_line_error(status, lines, words)
    assert list(tmp_path.iterdir()) == [adapter]


def test_a_merge_that_fails_while_writing_leaves_nothing(
    trained, tiny_model_dir, tmp_path, monkeypatch, capsys
):
    from transformers import PreTrainedTokenizerBase

    def disk_full(self, directory, **kwargs):
        (Path(directory) / "tokenizer.json").write_text("{")  # half-written
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", disk_full)
    output = tmp_path / "merged"
    argv = ["merge", "--model", str(tiny_model_dir), "--adapter", str(trained / "run" / "adapter")]
    status, lines = run_cli([*argv, "--output", str(output)], capsys)
    assert_one_line_error(status, lines, "No space left on device")
    assert list(tmp_path.iterdir()) == []  # neither the output nor a scratch directory


def test_merge_folds_an_adalora_adapter_into_a_plain_directory(tiny_model_dir, tmp_path):
    """AdaLoRA is mergeable: its P Λ Q goes into the weights, and the directory is a plain
    model (it once came out with AdaLoRA's wrappers still in it, unmerged)."""
    from loralab.models.loading import load_model

    model, _ = load_model(str(tiny_model_dir))
    save_random_adalora(model, tmp_path / "adalora", ["q_proj"])
    tokens = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        expected = model(tokens).logits
    argv = ["merge", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "adalora")]
    assert main([*argv, "--output", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name in merged.state_dict())
    with torch.no_grad():
        assert torch.allclose(merged(tokens).logits, expected, atol=1e-5)


# -- what a new user hits first ------------------------------------------------------------


def test_a_finished_run_is_never_trained_over_unasked(trained, tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    (run / "notes.txt").write_text("mine")  # a file of the user's own
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(trained / "train.jsonl")]
    argv += ["--output-dir", str(run), "--max-steps", "2", "--batch-size", "4", "--r", "2"]
    status, lines = run_cli([*argv, "--no-progress"], capsys)
    assert_one_line_error(status, lines, "holds a finished run (its adapter is there)")
    assert "add --resume to continue it, --overwrite to replace it" in lines[0]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert main([*argv, "--no-progress", "--overwrite"]) == 0
    assert "--overwrite: removed a finished run" in capsys.readouterr().err
    assert (run / "notes.txt").read_text() == "mine"
    assert len((run / "metrics.jsonl").read_text().splitlines()) < len(
        (trained / "run" / "metrics.jsonl").read_text().splitlines()
    )


def test_a_mistyped_or_abbreviated_flag_is_refused_with_what_it_may_mean(capsys):
    status, lines = run_cli(["train", "--learnin-rate", "0.1"], capsys)
    assert_one_line_error(status, lines, "unrecognized arguments: --learnin-rate (did you mean")
    assert "--learning-rate" in lines[0]
    status, lines = run_cli(["train", "--learn", "0.1"], capsys)  # no abbreviations
    assert_one_line_error(status, lines, "unrecognized arguments: --learn (did you mean")
    assert "--learning-rate" in lines[0]  # the flag it begins
    status, lines = run_cli(["serve", "--max-lora", "2"], capsys)
    assert_one_line_error(status, lines, "--max-lora (did you mean --max-loras")


def test_pattern_flags_take_pattern_value_pairs_and_name_a_bad_one(capsys):
    from loralab.cli import _parse, build_parser

    args = _parse(
        build_parser(),
        [
            "train",
            "--rank-pattern",
            "q=16",
            "k=4",
            "--alpha-pattern",
            "q=2.5",
            "--layers-to-transform",
            "0",
            "1",
            "--bias",
            "all",
        ],
    )
    assert (args.rank_pattern, args.alpha_pattern) == ({"q": 16, "k": 4}, {"q": 2.5})
    assert (args.layers_to_transform, args.bias) == ([0, 1], "all")
    for bad in ("q=x", "=4", "q"):
        status, lines = run_cli(["train", "--rank-pattern", bad], capsys)
        assert_one_line_error(status, lines, f"--rank-pattern takes PATTERN=INT pairs, got {bad!r}")


def test_serve_takes_an_adapter_folder_alone_named_after_its_run():
    from loralab.cli import build_parser

    args = build_parser().parse_args(
        ["serve", "--adapter", "runs/e2e/adapter", "--adapter", "x/sql", "--adapter", "n=d"]
    )
    assert [name for name, _ in args.adapter] == ["e2e", "sql", "n"]


def test_the_start_is_described_and_dropped_examples_are_counted(
    trained, tiny_model_dir, tmp_path, capsys
):
    data = tmp_path / "long.jsonl"
    records = [{"prompt": f"Say {w}:", "completion": f" {w}"} for w in WORDS]
    records += [{"prompt": "Say " + "very " * 40 + "long:", "completion": " no"}] * 3
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--r", "2"]
    argv += ["--output-dir", str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "4"]
    argv += ["--max-length", "24", "--eval-every", "1", "--validation-data", str(data)]
    with pytest.warns(UserWarning, match="3 of 11 training examples were dropped"):
        assert main(argv) == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("loralab train: ")]
    assert lines[0].startswith(f"loralab train: model {tiny_model_dir} on cpu, float32")
    assert "dropped: beyond --max-length" in lines[1] and "steps per epoch of 4" in lines[1]
    assert lines[2].startswith("loralab train: fill: ") and "% of the tokens computed" in lines[2]
    assert lines[3].startswith("loralab train: trainable: ")
    assert "; validation loss " in captured.out and "at step 2" in captured.out


def test_epochs_train_that_many_passes_and_a_resume_counts_the_same(
    trained, tiny_model_dir, tmp_path, capsys
):
    run = tmp_path / "run"
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(trained / "train.jsonl")]
    argv += ["--output-dir", str(run), "--epochs", "2", "--batch-size", "4", "--r", "2"]
    argv += ["--save-every", "1", "--no-progress"]
    assert main(argv) == 0
    examples = len((trained / "train.jsonl").read_text().splitlines())
    steps = 2 * -(-examples // 4)
    assert f"trained {steps} steps" in capsys.readouterr().out
    saved = (run / "config.yaml").read_text()
    assert "epochs: 2.0" in saved and "max_steps: null" in saved
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0  # nothing left
    assert f"trained {steps} steps" in capsys.readouterr().out
    status, lines = run_cli([*argv[:-3], "--max-steps", "3", "--overwrite"], capsys)
    assert_one_line_error(status, lines, "both say how long to train; give one")


def test_help_answers_before_torch_loads():
    """`--help` and a mistyped flag cost no import of torch or Transformers (~3 s)."""
    import subprocess
    import sys

    code = (
        "import sys, contextlib, io\n"
        "from loralab.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['train', '--help'])\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "[]", done.stderr


def _generate_with_adapter(trained, tiny_model_dir) -> list[str]:
    """``loralab generate`` on the tiny model with the trained run's adapter."""
    adapter = trained / "run" / "adapter"
    return ["generate", "--model", str(tiny_model_dir), "--adapter", str(adapter)]


def test_engine_chooses_what_generates_and_hf_gives_the_same_text(trained, tiny_model_dir, capsys):
    import loralab.generate

    argv = _generate_with_adapter(trained, tiny_model_dir)
    texts = {}
    try:
        for engine in ("engine", "hf"):
            assert main([*argv, "--engine", engine, "--max-new-tokens", "6", "Say cat:"]) == 0
            texts[engine] = capsys.readouterr().out
    finally:
        loralab.generate.use_engine("auto")  # the flag sets the process's default
    assert texts["engine"] == texts["hf"] and "### Say cat:" in texts["hf"]


def test_engine_weights_are_said_once_and_refused_where_bf16_is_emulated(
    trained, tiny_model_dir, monkeypatch, capsys, caplog
):
    import loralab.generate
    from loralab.engine import weights

    argv = _generate_with_adapter(trained, tiny_model_dir)
    argv += ["--engine-weights", "bf16", "--max-new-tokens", "6", "Say cat:", "Say dog:"]
    monkeypatch.setattr(weights, "_native_bf16", lambda device: "the test says so")
    monkeypatch.setattr(loralab.generate, "_said", set())
    try:
        assert main(argv) == 0
        said = [r.message for r in caplog.records if "engine's weights" in r.message]
        assert said == ["the engine's weights: bf16 (the test says so)"]
        monkeypatch.setattr(weights, "_native_bf16", lambda device: None)
        capsys.readouterr()
        assert main(argv) != 0
        assert "neither AVX512-BF16 nor AMX" in capsys.readouterr().err
    finally:
        loralab.generate.use_engine("auto")  # the flags set the process's defaults


def test_generate_that_gives_no_text_without_chat_says_to_add_chat(
    tiny_model_dir, monkeypatch, capsys
):
    import loralab.generate

    monkeypatch.setattr(loralab.generate, "generate", lambda model, tok, prompts, *a, **k: [""])
    assert main(["generate", "--model", str(tiny_model_dir), "hello"]) == 0
    assert "no text was generated" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_model_dir), "--chat", "hello"]) == 0
    assert "no text was generated" not in capsys.readouterr().err


def test_an_interrupted_run_resumes_from_its_folder_alone(
    trained, tiny_model_dir, tmp_path, monkeypatch, capsys
):
    import os
    import signal

    import loralab.training.loop as train_module

    real_step, calls = train_module._optimizer_step, []

    def step_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # Ctrl-C in the middle of the second step
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "_optimizer_step", step_then_interrupt)
    run = tmp_path / "run"
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(trained / "train.jsonl")]
    argv += ["--output-dir", str(run), "--max-steps", "4", "--batch-size", "4", "--r", "2"]
    assert main([*argv, "--no-progress"]) == 130
    assert f"continue with: loralab train --resume {run}" in capsys.readouterr().err
    monkeypatch.setattr(train_module, "_optimizer_step", real_step)
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert "trained 4 steps" in capsys.readouterr().out
    status, lines = run_cli(["train", "--resume", str(tmp_path)], capsys)
    assert_one_line_error(status, lines, "no config.yaml there")


def test_eval_scores_your_own_records_and_writes_the_predictions(
    trained, tiny_model_dir, tmp_path, capsys
):
    data = tmp_path / "held_out.jsonl"
    records = [{"prompt": f"Say {w}:", "completion": f" {w}"} for w in WORDS[:4]]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    predictions = tmp_path / "out" / "predictions.jsonl"
    argv = ["eval", "--model", str(tiny_model_dir), "--adapter", str(trained / "run" / "adapter")]
    argv += ["--data", str(data), "--predictions", str(predictions), "--max-new-tokens", "4"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == 4
    assert {"loss", "perplexity", "exact_match", "bleu", "rouge_l"} <= set(result)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in records]
    assert [r["reference"] for r in rows] == [r["completion"] for r in records]
    assert all(isinstance(r["prediction"], str) for r in rows)


def test_a_metric_of_your_own_and_chats_scored_on_their_last_turn(tiny_model_dir):
    from loralab.evaluate import evaluate_records
    from loralab.models.loading import load_model
    from loralab.tasks.text_metrics import exact_match

    model, tokenizer = load_model(str(tiny_model_dir))
    chats = [
        {"messages": [{"role": "user", "content": f"hi {w}"}, {"role": "assistant", "content": w}]}
        for w in WORDS[:3]
    ]

    def lengths(predictions, references):
        return {"mean_length": sum(map(len, predictions)) / len(predictions)}

    result = evaluate_records(model, tokenizer, chats, max_new_tokens=3, metrics=[lengths])
    assert [row["reference"] for row in result.predictions] == WORDS[:3]
    assert result.predictions[0]["prompt"] == [{"role": "user", "content": "hi cat"}]
    hypotheses = [row["prediction"] for row in result.predictions]
    assert result.metrics["mean_length"] == sum(map(len, hypotheses)) / 3
    assert result.metrics["exact_match"] == exact_match(hypotheses, WORDS[:3])
    text = evaluate_records(model, tokenizer, [{"text": "a cat and a dog"}])
    assert set(text.metrics) == {"loss", "perplexity"} and text.predictions == []


def test_the_device_is_the_gpu_when_there_is_one_and_is_always_said(
    tiny_model_dir, monkeypatch, capsys
):
    import torch

    from loralab.models.devices import choose_device

    assert choose_device("auto") == torch.device("cpu")  # this machine: no CUDA
    status, lines = run_cli(["generate", "--device", "cuda", "hi"], capsys)
    assert_one_line_error(status, lines, "--device cuda: PyTorch sees no CUDA GPU here")
    status, lines = run_cli(["generate", "--device", "gpu", "hi"], capsys)
    assert_one_line_error(status, lines, "--device must be auto, cpu, cuda or cuda:N, got 'gpu'")
    assert main(["generate", "--model", str(tiny_model_dir), "hi", "--max-new-tokens", "2"]) == 0
    assert f"loralab: {tiny_model_dir} on cpu" in capsys.readouterr().err
    # where PyTorch sees GPUs (mocked here; benchmarks/gpu_devices.py runs it for real)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert choose_device(None) == choose_device("auto") == torch.device("cuda", 0)
    assert choose_device("cuda:1") == torch.device("cuda", 1)
    assert choose_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="this machine has 2 CUDA GPU"):
        choose_device("cuda:2")
    with pytest.raises(ConfigError, match="device must be auto, cpu, cuda or cuda:N, got 'gpu'"):
        TrainConfig(device="gpu")


def test_the_base_dtype_is_chosen_and_a_merge_keeps_the_bases_own(
    trained, tiny_model_dir, tmp_path, capsys
):
    from safetensors import safe_open

    base = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(base)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(base)
    run = tmp_path / "run"
    argv = ["train", "--model", str(base), "--data", str(trained / "train.jsonl"), "--r", "2"]
    argv += ["--output-dir", str(run), "--max-steps", "2", "--batch-size", "4", "--no-progress"]
    assert main([*argv, "--dtype", "bf16"]) == 0
    with safe_open(run / "adapter" / "adapter_model.safetensors", "pt") as factors:
        assert {factors.get_tensor(k).dtype for k in factors.keys()} == {torch.float32}  # noqa: SIM118

    def merged_dtypes(output, *flags):
        argv = ["merge", "--model", str(base), "--adapter", str(run / "adapter")]
        assert main([*argv, "--output", str(output), *flags]) == 0
        with safe_open(output / "model.safetensors", "pt") as merged:
            return {merged.get_tensor(k).dtype for k in merged.keys()}  # noqa: SIM118

    assert merged_dtypes(tmp_path / "as-saved") == {torch.bfloat16}  # not fp32 as before
    assert merged_dtypes(tmp_path / "fp32", "--dtype", "fp32") == {torch.float32}
    argv = ["generate", "--model", str(base), "--adapter", str(run / "adapter"), "hi"]
    assert main([*argv, "--dtype", "bf16", "--max-new-tokens", "2"]) == 0
    capsys.readouterr()
    status, lines = run_cli(["generate", "--dtype", "half", "hi"], capsys)
    assert_one_line_error(status, lines, "--dtype must be one of fp32, bf16, fp16, auto")


def test_generate_and_train_over_a_packed_gguf_base(tmp_path, capsys):
    from conftest import save_tiny_gguf

    path = tmp_path / "base.gguf"
    save_tiny_gguf(path, linear_type="Q8_0")
    texts = {}
    for flags in ([], ["--quantized-base", "gguf"]):
        command = ["generate", "--model", str(path), "--max-new-tokens", "6", *flags, "the"]
        assert main(command) == 0
        texts[bool(flags)] = capsys.readouterr().out
    assert texts[True] == texts[False]
    data = tmp_path / "records.jsonl"
    data.write_text('{"prompt": "the ", "completion": "the the"}\n' * 4)
    run = ["train", "--model", str(path), "--data", str(data), "--max-steps", "1"]
    run += ["--quantized-base", "gguf", "--output-dir", str(tmp_path / "run")]
    assert main(run) == 0
    err = capsys.readouterr().err
    assert "linear weights packed as in the GGUF (15 Q8_0)" in err
    assert (tmp_path / "run" / "adapter" / "README.md").exists()
    assert main(["info", str(tmp_path / "run" / "adapter")]) == 0
    info = capsys.readouterr().out
    assert "trained over a quantized base: file: `base.gguf`" in info
    assert "trained over a quantized base: packed linear weights: 15 × Q8_0" in info
    assert main([*run[:-2], "--output-dir", str(tmp_path / "bad"), "--quantized-base", "nf5"]) == 2
    assert (
        "quantized_base must be one of gguf, nf4, fp4, int8, got 'nf5'" in capsys.readouterr().err
    )


def test_train_generate_info_and_merge_over_a_bitsandbytes_base(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "records.jsonl"
    data.write_text('{"prompt": "the ", "completion": "the the"}\n' * 4)
    run = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--max-steps", "2"]
    assert main([*run, "--quantized-base", "nf4", "--output-dir", str(tmp_path / "run")]) == 0
    assert "linear weights quantized by bitsandbytes (14 nf4)" in capsys.readouterr().err
    adapter = tmp_path / "run" / "adapter"
    assert main(["info", str(adapter)]) == 0
    assert "trained over a quantized base: bnb_4bit_quant_type: nf4" in capsys.readouterr().out
    generate = ["generate", "--model", str(tiny_model_dir), "--adapter", str(adapter)]
    assert main([*generate, "--quantized-base", "nf4", "--max-new-tokens", "4", "the"]) == 0
    merge = ["merge", "--model", str(tiny_model_dir), "--adapter", str(adapter)]
    merge += ["--quantized-base", "nf4"]
    assert main([*merge, "--output", str(tmp_path / "dense")]) == 0
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "quantization_config" not in config  # a float model
    capsys.readouterr()
    assert main([*merge, "--requantize", "--output", str(tmp_path / "nf4")]) == 0
    assert "warning: re-quantized 4 merged weights" in capsys.readouterr().err  # q and v
    config = json.loads((tmp_path / "nf4" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    status, lines = run_cli([*merge[:-2], "--requantize", "--output", str(tmp_path / "x")], capsys)
    assert_one_line_error(status, lines, "--requantize stores the merged weights in bitsandbytes")
    gguf = [*merge, "--requantize", "--format", "gguf", "--output", str(tmp_path / "x.gguf")]
    status, lines = run_cli(gguf, capsys)
    assert_one_line_error(status, lines, "--requantize re-quantizes a Transformers directory")
