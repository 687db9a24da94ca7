"""Transformers' own mixture-of-experts classes, built from small configs with random
weights: 4 experts, top-2 routing, 2 layers (no downloads)."""

from __future__ import annotations

import torch

COMMON = dict(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    num_experts_per_tok=2,
)

# model_type -> (config class, model class, the config's own fields); gpt-oss stores its
# experts transposed (in, out), interleaves gate and up, and has biases
MOE_MODELS = {
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(head_dim=8, intermediate_size=48, moe_intermediate_size=12, num_experts=4),
    ),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=12, num_experts=4)),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(intermediate_size=12, num_local_experts=4),
    ),
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(head_dim=8, intermediate_size=12, num_local_experts=4, eos_token_id=1),
    ),
}


def tiny_moe(model_type: str, seed: int = 0):
    """A tiny ``model_type`` causal LM in eval mode; its experts' weights drawn at a scale
    whose outputs matter (the classes' own init leaves some at zero)."""
    import transformers

    config_class, model_class, fields = MOE_MODELS[model_type]
    config = getattr(transformers, config_class)(**COMMON, **fields)
    if model_type == "olmoe":
        config.eos_token_id = 1
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".experts." in name or name.endswith(("gate.weight", "router.weight")):
                parameter.normal_(0.0, 0.2)
    return model


def tiny_qwen3_moe_for_gguf(seed: int = 0):
    """A tiny Qwen3-MoE whose vocabulary is the tiny GGUF tokenizer's, with ``norm_topk_prob``
    as llama.cpp computes it, every weight (norms too) drawn at a scale that matters."""
    import transformers

    from conftest import TINY_GGUF_VOCAB

    config = transformers.Qwen3MoeConfig(
        **{**COMMON, "vocab_size": TINY_GGUF_VOCAB, "max_position_embeddings": 256},
        **MOE_MODELS["qwen3_moe"][2],
        norm_topk_prob=True,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
    )
    torch.manual_seed(seed)
    model = transformers.Qwen3MoeForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.normal_(1.0, 0.1)
            else:
                scale = 0.2 if ".experts." in name or name.endswith("gate.weight") else 0.05
                parameter.normal_(0.0, scale)
    return model


def save_moe_gguf(path, model, linear_type: str = "F32") -> None:
    """``model`` (a Qwen3-MoE) as a llama.cpp ``qwen3moe`` GGUF file with the tiny
    tokenizer; its matrices (the stacked experts too) stored as ``linear_type`` where their
    rows allow it, F32 elsewhere. Tensor names from loralab's ``GgufLayout``: that they are
    llama.cpp's is what Transformers' reader and llama.cpp itself check in the tests."""
    import gguf
    import numpy as np

    from conftest import add_tiny_tokenizer
    from loralab.models.gguf_layout import GgufLayout

    config = model.config
    writer = gguf.GGUFWriter(str(path), "qwen3moe")
    writer.add_name("tiny-qwen3moe")
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
    writer.add_expert_count(config.num_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    add_tiny_tokenizer(writer, pre="qwen2")
    layout = GgufLayout(config)
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
