"""BitFit: only the bias vectors train (Zaken et al., 2021; a baseline of Sec. 5.1).

Every bias the model already has trains: its linear and Conv1D layers, its LayerNorms,
a pooler. A model whose linear layers have no bias (Llama, SmolLM2, Mistral) first gets a
zero bias on every ``nn.Linear`` inside its transformer blocks, so at step 0 it computes
exactly what the base computed. The bias is registered on the ``nn.Linear`` itself (its
forward already adds ``self.bias`` when there is one), so the model keeps its modules
and the new state-dict keys read ``…q_proj.bias``. A classifier's new head trains too.

|Θ| = Σ out_features over the biased layers (existing or added) + the norms' biases +
the head.

Merging is trivial: the trained model is a plain model. Added biases, though, need layers
that have a bias to land in: to use such a result as a stand-alone Llama, build it with
``attention_bias=True`` and ``mlp_bias=True`` in its config (which give exactly the
attention and MLP projections a bias) and load the state dict into that.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..lora import frozen_base as bases
from ..lora.architectures import classifier_head, transformer_blocks
from ..lora.config import ConfigError, LoraConfig
from .method import MethodSettings, PlainMethod, record_method
from .trained_weights import freeze, head_parameters, unfreeze_head


def _block_linears(model: nn.Module) -> list[nn.Module]:
    """Every linear layer (dense or packed) inside the transformer blocks: each trains a
    bias, added if need be."""
    return [
        m
        for _, block in transformer_blocks(model)
        for m in block.modules()
        if bases.role_of(m) == "linear"  # dense or packed
    ]


def _has_bias(module: nn.Module) -> bool:
    return isinstance(getattr(module, "bias", None), nn.Parameter)


def _bias_size(module: nn.Module) -> int:
    """The length of ``module``'s bias, from the module's own shape attributes."""
    if bases.role_of(module) == "linear":
        return module.out_features
    if isinstance(module, Conv1D):
        return module.nf
    if isinstance(module, nn.LayerNorm):
        return math.prod(module.normalized_shape)
    return module.bias.numel()  # any other biased module: its bias as it stands


class BitFit(PlainMethod):
    name = "bitfit"
    summary = "BitFit: only the bias vectors train (zero biases added where layers have none)"
    mergeable = True  # a plain model; added biases need bias=True layers (module docstring)
    adds_depth = False
    uses_lora = False
    companion = None

    def check(self, model, settings: MethodSettings, lora: LoraConfig | None, max_length: int):
        if self.expected_parameters(model, settings, lora) == head_parameters(model):
            raise ConfigError(
                f"bitfit: {type(model).__name__} has no biases and no nn.Linear layers in its "
                "transformer blocks to add them to"
            )

    def apply(self, model: nn.Module, settings: MethodSettings, lora: LoraConfig | None) -> None:
        self.check(model, settings, lora, 0)
        freeze(model)
        for linear in _block_linears(model):
            if linear.bias is None:
                # Zero, so the output at step 0 is the base's exactly.
                linear.bias = nn.Parameter(
                    torch.zeros(
                        linear.out_features,
                        device=bases.device(linear),
                        dtype=bases.compute_dtype(linear),
                    )
                )
        for module in model.modules():
            if _has_bias(module):
                module.bias.requires_grad_(True)
        unfreeze_head(model)  # a classifier's new head always trains
        record_method(model, self.name, settings, None)

    def expected_parameters(self, model, settings: MethodSettings, lora: LoraConfig | None) -> int:
        head = classifier_head(model)
        in_head = {id(m) for m in head.modules()} if head is not None else set()
        block_linears = {id(m) for m in _block_linears(model)}
        total = 0
        for module in model.modules():
            if id(module) in in_head:
                continue
            if id(module) in block_linears:
                total += module.out_features  # existing or added, one bias per output
            elif _has_bias(module):
                total += _bias_size(module)
        return total + head_parameters(model)
