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


def test_the_engine_gives_transformers_texts_with_and_without_an_adapter(tiny_model_dir):
    """The Llama family runs on the engine; its texts equal Transformers' ``generate``,
    first lines and whole completions, with an unmerged adapter and without."""
    from conftest import randomize_lora
    from loralab import LoraConfig, inject_adapter

    model, tokenizer = load_tiny_causal_lm(tiny_model_dir)
    prompts = ["Say cat:", "A much longer prompt here:", "x", "one\ntwo"]
    for adapter in (False, True):
        if adapter:
            inject_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
            randomize_lora(model, seed=3, std=0.3)
        for newline in (False, True):
            settings = dict(batch_size=3, stop_at_newline=newline)
            texts = {
                engine: generate(model, tokenizer, prompts, 12, **settings, engine=engine)
                for engine in ("engine", "hf")
            }
            assert texts["engine"] == texts["hf"]
            assert any(text.strip() for text in texts["engine"])


def test_other_models_fall_back_and_say_so_once(tiny_model_dir, caplog):
    import logging

    from conftest import make_model
    from loralab import generate as generate_module

    model, tokenizer = load_tiny_causal_lm(tiny_model_dir)
    model.generation_config.repetition_penalty = 1.3
    generate_module._said.clear()
    with caplog.at_level(logging.WARNING, logger="loralab.generate"):
        first = generate(model, tokenizer, ["Say cat:"], 4)
        generate(model, tokenizer, ["Say dog:"], 4)
    said = [r.getMessage() for r in caplog.records]
    assert said == ["generating with Transformers' generate: the model's generation config "
                    "sets repetition_penalty=1.3"]  # fmt: skip
    assert first == generate(model, tokenizer, ["Say cat:"], 4, engine="hf")
    with pytest.raises(ValueError, match=r"the engine cannot generate here: .* not 'gpt2'"):
        generate(make_model("gpt2"), tokenizer, ["Say cat:"], 4, engine="engine")
    with pytest.raises(ValueError, match="engine must be one of auto, engine, hf, not 'vllm'"):
        generate(model, tokenizer, ["Say cat:"], 4, engine="vllm")
