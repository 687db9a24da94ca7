"""``merge_state_dicts``: a PEFT-format adapter merged into a plain state dict, with no model."""

from __future__ import annotations

import pytest
import torch
from adapter_checks import assert_same_logits, model_logits, perturb_trainable_base
from transformers import GPT2LMHeadModel

import loralab
import loralab.files.adapter_dir
import loralab.files.peft_config
from conftest import make_model, randomize_lora, token_batch
from loralab import LoraConfig


@pytest.mark.parametrize(
    ("kind", "settings"),
    [
        ("llama", {"target_modules": ["q", "v", "o", "up"], "rank_pattern": {"o": 2}}),
        ("gpt2", {"target_modules": ["c_attn", "c_fc"], "use_rslora": True}),
        ("gpt2", {"target_modules": ["q", "v"]}),  # fused subset, written as rank 2r
        (
            "bert",
            {"target_modules": ["q", "v"], "modules_to_save": ["classifier"], "bias": "lora_only"},
        ),
    ],
)
def test_merge_state_dicts_reproduces_the_adapted_logits(tmp_path, kind, settings):
    tokens = token_batch()
    model = make_model(kind)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    loralab.inject_adapter(model, LoraConfig(r=4, lora_alpha=8, **settings))
    randomize_lora(model, std=0.5)
    perturb_trainable_base(model)
    expected = model_logits(model, tokens)
    loralab.save_adapter(model, tmp_path)
    files = loralab.read_adapter(tmp_path)

    merged = loralab.merge_state_dicts(base_state, files.tensors, files.peft_config)
    assert list(merged) == list(base_state)
    fresh = make_model(kind)
    fresh.load_state_dict(merged)
    assert_same_logits(
        f"merge_state_dicts {kind} {sorted(settings)}",
        model_logits(fresh, tokens),
        expected,
        model_logits(make_model(kind), tokens),
    )


def test_merge_state_dicts_gpt2_embedding_into_untied_model(tmp_path):
    tokens = token_batch()
    model = make_model("gpt2")
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    loralab.inject_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["wte", "c_fc"]))
    randomize_lora(model)
    expected = model_logits(model, tokens)
    loralab.save_adapter(model, tmp_path)
    files = loralab.read_adapter(tmp_path)

    merged = loralab.merge_state_dicts(base_state, files.tensors, files.peft_config)
    # The LoRA touched the input lookup only: the (tied) output head keeps W0.
    assert not torch.equal(merged["transformer.wte.weight"], base_state["transformer.wte.weight"])
    assert torch.equal(merged["lm_head.weight"], base_state["lm_head.weight"])
    config = make_model("gpt2").config
    config.tie_word_embeddings = False
    fresh = GPT2LMHeadModel(config).eval()
    fresh.load_state_dict(merged)
    assert_same_logits(
        "merge_state_dicts gpt2 wte (untied)",
        model_logits(fresh, tokens),
        expected,
        model_logits(make_model("gpt2"), tokens),
    )


def test_merge_state_dicts_does_not_modify_its_inputs(tmp_path):
    model = make_model("llama")
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    kept = {k: v.clone() for k, v in base_state.items()}
    loralab.inject_adapter(model, LoraConfig(r=4, target_modules=["q"]))
    randomize_lora(model)
    tensors = loralab.adapter_state_dict(model)
    loralab.merge_state_dicts(
        base_state, tensors, loralab.files.peft_config.peft_config_dict(model)
    )
    assert all(torch.equal(base_state[k], kept[k]) for k in kept)
