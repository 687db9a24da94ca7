"""Scoring: a generation task by its metric (raw or chat prompts), perplexity, and
classification."""

import math

import pytest
import torch

from conftest import char_tokenizer, load_tiny_causal_lm, tiny_bert
from loralab.evaluate import classify, evaluate_task, perplexity
from loralab.generate import generate
from loralab.tasks import TaskError, get_task


def test_perplexity_is_exp_of_the_mean_token_loss(tiny_model_dir):
    model, tokenizer = load_tiny_causal_lm(tiny_model_dir)
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
    model, tokenizer = load_tiny_causal_lm(tiny_model_dir)
    task = get_task("sql")
    examples = task.splits(seed=0, test_size=4)["test"]
    result = evaluate_task(model, tokenizer, task, examples, batch_size=2)
    assert len(result.predictions) == 4 and "execution_accuracy" in result.metrics


def test_evaluate_with_chat_shots_scores_the_chat_replies(tiny_model_dir):
    model, tokenizer = load_tiny_causal_lm(tiny_model_dir)
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
