"""Many adapters on one base: list, switch, disable, delete, hot-swap, combine, mix per row."""

import random

import pytest
import torch

from conftest import make_model
from loralab import (
    LoraConfig,
    inject_adapter,
    lora_layers,
    merge_adapter,
    save_adapter,
)
from loralab.files.adapter_sets import load_all_adapters, save_all_adapters
from loralab.files.hot_swap import hot_swap_adapter
from loralab.files.peft_config import AdapterFileError
from loralab.lora.adapters import (
    active_adapter,
    combine_adapters,
    delete_adapter,
    disabled_adapters,
    list_adapters,
    set_active_adapter,
)
from several_adapters import logits, logits_alone, saved_adapter


def test_list_switch_disable(three):
    model, _, tokens, alone = three
    infos = {info.name: info for info in list_adapters(model)}
    assert set(infos) == {"a", "b", "c"}
    assert infos["a"].active and not infos["b"].active
    assert infos["b"].ranks == (2,) and infos["b"].modules == 4
    assert infos["b"].target_modules == ["o_proj", "v_proj"]  # as the file wrote them
    # the first adapter runs, and only it: o_proj (only b adapts it) stays the base
    torch.testing.assert_close(logits(model, tokens), alone["a"], atol=1e-5, rtol=1e-5)
    for name in ("b", "c", None, "a"):
        set_active_adapter(model, name)
        assert active_adapter(model) == name
        torch.testing.assert_close(logits(model, tokens), alone[name], atol=1e-5, rtol=1e-5)
    with disabled_adapters(model):
        torch.testing.assert_close(logits(model, tokens), alone[None], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(model, tokens), alone["a"], atol=1e-5, rtol=1e-5)


def test_unknown_adapter_lists_the_loaded_ones(three):
    model = three[0]
    with pytest.raises(KeyError, match=r"no adapter named 'd'; loaded adapters: \['a', 'b', 'c'\]"):
        set_active_adapter(model, "d")
    with pytest.raises(KeyError, match="loaded adapters"):
        delete_adapter(model, "d")


def test_delete_unwraps_layers_left_without_adapters(three):
    model, _, tokens, alone = three
    delete_adapter(model, "b")
    assert [i.name for i in list_adapters(model)] == ["a", "c"]
    assert not any("o_proj" in name for name in lora_layers(model))
    torch.testing.assert_close(logits(model, tokens), alone["a"], atol=1e-5, rtol=1e-5)
    merge_adapter(model)  # deleting a merged adapter restores the base weights first
    delete_adapter(model, "a")
    set_active_adapter(model, None)
    torch.testing.assert_close(logits(model, tokens), alone[None], atol=1e-5, rtol=1e-5)


def test_hot_swap_replaces_weights_in_place(three, tmp_path):
    model, _, tokens, _ = three
    other = saved_adapter(tmp_path, "llama", "a", seed=9)
    layer = lora_layers(model)["model.layers.0.self_attn.q_proj"]
    parameter = layer.lora["a"].A
    hot_swap_adapter(model, other, "a")
    assert lora_layers(model)["model.layers.0.self_attn.q_proj"] is layer
    assert layer.lora["a"].A is parameter  # the same tensors, new values
    torch.testing.assert_close(
        logits(model, tokens), logits_alone("llama", other, tokens), atol=1e-5, rtol=1e-5
    )


def test_hot_swap_keeps_a_merged_adapter_merged_with_the_new_weights(three, tmp_path):
    model, _, tokens, _ = three
    merge_adapter(model)
    other = saved_adapter(tmp_path, "llama", "a", seed=11)
    hot_swap_adapter(model, other, "a")
    assert all(
        layer.merged_adapters == ["a"] for layer in lora_layers(model).values() if "a" in layer.lora
    )
    torch.testing.assert_close(
        logits(model, tokens), logits_alone("llama", other, tokens), atol=1e-5, rtol=1e-5
    )


def test_hot_swap_with_other_shapes_says_why_and_changes_nothing(three, tmp_path):
    model, dirs, tokens, _ = three
    before = logits(model, tokens)
    with pytest.raises(
        AdapterFileError, match=r"rank 2 in the file, 4 loaded|adapts other modules"
    ):
        hot_swap_adapter(model, dirs["b"], "a")
    bigger = make_model("llama")
    inject_adapter(bigger, LoraConfig(r=8, target_modules=["q", "v"]))
    save_adapter(bigger, tmp_path / "r8")
    with pytest.raises(AdapterFileError, match=r"rank 8 in the file, 4 loaded"):
        hot_swap_adapter(model, tmp_path / "r8", "a")
    assert torch.equal(logits(model, tokens), before)


