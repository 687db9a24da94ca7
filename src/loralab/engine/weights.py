"""The format of the base weights the fast step multiplies by, chosen by the hardware.

``fp32`` (the default) multiplies by the model's own tensors as loaded: no copies, and
the tokens equal Transformers' to the last bit, which the tests and every reported score
rely on. ``bf16`` multiplies by a bf16 copy of each group's base weights (q|k|v and
gate|up fused, since the copy is made anyway), packed for oneDNN where PyTorch has it;
the inputs of those products are rounded to bf16 and their outputs come back to the
model's dtype, while the norms, attention, the residual stream and the LoRA updates stay
in fp32. It pays only where the CPU multiplies bf16 natively (AVX512-BF16 or AMX; on
CUDA always): there the products of a step read half the bytes and run on the bf16
units (``benchmarks/bench_small_matmuls.py``: the MLP weights at 1, 8 and 32 rows took
0.70×, 0.43× and 0.30× fp32's time on an AMX Xeon). Elsewhere bf16 is emulated and
slower, so ``auto`` never picks it there and ``bf16`` is refused with the reason.

``int8`` (asked for, never ``auto``) multiplies by an int8 copy of each group's base
weights and of the head, one scale per output row (the row's largest magnitude maps to
127), through PyTorch's weight-only int8 kernel with the inputs in bf16: a quarter of
fp32's bytes, for the steps that reading the weights bounds. On a 2-core AVX2 EPYC the
layers' products took 0.49× fp32's time at one row and 0.72× at 8, but 1.33× at 32
(``benchmarks/bench_small_matmuls.py``, against fp32 in slices), so it is for a few rows,
not for a full server batch; with fp32 inputs the same kernel was 2.7× slower than
fp32, hence bf16. CPU only (its other backends are not measured here). Its tokens
drift from fp32's as a Q8_0 file's do (a coarser rounding than Q8_0's blocks of 32).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

WEIGHTS = ("fp32", "bf16", "int8", "auto")
# Above this many rows the int8 kernel is slower than dequantizing the weight and
# multiplying in fp32 (1.33× fp32's time at 32 rows on the EPYC; a prompt's hundreds of
# rows much more), so a prefill multiplies by the dequantized weights.
INT8_KERNEL_ROWS = 16


def choose(requested: str, device: torch.device) -> tuple[str, str]:
    """The format to run (``fp32`` or ``bf16``) for ``requested`` (one of ``WEIGHTS``) on
    ``device``, and why, in words to print."""
    if requested not in WEIGHTS:
        raise ValueError(f"engine weights must be one of {', '.join(WEIGHTS)}, not {requested!r}")
    native = _native_bf16(device)
    if requested == "fp32":
        return "fp32", "the model's own weights, asked for"
    if requested == "int8":
        if device.type != "cpu":  # the kernel's other backends were not measured or tested
            raise ValueError(
                f"engine weights int8 run on the CPU (PyTorch's weight-only int8 kernel); "
                f"on {device.type} use bf16"
            )
        if not hasattr(torch, "_weight_int8pack_mm"):
            raise ValueError(
                f"engine weights int8: PyTorch {torch.__version__} has no weight-only int8 "
                "kernel (torch._weight_int8pack_mm); use fp32 or bf16"
            )
        return "int8", "int8 copies of the base weights, one scale a row, asked for"
    if requested == "bf16" and native is None:
        raise ValueError(
            "engine weights bf16: this CPU has neither AVX512-BF16 nor AMX, so bf16 products "
            "would be emulated and slower than fp32; use fp32 (or auto)"
        )
    if native is None:
        return "fp32", "this CPU has neither AVX512-BF16 nor AMX (bf16 would be slower)"
    return "bf16", native


# The CPU's bf16 units and PyTorch's checks for them (torch.cpu's, as its own kernels use).
_UNITS = (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))


def _native_bf16(device: torch.device) -> str | None:
    """What multiplies bf16 natively on ``device`` (None: nothing)."""
    if device.type == "cuda":
        return "CUDA"
    if device.type != "cpu":
        return None
    units = [name for name, check in _UNITS if getattr(torch.cpu, check, lambda: False)()]
    return f"this CPU has {' and '.join(units)}" if units else None


@dataclass
class Packed:
    """Base weights (out, in), fused along ``out``: in bf16, packed for oneDNN when
    ``onednn``; or in int8 with one bf16 scale per output row (``scales``); ``bias`` in
    the model's dtype (None: no bias)."""

    weight: Tensor
    bias: Tensor | None
    onednn: bool
    scales: Tensor | None = None

    @property
    def format(self) -> str:
        return "bf16" if self.scales is None else "int8"


