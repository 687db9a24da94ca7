"""bitsandbytes' quantized linear layers as a frozen base: QLoRA's NF4 and FP4
(``Linear4bit``) and LLM.int8() (``Linear8bitLt``), which Transformers puts in place of a
model's ``nn.Linear`` when it loads with a ``BitsAndBytesConfig``.

bitsandbytes is an optional dependency (``pip install 'loralab[qlora]'``): nothing here
imports it until a bitsandbytes layer exists or one is asked for, and a layer is
recognised only once bitsandbytes is loaded (no module can be one before).

Its layers already compute as a frozen base should: the 4-bit product saves only the
packed bytes for the backward and returns the input's gradient, the 8-bit one on a CPU
unpacks the weight inside its product. What they need from us is a guard: on a CPU with
AVX512-BF16, a 4-bit layer's first forward in eval mode without gradients rewrites its
weight and statistics, in place, into the layout of bitsandbytes' bf16 inference kernel.
From then on its product has no autograd (the input's gradient is lost, so every LoRA
layer below it stops learning, silently), its weight no longer dequantizes, and the
inverse (``Params4bit.to()``, saving) does not give the old bytes back: the statistics
come back rounded to bf16 (bitsandbytes#2078). ``keep_training_layout`` turns that
rewrite off on every 4-bit layer of a model; a layer already rewritten is refused.
"""

from __future__ import annotations

import importlib
import logging
import sys
import warnings
from types import ModuleType

import torch
from torch import Tensor, nn

INSTALL = "pip install 'loralab[qlora]'"


class BitsAndBytesMissing(ImportError):
    """A bitsandbytes base was asked for where bitsandbytes is not installed."""


def bitsandbytes(why: str) -> ModuleType:
    """The ``bitsandbytes`` module, imported quietly; ``why`` says what needed it."""
    # On a CPU with AVX512-BF16, bitsandbytes tries at import to fetch a kernel from the
    # Hub and logs a warning when it cannot; the fallback it then uses is its own.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # The int8 product in eval mode casts fp32 inputs to fp16 by design, and says so on
    # every call.
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    try:
        return importlib.import_module("bitsandbytes")
    except ImportError as error:
        raise BitsAndBytesMissing(
            f"{why} needs bitsandbytes, which is not installed here: {INSTALL}"
        ) from error


def _layer_class(name: str) -> type | None:
    """bitsandbytes' ``nn.<name>`` if bitsandbytes is loaded, else None."""
    layers = sys.modules.get("bitsandbytes.nn")
    return None if layers is None else getattr(layers, name, None)


def is_4bit(module: nn.Module) -> bool:
    layer_class = _layer_class("Linear4bit")
    return layer_class is not None and isinstance(module, layer_class)


def is_8bit(module: nn.Module) -> bool:
    layer_class = _layer_class("Linear8bitLt")
    return layer_class is not None and isinstance(module, layer_class)


def is_quantized_layer(module: nn.Module) -> bool:
    """Whether ``module`` is one of bitsandbytes' quantized linear layers."""
    return is_4bit(module) or is_8bit(module)


def format_name(module: nn.Module) -> str:
    """``nf4``, ``fp4`` or ``int8``: the format of a bitsandbytes layer's weight."""
    if is_8bit(module):
        return "int8"
    return module.weight.quant_state.quant_type


def is_rewritten(module: nn.Module) -> bool:
    """Whether a 4-bit layer's weight is in the CPU inference layout (see above)."""
    state = getattr(module.weight, "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def keep_training_layout(model: nn.Module) -> int:
    """Stop every 4-bit layer in ``model`` from rewriting its weight on an eval forward
    (see above); returns how many layers it guarded. A layer rewritten already is an
    error: its bytes cannot be put back."""
    guarded = 0
    for name, module in model.named_modules():
        if not is_4bit(module):
            continue
        if is_rewritten(module):
            raise ValueError(
                f"{name}: bitsandbytes rewrote this 4-bit weight into its CPU inference "
                "layout during an eval-mode forward, and that cannot be undone exactly "
                "(bitsandbytes#2078); training over it would lose the input's gradient. "
                "Reload the model, and add the adapter before any forward pass (loralab's "
                "loader guards the model as it loads it)"
            )
        module.support_avx512bf16_for_cpu = False
        guarded += 1
    return guarded


def _row_scales(module: nn.Module) -> Tensor:
    """An int8 layer's scale per row: on its weight until the first forward moves it into
    the layer's matmul state."""
    scales = module.weight.SCB
    return module.state.SCB if scales is None else scales


def dequantized(module: nn.Module) -> Tensor:
    """The layer's weight (out, in) as bitsandbytes' own product computes with it."""
    weight = module.weight
    if is_8bit(module):
        # The CPU product's own expression (MatMul8bitFp): int8 rows times scale / 127.
        return weight.data.float().mul_(_row_scales(module).float().unsqueeze(1).mul(1.0 / 127.0))
    if is_rewritten(module):
        raise ValueError("a 4-bit weight in the CPU inference layout does not dequantize")
    functional = bitsandbytes("dequantizing a 4-bit weight").functional
    return functional.dequantize_4bit(weight.data, weight.quant_state).float()


def stored_bytes(module: nn.Module) -> int:
    """Bytes the quantized weight takes: the packed values and their scales (the tables
    of the format's 16 or 256 values, the same for every layer, are not counted)."""
    weight = module.weight
    tensors = [weight.data]
    if is_8bit(module):
        tensors.append(_row_scales(module))
    else:
        state = weight.quant_state
        tensors.append(state.absmax)
        if state.nested:
            tensors.append(state.state2.absmax)
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the layer multiplies in: a 4-bit layer's ``compute_dtype`` (the
    ``bnb_4bit_compute_dtype`` it was loaded with), else its bias's, else fp32."""
    dtype = getattr(module, "compute_dtype", None)
    if dtype is None and module.bias is not None:
        dtype = module.bias.dtype
    return dtype or torch.float32


def stored_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the weight had before it was quantized (a 4-bit layer remembers it), the
    dtype a dense copy of it is made in."""
    state = getattr(module.weight, "quant_state", None)
    if state is not None and state.dtype is not None:
        return state.dtype
    return module.bias.dtype if module.bias is not None else compute_dtype(module)


def quantized_like(like: nn.Module, dense: nn.Linear) -> nn.Module:
    """A new bitsandbytes layer holding ``dense``'s weight quantized as ``like``'s is
    (format, block size, double quantization), on ``like``'s device."""
    module = bitsandbytes("re-quantizing a merged weight")
    weight = dense.weight.detach()
    bias = dense.bias is not None
    if is_8bit(like):
        layer = module.nn.Linear8bitLt(
            dense.in_features,
            dense.out_features,
            bias,
            has_fp16_weights=False,
            threshold=like.state.threshold,
        )
        layer.weight = module.nn.Int8Params(
            weight.cpu(), requires_grad=False, has_fp16_weights=False
        )
    else:
        state = like.weight.quant_state
        layer = module.nn.Linear4bit(
            dense.in_features,
            dense.out_features,
            bias,
            compute_dtype=like.compute_dtype,
            compress_statistics=state.nested,
            quant_type=state.quant_type,
        )
        layer.weight = module.nn.Params4bit(
            weight.cpu(),
            requires_grad=False,
            quant_type=state.quant_type,
            compress_statistics=state.nested,
            blocksize=state.blocksize,
        )
        layer.support_avx512bf16_for_cpu = False
    if bias:
        layer.bias = nn.Parameter(dense.bias.detach().clone(), requires_grad=False)
    return layer.to(like.weight.device)  # moving to a device is what quantizes