def _hand_merged(kind, parts):
    """A base whose weights are W0 + Σ w·ΔW, with ΔW read from each adapter's own layers."""
    base = make_model(kind)
    state = base.state_dict()
    for model, name, weight in parts:
        for module, layer in lora_layers(model).items():
            if name in layer.lora:
                state[f"{module}.weight"] += weight * layer.delta_weight(name)
    base.load_state_dict(state)
    return base


def test_combine_exactly(three):
    model, _, tokens, _ = three
    result = combine_adapters(model, ["a", "b"], [0.5, 2.0], "mix")
    assert result.relative_error == 0.0
    assert result.ranks["model.layers.0.self_attn.v_proj"] == 4 + 2  # concatenated
    assert result.ranks["model.layers.0.self_attn.o_proj"] == 2  # only b adapts it
    set_active_adapter(model, "mix")
    expected = _hand_merged("llama", [(model, "a", 0.5), (model, "b", 2.0)])
    torch.testing.assert_close(
        logits(model, tokens), logits(expected, tokens), atol=1e-5, rtol=1e-5
    )


def test_combine_compressed_reports_the_svd_error(three):
    model = three[0]
    full = combine_adapters(model, ["a", "c"], [1.0, 1.0], "exact")
    lossless = combine_adapters(model, ["a", "c"], [1.0, 1.0], "r8", rank=8)
    assert full.relative_error == 0.0 and lossless.relative_error < 1e-6
    lossy = combine_adapters(model, ["a", "c"], [1.0, 1.0], "r2", rank=2)
    # the reported error is the true one, computed here from the deltas
    num = den = 0.0
    for layer in lora_layers(model).values():
        if "r2" in layer.lora:
            exact = layer.delta_weight("exact")
            num += float(((exact - layer.delta_weight("r2")) ** 2).sum())
            den += float((exact**2).sum())
    assert 0.05 < lossy.relative_error == pytest.approx((num / den) ** 0.5, rel=1e-4)


def test_combine_refuses_bad_requests(three):
    model = three[0]
    with pytest.raises(KeyError, match="no adapter named 'z'"):
        combine_adapters(model, ["a", "z"], [1, 1], "new")
    with pytest.raises(ValueError, match="one weight per adapter"):
        combine_adapters(model, ["a", "b"], [1], "new")
    with pytest.raises(ValueError, match="already exists"):
        combine_adapters(model, ["a"], [1], "b")


def test_long_random_sequence_of_merged_switches_restores_the_base(three):
    model, _, tokens, alone = three
    w0 = {n: layer.base_layer.weight.detach().clone() for n, layer in lora_layers(model).items()}
    merge_adapter(model)
    rng = random.Random(0)
    for _ in range(200):
        set_active_adapter(model, rng.choice(["a", "b", "c", None]))
    set_active_adapter(model, "b")
    torch.testing.assert_close(logits(model, tokens), alone["b"], atol=1e-5, rtol=1e-5)
    set_active_adapter(model, None)
    for name, layer in lora_layers(model).items():
        weight = layer.base_layer.weight
        assert (weight - w0[name]).norm() / w0[name].norm() < 1e-6


def test_save_and_load_all_adapters(three, tmp_path):
    model, _, tokens, alone = three
    set_active_adapter(model, "a")
    combine_adapters(model, ["b"], [1.0], "default")
    save_all_adapters(model, tmp_path / "all")
    assert (tmp_path / "all" / "adapter_config.json").exists()  # default at the top
    assert {p.name for p in (tmp_path / "all").iterdir() if p.is_dir()} == {"a", "b", "c"}
    fresh = make_model("llama")
    assert load_all_adapters(fresh, tmp_path / "all") == ["default", "a", "b", "c"]
    for name in ("a", "b", "c"):
        set_active_adapter(fresh, name)
        torch.testing.assert_close(logits(fresh, tokens), alone[name], atol=1e-5, rtol=1e-5)
    set_active_adapter(fresh, "default")
    torch.testing.assert_close(logits(fresh, tokens), alone["b"], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_hot_swap_keeps_a_compiled_model_working(three, tmp_path):
    model, _, tokens, _ = three
    compiled = torch.compile(model)
    with torch.no_grad():
        compiled(tokens)
    other = saved_adapter(tmp_path, "llama", "a", seed=13)
    hot_swap_adapter(model, other, "a")
    with torch.no_grad():
        swapped = compiled(tokens).logits
    torch.testing.assert_close(swapped, logits_alone("llama", other, tokens), atol=1e-5, rtol=1e-5)
