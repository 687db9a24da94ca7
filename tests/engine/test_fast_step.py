"""The engine's fast step (the model's tensors read through a plan, no module calls in the
layers) against the model's own modules: the same hidden states to fp32 rounding, the
same greedy tokens, each row its own adapter from the step's inputs; and every model or
adapter the fast step cannot read runs the modules, with the reason."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_llama_engine import FAMILY, PROMPTS, _model

from conftest import randomize_lora
from loralab import LoraConfig, inject_adapter
from loralab.engine import decode_greedy, llama, plan
from loralab.engine.runner import Runner
from loralab.lora.adapters import set_active_adapter
from loralab.lora.mixing import mixed_adapters

# The fast step sums the same products in another order (a group's factors stacked, the
# scale folded into B, the base product accumulated onto the update): hidden states of
# the tiny models (|h| up to ~3) differ by ≤ 2e-6 on an AVX-512 CPU and ≤ 4e-6 on an
# AVX2 one, whose kernels block the sums differently.
FP32_ROUNDING = 1e-5


def _two_adapters(name: str = "llama") -> torch.nn.Module:
    model = _model(name, adapter=False)
    for adapter, seed in (("a", 1), ("b", 2)):
        r = 4 if adapter == "a" else 2  # ranks differ: the stacks are padded
        inject_adapter(model, LoraConfig(r=r, lora_alpha=8, target_modules="all-linear"), adapter)
        randomize_lora(model, seed=seed, std=0.3)
    return model


def _hidden(
    model, fast: bool, row_adapters=None, weights: str = "fp32", logits: bool = False
) -> torch.Tensor:
    """The prompts' hidden states (or their logits) through the fast step or the modules."""
    runner = Runner(model, len(PROMPTS), 32, weights)
    rows = runner.plan(row_adapters)
    if not fast:
        rows.layers, rows.reason = None, "the modules, for comparison"
    longest = max(len(p) for p in PROMPTS)
    tokens = torch.tensor([p + [0] * (longest - len(p)) for p in PROMPTS])
    positions = torch.arange(longest).expand(len(PROMPTS), longest)
    with torch.no_grad():
        hidden = runner.forward(rows, tokens, positions)
        return runner.logits(rows, hidden) if logits else hidden


@pytest.mark.parametrize("adapter", [False, True], ids=["base", "adapter"])
@pytest.mark.parametrize("name", sorted(FAMILY))
def test_the_fast_step_computes_what_the_modules_compute(name, adapter):
    model = _model(name, adapter)
    assert plan.fast_reason(model) is None
    fast, modules = _hidden(model, True), _hidden(model, False)
    gap = (fast - modules).abs().max().item()
    print(f"{name}, {'adapter' if adapter else 'base'}: max |Δhidden| {gap:.1e}")
    torch.testing.assert_close(fast, modules, rtol=0, atol=FP32_ROUNDING)


def test_each_row_its_adapter_from_the_steps_inputs():
    """Per-row factors (ranks 4 and 2 padded, one row on the bare base) as inputs of the
    fast step: each row's tokens are its adapter's alone, and the hidden states those of
    ``mixed_adapters`` over the modules."""
    model = _two_adapters()
    rows = ["a", None, "b"]
    assert plan.fast_reason(model, rows) is None
    expected = []
    for prompt, name in zip(PROMPTS, rows, strict=True):
        set_active_adapter(model, name)
        expected.append(decode_greedy(model, [prompt], 10)[0])
    set_active_adapter(model, "b")  # what the layers run does not matter to the rows
    assert decode_greedy(model, PROMPTS, 10) != expected
    from loralab.engine import decode

    assert decode(model, PROMPTS, 10, row_adapters=rows) == expected
    with mixed_adapters(model, rows):
        reason = plan.fast_reason(model)
        assert reason == "layer 0: a hook runs inside it (per-row mixing, or a user's)"
        modules = _hidden(model, False)
    torch.testing.assert_close(_hidden(model, True, rows), modules, rtol=0, atol=FP32_ROUNDING)


def test_a_changed_adapter_is_gathered_again():
    model = _two_adapters()
    before = plan.build(model, ["a", "b", None])
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora["a"].B.add_(1.0)  # an optimizer step, a hot-swap: the version changes
    after = plan.build(model, ["a", "b", None])
    assert not torch.equal(before[0].qkv.update.Bt[0], after[0].qkv.update.Bt[0])
    assert torch.equal(before[0].qkv.update.Bt[1], after[0].qkv.update.Bt[1])
    assert torch.count_nonzero(after[0].qkv.update.A[2]) == 0  # the bare base: zeros


def test_what_the_fast_step_cannot_read_runs_the_modules_with_the_reason():
    model = _model("llama", adapter=False)
    inject_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True))
    randomize_lora(model, seed=1, std=0.3)
    reason = plan.fast_reason(model)
    assert reason == ("layer 0: q_proj: a DoraLinear; the fast step reads plain LoRA layers only")
    expected = [llama_modules_greedy(model, prompt) for prompt in PROMPTS]
    assert decode_greedy(model, PROMPTS, 8) == expected

    bare = _model("llama", adapter=False)
    inject_adapter(bare, LoraConfig(r=4, target_modules=["q_proj"]))
    inject_adapter(bare, LoraConfig(r=4, target_modules=["lm_head"]), "head")
    assert plan.fast_reason(bare) is None  # one adapter for every row: the head is a module
    assert plan.fast_reason(bare, ["default", "head"]) == (
        "lm_head has an adapter, which the fast step does not mix per row"
    )


