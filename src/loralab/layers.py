"""The LoRA layers: ``h = W0 x + (α/r) · B A x`` around a frozen base layer.

Each wrapper keeps the user's layer as ``base_layer`` untouched and holds one
``LoraFactors`` (the trainable ``A`` and ``B``) per named adapter. ``delta_weight()`` is
the single source of truth for merge, unmerge, export and analysis: it returns ``ΔW`` in
the base weight's own layout, computed in fp32.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from .dropout import low_rank_path

# -- ΔW as pure functions of the factors (also used to merge state dicts) ----------------


def low_rank_product(A: Tensor, B: Tensor, scale: float) -> Tensor:
    """``scale · B A`` in fp32: (out, r) @ (r, in) -> (out, in)."""
    return (B.float() @ A.float()) * scale


def conv2d_delta(A: Tensor, B: Tensor, scale: float) -> Tensor:
    """ΔW of a conv LoRA: A is a (r, in, kh, kw) conv, B a 1×1 conv (out, r, 1, 1)."""
    out_channels = B.shape[0]
    return low_rank_product(A.flatten(1), B.flatten(1), scale).view(out_channels, *A.shape[1:])


class MergeError(RuntimeError):
    """A merge was refused (non-finite delta in safe mode, or inconsistent state)."""


# -- the trainable pair -------------------------------------------------------------------


class LoraFactors(nn.Module):
    """One adapter's ``A`` and ``B`` for one layer, with its scale and dropout."""

    def __init__(
        self,
        a_shape: tuple[int, ...],
        b_shape: tuple[int, ...],
        r: int,
        alpha: float,
        scale: float,
        dropout: float,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(a_shape, device=device, dtype=dtype))
        # B starts at zero so ΔW = 0 and the adapted model equals the base at step 0 (Sec. 4.1).
        self.B = nn.Parameter(torch.zeros(b_shape, device=device, dtype=dtype))
        self.r = r
        self.alpha = alpha
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scale={self.scale:g}"


def _factor_dtype(weight: Tensor) -> torch.dtype:
    # Half-precision bases train their adapters in fp32: the factors are tiny and the
    # low-rank path is where precision is lost first.
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype


# -- the wrappers ---------------------------------------------------------------------------


class LoraLayer(nn.Module):
    """A frozen ``base_layer`` plus named low-rank updates; one of them is active."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.merged_adapters: list[str] = []
        self.row_mix = None  # set by adapters.mixed_adapters for one mixed batch
        self.train(base_layer.training)  # wrapping never switches eval mode (dropout) on

    # Subclasses define the factor shapes, the init of A, the low-rank path and ΔW.
    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of A and B at rank r."""
        raise NotImplementedError

    def max_rank(self) -> int:
        """The largest rank the base matrix allows: min(d, k)."""
        raise NotImplementedError

    def lora_update(self, x: Tensor, factors: LoraFactors) -> Tensor:
        raise NotImplementedError

    def delta_weight(self, adapter_name: str | None = None) -> Tensor:
        raise NotImplementedError

    def _init_a(self, A: Tensor, init: str) -> None:
        if init == "gaussian":
            nn.init.normal_(A, std=1 / A.shape[0])  # N(0, 1/r)
        else:  # Kaiming-uniform, as the paper's reference code does for A.
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))

    def __getattr__(self, name: str):
        # Code that reads ``module.weight`` or ``module.in_features`` keeps working.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def add_adapter(
        self, name: str, r: int, alpha: float, scale: float, dropout: float, init: str
    ) -> None:
        if name in self.lora:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        weight = self.base_layer.weight
        a_shape, b_shape = self.factor_shapes(r)
        factors = LoraFactors(
            a_shape, b_shape, r, alpha, scale, dropout, weight.device, _factor_dtype(weight)
        )
        with torch.no_grad():
            self._init_a(factors.A, init)
        factors.train(self.training)  # a new adapter follows the model's train/eval mode
        self.lora[name] = factors
        if self.active_adapter is None:
            self.active_adapter = name

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.row_mix is not None:  # a mixed batch: each row its own adapter
            return self.row_mix(x, result)
        name = self.active_adapter
        if name is None or name in self.merged_adapters:
            return result
        factors = self.lora[name]
        return result + self.lora_update(self._lora_input(x, factors), factors).to(result.dtype)

    def _lora_input(self, x: Tensor, factors: LoraFactors) -> Tensor:
        # A half-precision base feeds its fp32 factors in fp32.
        return x.to(factors.A.dtype)

    def _factors(self, adapter_name: str | None) -> LoraFactors:
        name = adapter_name or self.active_adapter
        if name is None or name not in self.lora:
            raise KeyError(f"no adapter {name!r} on this layer; it has {list(self.lora)}")
        return self.lora[name]

    # -- merging: W ← W ± ΔW, computed in fp32 and cast once ------------------------------

    def merge(self, adapter_name: str | None = None, safe: bool = False) -> None:
        """Add ``ΔW`` into the base weight. Merging an adapter twice does nothing."""
        name = adapter_name or self.active_adapter
        if name in self.merged_adapters:
            return
        delta = self.delta_weight(name)
        if safe and not torch.isfinite(delta).all():
            raise MergeError(f"adapter {name!r} has a non-finite ΔW (NaN or Inf); not merged")
        self._add_to_weight(delta)
        self.merged_adapters.append(name)

    def unmerge(self, adapter_name: str | None = None) -> None:
        """Subtract a merged adapter's ``ΔW`` again; does nothing if it is not merged."""
        name = adapter_name or self.active_adapter
        if name not in self.merged_adapters:
            return
        self._add_to_weight(-self.delta_weight(name))
        self.merged_adapters.remove(name)

    def _add_to_weight(self, delta: Tensor) -> None:
        weight = self.base_layer.weight
        with torch.no_grad():
            weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))

    def extra_repr(self) -> str:
        return f"active={self.active_adapter!r}, merged={self.merged_adapters}"


class LoraLinear(LoraLayer):
    """LoRA around ``nn.Linear``: weight (out, in), A (r, in), B (out, r)."""

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        base = self.base_layer
        return (r, base.in_features), (base.out_features, r)

    def max_rank(self) -> int:
        base = self.base_layer
        return min(base.in_features, base.out_features)

    def lora_update(self, x: Tensor, factors: LoraFactors) -> Tensor:
        # (…, in) -> (…, r) -> (…, out); with dropout, a mask is kept rather than a copy of x
        return low_rank_path(x, factors.A, factors.B, factors.scale, factors.dropout)

    def delta_weight(self, adapter_name: str | None = None) -> Tensor:
        f = self._factors(adapter_name)
        return low_rank_product(f.A, f.B, f.scale)


class LoraConv1D(LoraLinear):
    """LoRA around GPT-2's ``Conv1D``, whose weight is stored transposed: (in, out)."""

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        base = self.base_layer
        in_features, out_features = base.weight.shape
        return (r, in_features), (out_features, r)

    def max_rank(self) -> int:
        base = self.base_layer
        return min(base.weight.shape)

    def delta_weight(self, adapter_name: str | None = None) -> Tensor:
        return super().delta_weight(adapter_name).T  # (in, out), like the base weight


class LoraEmbedding(LoraLayer):
    """LoRA around ``nn.Embedding``: weight (num, dim), A (r, num), B (dim, r), ΔW = (BA)ᵀ."""

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        base = self.base_layer
        return (r, base.num_embeddings), (base.embedding_dim, r)

    def max_rank(self) -> int:
        base = self.base_layer
        return min(base.num_embeddings, base.embedding_dim)

    def _init_a(self, A: Tensor, init: str) -> None:
        # A is read by lookup, not by a matrix product over its fan-in, so Kaiming's
        # 1/√num_embeddings bound would make it vanish: use N(0, 1) as loralib does.
        nn.init.normal_(A, std=1.0 if init == "kaiming" else 1 / A.shape[0])

    def lora_update(self, x: Tensor, factors: LoraFactors) -> Tensor:
        rows = F.embedding(x, factors.A.T, padding_idx=self.base_layer.padding_idx)  # (…, r)
        return (rows @ factors.B.T) * factors.scale

    def _lora_input(self, x: Tensor, factors: LoraFactors) -> Tensor:
        return x  # token ids stay integers

    def delta_weight(self, adapter_name: str | None = None) -> Tensor:
        f = self._factors(adapter_name)
        return low_rank_product(f.A, f.B, f.scale).T


class LoraConv2d(LoraLayer):
    """LoRA around ``nn.Conv2d``: A is a conv like the base with r channels, B a 1×1 conv."""

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        base = self.base_layer
        return (r, base.in_channels, *base.kernel_size), (base.out_channels, r, 1, 1)

    def max_rank(self) -> int:
        base = self.base_layer
        kh, kw = base.kernel_size
        return min(base.out_channels, base.in_channels * kh * kw)

    def lora_update(self, x: Tensor, factors: LoraFactors) -> Tensor:
        conv = self.base_layer
        hidden = F.conv2d(
            factors.dropout(x), factors.A, None, conv.stride, conv.padding, conv.dilation
        )
        return F.conv2d(hidden, factors.B) * factors.scale

    def delta_weight(self, adapter_name: str | None = None) -> Tensor:
        f = self._factors(adapter_name)
        return conv2d_delta(f.A, f.B, f.scale)


@dataclass(frozen=True)
class FusedParts:
    """How a fused projection splits its outputs, and which parts get LoRA.

    GPT-2's ``c_attn`` computes q, k and v in one matrix: ``names=("q", "k", "v")`` with
    three equal sizes. The paper adapts only q and v (Sec. 7.1): ``enabled=("q", "v")``.
    """

    names: tuple[str, ...]
    sizes: tuple[int, ...]
    enabled: tuple[str, ...]

    def offsets(self) -> dict[str, tuple[int, int]]:
        spans, start = {}, 0
        for name, size in zip(self.names, self.sizes, strict=True):
            spans[name] = (start, start + size)
            start += size
        return spans


class LoraFusedLinear(LoraLayer):
    """LoRA on a subset of a fused projection (``Linear`` or ``Conv1D``).

    Each enabled part has its own rank-r pair, stacked: A (p, r, in), B (p, part, r), so
    ``W_q`` and ``W_v`` are adapted as separate matrices while ``W_k`` stays exactly
    frozen — the paper's GPT-2 set-up, which a plain LoRA on ``c_attn`` cannot express.
    """

    def __init__(self, base_layer: nn.Module, parts: FusedParts) -> None:
        super().__init__(base_layer)
        self.parts = parts
        self.transposed = isinstance(base_layer, Conv1D)
        sizes = {name: size for name, size in zip(parts.names, parts.sizes, strict=True)}
        enabled_sizes = {sizes[name] for name in parts.enabled}
        if len(enabled_sizes) != 1:
            raise ValueError(f"fused parts {parts.enabled} must have equal sizes, got {sizes}")

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        in_features = _in_out(self.base_layer)[0]
        part_size = dict(zip(self.parts.names, self.parts.sizes, strict=True))[
            self.parts.enabled[0]
        ]
        return (len(self.parts.enabled), r, in_features), (len(self.parts.enabled), part_size, r)

    def max_rank(self) -> int:
        return min(_in_out(self.base_layer)[0], *self.parts.sizes)

    def _init_a(self, A: Tensor, init: str) -> None:
        for part in A:  # each part is its own (r, in) matrix with its own fan-in
            super()._init_a(part, init)

    def _part_updates(self, x: Tensor, factors: LoraFactors) -> Tensor:
        hidden = torch.einsum("...i,pri->...pr", factors.dropout(x), factors.A)  # (…, p, r)
        return torch.einsum("...pr,por->...po", hidden, factors.B) * factors.scale  # (…, p, o)

    def lora_update(self, x: Tensor, factors: LoraFactors) -> Tensor:
        updates = self._part_updates(x, factors)
        pieces = []
        for name, size in zip(self.parts.names, self.parts.sizes, strict=True):
            if name in self.parts.enabled:
                pieces.append(updates[..., self.parts.enabled.index(name), :])
            else:  # a frozen part gets exactly zero
                pieces.append(updates.new_zeros(*updates.shape[:-2], size))
        return torch.cat(pieces, dim=-1)

    def delta_weight(self, adapter_name: str | None = None) -> Tensor:
        f = self._factors(adapter_name)
        in_features = f.A.shape[-1]
        rows = []
        for name, size in zip(self.parts.names, self.parts.sizes, strict=True):
            if name in self.parts.enabled:
                index = self.parts.enabled.index(name)
                rows.append(low_rank_product(f.A[index], f.B[index], f.scale))
            else:
                rows.append(torch.zeros(size, in_features, device=f.A.device))
        delta = torch.cat(rows, dim=0)  # (out, in)
        return delta.T if self.transposed else delta

    def extra_repr(self) -> str:
        return f"parts={self.parts.enabled} of {self.parts.names}, " + super().extra_repr()


def _in_out(base: nn.Module) -> tuple[int, int]:
    if isinstance(base, Conv1D):
        return base.weight.shape[0], base.weight.shape[1]
    return base.in_features, base.out_features


def lora_class_for(module: nn.Module) -> type[LoraLayer] | None:
    """The wrapper for a module type, or None if LoRA does not support it."""
    if isinstance(module, Conv1D):
        return LoraConv1D
    if isinstance(module, nn.Linear):
        return LoraLinear
    if isinstance(module, nn.Embedding):
        return LoraEmbedding
    if isinstance(module, nn.Conv2d):
        return LoraConv2d
    return None


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a module of a supported type still cannot take LoRA, or None."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"Conv2d with groups={module.groups} (only groups=1 is supported)"
        if module.padding_mode != "zeros":
            return f"Conv2d with padding_mode={module.padding_mode!r} (only 'zeros')"
    return None


class TrainableCopy(nn.Module):
    """A module trained in full for an adapter (``modules_to_save``).

    The original stays frozen so that the base model is still there underneath; each
    adapter trains its own copy, used while that adapter is active.
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()
        self.train(original.training)
        self.active_adapter: str | None = None

    def add_adapter(self, name: str) -> None:
        trainable = copy.deepcopy(self.original)  # keeps the original's train/eval mode
        for parameter in trainable.parameters():
            parameter.requires_grad_(True)
        self.copies[name] = trainable
        if self.active_adapter is None:
            self.active_adapter = name

    def active_module(self) -> nn.Module:
        name = self.active_adapter
        return self.copies[name] if name is not None and name in self.copies else self.original

    def forward(self, *args, **kwargs):
        return self.active_module()(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original", "copies", "active_adapter"):
                raise
            return getattr(self.active_module(), name)
