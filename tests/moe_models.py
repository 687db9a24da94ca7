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
