"""A base quantized by bitsandbytes, as QLoRA users know it: ``--quantized-base nf4``,
``fp4`` or ``int8`` quantizes a float checkpoint while it loads, with
``BitsAndBytesConfig``'s meaning (the 4-bit formats with double quantization and blocks
of 64 values, computing in fp32 on a CPU and bf16 on CUDA; int8 as LLM.int8(), outliers
above 6.0 kept in 16 bits); a checkpoint saved quantized by bitsandbytes is read as it
is, with or without the flag. Either way every 4-bit layer is kept in the layout it
trains in (``lora/quantized/bnb.py`` says why) and the model's state records the
quantization, for the adapter's model card.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..lora.quantized import bnb
from ..lora.state import model_state
from .errors import ModelLoadError


def saved_format(config: dict[str, Any] | None) -> str | None:
    """The bitsandbytes format a checkpoint's ``quantization_config`` says it was saved
    in (nf4, fp4, int8), or None: not quantized by bitsandbytes."""
    if not config or config.get("quant_method") != "bitsandbytes":
        return None
    if config.get("load_in_8bit") or config.get("_load_in_8bit"):
        return "int8"
    return config.get("bnb_4bit_quant_type", "fp4")


def saved_quantization(directory: Path) -> dict[str, Any] | None:
    """A model directory's ``quantization_config`` (None: none, or no config.json)."""
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # the load that follows says what is wrong with the directory
    return config.get("quantization_config") if isinstance(config, dict) else None


def load_options(
    asked: str | None, saved: dict[str, Any] | None, device: torch.device, name: str
) -> dict[str, Any]:
    """``from_pretrained``'s options for a bitsandbytes base: quantize at load as
    ``asked`` says, or read the checkpoint as ``saved``; none for a float base."""
    stored = saved_format(saved)
    if stored is not None:
        if asked is not None and asked != stored:
            raise ModelLoadError(
                f"{name} was saved quantized by bitsandbytes as {stored}; it cannot be "
                f"loaded as {asked} (drop --quantized-base, or give it {stored})"
            )
        _require_bitsandbytes(f"{name} (saved quantized by bitsandbytes)")
        return {"device_map": {"": device}}
    if asked is None:
        return {}
    _require_bitsandbytes(f"--quantized-base {asked}")
    return {"quantization_config": _bnb_config(asked, device), "device_map": {"": device}}


def _require_bitsandbytes(why: str) -> None:
    try:
        bnb.bitsandbytes(why)
    except bnb.BitsAndBytesMissing as error:
        raise ModelLoadError(str(error)) from None


def _bnb_config(format_name: str, device: torch.device):
    from transformers import BitsAndBytesConfig

    if format_name == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    # bf16 products are slow on a CPU without AVX512-BF16 (7-11× fp32 in the issue's
    # measurement), and fp32 is exact; CUDA's tensor cores want bf16.
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=format_name,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )


def prepare_loaded(model: nn.Module) -> None:
    """Guard a model holding bitsandbytes layers and record its quantization (nothing
    for a model without them)."""
    bnb.keep_training_layout(model)
    formats = Counter(bnb.format_name(m) for m in model.modules() if bnb.is_quantized_layer(m))
    if not formats:
        return
    config = getattr(model.config, "quantization_config", None)
    settings = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    types = ", ".join(f"{count} {name}" for name, count in sorted(formats.items()))
    model_state(model).base_quantization = {
        "backend": "bitsandbytes",
        "summary": f"linear weights quantized by bitsandbytes ({types})",
        # ``_load_in_4bit`` and its like are private twins of the public keys
        "config": {k: _plain(v) for k, v in settings.items() if not k.startswith("_")},
    }


def _plain(value: Any) -> Any:
    """A config value as its card line shows it (a dtype by its name)."""
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return value.value if hasattr(value, "value") else value  # an enum
