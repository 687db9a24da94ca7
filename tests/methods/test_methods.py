"""The method registry, saving and loading any method, and training with each one."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from conftest import make_model, token_batch
from loralab import LoraConfig
from loralab.files.peft_config import AdapterFileError
from loralab.lora.config import ConfigError
from loralab.lora.inject import trainable_parameters
from loralab.methods import (
    METHOD_NAMES,
    METHODS,
    Method,
    MethodSettings,
    applied_method,
    get_method,
)
from loralab.methods.method_files import METHOD_FILE, METHOD_WEIGHTS, load_method, save_method
from loralab.training.config import TrainConfig
from loralab.training.loop import train

PAPER_METHODS = (
    "full",
    "ft-top2",
    "bitfit",
    "preembed",
    "prelayer",
    "adapter-h",
    "adapter-l",
    "lora",
    "lora-pe",
)
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"])
SETTINGS = MethodSettings(prefix_length=3, infix_length=1, adapter_rank=4, top_layers=1)


def _output(model, ids):
    out = model(ids)
    return out.logits


def _apply(name, model):
    method = get_method(name)
    method.apply(model, SETTINGS, LORA if method.uses_lora else None)
    return method


def _perturb(model, seed=5):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.add_(0.1 * noise.to(parameter.dtype))


def test_every_method_of_the_paper_is_registered():
    assert set(PAPER_METHODS) <= set(METHOD_NAMES)


def test_an_unknown_method_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown method 'lorra'.*lora-pe.*adapter-h"):
        get_method("lorra")
    with pytest.raises(ConfigError, match="unknown method"):
        TrainConfig(method="prefix", task="e2e")


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"adapter_rank": 0}, "adapter_rank must be an integer ≥ 1, got 0"),
        ({"prefix_length": -1}, "prefix_length must be an integer ≥ 0"),
        ({"top_layers": 0}, "top_layers must be an integer ≥ 1"),
    ],
)
def test_bad_method_settings_are_refused_when_the_config_is_built(settings, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(task="e2e", **settings)


@pytest.mark.parametrize("name", PAPER_METHODS)
@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_trainable_count_equals_the_formula(name, kind):
    method = get_method(name)
    lora = LORA if method.uses_lora else None
    expected = method.expected_parameters(make_model(kind), SETTINGS, lora)
    model = make_model(kind)
    method.apply(model, SETTINGS, lora)
    assert trainable_parameters(model).trainable == expected


@pytest.mark.parametrize("name", PAPER_METHODS)
def test_counts_on_the_meta_device_match_the_real_model(name):
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=101,
        max_position_embeddings=64,
    )
    with torch.device("meta"):
        meta = LlamaForCausalLM(config)
    torch.manual_seed(0)
    real = LlamaForCausalLM(config)
    counts = []
    for model in (meta, real):
        method = _apply(name, model)
        counts.append(trainable_parameters(model).trainable)
    assert (
        counts[0]
        == counts[1]
        == method.expected_parameters(
            LlamaForCausalLM(config), SETTINGS, LORA if method.uses_lora else None
        )
    )


@pytest.mark.parametrize("name", PAPER_METHODS)
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_save_then_load_gives_the_same_outputs(name, kind, tmp_path):
    model = make_model(kind)
    _apply(name, model)
    _perturb(model)
    save_method(model, tmp_path / "saved", base_model_name_or_path="tiny")
    loaded = load_method(make_model(kind), tmp_path / "saved")
    assert applied_method(loaded).name == name
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(_output(loaded, ids), _output(model, ids), rtol=0, atol=0)
    if name == "lora":  # a plain PEFT adapter directory, nothing of ours
        assert not (tmp_path / "saved" / METHOD_FILE).exists()
    else:
        assert json.loads((tmp_path / "saved" / METHOD_FILE).read_text())["method"] == name


def test_a_file_for_another_model_is_refused_and_the_model_is_unchanged(tmp_path):
    model = make_model("llama")
    _apply("adapter-h", model)
    save_method(model, tmp_path / "saved")
    other = make_model("gpt2")
    before = {k: v.clone() for k, v in other.state_dict().items()}
    names = [n for n, _ in other.named_modules()]
    with pytest.raises(AdapterFileError, match="saved"):
        load_method(other, tmp_path / "saved")
    assert [n for n, _ in other.named_modules()] == names
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    assert applied_method(other) is None


def test_a_wrong_shape_names_the_tensor_and_both_shapes(tmp_path):
    model = make_model("llama")
    _apply("bitfit", model)
    save_method(model, tmp_path / "saved")
    settings = json.loads((tmp_path / "saved" / METHOD_FILE).read_text())
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "saved" / METHOD_WEIGHTS)
    key = next(iter(tensors))
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1)
    save_file(tensors, tmp_path / "saved" / METHOD_WEIGHTS)
    with pytest.raises(AdapterFileError, match=rf"{key} has shape"):
        load_method(make_model("llama"), tmp_path / "saved")
    settings["method"] = "nope"
    (tmp_path / "saved" / METHOD_FILE).write_text(json.dumps(settings))
    with pytest.raises(AdapterFileError, match="unknown method 'nope'"):
        load_method(make_model("llama"), tmp_path / "saved")


def _data(tmp_path):
    records = [{"prompt": f"Say {w}:", "completion": f" {w}"} for w in ["cat", "dog", "owl"] * 8]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.mark.parametrize("name", PAPER_METHODS)
def test_training_with_each_method_moves_only_its_parameters(name, tmp_path, tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    config = TrainConfig(
        model="unused",
        method=name,
        data=str(_data(tmp_path)),
        output_dir=str(tmp_path / "run"),
        r=4,
        target_modules=["q", "v"],
        prefix_length=2,
        adapter_rank=4,
        top_layers=1,
        learning_rate=1e-2,
        max_steps=3,
        batch_size=4,
        max_length=32,
        progress=False,
        save_every=2,
    )
    result = train(config, model=model, tokenizer=tokenizer)
    assert result.trainable == get_method(name).expected_parameters(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        config.method_settings(),
        config.lora_config() if get_method(name).uses_lora else None,
    )
    changed = {
        k for k, v in model.state_dict().items() if k in base and not torch.equal(v, base[k])
    }
    if name == "full":
        assert changed  # everything may move
    elif name == "ft-top2":
        assert changed and all(".layers.1." in k for k in changed), changed
    else:
        assert not changed, changed  # the base stays as it was
    reloaded = load_method(AutoModelForCausalLM.from_pretrained(tiny_model_dir), result.adapter_dir)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_a_peft_adapter_listing_modules_the_model_lacks_loads_like_in_peft(tmp_path):
    # PEFT skips target entries that match nothing; so does loading through load_method.
    model = make_model("llama")
    _apply("lora", model)
    _perturb(model)
    save_method(model, tmp_path / "saved")
    config_path = tmp_path / "saved" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["target_modules"] = [*config["target_modules"], "not_a_module"]
    config_path.write_text(json.dumps(config))
    loaded = load_method(make_model("llama"), tmp_path / "saved")
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(_output(loaded, ids), _output(model, ids), rtol=0, atol=0)


CAPABILITIES = (
    "fsdp_refusal",
    "regularizer",
    "after_optimizer_step",
    "save",
    "load",
    "peft_type",
    "write_report",
    "final_trainable",
)


def test_every_method_declares_its_optional_capabilities():
    for name, method in METHODS.items():
        assert isinstance(method, Method), name
        present = {c for c in CAPABILITIES if getattr(method, c) is not None}
        expected = set(CAPABILITIES) if name == "adalora" else set()
        assert present == expected, name
        assert method.configured(TrainConfig(method=name)).name == name


def _code_words(path: Path) -> tuple[set[str], set[str]]:
    """The identifiers and the string constants of a module's code (docstrings aside)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    names, strings = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.alias):
            names.add(node.name)
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
        ):
            strings.add(node.value)
    return names, strings


def test_the_training_loop_names_no_method_and_no_module_branches_on_adalora():
    import loralab.experiments.runs
    import loralab.methods.method_files
    import loralab.training.loop

    names, strings = _code_words(Path(loralab.training.loop.__file__))
    assert not strings & set(METHOD_NAMES)  # what a method does, it declares
    for module in (loralab.training.loop, loralab.methods.method_files, loralab.experiments.runs):
        names, strings = _code_words(Path(module.__file__))
        # the experiments keep data per method name (learning rates); no code of AdaLoRA's
        words = {
            w.lower() for w in names | (set() if module is loralab.experiments.runs else strings)
        }
        assert not any("adalora" in w for w in words), module.__name__
