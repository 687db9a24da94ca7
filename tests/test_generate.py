"""Batched greedy completions: left padding, and chats through the template."""

import pytest

from conftest import load_tiny_causal_lm
from loralab.data.encoding import encode_prompt
from loralab.data.records import DataError
from loralab.generate import generate


def test_batched_generation_equals_one_prompt_at_a_time(tiny_model_dir):
    model, tokenizer = load_tiny_causal_lm(tiny_model_dir)
    prompts = ["Say cat:", "A much longer prompt here:", "x"]
    batched = generate(
        model, tokenizer, prompts, max_new_tokens=6, batch_size=3, stop_at_newline=False
    )
    alone = [generate(model, tokenizer, [p], 6, stop_at_newline=False)[0] for p in prompts]
    assert batched == alone  # left padding: each row continues its own prompt
    assert tokenizer.padding_side == "right"  # restored afterwards


def test_chat_prompts_go_through_the_template_without_extra_special_tokens(tiny_model_dir):
    from tokenizers import processors

    _, tokenizer = load_tiny_causal_lm(tiny_model_dir)
    # A tokenizer that puts a BOS before every text it encodes, as Llama's do.
    bos = tokenizer.eos_token_id
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<eos> $A", special_tokens=[("<eos>", bos)]
    )
    messages = [{"role": "user", "content": "hi"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<user>hi<eos><assistant>"
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer(text)["input_ids"] == [bos, *plain]
    assert encode_prompt(tokenizer, messages) == plain  # the template's tokens, no more
    tokenizer.chat_template = None
    with pytest.raises(DataError, match="a chat prompt needs a tokenizer with a chat template"):
        encode_prompt(tokenizer, messages)


def test_a_named_progress_bar_counts_the_prompts_and_none_by_default(tiny_model_dir, capsys):
    model, tokenizer = load_tiny_causal_lm(tiny_model_dir)
    prompts = [f"prompt {i}" for i in range(5)]
    plain = generate(model, tokenizer, prompts, 3, batch_size=2)
    assert "score" not in capsys.readouterr().err
    assert generate(model, tokenizer, prompts, 3, batch_size=2, progress="score") == plain
    bar = capsys.readouterr().err
    assert "score" in bar and "5/5" in bar
