"""The one record loralab keeps on a model: one ``__dict__`` key, nothing in the state dict."""

import torch

from conftest import make_model, token_batch
from loralab import LoraConfig, active_adapter, inject_adapter, merge_and_unload, unload
from loralab.lora.state import STATE_KEY, model_state
from loralab.methods import MethodSettings, applied_method, get_method


def test_everything_loralab_keeps_is_one_record_outside_the_state_dict():
    model = make_model("llama")
    keys = set(model.__dict__)
    base_keys = set(model.state_dict())
    get_method("lora").apply(model, MethodSettings(), LoraConfig(r=2, target_modules=["q"]))
    assert set(model.__dict__) - keys == {STATE_KEY}
    state = model_state(model)
    assert list(state.adapters) == ["default"] and state.active == "default"
    assert state.requires_grad is not None and applied_method(model).name == "lora"
    merge_and_unload(model)
    assert set(model.state_dict()) == base_keys


def test_after_unloading_a_new_adapter_is_active_again():
    for remove in (unload, merge_and_unload):
        model = make_model("llama")
        inject_adapter(model, LoraConfig(r=2, target_modules=["q"]))
        remove(model)
        inject_adapter(model, LoraConfig(r=2, target_modules=["v"]), adapter_name="second")
        assert active_adapter(model) == "second"
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora" in name:
                    parameter.fill_(0.1)
            tokens = token_batch()
            adapted = model(tokens).logits
            merged = merge_and_unload(model)(tokens).logits
        torch.testing.assert_close(adapted, merged)  # the second adapter did run
        assert not torch.equal(adapted, make_model("llama")(tokens).logits)
