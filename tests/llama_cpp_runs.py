"""llama.cpp (through llama-cpp-python) and loralab on the same tokens, for the GGUF tests."""

from __future__ import annotations

import contextlib

import llama_cpp  # a test dependency: llama.cpp itself reads what we write
import numpy as np
import torch

from conftest import randomize_lora
from loralab import LoraConfig, inject_adapter, save_adapter
from loralab.models.loading import load_model

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENS = [1, 40, 77, 101, 5, 200, 33, 90, 150, 7, 61, 250]


def adapted(gguf_file, tmp_path, **config):
    """The tiny GGUF base with a random adapter on it, and the adapter's directory."""
    model, _ = load_model(str(gguf_file))
    inject_adapter(model, LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ALL, **config}))
    randomize_lora(model, std=0.3)
    save_adapter(model, tmp_path / "adapter")
    return model, tmp_path / "adapter"


def open_llama(gguf_file, adapter_file=None, n_ctx: int = 64, f32_cache: bool = True):
    """llama.cpp on ``gguf_file`` (with ``adapter_file``), every position's logits kept."""
    options = {"lora_path": str(adapter_file)} if adapter_file else {}
    if f32_cache:
        # its KV cache in f32 too (llama.cpp's default is f16), so that what is compared
        # is the arithmetic, not the cache's rounding
        options.update(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    with _weights_as_stored():
        return llama_cpp.Llama(
            model_path=str(gguf_file), n_ctx=n_ctx, logits_all=True, verbose=False, **options
        )


@contextlib.contextmanager
def _weights_as_stored():
    """llama.cpp with its weights as the file stores them (``use_extra_bufts`` off): not
    repacked into the buffers of its AMX and other CPU kernels. On a CPU with AMX,
    llama-cpp-python 0.3.36 crashed (SIGSEGV) in its first decode of the tiny model's Q8_0
    file, whose rows are 32 wide; with the weights as stored it reads the same file
    right. Repacking is a speed-up, not what these tests compare. ``Llama`` takes no
    such option, so its source of default model parameters is wrapped while it loads."""
    module = llama_cpp.llama_cpp
    defaults = module.llama_model_default_params

    def stored():
        params = defaults()
        params.use_extra_bufts = False
        return params

    module.llama_model_default_params = stored
    try:
        yield
    finally:
        module.llama_model_default_params = defaults


def llama_logits(gguf_file, adapter_file=None, tokens=TOKENS) -> np.ndarray:
    llm = open_llama(gguf_file, adapter_file, n_ctx=max(64, len(tokens)))
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)])


def llama_greedy(llm, tokens: list[int], new: int) -> list[int]:
    """``new`` greedy tokens after ``tokens`` (the end token does not stop them)."""
    llm.reset()
    llm.eval(tokens)
    out = []
    for _ in range(new):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    return out


def loralab_greedy(model, tokens: list[int], new: int) -> list[int]:
    """The same in PyTorch, one token at a time through the KV cache."""
    out, past, step = [], None, torch.tensor([tokens])
    with torch.no_grad():
        for _ in range(new):
            result = model(step, past_key_values=past, use_cache=True)
            past = result.past_key_values
            out.append(int(result.logits[0, -1].argmax()))
            step = torch.tensor([out[-1:]])
    return out


def agreeing(a: list[int], b: list[int]) -> int:
    """How many tokens agree before the first difference."""
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def loralab_logits(model, tokens=TOKENS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()
