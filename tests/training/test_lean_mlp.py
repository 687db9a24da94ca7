"""The gated MLP that keeps two tensors for the backward pass instead of three
(``lean_mlp.py``): the same loss and gradients to the last bit, less kept, and the model's
own forward after."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import VOCAB, randomize_lora, tiny_gpt2, tiny_llama, token_batch
from loralab import LoraConfig, inject_adapter
from loralab.training.lean_mlp import GatedProduct, lean_mlp
from loralab.training.loop import train
from tiny_runs import run_config, tiny_pair


def test_the_gated_product_is_autograds_to_the_last_bit():
    for dtype in (torch.float32, torch.bfloat16):
        generator = torch.Generator().manual_seed(0)
        gate, up, grad = (torch.randn(3, 5, 16, generator=generator).to(dtype) for _ in "abc")
        gate.requires_grad_()
        up.requires_grad_()
        plain = F.silu(gate) * up
        plain_grads = torch.autograd.grad(plain, (gate, up), grad)
        ours = GatedProduct.apply(gate, up)
        our_grads = torch.autograd.grad(ours, (gate, up), grad)
        assert torch.equal(ours, plain), dtype
        assert all(torch.equal(a, b) for a, b in zip(our_grads, plain_grads, strict=True)), dtype


def _saved_bytes_loss_and_grads(model, ids):
    seen: dict[int, int] = {}

    def pack(tensor):
        seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=ids, labels=ids).loss
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = sum(size for pointer, size in seen.items() if pointer not in weights)
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return kept, loss.detach(), grads


def test_lean_mlp_keeps_one_tensor_less_per_block_with_the_same_loss_and_gradients():
    torch.manual_seed(0)
    model = tiny_llama().train()
    # LoRA inside the MLP too (gate, up), so gradients flow through both inputs
    inject_adapter(model, LoraConfig(r=4, target_modules=["q", "v", "gate", "up"]))
    randomize_lora(model)
    ids = token_batch(batch=2, length=7)
    plain = _saved_bytes_loss_and_grads(model, ids)
    with lean_mlp(model) as swapped:
        assert swapped == len(model.model.layers)
        lean = _saved_bytes_loss_and_grads(model, ids)
    tokens, intermediate = ids.numel(), model.config.intermediate_size
    assert plain[0] - lean[0] == swapped * tokens * intermediate * 4  # silu(gate), fp32
    assert torch.equal(lean[1], plain[1])
    assert lean[2].keys() == plain[2].keys() and len(lean[2]) == 4 * 2 * swapped
    assert all(torch.equal(lean[2][name], plain[2][name]) for name in plain[2])
    # the model's own forward is back after the block
    assert all("forward" not in vars(layer.mlp) for layer in model.model.layers)


def test_other_mlps_are_left_as_they_are():
    gelu = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        vocab_size=VOCAB,
        hidden_act="gelu",
    )
    for model in (tiny_gpt2(), LlamaForCausalLM(gelu)):
        with lean_mlp(model) as swapped:
            assert swapped == 0


def test_training_with_and_without_it_gives_the_same_adapter_bit_for_bit(tmp_path, tiny_model_dir):
    adapters, models = {}, {}
    for name, lean in (("lean", True), ("plain", False)):
        model, tokenizer = tiny_pair(tiny_model_dir)
        config = run_config(tmp_path, name, lean_mlp=lean, save_every=0, target_modules=["q", "up"])
        models[name] = train(config, model=model, tokenizer=tokenizer).model
        adapters[name] = load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors"))
    assert adapters["lean"].keys() == adapters["plain"].keys()
    assert all(torch.equal(adapters["lean"][k], adapters["plain"][k]) for k in adapters["lean"])
    assert all("forward" not in vars(m) for m in models["lean"].modules())
