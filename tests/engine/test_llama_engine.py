"""The engine's greedy decoding gives Transformers' greedy tokens, to the last token, on
tiny models of the Llama family (Llama, Qwen2 with biases, Qwen3 with per-head norms,
Mistral with a sliding window shorter than the prompts), with and without an unmerged
adapter, for rows of different lengths decoded in one batch, and with a different
adapter on each row."""

from __future__ import annotations

import pytest
import torch

from conftest import LLAMA_FAMILY as FAMILY
from conftest import make_model, randomize_lora
from loralab import LoraConfig, inject_adapter
from loralab.engine import KVCache, decode_greedy, supported_reason
from loralab.lora.adapters import set_active_adapter
from loralab.lora.mixing import mixed_adapters

PROMPTS = [[5, 17, 40, 3, 22, 8, 61], [2, 9], [70, 71, 72, 73]]


def _model(name: str, adapter: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = FAMILY[name]().eval()
    if adapter:
        inject_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        randomize_lora(model, seed=1, std=0.3)
    return model


def _transformers_greedy(model, prompt: list[int], new: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, max_new_tokens=new, do_sample=False, eos_token_id=None)
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("adapter", [False, True], ids=["base", "adapter"])
@pytest.mark.parametrize("name", sorted(FAMILY))
def test_greedy_tokens_equal_transformers(name, adapter):
    model = _model(name, adapter)
    new = 12
    expected = [_transformers_greedy(model, prompt, new) for prompt in PROMPTS]
    assert decode_greedy(model, PROMPTS, new) == expected


def test_a_row_stops_at_its_stop_token_and_the_others_go_on():
    model = _model("llama", adapter=False)
    full = decode_greedy(model, PROMPTS, 10)
    stop = full[1][3]
    stopped = decode_greedy(model, PROMPTS, 10, stop_ids=[stop])
    assert stopped[1] == full[1][: full[1].index(stop) + 1]
    for row in (0, 2):
        cut = full[row].index(stop) + 1 if stop in full[row] else 10
        assert stopped[row] == full[row][:cut]


def test_other_architectures_are_told_why():
    assert "not 'gpt2'" in supported_reason(make_model("gpt2"))
    with pytest.raises(ValueError, match="the engine runs the Llama family"):
        decode_greedy(make_model("gpt2"), [[1, 2]], 2)


def test_a_step_attends_over_the_live_length_in_buckets_never_the_whole_buffer():
    cache = KVCache(layers=1, rows=2, kv_heads=1, length=1000, head_dim=4)
    assert cache.live_length(0) == 64 and cache.live_length(63) == 64
    assert cache.live_length(64) == 128 and cache.live_length(999) == 1000
    keys = torch.randn(2, 1, 3, 4)
    cache.write(0, keys, keys, cache.slots(torch.tensor([[0, 1, 2], [7, 8, 9]])))
    read, _ = cache.read(0, rows=2, live=64)
    assert read.data_ptr() == cache.keys[0].data_ptr()  # a view
    assert torch.equal(read[0, :, :3], keys[0]) and torch.equal(read[1, :, 7:10], keys[1])


def test_rows_write_each_head_at_their_own_positions():
    cache = KVCache(layers=2, rows=3, kv_heads=2, length=16, head_dim=4)
    cache.ensure(16)
    keys, values = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)
    positions = torch.tensor([[4, 5, 6], [0, 1, 2]])
    cache.write(1, keys, values, cache.slots(positions, first=1))  # rows 1 and 2
    for row, where in ((1, slice(4, 7)), (2, slice(0, 3))):
        assert torch.equal(cache.keys[1][row, :, where], keys[row - 1])
        assert torch.equal(cache.values[1][row, :, where], values[row - 1])
    written = torch.zeros(3, 2, 16, dtype=torch.bool)
    written[1, :, 4:7] = written[2, :, 0:3] = True
    assert not cache.keys[1][~written].any() and not cache.keys[0].any()


def test_each_row_its_own_adapter_as_each_alone():
    """The rows of one batch run different adapters (and one the bare base) through
    ``mixed_adapters``: each row's tokens are those of its adapter decoded alone."""
    model = _model("llama", adapter=False)
    for name, seed in (("a", 1), ("b", 2)):
        inject_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), name)
        randomize_lora(model, seed=seed, std=0.3)  # every adapter so far: b redraws a's
    rows = ["a", None, "b"]
    expected = []
    for prompt, name in zip(PROMPTS, rows, strict=True):
        set_active_adapter(model, name)
        expected.append(decode_greedy(model, [prompt], 10)[0])
    set_active_adapter(model, "a")
    with mixed_adapters(model, rows):
        mixed = decode_greedy(model, PROMPTS, 10)
    assert mixed == expected
    assert len({tuple(row) for row in expected}) == 3
