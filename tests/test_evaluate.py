"""Scoring: greedy generation without the prompt, perplexity, and classification."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import char_tokenizer, tiny_bert
from loralab.data import DataError, encode_prompt
from loralab.evaluate import classify, evaluate_task, generate, perplexity
from loralab.tasks import TaskError, get_task


def _tiny(directory):
    return AutoModelForCausalLM.from_pretrained(directory).eval(), AutoTokenizer.from_pretrained(
        directory
    )


def test_batched_generation_equals_one_prompt_at_a_time(tiny_model_dir):
    model, tokenizer = _tiny(tiny_model_dir)
    prompts = ["Say cat:", "A much longer prompt here:", "x"]
    batched = generate(
        model, tokenizer, prompts, max_new_tokens=6, batch_size=3, stop_at_newline=False
    )
    alone = [generate(model, tokenizer, [p], 6, stop_at_newline=False)[0] for p in prompts]
    assert batched == alone  # left padding: each row continues its own prompt
    assert tokenizer.padding_side == "right"  # restored afterwards


def test_perplexity_is_exp_of_the_mean_token_loss(tiny_model_dir):
    model, tokenizer = _tiny(tiny_model_dir)
    texts = [{"text": "hello world"}, {"text": "a longer piece of text"}]
    value = perplexity(model, tokenizer, texts)
    total = count = 0
    for example in texts:
        ids = torch.tensor([tokenizer(example["text"])["input_ids"] + [tokenizer.eos_token_id]])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()
        total += loss * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    assert value == pytest.approx(math.exp(total / count))


def test_classifier_predictions_and_task_scoring():
    model, tokenizer = tiny_bert(), char_tokenizer()
    model.resize_token_embeddings(len(tokenizer))
    task = get_task("nli")
    examples = task.splits(seed=0, test_size=6)["test"]
    predictions = classify(model, tokenizer, examples, task.labels)
    assert len(predictions) == 6 and all(p in (0, 1, 2) for p in predictions)
    result = evaluate_task(model, tokenizer, task, examples)
    expected = 100 * sum(p == e["label"] for p, e in zip(predictions, examples, strict=True)) / 6
    assert result.metrics["accuracy"] == pytest.approx(expected)


def test_generation_task_scores_with_the_tasks_metric(tiny_model_dir):
    model, tokenizer = _tiny(tiny_model_dir)
    task = get_task("sql")
    examples = task.splits(seed=0, test_size=4)["test"]
    result = evaluate_task(model, tokenizer, task, examples, batch_size=2)
    assert len(result.predictions) == 4 and "execution_accuracy" in result.metrics


def test_chat_prompts_go_through_the_template_without_extra_special_tokens(tiny_model_dir):
    from tokenizers import processors

    _, tokenizer = _tiny(tiny_model_dir)
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


def test_evaluate_with_chat_shots_scores_the_chat_replies(tiny_model_dir):
    model, tokenizer = _tiny(tiny_model_dir)
    task = get_task("e2e")
    splits = task.splits(seed=0, train_size=1, test_size=3)
    shots, examples = splits["train"], splits["test"]
    result = evaluate_task(model, tokenizer, task, examples, batch_size=2, chat_shots=shots)
    chats = [task.chat_messages(example, shots) for example in examples]
    replies = generate(model, tokenizer, chats, task.max_new_tokens, stop_at_newline=False)
    assert result.predictions == replies
    assert result.metrics == task.score(replies, examples)
    raw = evaluate_task(model, tokenizer, task, examples, batch_size=2)
    assert raw.predictions == generate(
        model, tokenizer, [e["prompt"] for e in examples], task.max_new_tokens
    )
    with pytest.raises(TaskError, match="sql: no instruction to prompt a chat model with"):
        sql = get_task("sql")
        evaluate_task(model, tokenizer, sql, sql.splits(test_size=1)["test"], chat_shots=[])
