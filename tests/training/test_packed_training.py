"""Packing changes what a step computes, never what it learns: the loss and the gradients
of a packed batch equal those of the same examples in an unpacked batch (to fp32
rounding), and each example's logits in a packed row equal its logits alone, on tiny
models of several families (Mistral with a sliding window shorter than the rows, GPT-2
with learnt absolute positions). A model that would attend across examples is refused."""

from __future__ import annotations

import json
import random

import pytest
import torch
from torch import nn

from conftest import LLAMA_FAMILY, LLAMA_SIZES, randomize_lora, tiny_gpt2
from loralab import LoraConfig, inject_adapter
from loralab.data.batches import collate
from loralab.data.encoding import IGNORE_INDEX, Encoded
from loralab.data.packing import pack
from loralab.lora.config import ConfigError
from loralab.training.loop import train
from loralab.training.loss import causal_lm_loss
from loralab.training.packed_attention import check_packed_attention
from tiny_runs import run_config, tiny_pair

FAMILY = {**LLAMA_FAMILY, "gpt2": tiny_gpt2}
VOCAB = LLAMA_SIZES["vocab_size"]  # GPT-2's is larger


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = FAMILY[name]()
    inject_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_lora(model, seed=1, std=0.3)
    return model.train()  # no dropout anywhere: the tiny configs and LoRA's are 0


