"""LoRA's dropout without a dropped copy of the input (``dropout.py``): the plain
computation's outputs and gradients, fewer bytes kept for the backward pass, and a graph
``torch.compile`` can capture."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from conftest import randomize_lora
from loralab import LoraConfig, inject_adapter
from loralab.lora.low_rank_path import low_rank_path


def _factors(seed: int = 0, d_in: int = 12, d_out: int = 10, r: int = 3):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, d_in, generator=generator, requires_grad=True)
    A = torch.randn(r, d_in, generator=generator).requires_grad_()
    B = torch.randn(d_out, r, generator=generator).requires_grad_()
    return x, A, B


def _plain(x, A, B, scale, p):
    return F.linear(F.linear(F.dropout(x, p, training=True), A), B) * scale


def _run(compute, x, A, B, seed: int = 7):
    for t in (x, A, B):
        t.grad = None
    torch.manual_seed(seed)
    out = compute()
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach(), x.grad.clone(), A.grad.clone(), B.grad.clone()


def test_outputs_and_gradients_are_the_plain_computations():
    x, A, B = _factors()
    dropout = nn.Dropout(0.3).train()
    ours = _run(lambda: low_rank_path(x, A, B, 2.0, dropout), x, A, B)
    plain = _run(lambda: _plain(x, A, B, 2.0, 0.3), x, A, B)
    for mine, theirs, what in zip(ours, plain, ("out", "x", "A", "B"), strict=True):
        assert torch.allclose(mine, theirs, rtol=1e-6, atol=1e-6), what
    assert not torch.equal(ours[0], _run(lambda: _plain(x, A, B, 2.0, 0.0), x, A, B)[0])


def test_eval_mode_and_no_dropout_are_the_plain_products():
    x, A, B = _factors(1)
    with torch.no_grad():
        for dropout in (nn.Dropout(0.3).eval(), nn.Identity()):
            out = low_rank_path(x, A, B, 0.5, dropout)
            assert torch.equal(out, F.linear(F.linear(x, A), B) * 0.5)
        assert torch.equal(low_rank_path(x, A, B, 1.0, nn.Dropout(1.0)), torch.zeros(2, 5, 10))


def _saved_bytes(compute) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward pass."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        compute()
    return sum(storages.values())


def test_two_layers_on_one_input_keep_the_input_once_and_two_masks():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(4, 64, 256, generator=generator, requires_grad=True)
    q = [torch.randn(8, 256, requires_grad=True), torch.zeros(256, 8, requires_grad=True)]
    v = [torch.randn(8, 256, requires_grad=True), torch.zeros(256, 8, requires_grad=True)]
    dropout = nn.Dropout(0.1).train()
    ours = _saved_bytes(lambda: [low_rank_path(x, *f, 2.0, dropout) for f in (q, v)])
    plain = _saved_bytes(lambda: [_plain(x, *f, 2.0, 0.1) for f in (q, v)])
    elements = x.numel()
    factors = sum(t.numel() * 4 for t in (*q, *v))
    products = 2 * x.shape[0] * x.shape[1] * 8 * 4  # the (…, r) products, fp32
    # Plain: each layer keeps its dropped copy of x (4 bytes an element) and its noise (4);
    # here x once (4) and a 1-byte mask per layer, beside the factors and (…, r) products.
    assert plain >= 2 * 8 * elements
    assert ours == (4 + 2 * 1) * elements + factors + products
    print(f"saved for backward: plain {plain / 2**20:.1f} MiB, ours {ours / 2**20:.1f} MiB")


def test_lora_layers_with_dropout_train_under_torch_compile():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4))
    inject_adapter(model, LoraConfig(r=4, lora_dropout=0.1, target_modules=["0", "2"]))
    randomize_lora(model)
    model.train()
    x = torch.randn(3, 7, 16)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled(x).square().mean().backward()  # dynamo captures the custom autograd Function
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()  # without dropout the compiled forward is the eager one
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-6)
