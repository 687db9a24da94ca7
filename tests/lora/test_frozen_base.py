"""The frozen base, one kind per layer type: its sizes, its weight as the matrix (out, in)
and back, and a layer of no kind or a quantized one refused by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import loralab
from conftest import make_model
from loralab import LoraConfig, TargetError
from loralab.lora import frozen_base


@pytest.mark.parametrize(
    ("module", "in_out", "matrix"),
    [
        (nn.Linear(3, 5), (3, 5), (5, 3)),
        (Conv1D(5, 3), (3, 5), (5, 3)),  # GPT-2's: weight stored (in, out)
        (nn.Embedding(7, 4), (7, 4), (4, 7)),  # a one-hot token to its row
        (nn.Conv2d(2, 6, 3), (2, 6), (6, 18)),  # the kernel as (out, in · kh · kw)
    ],
)
def test_each_kind_answers_for_its_modules(module, in_out, matrix):
    assert frozen_base.in_out(module) == in_out
    weight = frozen_base.weight_matrix(module)
    assert tuple(weight.shape) == matrix
    back = frozen_base.to_weight_layout(module, weight)
    assert torch.equal(back, module.weight.detach())
    delta = torch.ones(matrix)
    before = module.weight.detach().clone()
    frozen_base.add_to_weight(module, frozen_base.to_weight_layout(module, delta))
    assert torch.equal(module.weight.detach(), before + 1)
    assert frozen_base.fan_in_fan_out(module) == isinstance(module, Conv1D)


def test_a_module_of_no_kind_is_an_error():
    with pytest.raises(TypeError, match="LayerNorm is no kind of frozen base"):
        frozen_base.in_out(nn.LayerNorm(4))


def test_a_quantized_linear_is_refused_by_name_and_the_model_is_unchanged():
    """bitsandbytes' Linear4bit subclasses nn.Linear with an integer weight: never wrap it
    as if it were dense."""
    model = make_model("llama")
    q_proj = model.model.layers[0].self_attn.q_proj
    q_proj.weight = nn.Parameter(torch.zeros_like(q_proj.weight, dtype=torch.uint8), False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TargetError, match=r"stored as torch.uint8 \(a quantized layer\)"):
        loralab.inject_adapter(model, LoraConfig(target_modules=["q_proj"]))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
