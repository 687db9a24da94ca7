"""PEFT's ``adapter_config.json``, both ways: the keys loralab writes, and every bad value
or key of a file named with its field, file and line.
"""

from __future__ import annotations

import dataclasses
import json

import peft
import pytest
import torch
from adapter_checks import ATOL, assert_load_fails, edit_config, model_logits, saved_llama

import loralab
import loralab.files.adapter_dir
import loralab.files.peft_config
from conftest import make_model, token_batch
from loralab import AdapterFileError, LoraConfig


def _peft_known_keys() -> set[str]:
    return {f.name for f in dataclasses.fields(peft.LoraConfig)}


@pytest.mark.parametrize(
    ("kind", "settings"),
    [
        ("llama", {"target_modules": ["q", "v"]}),
        ("gpt2", {"target_modules": ["q", "v"], "use_rslora": True}),
        ("bert", {"target_modules": ["q", "v"], "modules_to_save": ["classifier"]}),
    ],
)
def test_config_file_is_sorted_peft_json(tmp_path, kind, settings):
    model = loralab.inject_adapter(make_model(kind), LoraConfig(r=4, lora_alpha=8, **settings))
    loralab.save_adapter(model, tmp_path, base_model_name_or_path="tiny/" + kind)
    text = (tmp_path / "adapter_config.json").read_text()
    data = json.loads(text)
    assert text == json.dumps(data, indent=2, sort_keys=True) + "\n"
    assert data["peft_type"] == "LORA"
    assert data["base_model_name_or_path"] == "tiny/" + kind
    assert data["r"] == 4 and data["lora_alpha"] == 8
    assert set(data) <= _peft_known_keys(), set(data) - _peft_known_keys()
    assert data["task_type"] == {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS"}[kind]
    # PEFT builds its config from the file without complaint.
    peft.LoraConfig.from_pretrained(str(tmp_path))


def test_malformed_json_names_file_and_line(tmp_path):
    _, directory = saved_llama(tmp_path)
    path = directory / "adapter_config.json"
    lines = path.read_text().splitlines()
    lines[2] = lines[2].rstrip(",")  # line 3 loses its comma: the parser stops on line 4
    path.write_text("\n".join(lines))
    assert_load_fails(directory, AdapterFileError, r"adapter_config\.json, line 4, column 3")


def test_unknown_key_with_value_suggests_the_real_one(tmp_path):
    _, directory = saved_llama(tmp_path)
    edit_config(directory, lora_alfa=16)
    assert_load_fails(directory, AdapterFileError, r"'lora_alfa'.*did you mean lora_alpha")


def test_unknown_key_with_null_only_warns(tmp_path):
    tokens = token_batch()
    adapted, directory = saved_llama(tmp_path)
    edit_config(directory, some_future_option=None)
    with pytest.warns(UserWarning, match="some_future_option"):
        model = loralab.load_adapter(make_model("llama"), directory)
    torch.testing.assert_close(
        model_logits(model, tokens), model_logits(adapted, tokens), atol=ATOL, rtol=0
    )


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("lora_bias", True, "lora_bias"),
        ("layer_replication", [[0, 1]], "layer_replication"),
        ("init_lora_weights", "loftq", "init_lora_weights"),
        ("r", 0, r"\br must be"),
        ("lora_dropout", 1.5, r"lora_dropout must be a number in \[0, 1\), got 1\.5"),
        ("lora_alpha", -1, "lora_alpha"),
        ("peft_type", "IA3", "peft_type"),
        ("target_modules", None, "target_modules"),
        ("bias", "some", "bias"),
    ],
)
def test_bad_config_values_name_the_field(tmp_path, field, value, match):
    _, directory = saved_llama(tmp_path)
    edit_config(directory, **{field: value})
    assert_load_fails(directory, AdapterFileError, match)


def test_feature_keys_at_their_off_value_load(tmp_path):
    tokens = token_batch()
    adapted, directory = saved_llama(tmp_path)
    edit_config(directory, use_dora=False, lora_bias=False, layer_replication=None)
    model = loralab.load_adapter(make_model("llama"), directory)
    torch.testing.assert_close(
        model_logits(model, tokens), model_logits(adapted, tokens), atol=ATOL, rtol=0
    )
