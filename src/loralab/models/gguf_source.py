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
    try:
        model = auto_class.from_pretrained(path.parent, **gguf, **options)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"could not load GGUF file {path}: {error}") from error
    return model, tokenizer


def dense_gguf_options() -> dict:
    # Transformers 5 may keep GGUF weights packed in blocks when a matmul kernel is
    # installed; LoRA wraps plain nn.Linear weights, and only a dense model can be saved.
    try:
        from transformers import GgufConfig
    except ImportError:  # older releases always dequantize
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}
