"""Several adapters on one tiny Llama, for the tests of adapters.py and mixing.py."""

import torch

from conftest import make_model, randomize_lora
from loralab import LoraConfig, inject_adapter, load_adapter, save_adapter

CONFIGS = {
    "a": LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"]),
    "b": LoraConfig(r=2, lora_alpha=4, target_modules=["v", "o"]),
    "c": LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"]),
}


def saved_adapter(tmp_path, kind, name, seed):
    """An adapter directory trained (here: randomised) alone on the base."""
    model = make_model(kind)
    inject_adapter(model, CONFIGS[name])
    randomize_lora(model, seed=seed)
    save_adapter(model, tmp_path / f"{kind}-{name}-{seed}")
    return tmp_path / f"{kind}-{name}-{seed}"


def logits_alone(kind, directory, tokens):
    with torch.no_grad():
        return load_adapter(make_model(kind), directory)(tokens).logits


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits
