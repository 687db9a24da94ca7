"""The LoRA layers: ``h = W0 x + (α/r) · B A x`` around a frozen base layer.

Each wrapper keeps the user's layer as ``base_layer`` untouched and holds one factors
object per named adapter. The factors own their tensors: which ones they hold, under which
name PEFT's files keep each, and how they make ``ΔW`` (``LoraFactors``; DoRA's and
AdaLoRA's beside it). The layer knows its geometry: the factors' shapes, the low-rank path
of its forward, and where ``ΔW`` lies in the base weight (``frozen_base.py`` reads the base).
``delta_weight()`` is the single source of truth for merge, unmerge, export and analysis.
``merge()`` remembers what it added (``MergedDelta``), and ``unmerge()`` subtracts exactly
that.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import frozen_base as bases
from .inits import Init, get_init
from .low_rank_path import low_rank_path


def low_rank_product(A: Tensor, B: Tensor, scale: float) -> Tensor:
    """``scale · B A`` in fp32: (out, r) @ (r, in) -> (out, in); stacked parts batch,
    (p, out, r) @ (p, r, in) -> (p, out, in); a conv's factors, (r, in, kh, kw) and
    (out, r, 1, 1), are multiplied as matrices (out, in · kh · kw)."""
    A, B = A.float(), B.float()
    if A.dim() == 4:
        A, B = A.flatten(1), B.flatten(1)
    return (B @ A) * scale


class MergeError(RuntimeError):
    """A merge was refused (non-finite delta in safe mode, or inconsistent state)."""


FACTOR_CLASSES: list[type[LoraFactors]] = []
"""Every kind of factors (LoRA's; variants register theirs), for reading PEFT tensors."""


def register_factors(factors_class: type[LoraFactors]) -> type[LoraFactors]:
    """Make a factors class known to the readers that see only tensors (state-dict merge)."""
    if factors_class not in FACTOR_CLASSES:
        FACTOR_CLASSES.append(factors_class)
    return factors_class


def factors_class_with(peft_names: set[str]) -> type[LoraFactors] | None:
    """The factors class whose tensors have exactly these PEFT names."""
    return next((c for c in FACTOR_CLASSES if set(c.peft_names.values()) == peft_names), None)


# -- the factors of one adapter on one layer ------------------------------------------------


class LoraFactors(nn.Module):
    """One adapter's ``A`` and ``B`` for one layer, with its scale and dropout."""

    peft_names: Mapping[str, str] = {"A": "lora_A.weight", "B": "lora_B.weight"}
    """Each tensor the factors hold (by attribute) and its name in PEFT's files, after the
    module's name; a layer may rename them (an embedding's are ``lora_embedding_A``…)."""
    reads_weight = False
    """Whether ``ΔW`` depends on the frozen base weight (DoRA's does; LoRA's does not)."""
    is_product = True
    """Whether ``ΔW`` is a product of two factors (``low_rank()``), as mixing per row and
    combining need."""

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

    @staticmethod
    def tensor_shapes(a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> dict[str, tuple]:
        """The shape of each tensor, by attribute, for factors of these ``A`` and ``B``."""
        return {"A": a_shape, "B": b_shape}

    @staticmethod
    def rank_of(tensors: Mapping[str, Tensor]) -> int:
        """The rank of factors with these tensors (by attribute)."""
        return tensors["A"].shape[0]

    @staticmethod
    def matrix_shape(tensors: Mapping[str, Tensor]) -> tuple[int, int]:
        """(out, in) of the ΔW these tensors make, as ``bases.weight_matrix`` lays it."""
        return tensors["B"].shape[0], tensors["A"][0].numel()

    def tensors(self) -> dict[str, nn.Parameter]:
        """The tensors, by attribute (``peft_names``' keys)."""
        return {name: getattr(self, name) for name in self.peft_names}

    @staticmethod
    def delta_from(tensors: Mapping[str, Tensor], scale: float, weight: Tensor | None) -> Tensor:
        """``ΔW = scale · B A`` (fp32, ``bases.weight_matrix``' layout) from the tensors, by
        attribute; ``weight`` is the frozen base matrix (out, in) where ``reads_weight``."""
        return low_rank_product(tensors["A"], tensors["B"], scale)

    def delta(self, weight: Tensor | None) -> Tensor:
        return self.delta_from(self.tensors(), self.scale, weight)

    def low_rank(self) -> tuple[Tensor, Tensor]:
        """``ΔW = B' A'`` with the scale inside ``B'``: the two factors that mixed batches
        stack and combining concatenates (only where ``is_product``)."""
        return self.A, self.B * self.scale

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scale={self.scale:g}"


register_factors(LoraFactors)


@dataclass
class MergedDelta:
    """What merging an adapter added to a weight, kept for unmerging to subtract exactly.

    ΔW itself where it depends on the weight (DoRA); otherwise a copy of the factors'
    tensors, r·(d + k) numbers rather than d·k, from which the same computation gives the
    same ΔW again."""

    factors_class: type[LoraFactors]
    scale: float
    tensors: dict[str, Tensor] | None = None
    added: Tensor | None = None  # ΔW in the base weight's layout

    @classmethod
    def of(cls, factors: LoraFactors, added: Tensor) -> MergedDelta:
        if factors.reads_weight:
            return cls(type(factors), factors.scale, added=added)
        copies = {name: t.detach().clone() for name, t in factors.tensors().items()}
        return cls(type(factors), factors.scale, tensors=copies)

    def delta_in(self, layer: LoraLayer) -> Tensor:
        """ΔW in the layout of ``layer``'s base weight, as merging added it."""
        if self.added is not None:
            return self.added
        return layer.to_weight_layout(self.factors_class.delta_from(self.tensors, self.scale, None))


# -- the wrappers ---------------------------------------------------------------------------


class LoraLayer(nn.Module):
    """A frozen ``base_layer`` plus named low-rank updates; one of them is active."""

    factors_class: type[LoraFactors] = LoraFactors
    peft_renames: Mapping[str, str] = {}
    """The layer's own PEFT names for some of its factors' tensors."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.merged: dict[str, MergedDelta] = {}  # adapter -> what merge added to the weight
        # adapter -> what its init took out of the weight (PiSSA, OLoRA: ``inits/``)
        self.rewrote: dict[str, MergedDelta] = {}
        self.train(base_layer.training)  # wrapping never switches eval mode (dropout) on

    # Subclasses define the factor shapes, the init of A, the low-rank path and where ΔW
    # lies in the base weight.
    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of A and B at rank r."""
        raise NotImplementedError

    def max_rank(self) -> int:
        """The largest rank the base matrix allows: min(d, k)."""
        raise NotImplementedError

    def lora_update(self, x: Tensor, factors: LoraFactors) -> Tensor:
        raise NotImplementedError

    def to_weight_layout(self, delta: Tensor) -> Tensor:
        """The factors' ΔW (``bases.weight_matrix``' layout) in the base weight's layout."""
        return bases.to_weight_layout(self.base_layer, delta)

    # Where ΔW goes: the base layer's one weight (``frozen_base``); a layer that adapts
    # one weight among several of its module (an expert stack) answers for its own.
    def stored_weight(self) -> Tensor:
        """The weight ΔW goes into, as stored."""
        return bases.weight_of(self.base_layer)

    def add_to_weight(self, delta: Tensor) -> None:
        """``W ← W + ΔW`` (ΔW in the stored weight's layout), in fp32, cast once."""
        bases.add_to_weight(self.base_layer, delta)

    def fixed_reason(self) -> str | None:
        """Why ΔW cannot go into the weight in place (a packed one), or None."""
        return bases.fixed_reason(self.base_layer)

    def factor_place(self) -> tuple[torch.device, torch.dtype]:
        """Where the factors live and their dtype (fp32 on a half-precision base)."""
        return bases.device(self.base_layer), bases.factor_dtype(self.base_layer)

    @property
    def fan_in_fan_out(self) -> bool:
        """Whether the weight lies (in, out), as PEFT's setting of that name says."""
        return bases.fan_in_fan_out(self.base_layer)

    @property
    def original(self) -> nn.Module:
        """The user's module under the wrapper (under every wrapper, where they nest)."""
        return self.base_layer

    one_plain_matrix = False
    """Whether ΔW is one plain product B·A on one weight matrix (Linear, Conv1D): what an
    init that starts from W0's SVD or QR needs (PiSSA, OLoRA)."""

    reads_a_by_lookup = False
    """Whether the forward reads ``A`` by lookup (an embedding's) rather than by a product
    over its fan-in: the inits draw it otherwise."""

    def a_matrices(self, factors: LoraFactors) -> list[Tensor]:
        """``A`` as the matrices an init draws, each with its own fan-in (views)."""
        return [factors.A]

    def init_factors(self, factors: LoraFactors, init: Init) -> None:
        """Set a new adapter's starting values as the init ``init`` says (``inits/``)."""
        init.start(self, factors)

    def __getattr__(self, name: str):
        # Code that reads ``module.weight`` or ``module.in_features`` keeps working.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    @property
    def merged_adapters(self) -> list[str]:
        """The adapters merged into the base weight, in the order they were merged."""
        return list(self.merged)

    def add_adapter(
        self, name: str, r: int, alpha: float, scale: float, dropout: float, init: str
    ) -> None:
        if name in self.lora:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        a_shape, b_shape = self.factor_shapes(r)
        device, dtype = self.factor_place()
        factors = self.factors_class(a_shape, b_shape, r, alpha, scale, dropout, device, dtype)
        with torch.no_grad():
            starting = get_init(init)
            self.init_factors(factors, starting)
            if starting.rewrites_base:
                self._take_out_start(name, factors)
        factors.train(self.training)  # a new adapter follows the model's train/eval mode
        self.lora[name] = factors
        if self.active_adapter is None:
            self.active_adapter = name

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        name = self.active_adapter
        if name is None or name in self.merged:
            return result
        return self.adapted(x, result, self.lora[name])

    def adapted(self, x: Tensor, result: Tensor, factors: LoraFactors) -> Tensor:
        """The base layer's ``result`` for input ``x``, with the adapter's update."""
        return result + self.lora_update(self._lora_input(x, factors), factors).to(result.dtype)

    def _lora_input(self, x: Tensor, factors: LoraFactors) -> Tensor:
        # A half-precision base feeds its fp32 factors in fp32.
        return x.to(factors.A.dtype)

    def _factors(self, adapter_name: str | None) -> LoraFactors:
        name = adapter_name or self.active_adapter
        if name is None or name not in self.lora:
            raise KeyError(f"no adapter {name!r} on this layer; it has {list(self.lora)}")
        return self.lora[name]

    def delta_weight(self, adapter_name: str | None = None) -> Tensor:
        """``ΔW`` of an adapter (the active one by default), in fp32, in the layout of the
        base weight; for a merged adapter, what merging added."""
        factors = self._factors(adapter_name)
        merged = self.merged.get(adapter_name or self.active_adapter)
        if merged is not None:  # the base weight now holds it (DoRA's ΔW reads the weight)
            return merged.delta_in(self)
        weight = bases.weight_matrix(self.base_layer) if factors.reads_weight else None
        return self.to_weight_layout(factors.delta(weight))

    # -- the PEFT form of the factors ------------------------------------------------------

    def to_peft(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The factors' tensors (by attribute) as PEFT holds them for this layer."""
        return dict(tensors)

    def from_peft(self, tensors: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
        """The inverse of ``to_peft``; ``source`` names the file in an error."""
        return dict(tensors)

    def peft_names(self) -> dict[str, str]:
        """Attribute -> the PEFT name of each factors tensor on this layer."""
        names = self.factors_class.peft_names
        return {attr: self.peft_renames.get(name, name) for attr, name in names.items()}

    def peft_tensors(self, adapter_name: str, original_base: bool = False) -> dict[str, Tensor]:
        """The adapter's tensors under their PEFT names (after the module's name).

        With ``original_base``, an adapter whose init rewrote the base is written for the
        base as it was: ``s·B A`` on ``W0 - s·B0 A0`` is ``s·[B, -B0] [A; A0]`` on ``W0``,
        a plain LoRA of rank 2r (PEFT's conversion of PiSSA and OLoRA)."""
        tensors = {k: t.detach() for k, t in self.lora[adapter_name].tensors().items()}
        start = self.rewrote.get(adapter_name)
        if original_base and start is not None:
            tensors = {
                "A": torch.cat([tensors["A"], start.tensors["A"]]),
                "B": torch.cat([tensors["B"], -start.tensors["B"]], dim=1),
            }
        peft = self.to_peft(tensors)
        return {self.peft_names()[attr]: tensor for attr, tensor in peft.items()}

    def peft_shapes(self, r: int) -> dict[str, tuple[int, ...]]:
        """The shape of each PEFT-named tensor of an adapter of rank ``r``."""
        shapes = self.factors_class.tensor_shapes(*self.factor_shapes(r))
        empty = {attr: torch.empty(shape, device="meta") for attr, shape in shapes.items()}
        empty = self.to_peft(empty)
        return {self.peft_names()[attr]: tuple(t.shape) for attr, t in empty.items()}

    # -- merging: W ← W ± ΔW, computed in fp32 and cast once ------------------------------

    def merge(self, adapter_name: str | None = None, safe: bool = False) -> None:
        """Add ``ΔW`` into the base weight. Merging an adapter twice does nothing."""
        name = adapter_name or self.active_adapter
        if name in self.merged:
            return
        delta = self.delta_weight(name)
        if safe and not torch.isfinite(delta).all():
            raise MergeError(f"adapter {name!r} has a non-finite ΔW (NaN or Inf); not merged")
        self.add_to_weight(delta)
        self.merged[name] = MergedDelta.of(self._factors(name), delta)

    def unmerge(self, adapter_name: str | None = None) -> None:
        """Subtract exactly the ``ΔW`` that merging added (even if the factors changed
        since, or ΔW depends on the weight, as DoRA's); does nothing if not merged."""
        name = adapter_name or self.active_adapter
        record = self.merged.pop(name, None)
        if record is not None:
            self.add_to_weight(-record.delta_in(self))

    def _take_out_start(self, name: str, factors: LoraFactors) -> None:
        """W0 -= the factors' starting ΔW, so that the model computes what it did; the
        starting factors are kept (r·(d + k) numbers) to give W0 back and to save an
        adapter that runs on the original base."""
        start = MergedDelta.of(factors, None)
        self.add_to_weight(-start.delta_in(self))
        self.rewrote[name] = start

    def restore_base(self, name: str) -> None:
        """Give the base weight back what adapter ``name``'s init took out of it."""
        start = self.rewrote.pop(name, None)
        if start is not None:
            with torch.no_grad():
                self.add_to_weight(start.delta_in(self))

    def extra_repr(self) -> str:
        return f"active={self.active_adapter!r}, merged={self.merged_adapters}"


class LoraLinear(LoraLayer):
    """LoRA around ``nn.Linear`` (or GPT-2's ``Conv1D``): A (r, in), B (out, r)."""

    one_plain_matrix = True

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        in_features, out_features = bases.in_out(self.base_layer)
        return (r, in_features), (out_features, r)

    def max_rank(self) -> int:
        return min(bases.in_out(self.base_layer))

    def lora_update(self, x: Tensor, factors: LoraFactors) -> Tensor:
        # (…, in) -> (…, r) -> (…, out); with dropout, a mask is kept rather than a copy of x
        return low_rank_path(x, factors.A, factors.B, factors.scale, factors.dropout)


class LoraConv1D(LoraLinear):
    """LoRA around GPT-2's ``Conv1D``, whose weight is stored transposed, (in, out): the
    layer is ``LoraLinear``'s; ``frozen_base.py`` reads the base either way."""


class LoraEmbedding(LoraLayer):
    """LoRA around ``nn.Embedding``: weight (num, dim), A (r, num), B (dim, r), ΔW = (BA)ᵀ."""

    peft_renames: Mapping[str, str] = {
        "lora_A.weight": "lora_embedding_A",
        "lora_B.weight": "lora_embedding_B",
    }

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        num, dim = bases.in_out(self.base_layer)
        return (r, num), (dim, r)

    def max_rank(self) -> int:
        return min(bases.in_out(self.base_layer))

    # A is read by lookup, not by a matrix product over its fan-in, so Kaiming's
    # 1/√num_embeddings bound would make it vanish: the Kaiming init draws N(0, 1) here.
    reads_a_by_lookup = True

    def lora_update(self, x: Tensor, factors: LoraFactors) -> Tensor:
        rows = F.embedding(x, factors.A.T, padding_idx=self.base_layer.padding_idx)  # (…, r)
        return (rows @ factors.B.T) * factors.scale

    def _lora_input(self, x: Tensor, factors: LoraFactors) -> Tensor:
        return x  # token ids stay integers


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
    PEFT holds the same adapter as one rank-(p·r) pair for the whole matrix, whose ``B``
    is zero outside the parts' blocks (``to_peft``).
    """

    def __init__(self, base_layer: nn.Module, parts: FusedParts) -> None:
        super().__init__(base_layer)
        self.parts = parts
        sizes = {name: size for name, size in zip(parts.names, parts.sizes, strict=True)}
        enabled_sizes = {sizes[name] for name in parts.enabled}
        if len(enabled_sizes) != 1:
            raise ValueError(f"fused parts {parts.enabled} must have equal sizes, got {sizes}")

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        in_features = bases.in_out(self.base_layer)[0]
        part_size = dict(zip(self.parts.names, self.parts.sizes, strict=True))[
            self.parts.enabled[0]
        ]
        return (len(self.parts.enabled), r, in_features), (len(self.parts.enabled), part_size, r)

    def max_rank(self) -> int:
        return min(bases.in_out(self.base_layer)[0], *self.parts.sizes)

    def a_matrices(self, factors: LoraFactors) -> list[Tensor]:
        return list(factors.A)  # each part is its own (r, in) matrix with its own fan-in

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

    def to_weight_layout(self, delta: Tensor) -> Tensor:
        """The parts' stacked ΔW (p, part, in) as rows of the whole matrix, zero for the
        frozen parts, in the base weight's layout."""
        rows = []
        for name, size in zip(self.parts.names, self.parts.sizes, strict=True):
            if name in self.parts.enabled:
                rows.append(delta[self.parts.enabled.index(name)])
            else:
                rows.append(delta.new_zeros(size, delta.shape[-1]))
        return super().to_weight_layout(torch.cat(rows, dim=0))  # (out, in)

    def to_peft(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Stacked per-part factors -> one rank-(p·r) pair for the whole fused matrix.

        A (p, r, in) -> (p·r, in); B (p, o, r) -> a block matrix (out, p·r) whose rows of
        the frozen parts are zero, so ``B A`` is exactly ``[B_q A_q; 0; B_v A_v]``.
        """
        A, B = tensors["A"], tensors["B"]
        p, r, in_features = A.shape
        spans = self.parts.offsets()
        block = B.new_zeros(sum(self.parts.sizes), p * r)
        if B.device.type != "meta":
            for index, part in enumerate(self.parts.enabled):
                start, end = spans[part]
                block[start:end, index * r : (index + 1) * r] = B[index]
        return {"A": A.reshape(p * r, in_features), "B": block}

    def from_peft(self, tensors: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
        """The inverse of ``to_peft``; the off-diagonal blocks must be exactly zero."""
        A, B = tensors["A"], tensors["B"]
        p = len(self.parts.enabled)
        r = A.shape[0] // p
        spans = self.parts.offsets()
        stacked_b = []
        mask = torch.ones_like(B, dtype=torch.bool)
        for index, part in enumerate(self.parts.enabled):
            start, end = spans[part]
            stacked_b.append(B[start:end, index * r : (index + 1) * r])
            mask[start:end, index * r : (index + 1) * r] = False
        if B[mask].count_nonzero():
            raise ValueError(
                f"{source}: the blocks outside the parts {self.parts.enabled} are not zero, so "
                "this is not a fused-subset adapter"
            )
        return {"A": A.reshape(p, r, A.shape[1]), "B": torch.stack(stacked_b)}

    def extra_repr(self) -> str:
        return f"parts={self.parts.enabled} of {self.parts.names}, " + super().extra_repr()


# The LoRA layer for each role of a frozen base (``frozen_base.FrozenBase.role``).
LORA_LAYERS: dict[str, type[LoraLayer]] = {
    "linear": LoraLinear,
    "conv1d": LoraConv1D,
    "embedding": LoraEmbedding,
    "conv2d": LoraConv2d,
}


def lora_class_for(module: nn.Module) -> type[LoraLayer] | None:
    """The wrapper for a module, by what its kind of base computes; None if LoRA does not
    support it."""
    kind = bases.kind_or_none(module)
    return None if kind is None else LORA_LAYERS.get(kind.role)


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a module of a supported type still cannot take LoRA, or None."""
    weight = getattr(module, "weight", None)
    integer = isinstance(weight, Tensor) and not weight.is_floating_point()
    if integer and not bases.is_packed(module):
        # a quantized layer of a kind loralab does not read (one subclassing nn.Linear):
        # never wrap it as a dense layer
        return (
            f"its weight is stored as {weight.dtype} (a quantized layer); loralab adapts "
            "layers with floating-point weights"
        )
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
