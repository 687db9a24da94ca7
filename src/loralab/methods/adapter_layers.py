"""Adapter layers: small bottleneck MLPs inserted into every block (baselines of Sec. 5.1).

Adapter^H (Houlsby et al., 2019) puts two adapters in each block: on the output of the
attention's output projection and on the output of the MLP's down projection, i.e. before
each residual add. Adapter^L (Lin et al., 2020) puts one, after the MLP, with a LayerNorm
on the adapter's input. Each adapter is ``h + up(act(down(h)))``; ``up`` starts at zero,
so at step 0 the adapted model computes exactly what the base computed.

|Θ| of Adapter^H = 2·L · (2·d·r + r + d); of Adapter^L = L · (2·d·r + r + d) + 2·L·d.

The adapters run on every forward (extra depth, hence latency) and, being nonlinear,
cannot be merged into the base weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..lora import frozen_base as bases
from ..lora.architectures import hidden_size, transformer_blocks
from ..lora.config import ConfigError, LoraConfig
from .method import MethodSettings, PlainMethod, record_method
from .trained_weights import freeze, head_parameters, unfreeze_head

# Where the adapters go, as paths inside one block, by family: Llama/Mistral, GPT-2, BERT.
ATTENTION_OUTPUT = ("self_attn.o_proj", "attn.c_proj", "attention.output.dense")
MLP_OUTPUT = ("mlp.down_proj", "mlp.c_proj", "output.dense")


class BottleneckAdapter(nn.Module):
    """``h + up(act(down(norm(h))))``: down d→r, GELU, up r→d, residual.

    GELU, because it is the nonlinearity of the MLPs the adapters sit in (GPT-2, BERT) and
    of Houlsby et al.'s released adapter code. ``norm`` is a LayerNorm for Adapter^L and
    the identity for Adapter^H.
    """

    def __init__(
        self, d: int, r: int, layer_norm: bool, device: torch.device, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d, device=device, dtype=dtype) if layer_norm else nn.Identity()
        self.down = nn.Linear(d, r, device=device, dtype=dtype)
        self.act = nn.GELU()
        self.up = nn.Linear(r, d, device=device, dtype=dtype)
        # up starts at zero so the adapter is the identity at step 0 (as LoRA's B, Sec. 4.1).
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.up(self.act(self.down(self.norm(h))))  # (B, T, d) -> (B, T, r) -> (B, T, d)


class WithAdapter(nn.Module):
    """A frozen projection followed by an adapter: ``adapter(base_layer(x))``.

    Keys read ``…o_proj.base_layer.weight`` and ``…o_proj.adapter.down.weight``; the
    projection's own path still names a module (this one).
    """

    def __init__(self, base_layer: nn.Module, adapter: BottleneckAdapter) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter

    def forward(self, x: Tensor) -> Tensor:
        return self.adapter(self.base_layer(x))


def adapter_sites(model: nn.Module, per_block: tuple[tuple[str, ...], ...]) -> list[str]:
    """The full module names the adapters wrap, block by block; ``ConfigError`` if any
    block lacks one of the sites, or already carries an adapter."""
    sites = []
    for block_name, block in transformer_blocks(model):
        for candidates in per_block:
            path = next((p for p in candidates if _has_submodule(block, p)), None)
            if path is None:
                raise ConfigError(
                    f"cannot place an adapter in {block_name} ({type(block).__name__}): none of "
                    f"{', '.join(candidates)} is there"
                )
            if isinstance(block.get_submodule(path), WithAdapter):
                raise ConfigError(f"{block_name}.{path} already carries an adapter")
            sites.append(f"{block_name}.{path}")
    return sites


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


class _AdapterMethod(PlainMethod):
    """What Adapter^H and Adapter^L share; they differ in sites and the LayerNorm."""

    name: str
    summary: str
    sites: tuple[tuple[str, ...], ...]
    layer_norm: bool
    mergeable = False  # a nonlinear layer: nothing to fold into W0
    adds_depth = True
    uses_lora = False
    companion = None

    def check(self, model, settings: MethodSettings, lora: LoraConfig | None, max_length: int):
        d = hidden_size(model)
        if settings.adapter_rank > d:
            raise ConfigError(
                f"adapter_rank={settings.adapter_rank} is larger than the hidden size d={d}: "
                f"the bottleneck must be at most d wide (1 ≤ adapter_rank ≤ {d})"
            )
        adapter_sites(model, self.sites)

    def apply(self, model: nn.Module, settings: MethodSettings, lora: LoraConfig | None) -> None:
        self.check(model, settings, lora, 0)
        freeze(model)
        d, r = hidden_size(model), settings.adapter_rank
        for name in adapter_sites(model, self.sites):
            parent_name, _, child = name.rpartition(".")
            base_layer = model.get_submodule(name)
            adapter = BottleneckAdapter(
                d, r, self.layer_norm, bases.device(base_layer), bases.compute_dtype(base_layer)
            )
            setattr(model.get_submodule(parent_name), child, WithAdapter(base_layer, adapter))
        unfreeze_head(model)  # a classifier's new head always trains
        record_method(model, self.name, settings, None)

    def expected_parameters(self, model, settings: MethodSettings, lora: LoraConfig | None) -> int:
        d, r = hidden_size(model), settings.adapter_rank
        adapters = len(transformer_blocks(model)) * len(self.sites)
        norms = 2 * d * adapters if self.layer_norm else 0
        return adapters * (2 * d * r + r + d) + norms + head_parameters(model)


class AdapterH(_AdapterMethod):
    name = "adapter-h"
    summary = "Adapter^H: two bottleneck adapters per block, after attention and after the MLP"
    sites = (ATTENTION_OUTPUT, MLP_OUTPUT)
    layer_norm = False


class AdapterL(_AdapterMethod):
    name = "adapter-l"
    summary = "Adapter^L: one bottleneck adapter per block, after the MLP, with a LayerNorm"
    sites = (MLP_OUTPUT,)
    layer_norm = True
