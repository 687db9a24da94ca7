"""OLoRA (``init="olora"``) against PEFT's ``init_lora_weights="olora"``: the same start,
and an adapter converted for the original base by either side runs the same on the other."""

from __future__ import annotations

import json

import peft
import pytest
import torch

import loralab
from conftest import make_model, randomize_lora, token_batch
from loralab import LoraConfig, TargetError
from loralab.lora.inject import lora_layers

TARGETS = ["q_proj", "v_proj", "down_proj"]
R, ALPHA = 4, 8


def _ours(kind: str = "llama", targets=TARGETS):
    model = make_model(kind)
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets, init="olora")
    loralab.inject_adapter(model, config)
    return model


def _peft():
    config = peft.LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights="olora"
    )
    return peft.get_peft_model(make_model("llama"), config)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_the_start_is_an_orthonormal_basis_of_w0s_columns_and_the_model_is_unchanged(kind):
    targets = TARGETS if kind == "llama" else ["c_attn", "c_fc"]
    tokens = token_batch()
    model = _ours(kind, targets)
    with torch.no_grad():
        torch.testing.assert_close(
            model(tokens).logits, make_model(kind)(tokens).logits, atol=1e-5, rtol=0
        )
    original = dict(make_model(kind).named_parameters())
    for name, layer in lora_layers(model).items():
        B = layer.lora["default"].B
        torch.testing.assert_close(B.T @ B, torch.eye(R), atol=1e-5, rtol=0)
        start = layer.delta_weight("default")  # s·B A, in the weight's layout
        torch.testing.assert_close(
            layer.base_layer.weight, original[f"{name}.weight"] - start, atol=1e-6, rtol=0
        )


def test_the_start_equals_peft_s_factors_and_its_residual():
    ours, theirs = _ours(), _peft()
    peft_layers = {
        name.removeprefix("base_model.model."): module
        for name, module in theirs.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    }
    gaps = {"factors": 0.0, "residual W0": 0.0}
    for name, layer in lora_layers(ours).items():
        other = peft_layers[name]
        pairs = {
            "factors": [
                (layer.lora["default"].A, other.lora_A["default"].weight),
                (layer.lora["default"].B, other.lora_B["default"].weight),
            ],
            "residual W0": [(layer.base_layer.weight, other.base_layer.weight)],
        }
        for what, tensors in pairs.items():
            for mine, theirs_ in tensors:
                torch.testing.assert_close(mine, theirs_, atol=1e-6, rtol=0)
                gaps[what] = max(gaps[what], (mine - theirs_).abs().max().item())
    print("OLoRA against PEFT at step 0: " + ", ".join(f"{k} {v:.1e}" for k, v in gaps.items()))


def test_converted_adapters_run_the_same_on_the_original_base_both_ways(tmp_path):
    tokens = token_batch()
    ours = _ours()
    randomize_lora(ours)
    with torch.no_grad():
        our_trained = ours.eval()(tokens).logits
    loralab.save_adapter(ours, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (written["r"], written["lora_alpha"]) == (2 * R, 2 * ALPHA)
    in_peft = peft.PeftModel.from_pretrained(make_model("llama"), tmp_path / "ours").eval()

    theirs = _peft()
    theirs.peft_config["default"].init_lora_weights = True  # PEFT's recipe for the start
    theirs.save_pretrained(tmp_path / "initial")
    theirs.peft_config["default"].init_lora_weights = "olora"
    randomize_lora(theirs, seed=5)
    with torch.no_grad():
        their_trained = theirs.eval()(tokens).logits
    theirs.save_pretrained(
        tmp_path / "theirs", path_initial_model_for_weight_conversion=str(tmp_path / "initial")
    )
    in_loralab = loralab.load_adapter(make_model("llama"), tmp_path / "theirs").eval()
    with torch.no_grad():
        in_peft_logits, in_loralab_logits = in_peft(tokens).logits, in_loralab(tokens).logits
    for where, logits, trained in (
        ("loralab's converted adapter in PEFT", in_peft_logits, our_trained),
        ("PEFT's converted adapter in loralab", in_loralab_logits, their_trained),
    ):
        print(f"OLoRA, {where}: max |Δlogits| {(logits - trained).abs().max().item():.1e}")
        torch.testing.assert_close(logits, trained, atol=1e-5, rtol=0)


def test_olora_refuses_an_embedding_before_touching_the_model():
    model = make_model("llama")
    with pytest.raises(TargetError, match=r"init='olora' cannot start .*LoraEmbedding has none"):
        loralab.inject_adapter(
            model, LoraConfig(r=2, init="olora", target_modules=["embed_tokens"])
        )