def llama_modules_greedy(model, prompt: list[int]) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
    return out[0, len(prompt) :].tolist()


def test_pytorchs_rms_norm_is_transformers_to_the_last_bit():
    model = _model("llama", adapter=False)
    norm = model.model.layers[0].input_layernorm
    with torch.no_grad():
        norm.weight.normal_()
        x = torch.randn(5, 7, norm.weight.shape[0]) * 4
        ours = F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)
        assert torch.equal(ours, norm(x))


def test_a_row_moved_into_a_freed_row_keeps_its_keys_and_values():
    model = _model("llama", adapter=False)
    cache = llama.new_cache(model, rows=3, length=16)
    for buffers in (cache.keys, cache.values):
        for buffer in buffers:
            buffer.normal_()
    before = [b[2, :, :5].clone() for b in (*cache.keys, *cache.values)]
    cache.move(2, 0, 5)
    after = [b[0, :, :5] for b in (*cache.keys, *cache.values)]
    assert all(torch.equal(x, y) for x, y in zip(before, after, strict=True))


def test_rows_that_leave_are_taken_by_the_last_rows_and_the_order_says_so():
    model = _model("llama", adapter=False)
    cache = llama.new_cache(model, rows=5, length=8)
    for buffer in (*cache.keys, *cache.values):
        buffer.normal_()
    before = [b.clone() for b in (*cache.keys, *cache.values)]
    lengths = [3, 4, 5, 6, 7]
    order = cache.drop([1, 4], 5, lengths)  # 4 is last: it goes; 3 takes 1's place
    assert order == [0, 3, 2]
    for old, new in zip(before, (*cache.keys, *cache.values), strict=True):
        for row, was in enumerate(order):
            assert torch.equal(new[row, :, : lengths[was]], old[was, :, : lengths[was]])


def test_a_plan_built_on_a_checked_one_reuses_its_checks_and_gathers_the_same():
    model = _two_adapters()
    runner = Runner(model, 3, 32)
    first = runner.plan(["a", None, "a"])
    again = runner.plan(["b", "a", None], checked=first)
    fresh = runner.plan(["b", "a", None])
    assert again.known == {"a", "b", None} and first.known == {"a", None}
    for ours, theirs in zip(again.layers, fresh.layers, strict=True):
        assert torch.equal(ours.qkv.update.A, theirs.qkv.update.A)
        assert torch.equal(ours.down.update.Bt, theirs.down.update.Bt)
    with torch.no_grad():  # a hot-swap: the server builds its next plan unchecked
        model.model.layers[0].self_attn.q_proj.lora["a"].B.add_(1.0)
    changed = runner.plan(["a", "b", None])
    assert not torch.equal(changed.layers[0].qkv.update.Bt[0], fresh.layers[0].qkv.update.Bt[1])


def test_a_grown_cache_keeps_what_it_stored():
    model = _model("llama", adapter=False)
    cache = llama.new_cache(model, rows=2, length=8)
    cache.ensure(6)  # as a forward reading 6 positions does
    for buffer in (*cache.keys, *cache.values):
        buffer[:, :, :6].normal_()
    before = [b[:, :, :6].clone() for b in (*cache.keys, *cache.values)]
    cache.grow(rows=5, length=20)
    assert (cache.rows, cache.length, cache.ready) == (5, 20, 6)
    for old, new in zip(before, (*cache.keys, *cache.values), strict=True):
        assert new.shape[0] == 5 and new.shape[2] == 20
        assert torch.equal(new[:2, :, :6], old)
        assert not new[2:, :, :6].any()  # the new rows' ready positions: zeros
    cache.grow(rows=1, length=4)  # never shrinks
    assert (cache.rows, cache.length) == (5, 20)


def test_positions_nothing_wrote_hold_zeros_before_a_forward_reads_them():
    """The cache's buffers start unwritten (a long prompt's would stall the others while
    hundreds of MB are touched); a forward zeroes the positions it reads first, so what
    was there before (NaN here) never reaches a masked key's 0 × value."""
    model = _model("llama", adapter=False)
    tokens = torch.tensor([PROMPTS[0][:5], PROMPTS[0][2:7]])
    positions = torch.tensor([[0, 1, 2, 3, 4], [20, 21, 22, 23, 24]])  # row 1 starts late
    outs = []
    for garbage in (0.0, float("nan")):
        runner = Runner(model, 2, 200)
        assert runner.cache.ready == 0
        for buffer in (*runner.cache.keys, *runner.cache.values):
            buffer.fill_(garbage)
        with torch.no_grad():
            outs.append(runner.forward(runner.plan(), tokens, positions))
        assert runner.cache.ready == 64  # the live bucket, not the whole buffer
        assert runner.cache.keys[0][:, :, 64:].isnan().all() == (garbage != 0)
    assert torch.equal(outs[0], outs[1])
