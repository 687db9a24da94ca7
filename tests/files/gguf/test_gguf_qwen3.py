"""A dense Qwen3 in llama.cpp's GGUF (its ``qwen3``): the file loads as the model it was
written from, and an adapter on every projection runs in llama.cpp as a LoRA file and
merged into the base, with loralab's logits."""

from __future__ import annotations

import numpy as np

from conftest import randomize_lora
from gguf_models import save_qwen3_gguf, tiny_qwen3_for_gguf
from llama_cpp_runs import ALL, llama_logits, loralab_logits
from loralab import LoraConfig, inject_adapter, save_adapter
from loralab.cli import main
from loralab.models.loading import load_model


def test_a_qwen3_gguf_loads_and_its_adapter_runs_in_llama_cpp_as_a_file_and_merged(tmp_path):
    model = tiny_qwen3_for_gguf(moe=False)
    path = tmp_path / "tiny-qwen3.gguf"
    save_qwen3_gguf(path, model)
    loaded, _ = load_model(str(path))
    # the head width is a field Transformers' GGUF reader leaves out (its default is 128)
    assert loaded.config.head_dim == model.config.head_dim == 16
    assert (loralab_logits(loaded) == loralab_logits(model)).all()
    assert np.abs(llama_logits(path) - loralab_logits(model)).max() < 1e-4

    inject_adapter(loaded, LoraConfig(r=4, lora_alpha=8, target_modules=ALL))
    randomize_lora(loaded, std=0.3)
    save_adapter(loaded, tmp_path / "adapter")
    expected = loralab_logits(loaded)
    assert np.abs(llama_logits(path) - expected).max() > 0.05  # the adapter matters
    adapter, merged = tmp_path / "adapter.gguf", tmp_path / "merged.gguf"
    common = ["--model", str(path), "--adapter", str(tmp_path / "adapter")]
    assert main(["export", *common, "--output", str(adapter)]) == 0
    assert main(["merge", *common, "--format", "gguf", "--output", str(merged)]) == 0
    assert np.abs(llama_logits(path, adapter) - expected).max() < 1e-4
    assert np.abs(llama_logits(merged) - expected).max() < 1e-4
