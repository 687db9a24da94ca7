"""What the tests of adapter files share: a saved tiny Llama, an edited config, logits, and
the checks that a load failed with a named error and left the model as it was.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import loralab
import loralab.files.adapter_dir
import loralab.files.peft_config
from conftest import make_model, randomize_lora
from loralab import LoraConfig, lora_layers

ATOL = 1e-5


def model_logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def assert_same_logits(
    label: str, actual: torch.Tensor, expected: torch.Tensor, base: torch.Tensor
):
    """``actual`` reproduces ``expected`` (≤ ATOL), and ``expected`` is not just the base.

    The difference is printed, so ``pytest -s`` shows what each interop check saw.
    """
    assert (expected - base).abs().max().item() > 100 * ATOL, "the adapter changes nothing"
    diff = (actual - expected).abs().max().item()
    print(f"{label}: max |Δlogits| = {diff:.3g}")
    assert diff <= ATOL, f"{label}: max abs difference {diff}"


def perturb_trainable_base(model: nn.Module, seed: int = 5) -> None:
    """Trained biases and modules_to_save copies get values unlike the base's."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if parameter.requires_grad and "lora" not in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert not lora_layers(model)
    assert not loralab.adapter_configs(model)
    assert after["grad"] == before["grad"]
    assert list(after["state"]) == list(before["state"])
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key


def saved_llama(tmp_path, **config) -> tuple[nn.Module, object]:
    model = make_model("llama")
    loralab.inject_adapter(model, LoraConfig(**{"r": 4, "lora_alpha": 8, **config}))
    randomize_lora(model)
    directory = tmp_path / "adapter"
    loralab.save_adapter(model, directory)
    return model, directory


def edit_config(directory, **changes) -> None:
    path = directory / "adapter_config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def assert_load_fails(directory, error, match, kind="llama", model=None):
    model = model if model is not None else make_model(kind)
    before = snapshot(model)
    with pytest.raises(error, match=match):
        loralab.load_adapter(model, directory)
    assert_unchanged(model, before)
