"""A GGUF file read through Transformers, every weight dequantized to a dense tensor
(LoRA wraps plain weights, and only a dense model can be saved).
"""

from __future__ import annotations

from pathlib import Path

from transformers import (
    AutoTokenizer,
)

from .errors import ModelLoadError


def load_gguf(auto_class, path: Path, options: dict):
    gguf = {"gguf_file": path.name, **dense_gguf_options()}
    read_missing_config_fields()
    try:
        model, info = auto_class.from_pretrained(
            path.parent, **gguf, **options, output_loading_info=True
        )
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, ValueError, RuntimeError) as error:  # RuntimeError: weights that do not fit
        raise ModelLoadError(f"could not load GGUF file {path}: {error}") from error
    _refuse_unread_weights(model, info["missing_keys"], path)
    return model, tokenizer


def _refuse_unread_weights(model, missing: list[str], path: Path) -> None:
    """A base weight the file gave no tensor for would be left at its random init, and
    everything after it garbage: llama.cpp keeps Mixtral in its ``llama`` layout, with its
    experts as ``ffn_*_exps``, which Transformers reads as a dense Llama without an MLP. A
    new task head (a classifier's) is expected to be missing, and is not refused."""
    prefix = f"{model.base_model_prefix}."
    unread = sorted(key for key in missing if key.startswith(prefix))
    if unread:
        raise ModelLoadError(
            f"{path}: Transformers read it as {type(model).__name__} and found no tensor for "
            f"{len(unread)} of its weights ({', '.join(unread[:3])}"
            f"{', …' if len(unread) > 3 else ''}), which would stay "
            "random; the file's architecture is one Transformers' GGUF reader does not "
            "know in full (a mixture of experts kept in llama.cpp's llama layout, such as "
            "Mixtral's?). Load the model from its Transformers directory instead"
        )


# GGUF metadata Transformers' GGUF reader does not carry into the config for an
# architecture it loads (5.x): the config keeps its default, and the weights then do not
# fit. Qwen3-MoE's expert width is 768 in its 30B-A3B release and Qwen3's head width 128
# in every release, the configs' defaults, so only other sizes (and small test models)
# showed the gaps.
MISSING_CONFIG_FIELDS = {
    "qwen3": {"attention.key_length": "head_dim"},
    "qwen3_moe": {"expert_feed_forward_length": "moe_intermediate_size"},
}


def read_missing_config_fields() -> None:
    """Teach Transformers' table of GGUF fields the ones above. Where a release maps the
    field itself, its own mapping stays."""
    from transformers.integrations import ggml

    for model_type, fields in MISSING_CONFIG_FIELDS.items():
        known = ggml.GGUF_CONFIG_MAPPING.get(model_type)
        if known is not None:
            for key, field in fields.items():
                known.setdefault(key, field)


def dense_gguf_options() -> dict:
    # Transformers 5 may keep GGUF weights packed in blocks when a matmul kernel is
    # installed; LoRA wraps plain nn.Linear weights, and only a dense model can be saved.
    try:
        from transformers import GgufConfig
    except ImportError:  # older releases always dequantize
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}
