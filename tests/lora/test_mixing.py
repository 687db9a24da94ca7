"""Each batch row with its own adapter: equal to each row run alone, in a forward pass and
in generation, on every layer type; refusals say why."""

import pytest
import torch

from conftest import make_model, randomize_lora, token_batch
from loralab import LoraConfig, inject_adapter, load_adapter, merge_adapter, save_adapter
from loralab.files.hot_swap import hot_swap_adapter
from loralab.lora.adapters import set_active_adapter
from loralab.lora.mixing import mixed_adapters
from several_adapters import logits, logits_alone, saved_adapter


def test_mixed_batch_rows_equal_each_rowlogits_alone(three):
    model, _, tokens, alone = three
    rows = ["a", None, "c", "b"]
    with mixed_adapters(model, rows):
        mixed = logits(model, tokens)
    for index, name in enumerate(rows):
        torch.testing.assert_close(mixed[index], alone[name][index], atol=1e-5, rtol=1e-5)
    # outside the block the active adapter runs again
    torch.testing.assert_close(logits(model, tokens), alone["a"], atol=1e-5, rtol=1e-5)


def test_mixed_batch_sees_weights_changed_since_the_last_one(three, tmp_path):
    model, _, tokens, alone = three
    rows = ["a", "b", None, "a"]
    with mixed_adapters(model, rows):
        logits(model, tokens)  # builds (and keeps) the stacked banks
    other = saved_adapter(tmp_path, "llama", "a", seed=21)
    hot_swap_adapter(model, other, "a")
    with mixed_adapters(model, rows):
        mixed = logits(model, tokens)
    swapped = logits_alone("llama", other, tokens)
    for index in (0, 3):
        torch.testing.assert_close(mixed[index], swapped[index], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], alone["b"][1], atol=1e-5, rtol=1e-5)


def test_mixed_batch_on_fused_and_embedding_layers(tmp_path):
    model = make_model("gpt2")
    configs = {
        "q": LoraConfig(r=2, target_modules=["q", "v"]),
        "w": LoraConfig(r=3, target_modules=["wte", "o"]),
    }
    alone = {}
    tokens = token_batch(batch=3)
    for seed, (name, config) in enumerate(configs.items()):
        single = make_model("gpt2")
        inject_adapter(single, config)
        randomize_lora(single, seed=seed)
        save_adapter(single, tmp_path / name)
        load_adapter(model, tmp_path / name, adapter_name=name)
        alone[name] = logits(single, tokens)
    alone[None] = logits(make_model("gpt2"), tokens)
    rows = ["w", "q", None]
    with mixed_adapters(model, rows):
        mixed = logits(model, tokens)
    for index, name in enumerate(rows):
        torch.testing.assert_close(mixed[index], alone[name][index], atol=1e-5, rtol=1e-5)


def test_generation_with_per_row_adapters(three):
    model, _, _, _ = three
    prompts = token_batch(seed=5, batch=3, length=4)
    rows = ["b", "a", None]
    with mixed_adapters(model, rows):
        mixed = model.generate(prompts, max_new_tokens=5, do_sample=False, pad_token_id=0)
    for index, name in enumerate(rows):
        set_active_adapter(model, name)
        single = model.generate(
            prompts[index : index + 1], max_new_tokens=5, do_sample=False, pad_token_id=0
        )
        assert torch.equal(mixed[index], single[0])


def test_mixed_batch_refuses_merged_adapters_and_wrong_sizes(three):
    model, _, tokens, _ = three
    with pytest.raises(KeyError, match="no adapter named 'x'"), mixed_adapters(model, ["x"] * 4):
        pass
    with (
        pytest.raises(ValueError, match="2 row adapters but the batch has 4 rows"),
        mixed_adapters(model, ["a", "b"]),
    ):
        model(tokens)
    merge_adapter(model)
    with pytest.raises(ValueError, match="unmerge"), mixed_adapters(model, ["a"] * 4):
        pass


def test_an_adapter_loaded_again_under_its_name_is_not_mixed_from_the_old_bank(tmp_path):
    """The stacked factors a layer keeps are rebuilt when an adapter is replaced by a new
    one of the same name, even while another adapter keeps the layer wrapped."""
    from loralab import delete_adapter

    one = saved_adapter(tmp_path, "llama", "a", 1)
    other = saved_adapter(tmp_path, "llama", "a", 2)
    keeper = saved_adapter(tmp_path, "llama", "c", 3)
    model = load_adapter(make_model("llama"), one, adapter_name="x")
    load_adapter(model, keeper, adapter_name="keep")
    tokens = token_batch(batch=2)
    with mixed_adapters(model, ["x", "keep"]):
        logits(model, tokens)  # builds the banks with the first "x"
    delete_adapter(model, "x")
    load_adapter(model, other, adapter_name="x")
    with mixed_adapters(model, ["x", "keep"]):
        mixed = logits(model, tokens)
    expected = logits_alone("llama", other, tokens[:1])
    torch.testing.assert_close(mixed[:1], expected, rtol=1e-5, atol=1e-5)