def linear(x: Tensor, packed: Packed) -> Tensor:
    """``x Wᵀ + b`` with the packed weights (their inputs in bf16), in ``x``'s dtype."""
    half = x.to(torch.bfloat16)
    if packed.scales is not None:
        flat = half.reshape(-1, half.shape[-1])  # the kernel takes (rows, in) only
        if flat.shape[0] <= INT8_KERNEL_ROWS:
            out = torch._weight_int8pack_mm(flat, packed.weight, packed.scales)
        else:  # a prompt's many rows: the weights dequantized, the product in fp32
            weight = packed.weight.float() * packed.scales.float()[:, None]
            out = (flat.float() @ weight.T).to(torch.bfloat16)
        out = out.view(*half.shape[:-1], -1)
    elif packed.onednn:
        out = torch.ops.mkldnn._linear_pointwise(half, packed.weight, None, "none", [], "")
    else:
        out = torch.nn.functional.linear(half, packed.weight)
    out = out.to(x.dtype)
    return out if packed.bias is None else out + packed.bias


# Per module (the first of its group): the packed copy and the weights it was made from,
# by identity and version counter, so a merge or any in-place change packs again.
_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def packed(
    owner: torch.nn.Module,
    weights: list[Tensor],
    biases: list[Tensor | None],
    format: str = "bf16",
) -> Packed:
    """The bf16 (or int8: ``format``) copy of ``weights`` (each (out, in), fused along
    out) and ``biases``, made once per version of the weights and kept with ``owner``."""
    key = (format, *((id(w), w._version, w.data_ptr()) for w in weights))
    key += tuple(None if b is None else (id(b), b._version) for b in biases)
    cached = _PACKED.get(owner)
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        fused = torch.cat([w.detach() for w in weights])
        bias = None
        if any(b is not None for b in biases):
            parts = [
                b.detach() if b is not None else w.new_zeros(w.shape[0])
                for w, b in zip(weights, biases, strict=True)
            ]
            bias = torch.cat(parts)
        if format == "int8":
            values, scales = quantized(fused)
            result = Packed(values, bias, False, scales)
        else:
            weight = fused.to(torch.bfloat16)
            onednn = weight.device.type == "cpu" and onednn_bf16()
            if onednn:  # oneDNN's blocked layout; its products read it at any row count
                weight = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
            result = Packed(weight, bias, onednn)
    _PACKED[owner] = (key, result, weights)
    return result


def quantized(weight: Tensor) -> tuple[Tensor, Tensor]:
    """``weight`` (out, in) as int8 and one bf16 scale per row, its largest magnitude at
    ±127 (the rounding is against the bf16 scale the kernel multiplies by)."""
    scales = (weight.abs().amax(dim=1).float() / 127).clamp(min=torch.finfo(torch.float32).tiny)
    scales = scales.to(torch.bfloat16)
    values = torch.round(weight.float() / scales.float()[:, None]).clamp(-127, 127)
    return values.to(torch.int8).contiguous(), scales


def onednn_bf16() -> bool:
    """Whether oneDNN packs and multiplies bf16 on this CPU: it refuses to where the CPU
    lacks AVX-512 (BW, VL, DQ) and AVX-NE-CONVERT, where plain ``F.linear`` runs instead
    (only the tests ask for bf16 there, ``choose`` refuses it)."""
    if not torch.backends.mkldnn.is_available():
        return False
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check is not None and check())
