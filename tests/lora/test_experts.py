"""LoRA on the fused 3-D expert weights of Transformers' MoE classes (``target_parameters``):
the forward against an explicit loop over experts, merge and unmerge, training that moves
every routed expert, the parameter count, and the refusals."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from loralab import LoraConfig, inject_adapter
from loralab.lora.config import ConfigError
from loralab.lora.experts import LoraExperts, expert_shape
from loralab.lora.inject import TargetError, lora_layers, trainable_parameters
from loralab.lora.merge import merge_adapter, merge_and_unload, unmerge_adapter
from loralab.lora.mixing import mixed_adapters
from moe_models import MOE_MODELS, tiny_moe

ARCHITECTURES = list(MOE_MODELS)
EXPERTS = LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=["experts"])


def _randomize(model, seed=1, std=0.3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for factors in layer.lora.values():
                factors.A.copy_(torch.randn(factors.A.shape, generator=generator) * std)
                factors.B.copy_(torch.randn(factors.B.shape, generator=generator) * std)


def _oracle(experts, hidden, index, weights, updates):
    """Token by token, choice by choice: ``W_e x + s·B_e A_e x`` for each adapted weight,
    the module's own gate between the two projections, weighted by the router."""

    def project(name, expert, x):
        weight = getattr(experts, name)[expert]
        matrix = weight.T if experts.is_transposed else weight  # (out, in)
        y = matrix @ x
        if experts.has_bias:
            y = y + getattr(experts, f"{name}_bias")[expert]
        if name in updates:
            factors = updates[name]
            y = y + factors.scale * (factors.B[expert] @ (factors.A[expert] @ x))
        return y

    out = torch.zeros_like(hidden)
    for token in range(hidden.shape[0]):
        for choice in range(index.shape[1]):
            expert = int(index[token, choice])
            h = experts._apply_gate(project("gate_up_proj", expert, hidden[token])[None])[0]
            out[token] += weights[token, choice] * project("down_proj", expert, h)
    return out


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_the_forward_equals_an_explicit_loop_over_experts(model_type):
    model = inject_adapter(tiny_moe(model_type), EXPERTS)
    _randomize(model)
    wrapper = model.model.layers[0].mlp.experts
    assert isinstance(wrapper, LoraExperts) and isinstance(wrapper.base_layer, LoraExperts)
    updates = {layer.weight_name: layer.lora["default"] for layer in wrapper.chain()}
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(9, 32, generator=generator)
    index = torch.stack([torch.randperm(4, generator=generator)[:2] for _ in range(9)])
    weights = torch.rand(9, 2, generator=generator)
    with torch.no_grad():
        got = wrapper(hidden, index, weights)
        expected = _oracle(wrapper.original, hidden, index, weights, updates)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_a_new_adapter_leaves_the_model_as_it_was(model_type):
    base = tiny_moe(model_type)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = base(ids).logits
        after = inject_adapter(copy.deepcopy(base), EXPERTS)(ids).logits  # B = 0
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_merge_then_unmerge_restores_every_experts_weight(model_type):
    model = inject_adapter(tiny_moe(model_type), EXPERTS)
    _randomize(model)
    experts = model.model.layers[1].mlp.experts.original
    original = {n: getattr(experts, n).detach().clone() for n in ("gate_up_proj", "down_proj")}
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        unmerged = model(ids).logits
        merge_adapter(model)
        merged = model(ids).logits
    for layer in model.model.layers[1].mlp.experts.chain():
        factors = layer.lora["default"]
        delta = factors.scale * factors.B.detach() @ factors.A.detach()  # (E, out, in)
        if experts.is_transposed:
            delta = delta.transpose(1, 2)
        torch.testing.assert_close(
            getattr(experts, layer.weight_name), original[layer.weight_name] + delta
        )
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    unmerge_adapter(model)
    for name, weight in original.items():
        torch.testing.assert_close(getattr(experts, name), weight, atol=1e-6, rtol=0)
    plain = merge_and_unload(model)
    assert not isinstance(plain.model.layers[0].mlp.experts, LoraExperts)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, unmerged, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_training_moves_every_routed_experts_factors_and_only_those(model_type):
    """An expert that received tokens and did not move is the bug the anchors shipped."""
    model = inject_adapter(tiny_moe(model_type), EXPERTS)
    routed: dict[int, set[int]] = {}

    def record(layer):
        def hook(module, args, kwargs):
            hidden, index, weights = args
            if layer == 0:  # expert 3 of layer 0 gets no token: its choices go to expert 2
                index = index.masked_fill(index == 3, 2)
            routed.setdefault(layer, set()).update(index.flatten().tolist())
            return (hidden, index, weights), kwargs

        return hook

    for index, block in enumerate(model.model.layers):
        block.mlp.experts.register_forward_pre_hook(record(index), with_kwargs=True)
    start = {
        (i, layer.weight_name): {
            k: t.detach().clone() for k, t in layer.lora["default"].tensors().items()
        }
        for i, block in enumerate(model.model.layers)
        for layer in block.mlp.experts.chain()
    }
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-2)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(2))
    model.train()
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert 3 not in routed[0] and routed[0]  # the starved expert
    for (index, weight), tensors in start.items():
        layer = next(
            x for x in model.model.layers[index].mlp.experts.chain() if x.weight_name == weight
        )
        now = layer.lora["default"].tensors()
        for expert in range(4):
            moved = all(not torch.equal(now[k][expert], tensors[k][expert]) for k in ("A", "B"))
            assert moved == (expert in routed[index]), (index, weight, expert)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_the_parameter_count_matches_the_formula(model_type):
    config = LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj"], target_parameters=["experts"])
    model = inject_adapter(tiny_moe(model_type), config)
    experts = model.model.layers[0].mlp.experts.original
    per_layer = sum(
        count * 3 * (inputs + out)
        for count, out, inputs in (expert_shape(experts, w) for w in ("gate_up_proj", "down_proj"))
    )
    report = trainable_parameters(model)
    assert report.trainable == 2 * (per_layer + 3 * (32 + 32))
    rows = {key: value for key, value in report.by_type.items() if "experts" in key}
    assert set(rows) == {
        "model.layers.*.mlp.experts.gate_up_proj (lora, 4 experts)",
        "model.layers.*.mlp.experts.down_proj (lora, 4 experts)",
    }


