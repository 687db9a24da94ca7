"""Which device a command runs on, the GPU when there is one, as every training tool a
user knows does, unless told otherwise; and the dtype the frozen base is held in.

``--device auto`` (the default) is the first CUDA GPU when PyTorch sees one, else the
CPU; ``cpu``, ``cuda`` and ``cuda:N`` are taken as asked, and a GPU that is not there is
an error that says so before anything loads. Under ``torchrun`` each process takes the
GPU of its local rank (``distributed.py``).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ..lora.config import ConfigError

if TYPE_CHECKING:
    import torch

# torch is imported where a device or dtype is built, not with this module: the command
# line checks these names while it parses, before anything heavy loads (``--help``).

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device(name: str | None, flag: str = "device") -> None:
    """Refuse a device name that is none of ``DEVICE_CHOICES``."""
    if name is not None and (not isinstance(name, str) or not _DEVICE.fullmatch(name)):
        raise ConfigError(f"{flag} must be {DEVICE_CHOICES}, got {name!r}")


def choose_device(name: str | None = None, flag: str = "--device") -> torch.device:
    """The device ``name`` asks for (None: ``auto``), checked against this machine."""
    import torch

    check_device(name, flag)
    if name in (None, "auto"):
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"{flag} {name}: PyTorch sees no CUDA GPU here (torch.cuda.is_available() is "
                "False: no GPU, no driver, or a CPU build of torch); use --device cpu"
            )
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)"
            )
        device = torch.device("cuda", index)
    return device


def place(model: torch.nn.Module, device: torch.device) -> None:
    """Move ``model`` to ``device`` unless it is there: a model quantized by bitsandbytes
    is loaded on its device and refuses ``.to()`` (its 8-bit weights cannot move)."""
    if model_device(model) != device:
        model.to(device)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s weights are (its inputs go there)."""
    import torch

    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


# The base's weights: fp32 (the default), or half precision, which halves the memory a
# frozen base takes (a 7B model: 28 GB in fp32, 14 in bf16). LoRA's factors stay fp32 on a
# half-precision base (``bases.factor_dtype``).
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def base_dtype(name: str | None, flag: str = "--dtype") -> torch.dtype | str:
    """The torch dtype ``name`` (``fp32``, ``bf16`` or ``fp16``; None: fp32) asks for, or
    ``"auto"``: the dtype the checkpoint was saved in."""
    check_dtype(name, flag)
    if name == "auto":
        return "auto"
    import torch

    return getattr(torch, DTYPE_NAMES[name or "fp32"])


def check_dtype(name: str | None, flag: str = "--dtype") -> None:
    """Refuse a dtype name that is none of fp32, bf16, fp16 and auto."""
    if name is not None and name not in (*DTYPE_NAMES, "auto"):
        choices = ", ".join([*DTYPE_NAMES, "auto"])
        raise ConfigError(f"{flag} must be one of {choices}, got {name!r}")


# A frozen base kept quantized instead of in --dtype (``lora/quantized/``): ``gguf`` keeps a
# GGUF file's own packed blocks (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K), unpacked inside each
# forward and backward; the memory its linear weights take is the file's. ``nf4``, ``fp4``
# and ``int8`` are bitsandbytes' (QLoRA's), quantizing a float checkpoint as it loads
# (``bnb_base.py``; the ``qlora`` extra).
QUANTIZED_BASES = ("gguf", "nf4", "fp4", "int8")


def check_quantized_base(name: str | None, flag: str = "quantized_base") -> None:
    """Refuse a quantized base that is none of ``QUANTIZED_BASES``."""
    if name is not None and name not in QUANTIZED_BASES:
        raise ConfigError(f"{flag} must be one of {', '.join(QUANTIZED_BASES)}, got {name!r}")