def _examples(count: int = 9, seed: int = 0) -> list[Encoded]:
    rng = random.Random(seed)
    items = []
    for _ in range(count):
        length = rng.randint(2, 14)
        ids = [rng.randrange(1, VOCAB) for _ in range(length)]
        prompt = rng.randint(0, length - 1)  # the loss counts the rest
        items.append(Encoded(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return items


def _loss_and_grads(model: nn.Module, batch: dict, chunked: bool):
    batch = {**batch, "use_cache": False}  # as training runs it
    model.zero_grad(set_to_none=True)
    loss = causal_lm_loss(model, model, batch) if chunked else model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("chunked", [False, True], ids=["model-loss", "chunked-loss"])
@pytest.mark.parametrize("family", sorted(FAMILY))
def test_a_packed_batch_has_the_loss_and_gradients_of_its_examples(family, chunked):
    model = _model(family)
    items = _examples()
    rows = pack(items, 24)
    assert len(rows) < len(items) and any(len(row.segments) > 1 for row in rows)
    plain_loss, plain_grads = _loss_and_grads(model, collate(items, 0), chunked)
    packed_loss, packed_grads = _loss_and_grads(model, collate(rows, 0), chunked)
    torch.testing.assert_close(packed_loss, plain_loss, rtol=1e-6, atol=1e-6)
    assert plain_grads.keys() == packed_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        scale = grad.abs().max().item()
        gap = (packed_grads[name] - grad).abs().max().item()
        assert gap <= 1e-5 * scale + 1e-7, (name, gap, scale)


@pytest.mark.parametrize("family", sorted(FAMILY))
@torch.no_grad()
def test_each_examples_logits_in_a_packed_row_equal_its_logits_alone(family):
    model = _model(family).eval()
    items = _examples(seed=1)
    batch = collate(pack(items, 30), 0)
    logits = model(**batch, use_cache=False).logits
    placed = 0
    for row, packed in enumerate(pack(items, 30)):
        start = 0
        for length in packed.segments:
            alone = model(input_ids=torch.tensor([packed.input_ids[start : start + length]]))
            torch.testing.assert_close(
                logits[row, start : start + length], alone.logits[0], rtol=1e-5, atol=1e-5
            )
            start += length
            placed += 1
    assert placed == len(items)


class _AttendsAcross(nn.Module):
    """A model that drops the position ids: its packed rows would attend across examples."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids=None, **kwargs):
        return self.model(input_ids=input_ids, **kwargs)


def test_a_model_that_attends_across_examples_is_refused():
    model = _model("llama")
    check_packed_attention(model, {"use_cache": False})  # as training calls it: accepted
    assert model.training  # and left as it was
    with pytest.raises(ConfigError, match="attends across the examples of a packed row"):
        check_packed_attention(_AttendsAcross(model), {"use_cache": False})
    # Called with a cache, Transformers builds no packed mask: the check sees it.
    with pytest.raises(ConfigError, match="attends across"):
        check_packed_attention(model, {"use_cache": True})


def _chat_file(tmp_path, count: int = 40):
    rng = random.Random(0)
    lines = []
    for index in range(count):
        words = " ".join(rng.choice(["ab", "cd", "ef"]) for _ in range(rng.randint(1, 12)))
        record = {"prompt": f"Echo {index}:", "completion": f" {words}"}
        lines.append(json.dumps(record) + "\n")
    path = tmp_path / "short.jsonl"
    path.write_text("".join(lines), encoding="utf-8")
    return path


def test_a_packed_run_trains_resumes_bit_for_bit_and_reports_its_fill(
    tmp_path, tiny_model_dir, capsys
):
    data = str(_chat_file(tmp_path))
    settings = dict(data=data, packing=True, max_length=64, batch_size=2, progress=True)
    whole = train(run_config(tmp_path, "whole", **settings), *tiny_pair(tiny_model_dir))
    err = capsys.readouterr().err
    assert "packing: 40 examples in " in err and "% without packing)" in err
    rows = len(whole.datasets.rows)
    assert rows < 40 and sum(len(r.segments) for r in whole.datasets.rows) == 40
    first = json.loads((whole.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss_tokens_per_s"] > 0
    # Resumed from the checkpoint of step 3: the same steps, the same adapter.
    assert (whole.run_dir / "checkpoint").is_dir()
    whole_state = {k: v.clone() for k, v in whole.model.state_dict().items()}
    resumed = run_config(tmp_path, "whole", **settings, resume=True)
    result = train(resumed, *tiny_pair(tiny_model_dir))
    assert result.losses == whole.losses
    for name, value in result.model.state_dict().items():
        assert torch.equal(value, whole_state[name]), name


def test_packing_is_for_causal_lms():
    with pytest.raises(ConfigError, match="packing puts several examples of a causal LM"):
        run_config_for_classifier()


def run_config_for_classifier():
    from loralab.training.config import TrainConfig

    return TrainConfig(model_kind="classification", task="nli", packing=True)


def test_an_example_over_max_length_is_truncated_or_refused_as_asked(tmp_path, tiny_model_dir):
    from loralab.data.records import DataError

    path = tmp_path / "long.jsonl"
    records = [{"prompt": "Say:", "completion": " ab"}] * 3 + [
        {"prompt": "Say:", "completion": " " + "ab " * 40}
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    settings = dict(data=str(path), validation_data=None, packing=True, max_length=32)
    result = train(run_config(tmp_path, "cut", **settings, max_steps=1), *tiny_pair(tiny_model_dir))
    assert max(len(row) for row in result.datasets.rows) <= 32
    assert sum(len(row.segments) for row in result.datasets.rows) == 4  # none split or lost
    refuse = run_config(tmp_path, "refused", **settings, long_examples="refuse")
    with pytest.raises(DataError, match=r"long.jsonl, line 4: \d+ tokens, longer than"):
        train(refuse, *tiny_pair(tiny_model_dir))
    # Named where it is in the file, whatever was held out before it.
    held = run_config(
        tmp_path,
        "held",
        **{**settings, "long_examples": "refuse", "validation_split_fraction": 0.25},
    )
    with pytest.raises(DataError, match=r"long.jsonl, line 4: \d+ tokens"):
        train(held, *tiny_pair(tiny_model_dir))


@pytest.mark.parametrize("method", ["preembed", "prelayer", "lora-pe"])
def test_prefix_methods_pack_with_the_same_loss(tmp_path, tiny_model_dir, method):
    """A prefix method's tokens are part of each example, so they pack with it."""
    from loralab.methods.prefix import prompt_tokens
    from loralab.training.examples import encode_examples, load_examples
    from loralab.training.loop import prepare_model

    config = run_config(
        tmp_path, method=method, prefix_length=2, infix_length=1, packing=True, max_length=64
    )
    model, tokenizer = tiny_pair(tiny_model_dir)
    prepare_model(config, model)
    with torch.no_grad():  # the tables start as real tokens' embeddings: make them differ
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.1 * torch.randn_like(parameter))
    datasets = encode_examples(config, load_examples(config), tokenizer, prompt_tokens(model))
    items = datasets.train[:12]
    rows = pack(items, 64)
    assert len(rows) < len(items)
    plain, plain_grads = _loss_and_grads(model, collate(items, 0), chunked=False)
    packed, packed_grads = _loss_and_grads(model, collate(rows, 0), chunked=False)
    torch.testing.assert_close(packed, plain, rtol=1e-6, atol=1e-6)
    for name, grad in plain_grads.items():
        gap = (packed_grads[name] - grad).abs().max().item()
        assert gap <= 1e-5 * grad.abs().max().item() + 1e-7, name
