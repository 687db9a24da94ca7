"""The causal-LM loss on counted positions (``loss.py``): the model's own loss and gradients,
without ever building the full logits."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaForCausalLM

from conftest import make_model, randomize_lora, token_batch
from loralab import LoraConfig, inject_adapter
from loralab.training.loss import NORMALISER_ROWS, causal_lm_loss, counted_head, row_logsumexp


def _batch(seed: int = 1, rows: int = 3, length: int = 11) -> dict[str, torch.Tensor]:
    """A right-padded batch whose loss counts only each row's last few tokens."""
    ids = token_batch(seed, rows, length)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # row 1 is shorter
    labels = ids.clone()
    labels[:, :5] = -100  # the prompt
    labels[mask == 0] = -100
    labels[2, 5:7] = -100  # a hole inside a completion
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _loss_and_grads(model, compute) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    return loss.detach(), _grads(model)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("chunk", [None, 4])
def test_equals_the_models_own_loss_and_gradients(kind, chunk):
    model = make_model(kind)
    targets = ["q", "v"] if kind == "llama" else ["c_attn", "c_proj"]
    inject_adapter(model, LoraConfig(r=4, target_modules=targets))
    randomize_lora(model)
    model.train()
    batch = _batch()
    plain, plain_grads = _loss_and_grads(model, lambda: model(**batch).loss)
    ours, our_grads = _loss_and_grads(model, lambda: causal_lm_loss(model, model, batch, chunk))
    assert torch.allclose(ours, plain, rtol=1e-6, atol=1e-6), (ours, plain)
    assert our_grads.keys() == plain_grads.keys() and our_grads
    for name, grad in plain_grads.items():
        assert torch.allclose(our_grads[name], grad, rtol=1e-5, atol=1e-7), name


def test_a_trained_tied_head_gets_its_gradient_too():
    model = make_model("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.train()
    batch = _batch(seed=2)
    plain, plain_grads = _loss_and_grads(model, lambda: model(**batch).loss)
    ours, our_grads = _loss_and_grads(model, lambda: causal_lm_loss(model, model, batch, 5))
    assert torch.allclose(ours, plain, atol=1e-6)
    for name, grad in plain_grads.items():  # every parameter trains: full fine-tuning
        assert torch.allclose(our_grads[name], grad, rtol=1e-5, atol=1e-7), name


def _large_vocab_model() -> tuple[LlamaForCausalLM, dict[str, torch.Tensor], set[int]]:
    """A tiny Llama with LoRA whose logits outgrow every other tensor, as in a real model;
    a batch for it; and its parameters' storages (their views share them)."""
    config = make_model("llama").config
    config.vocab_size = 1000
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    inject_adapter(model, LoraConfig(r=4, target_modules=["q", "v"]))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return model, _batch(rows=4, length=16), weights


def test_the_full_logits_are_never_built():
    model, batch, weights = _large_vocab_model()
    vocab = model.config.vocab_size
    full_logits = 4 * 16 * vocab

    class LargestTensor(TorchDispatchMode):
        """The most elements of any tensor an operation creates (views of weights aside)."""

        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in out if isinstance(out, (tuple, list)) else [out]:
                if (
                    isinstance(tensor, torch.Tensor)
                    and tensor.untyped_storage().data_ptr() not in weights
                ):
                    self.largest = max(self.largest, tensor.numel())
            return out

    with LargestTensor() as plain:
        model(**batch).loss.backward()
    with LargestTensor() as ours:
        causal_lm_loss(model, model, batch, chunk=8).backward()
    assert plain.largest >= full_logits
    assert ours.largest <= 8 * vocab < full_logits  # one chunk of logits at most


def test_other_heads_and_models_keep_their_own_loss():
    llama = make_model("llama")
    assert counted_head(llama) is not None
    inject_adapter(llama, LoraConfig(r=2, target_modules=["lm_head"]))  # a wrapped head
    assert counted_head(llama) is None
    batch = _batch()
    assert torch.equal(causal_lm_loss(llama, llama, batch), llama(**batch).loss)
    bert = make_model("bert")  # a classifier: labels are one class per row
    labels = torch.tensor([0, 2])
    ids = token_batch(batch=2)
    assert torch.equal(
        causal_lm_loss(bert, bert, {"input_ids": ids, "labels": labels}),
        bert(input_ids=ids, labels=labels).loss,
    )


def test_the_head_is_back_in_place_after_an_error_in_the_forward(monkeypatch):
    model = make_model("llama")
    head = model.lm_head

    def fail(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(model.model, "forward", fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        causal_lm_loss(model, model, _batch())
    assert model.lm_head is head


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("count", [1, 2, 16, 17, 18, 33, 40, 170])
def test_the_log_normaliser_by_blocks_of_rows_is_torchs_to_the_last_bit(count, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        logits = torch.randn(count, 49_152, generator=torch.Generator().manual_seed(count)) * 6
        assert torch.equal(row_logsumexp(logits), torch.logsumexp(logits, dim=-1))
    finally:
        torch.set_num_threads(before)


def test_the_loss_holds_one_chunk_of_logits_at_a_time():
    model, batch, weights = _large_vocab_model()
    chunk = NORMALISER_ROWS + 2  # a block of rows and a part of one
    counted = int((batch["labels"][:, 1:] != -100).sum())
    assert counted > 2 * chunk
    block = (NORMALISER_ROWS + 1) * model.config.vocab_size

    class ChunksAlive(TorchDispatchMode):
        """The most tensors larger than a block of rows' logits alive at once."""

        def __init__(self):
            super().__init__()
            self.alive: dict[int, weakref.ref] = {}  # by storage: in-place ops return it
            self.most = self.made = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in out if isinstance(out, (tuple, list)) else [out]:
                large = isinstance(tensor, torch.Tensor) and tensor.numel() > block
                where = tensor.untyped_storage().data_ptr() if large else None
                if not large or where in weights:
                    continue
                self.alive = {k: ref for k, ref in self.alive.items() if ref() is not None}
                if where not in self.alive:
                    self.alive[where] = weakref.ref(tensor)
                    self.most, self.made = max(self.most, len(self.alive)), self.made + 1
            return out

    with ChunksAlive() as seen:
        causal_lm_loss(model, model, batch, chunk=chunk).backward()
    assert seen.made >= 2  # the logits of two chunks or more were made, one after the other
    assert seen.most == 1
