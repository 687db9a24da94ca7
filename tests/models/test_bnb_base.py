"""Loading a base quantized by bitsandbytes: a float checkpoint quantized as it loads with
``BitsAndBytesConfig``'s meaning, a checkpoint saved quantized read as it is, adapters that
PEFT reads over the same quantized base both ways, the model card PEFT's readers look
for, and one clear line for what cannot be done."""

from __future__ import annotations

import json
import sys

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from conftest import assert_same_logits, randomize_lora, save_tiny_gguf, token_batch
from loralab import LoraConfig, inject_adapter, load_adapter, save_adapter
from loralab.files.model_card import CARD_FILE, MARKER
from loralab.files.peft_config import CONFIG_FILE
from loralab.lora.quantized import bnb
from loralab.lora.state import model_state
from loralab.models.errors import ModelLoadError
from loralab.models.loading import load_model

NF4 = BitsAndBytesConfig(
    load_in_4bit=True,
    bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True,
    bnb_4bit_compute_dtype=torch.float32,
)


def _theirs(tiny_model_dir):
    """The tiny model quantized by Transformers as a QLoRA user writes it, guarded as
    loralab guards its own (the comparison is of the adapters, not of bitsandbytes' CPU
    inference kernel)."""
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, quantization_config=NF4, device_map="cpu"
    )
    bnb.keep_training_layout(model)
    return model


@pytest.mark.parametrize("format_name", ["nf4", "fp4", "int8"])
def test_the_config_is_what_bitsandbytes_config_means(tiny_model_dir, format_name):
    model, _ = load_model(str(tiny_model_dir), quantized_base=format_name)
    recorded = model_state(model).base_quantization
    assert recorded["summary"] == f"linear weights quantized by bitsandbytes (14 {format_name})"
    config = recorded["config"]
    assert config["quant_method"] == "bitsandbytes"
    assert config["load_in_8bit"] is (format_name == "int8")
    if format_name != "int8":
        assert config["bnb_4bit_quant_type"] == format_name
        assert config["bnb_4bit_use_double_quant"] is True
        assert config["bnb_4bit_compute_dtype"] == "float32"  # on a CPU; bf16 on CUDA


def test_the_same_checkpoint_quantizes_to_the_same_bytes_as_transformers_does(tiny_model_dir):
    ours, _ = load_model(str(tiny_model_dir), quantized_base="nf4")
    theirs = dict(_theirs(tiny_model_dir).named_modules())
    for name, layer in ours.named_modules():
        if bnb.is_quantized_layer(layer):
            assert torch.equal(layer.weight.data, theirs[name].weight.data), name


def test_a_peft_adapter_trained_over_nf4_loads_with_the_same_logits(tiny_model_dir, tmp_path):
    theirs = _theirs(tiny_model_dir)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    theirs = peft.get_peft_model(theirs, config)
    randomize_lora(theirs, seed=4)
    theirs.save_pretrained(tmp_path / "peft")
    ours, _ = load_model(str(tiny_model_dir), quantized_base="nf4")
    load_adapter(ours, tmp_path / "peft")
    assert_same_logits(ours, theirs, token_batch(), "PEFT's adapter over NF4 in loralab")


def test_an_adapter_trained_over_nf4_loads_in_peft_with_the_same_logits(tiny_model_dir, tmp_path):
    ours, _ = load_model(str(tiny_model_dir), quantized_base="nf4")
    inject_adapter(ours, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_lora(ours, seed=2)
    save_adapter(ours, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(_theirs(tiny_model_dir), tmp_path / "adapter")
    assert_same_logits(ours, theirs, token_batch(), "loralab's adapter over NF4 in PEFT")


def test_the_card_has_peft_s_bitsandbytes_section_and_the_config_no_extra_key(
    tiny_model_dir, tmp_path
):
    config = LoraConfig(r=2, target_modules=["q", "v"])
    for name, quantized in (("nf4", "nf4"), ("dense", None)):
        model, _ = load_model(str(tiny_model_dir), quantized_base=quantized)
        save_adapter(inject_adapter(model, config), tmp_path / name)
    card = (tmp_path / "nf4" / CARD_FILE).read_text()
    assert card.startswith(MARKER)
    section = card[card.index("## Training procedure") :].splitlines()
    assert (
        section[2] == "The following `bitsandbytes` quantization config was used during training:"
    )
    assert "- load_in_4bit: True" in section and "- bnb_4bit_quant_type: nf4" in section
    assert "- bnb_4bit_use_double_quant: True" in section
    assert "- bnb_4bit_compute_dtype: float32" in section
    saved = json.loads((tmp_path / "nf4" / CONFIG_FILE).read_text())
    assert saved == json.loads((tmp_path / "dense" / CONFIG_FILE).read_text())


def test_a_checkpoint_saved_quantized_is_read_as_it_is(tiny_model_dir, tmp_path):
    model, tokenizer = load_model(str(tiny_model_dir), quantized_base="nf4")
    model.save_pretrained(tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "saved")
    for asked in (None, "nf4"):
        again, _ = load_model(str(tmp_path / "saved"), quantized_base=asked)
        layers = dict(again.named_modules())
        for name, layer in model.named_modules():
            if bnb.is_quantized_layer(layer):
                assert torch.equal(bnb.dequantized(layers[name]), bnb.dequantized(layer)), name
                assert layers[name].support_avx512bf16_for_cpu is False
        assert model_state(again).base_quantization["config"]["bnb_4bit_quant_type"] == "nf4"
    with pytest.raises(ModelLoadError, match=r"saved quantized by bitsandbytes as nf4; .* as int8"):
        load_model(str(tmp_path / "saved"), quantized_base="int8")


def test_a_gguf_file_is_not_quantized_again(tmp_path):
    path = tmp_path / "base.gguf"
    save_tiny_gguf(path, linear_type="Q8_0")
    with pytest.raises(ModelLoadError, match=r"nf4 quantizes a float checkpoint .* gguf keeps"):
        load_model(str(path), quantized_base="nf4")


def test_without_bitsandbytes_it_says_which_extra_to_install(tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(ModelLoadError) as raised:
        load_model(str(tiny_model_dir), quantized_base="nf4")
    assert str(raised.value) == (
        "--quantized-base nf4 needs bitsandbytes, which is not installed here: "
        "pip install 'loralab[qlora]'"
    )
