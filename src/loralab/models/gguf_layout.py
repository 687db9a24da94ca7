"""llama.cpp's GGUF layout: facts of its converter that loading a GGUF and writing one
both need. Which GGUF architecture a Transformers ``model_type`` becomes, each tensor's
GGUF name (from the ``gguf`` package's own tables), the row order of Llama's q and k
projections, and the GGUF tensors one fused Transformers tensor is stored as (a
mixture of experts' ``gate_up_proj``).
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
from torch import Tensor


class UnknownArchitecture(ValueError):
    """A model type whose GGUF layout is not known here (one line)."""


# Transformers' model_type → the GGUF architecture llama.cpp's converter writes for it, and
# whether that converter permutes the q and k rows (its Llama family does; Qwen2 does not).
ARCHITECTURES: dict[str, tuple[gguf.MODEL_ARCH, bool]] = {
    "llama": (gguf.MODEL_ARCH.LLAMA, True),
    "mistral": (gguf.MODEL_ARCH.LLAMA, True),
    "qwen2": (gguf.MODEL_ARCH.QWEN2, False),
    "qwen3": (gguf.MODEL_ARCH.QWEN3, False),
    "qwen3_moe": (gguf.MODEL_ARCH.QWEN3MOE, False),
}

# A stacked experts tensor Transformers keeps fused that llama.cpp stores as equal parts
# along its rows (dim 1 of experts × out × in): gate_up_proj is gate's rows, then up's, in
# the architectures above (Transformers' own GGUF reader joins them in that order).
FUSED_EXPERTS = {"experts.gate_up_proj": ("experts.gate_proj", "experts.up_proj")}


@dataclass(frozen=True)
class Part:
    """One GGUF tensor of a Transformers tensor: the whole of it, or its ``index``-th of
    ``of`` equal slices along dim 1 (a fused experts tensor)."""

    gguf_name: str
    index: int = 0
    of: int = 1

    def of_tensor(self, tensor: Tensor) -> Tensor:
        """This part of ``tensor`` (a view: copying into it fills the tensor)."""
        return tensor if self.of == 1 else tensor.chunk(self.of, dim=1)[self.index]


class GgufLayout:
    """Where a Transformers model's tensors go in llama.cpp's GGUF, and in which row order."""

    def __init__(self, config) -> None:
        model_type = getattr(config, "model_type", None)
        if model_type not in ARCHITECTURES:
            raise UnknownArchitecture(
                f"llama.cpp's GGUF layout is known here for the architectures "
                f"{sorted(ARCHITECTURES)}; the model is {model_type!r}"
            )
        self.model_type = model_type
        self.architecture, self._permutes = ARCHITECTURES[model_type]
        self.architecture_name = gguf.MODEL_ARCH_NAMES[self.architecture]
        self._names = gguf.get_tensor_name_map(self.architecture, config.num_hidden_layers)
        self._heads = config.num_attention_heads
        self._kv_heads = getattr(config, "num_key_value_heads", None) or self._heads

    def name(self, hf_name: str) -> str | None:
        """``model.layers.3.self_attn.q_proj.weight`` → ``blk.3.attn_q.weight`` (None when
        llama.cpp's layout has no such tensor). A stacked experts parameter has no suffix in
        Transformers (``mlp.experts.down_proj``) and is a ``.weight`` in GGUF."""
        if not hf_name.endswith((".weight", ".bias")):
            hf_name += ".weight"
        return self._names.get_name(hf_name, try_suffixes=(".weight", ".bias"))

    def parts(self, hf_name: str) -> list[Part]:
        """The GGUF tensors ``hf_name`` is stored as: one, the parts of a fused experts
        tensor, or none (a tensor llama.cpp's layout does not have)."""
        for fused, names in FUSED_EXPERTS.items():
            if hf_name.endswith("." + fused):
                prefix = hf_name.removesuffix(fused)
                found = [self.name(prefix + name) for name in names]
                if None in found:
                    return []
                return [Part(name, i, len(found)) for i, name in enumerate(found)]
        name = self.name(hf_name)
        return [] if name is None else [Part(name)]

    def tensors(self, hf_name: str, tensor: Tensor) -> dict[str, Tensor]:
        """``tensor`` (the model's ``hf_name``) as llama.cpp stores it: GGUF name → values
        in its row order (empty when its layout has no such tensor)."""
        return {
            part.gguf_name: self.rows(part.gguf_name, part.of_tensor(tensor))
            for part in self.parts(hf_name)
        }

    def rows(self, gguf_name: str, rows: Tensor) -> Tensor:
        """A weight (or a LoRA ``B``) in llama.cpp's row order: q and k are permuted for its
        rotary embedding in the Llama family, everything else is as Transformers has it."""
        tensor = gguf_name.split(".")[-2]  # attn_q in blk.3.attn_q.weight
        if not self._permutes or tensor not in ("attn_q", "attn_k"):
            return rows
        return rotary_rows(rows, self._heads if tensor == "attn_q" else self._kv_heads)

    def hf_name(self, gguf_name: str, hf_names: list[str]) -> str | None:
        """The one of ``hf_names`` that ``gguf_name`` is (None: none of them)."""
        return next((n for n in hf_names if self.name(n) == gguf_name), None)

    def hf_rows(self, gguf_name: str, rows: Tensor) -> Tensor:
        """The inverse of ``rows``: a tensor as llama.cpp stores it, in Transformers' order."""
        tensor = gguf_name.split(".")[-2]
        if not self._permutes or tensor not in ("attn_q", "attn_k"):
            return rows
        heads = self._heads if tensor == "attn_q" else self._kv_heads
        return unrotary_rows(rows, heads)


def rotary_rows(rows: Tensor, heads: int) -> Tensor:
    """The rows of a q or k projection (or of its ``B``) in llama.cpp's order: within each
    head, Transformers keeps the two rotary halves apart, llama.cpp interleaves them."""
    out = rows.shape[0]
    return (
        rows.reshape(heads, 2, out // heads // 2, *rows.shape[1:])
        .swapaxes(1, 2)
        .reshape(rows.shape)
    )


def unrotary_rows(rows: Tensor, heads: int) -> Tensor:
    """The inverse of ``rotary_rows``: llama.cpp's order back to Transformers'. Whole rows
    move, so packed rows (bytes) can be reordered as they are."""
    out = rows.shape[0]
    return (
        rows.reshape(heads, out // heads // 2, 2, *rows.shape[1:])
        .swapaxes(1, 2)
        .reshape(rows.shape)
    )
