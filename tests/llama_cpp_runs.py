"""llama.cpp (through llama-cpp-python) and loralab on the same tokens, for the GGUF tests."""

from __future__ import annotations

import llama_cpp  # a test dependency: llama.cpp itself reads what we write
import numpy as np
import torch

from conftest import randomize_lora
from loralab import LoraConfig, inject_adapter, save_adapter
from loralab.models import load_model

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENS = [1, 40, 77, 101, 5, 200, 33, 90, 150, 7, 61, 250]


def adapted(gguf_file, tmp_path, **config):
    """The tiny GGUF base with a random adapter on it, and the adapter's directory."""
    model, _ = load_model(str(gguf_file))
    inject_adapter(model, LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ALL, **config}))
    randomize_lora(model, std=0.3)
    save_adapter(model, tmp_path / "adapter")
    return model, tmp_path / "adapter"


def llama_logits(gguf_file, adapter_file=None) -> np.ndarray:
    options = {"lora_path": str(adapter_file)} if adapter_file else {}
    llm = llama_cpp.Llama(
        model_path=str(gguf_file),
        n_ctx=64,
        logits_all=True,
        verbose=False,
        # its KV cache in f32 too (llama.cpp's default is f16), so that what is compared
        # is the arithmetic, not the cache's rounding
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        **options,
    )
    llm.eval(TOKENS)
    return np.array(llm.scores[: len(TOKENS)])


def loralab_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0].numpy()
