"""Transformers models written as llama.cpp GGUF files for the tests: a tiny Qwen3 or
Qwen3-MoE with random weights and the tiny GGUF tokenizer (no downloads)."""

from __future__ import annotations

import torch

from moe_models import COMMON, MOE_MODELS


def tiny_qwen3_for_gguf(moe: bool, seed: int = 0):
    """A tiny Qwen3 (``moe``: Qwen3-MoE, 4 experts, top-2) whose vocabulary is the tiny
    GGUF tokenizer's, its heads 8 wide (not Qwen3's default 128, nor hidden / heads), with
    ``norm_topk_prob`` as llama.cpp computes it, every weight (norms too) drawn at a scale
    that matters."""
    import transformers

    from conftest import TINY_GGUF_VOCAB

    shape = {**COMMON, "vocab_size": TINY_GGUF_VOCAB, "max_position_embeddings": 256}
    shape.update(tie_word_embeddings=False, rms_norm_eps=1e-6)
    if moe:
        config = transformers.Qwen3MoeConfig(
            **shape, **MOE_MODELS["qwen3_moe"][2], norm_topk_prob=True
        )
        model_class = transformers.Qwen3MoeForCausalLM
    else:
        shape.pop("num_experts_per_tok")
        config = transformers.Qwen3Config(**shape, head_dim=16, intermediate_size=48)
        model_class = transformers.Qwen3ForCausalLM
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.normal_(1.0, 0.1)
            else:
                scale = 0.2 if ".experts." in name or name.endswith("gate.weight") else 0.05
                parameter.normal_(0.0, scale)
    return model


def save_qwen3_gguf(path, model, linear_type: str = "F32") -> None:
    """``model`` (a Qwen3 or Qwen3-MoE) as a llama.cpp ``qwen3`` / ``qwen3moe`` GGUF file
    with the tiny tokenizer; its matrices (the stacked experts too) stored as
    ``linear_type`` where their rows allow it, F32 elsewhere. Tensor names from loralab's
    ``GgufLayout``: that they are llama.cpp's is what Transformers' reader and llama.cpp
    itself check in the tests."""
    import gguf
    import numpy as np

    from conftest import add_tiny_tokenizer
    from loralab.models.gguf_layout import GgufLayout

    config = model.config
    layout = GgufLayout(config)
    writer = gguf.GGUFWriter(str(path), layout.architecture_name)
    writer.add_name(f"tiny-{layout.architecture_name}")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if config.model_type == "qwen3_moe":
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    add_tiny_tokenizer(writer, pre="qwen2")
    kind = gguf.GGMLQuantizationType[linear_type]
    block = gguf.GGML_QUANT_SIZES[kind][0]
    for key, tensor in model.state_dict().items():
        for name, values in layout.tensors(key, tensor.float()).items():
            values = np.ascontiguousarray(values.numpy())
            dense = kind == gguf.GGMLQuantizationType.F32 or values.shape[-1] % block
            if values.ndim == 1 or dense:
                writer.add_tensor(name, values)
            else:
                writer.add_tensor(name, gguf.quants.quantize(values, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