def test_short_names_and_peft_names_select_the_same_weights():
    for targets in (["experts.gate_up"], ["gate_up_proj"], ["mlp.experts.gate_up_proj"]):
        model = inject_adapter(
            tiny_moe("qwen3_moe"), LoraConfig(target_modules=[], target_parameters=targets)
        )
        chosen = {(n, layer.weight_name) for n, layer in lora_layers(model).items()}
        assert chosen == {(f"model.layers.{i}.mlp.experts", "gate_up_proj") for i in (0, 1)}
    model = inject_adapter(
        tiny_moe("mixtral"), LoraConfig(target_modules=[], target_parameters=["experts.down"])
    )
    assert {layer.weight_name for layer in lora_layers(model).values()} == {"down_proj"}


def test_all_linear_on_an_moe_says_the_experts_are_left_out():
    with pytest.warns(
        UserWarning, match=r"experts are stacked weights .* target_parameters=\['experts'\]"
    ):
        inject_adapter(tiny_moe("qwen3_moe"), LoraConfig(target_modules="all-linear"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inject_adapter(
            tiny_moe("qwen3_moe"),
            LoraConfig(target_modules="all-linear", target_parameters=["experts"]),
        )


@pytest.mark.parametrize(
    ("settings", "error", "words"),
    [
        (
            dict(target_parameters=["mlp.gate.weight"]),
            TargetError,
            "is not a stacked expert weight",
        ),
        (dict(target_parameters=["expert.gateup"]), TargetError, "matches no expert weight"),
        (dict(target_parameters=["experts"], r=40), TargetError, "larger than each expert's"),
        (
            dict(target_parameters=["experts"], lora_dropout=0.1),
            ConfigError,
            "PEFT refuses dropout",
        ),
        (dict(target_parameters=["experts"], use_dora=True), ConfigError, "DoRA adapts whole"),
        (dict(target_parameters="experts"), ConfigError, "must be a list of parameter names"),
        (dict(target_parameters=["experts"], init="pissa"), TargetError, "cannot start an adapter"),
    ],
)
def test_bad_settings_are_refused_and_the_model_is_untouched(settings, error, words):
    model = tiny_moe("qwen3_moe")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=words):
        inject_adapter(model, LoraConfig(**{"target_modules": [], **settings}))
    assert not lora_layers(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_second_adapter_must_adapt_the_same_weights():
    model = inject_adapter(tiny_moe("olmoe"), EXPERTS)
    inject_adapter(model, EXPERTS, adapter_name="second")
    with pytest.raises(TargetError, match="must adapt the same weights"):
        inject_adapter(
            model,
            LoraConfig(target_modules=[], target_parameters=["experts.down"]),
            adapter_name="third",
        )


def test_expert_adapters_are_not_mixed_per_row():
    model = inject_adapter(tiny_moe("qwen3_moe"), EXPERTS)
    with (
        pytest.raises(ValueError, match="stacked expert weights"),
        mixed_adapters(model, ["default"]),
    ):
        pass
