"""The command line on a tiny local model: train (flags and YAML), eval, generate, merge, info."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loralab.cli import main

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
