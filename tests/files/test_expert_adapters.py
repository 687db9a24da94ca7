"""Adapters on stacked expert weights in PEFT's files, both ways with PEFT itself (the test
extra's release): the same logits, the same tensor names and shapes, ``target_parameters``
in the config; hot-swapped in place; described by ``loralab info``. (In llama.cpp's GGUF:
``files/gguf/test_gguf_experts.py``.)"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_same_logits
from loralab import LoraConfig, inject_adapter, load_adapter, save_adapter
from loralab.cli import main
from loralab.files.hot_swap import hot_swap_adapter
from loralab.lora.inject import lora_layers
from moe_models import MOE_MODELS, tiny_moe

peft = pytest.importorskip("peft")  # a test dependency: CI installs it

IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))


def _randomized(model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for factors in layer.lora.values():
                factors.A.copy_(torch.randn(factors.A.shape, generator=generator) * 0.3)
                factors.B.copy_(torch.randn(factors.B.shape, generator=generator) * 0.3)
    return model


def _logits(model):
    with torch.no_grad():
        return model.eval()(IDS).logits


def _peft_config(**overrides):
    settings = dict(
        r=2,
        lora_alpha=4,
        target_modules=["k_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        init_lora_weights=False,  # B ≠ 0: the files carry a real update
    )
    settings.update(overrides)
    return peft.LoraConfig(**settings)


@pytest.mark.parametrize("model_type", list(MOE_MODELS))
def test_ours_in_peft_and_peft_in_ours_give_the_same_logits(tmp_path, model_type):
    base = tiny_moe(model_type)
    config = LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["q_proj"],
        target_parameters=["experts"],
        rank_pattern={"down_proj": 3},
    )
    ours = _randomized(inject_adapter(copy.deepcopy(base), config))
    save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert_same_logits(theirs, ours, IDS, f"{model_type}: ours in PEFT")

    made = peft.get_peft_model(copy.deepcopy(base), _peft_config())
    made.save_pretrained(tmp_path / "peft")
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert_same_logits(loaded, made, IDS, f"{model_type}: PEFT's in ours")


def test_our_files_have_peft_names_shapes_and_config(tmp_path):
    base = tiny_moe("qwen3_moe")
    made = peft.get_peft_model(copy.deepcopy(base), _peft_config(target_modules=[]))
    made.save_pretrained(tmp_path / "peft")
    config = LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=["experts"])
    save_adapter(inject_adapter(copy.deepcopy(base), config), tmp_path / "ours")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert {k: tuple(t.shape) for k, t in ours.items()} == {
        k: tuple(t.shape) for k, t in theirs.items()
    }
    # the weight registered first is the inner wrapper: experts.base_layer.lora_*
    assert ours["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"].shape == (
        8,
        32,
    )
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written["target_modules"] == []
    assert sorted(written["target_parameters"]) == ["down_proj", "gate_up_proj"]


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_biases_are_peft_s_and_gpt_oss_expert_biases_stay_frozen(tmp_path, bias):
    """PEFT's rule: a bias is a parameter named ``bias``. gpt-oss's stacked
    ``gate_up_proj_bias`` and ``down_proj_bias`` are not trained or saved by PEFT, so not
    here either, and PEFT's file loads here as it is."""
    base = tiny_moe("gpt_oss")
    config = LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=["experts"], bias=bias
    )
    ours = inject_adapter(copy.deepcopy(base), config)
    trained = {n for n, p in ours.named_parameters() if p.requires_grad and "lora" not in n}
    assert trained and not any(n.endswith("proj_bias") for n in trained)
    save_adapter(ours, tmp_path / "ours")
    made = peft.get_peft_model(
        copy.deepcopy(base), _peft_config(target_modules=["q_proj"], bias=bias)
    )
    made.save_pretrained(tmp_path / "peft")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == set(theirs)
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(_logits(loaded), _logits(made), atol=1e-5, rtol=0)


def test_a_loaded_expert_adapter_is_hot_swapped_in_place(tmp_path):
    base = tiny_moe("olmoe")
    config = LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=["experts"])
    for seed in (1, 2):
        save_adapter(
            _randomized(inject_adapter(copy.deepcopy(base), config), seed), tmp_path / f"a{seed}"
        )
    model = load_adapter(copy.deepcopy(base), tmp_path / "a1")
    wrappers = dict(lora_layers(model))
    hot_swap_adapter(model, tmp_path / "a2", "default")
    assert lora_layers(model) == wrappers  # no module replaced
    expected = _logits(load_adapter(copy.deepcopy(base), tmp_path / "a2"))
    torch.testing.assert_close(_logits(model), expected, atol=1e-6, rtol=0)


def test_loralab_info_names_the_expert_weights(tmp_path, capsys):
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=["experts"])
    save_adapter(inject_adapter(tiny_moe("mixtral"), config), tmp_path / "a")
    assert main(["info", str(tmp_path / "a")]) == 0
    shown = capsys.readouterr().out
    assert "target_parameters: ['down_proj', 'gate_up_proj']" in shown  # as written for PEFT
    assert "model.layers.0.mlp.experts.base_layer  r·experts=8" in shown
    assert "model.layers.0.self_attn.q_proj  r=2" in shown


def test_merging_state_dicts_alone_refuses_expert_factors(tmp_path):
    from loralab import merge_state_dicts

    base = tiny_moe("qwen3_moe")
    config = LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=["experts"])
    save_adapter(inject_adapter(copy.deepcopy(base), config), tmp_path / "a")
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    written = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    with pytest.raises(ValueError, match="load it on the model and merge_and_unload"):
        merge_state_dicts(base.state_dict(), tensors, written)
