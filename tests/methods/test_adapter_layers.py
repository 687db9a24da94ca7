"""Adapter^H and Adapter^L: bottleneck adapters ``h + up(act(down(h)))`` in every block."""

import pytest
import torch
import torch.nn.functional as F

from conftest import make_model, token_batch
from loralab.lora.config import ConfigError
from loralab.lora.inject import trainable_parameters
from loralab.methods import METHODS, MethodSettings, get_method
from loralab.methods.adapter_layers import BottleneckAdapter, WithAdapter
from loralab.methods.method_files import load_method, save_method

R = 4
SETTINGS = MethodSettings(adapter_rank=R)
METHOD_NAMES = ("adapter-h", "adapter-l")

# Where the adapters sit, per family: (attention output, MLP output) inside block 0.
SITES = {
    "llama": ("model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"),
    "gpt2": ("transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj"),
    "bert": ("bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.output.dense"),
}


def formula(name: str, model) -> int:
    """|Θ| by hand from the config (SPEC.md and the LoRA paper), plus a classifier's head."""
    c = model.config
    d, layers = c.hidden_size, c.num_hidden_layers
    head = d * c.num_labels + c.num_labels if c.model_type == "bert" else 0
    if name == "adapter-h":  # L̂_Adpt = 2·L adapters of 2·d·r + r + d
        return 2 * layers * (2 * d * R + R + d) + head
    return layers * (2 * d * R + R + d) + 2 * layers * d + head  # one adapter + LN per block


def applied(name: str, kind: str):
    model = make_model(kind)
    get_method(name).apply(model, SETTINGS, None)
    return model


def randomize_trained(model, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in sorted(model.named_parameters()):
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)


@pytest.fixture(params=METHOD_NAMES)
def method_name(request) -> str:
    return request.param


def test_registered(method_name):
    method = METHODS[method_name]
    assert (method.mergeable, method.adds_depth, method.uses_lora) == (False, True, False)


def test_trainable_count_is_the_formula(method_name, model_kind):
    model = applied(method_name, model_kind)
    counted = trainable_parameters(model).trainable
    assert counted == get_method(method_name).expected_parameters(model, SETTINGS, None)
    assert counted == formula(method_name, model)


def test_count_on_the_meta_device(method_name, model_kind):
    config = make_model(model_kind).config
    cls = type(make_model(model_kind))
    with torch.device("meta"):
        model = cls(config)
    get_method(method_name).apply(model, SETTINGS, None)
    assert trainable_parameters(model).trainable == formula(method_name, model)
    assert all(p.is_meta for p in model.parameters())


def test_adapters_sit_where_the_papers_put_them(method_name, model_kind):
    model = applied(method_name, model_kind)
    attention, mlp = SITES[model_kind]
    wrapped = {n for n, m in model.named_modules() if isinstance(m, WithAdapter)}
    per_block = (attention, mlp) if method_name == "adapter-h" else (mlp,)
    assert {s for s in wrapped if ".0." in s} == set(per_block)
    assert len(wrapped) == len(per_block) * model.config.num_hidden_layers
    keys = model.state_dict()
    assert f"{mlp}.base_layer.weight" in keys and f"{mlp}.adapter.up.weight" in keys
    has_norm = f"{mlp}.adapter.norm.weight" in keys
    assert has_norm == (method_name == "adapter-l")


def test_step_zero_equals_the_base(method_name, model_kind):
    ids = token_batch()
    base = make_model(model_kind)(ids).logits
    assert torch.equal(applied(method_name, model_kind)(ids).logits, base)


def test_the_adapter_computes_the_formula(method_name, model_kind):
    model = applied(method_name, model_kind)
    randomize_trained(model)
    site = model.get_submodule(SITES[model_kind][1])
    seen = {}
    site.base_layer.register_forward_hook(lambda m, i, out: seen.update(h=out))
    site.register_forward_hook(lambda m, i, out: seen.update(out=out))
    model(token_batch())
    a, h = site.adapter, seen["h"]
    x = (
        F.layer_norm(h, (h.shape[-1],), a.norm.weight, a.norm.bias)
        if method_name == "adapter-l"
        else h
    )
    by_hand = h + F.linear(F.gelu(F.linear(x, a.down.weight, a.down.bias)), a.up.weight, a.up.bias)
    torch.testing.assert_close(seen["out"], by_hand, rtol=0, atol=1e-6)
    assert not torch.allclose(seen["out"], h)  # the adapter did something


def test_a_training_step_changes_only_the_adapters(method_name, model_kind):
    model = applied(method_name, model_kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".adapter." in n or n.startswith("classifier.") for n in trained)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(token_batch()).logits.pow(2).mean().backward()
    optimizer.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= trained
    assert any(k.endswith("adapter.up.weight") for k in changed)  # up gets a gradient at once


def test_save_and_load_restore_the_outputs(method_name, model_kind, tmp_path):
    model = applied(method_name, model_kind)
    randomize_trained(model)
    ids = token_batch()
    expected = model(ids).logits
    assert not torch.equal(expected, make_model(model_kind)(ids).logits)
    save_method(model, tmp_path)
    loaded = load_method(make_model(model_kind), tmp_path)
    assert torch.equal(loaded(ids).logits, expected)


def test_a_rank_above_d_is_refused_before_any_change(method_name):
    model = make_model("llama")
    before = list(model.state_dict())
    with pytest.raises(ConfigError, match=r"adapter_rank=33 .* d=32"):
        get_method(method_name).check(model, MethodSettings(adapter_rank=33), None, 0)
    with pytest.raises(ConfigError, match=r"adapter_rank=33"):
        get_method(method_name).apply(model, MethodSettings(adapter_rank=33), None)
    assert list(model.state_dict()) == before
    assert all(p.requires_grad for p in model.parameters())
    get_method(method_name).check(model, MethodSettings(adapter_rank=32), None, 0)  # r = d is fine


def test_a_rank_below_one_is_refused():
    with pytest.raises(ConfigError, match="adapter_rank"):
        MethodSettings(adapter_rank=0)


def test_adapters_are_not_stacked_twice(method_name):
    model = applied(method_name, "gpt2")
    with pytest.raises(ConfigError, match="already carries an adapter"):
        get_method(method_name).apply(model, SETTINGS, None)


def test_bottleneck_adapter_alone():
    adapter = BottleneckAdapter(
        8, 2, layer_norm=False, device=torch.device("cpu"), dtype=torch.float32
    )
    h = torch.randn(3, 5, 8)
    assert torch.equal(adapter(h), h)  # up starts at zero
    assert sum(p.numel() for p in adapter.parameters()) == 2 * 8 * 2 + 2 + 8
