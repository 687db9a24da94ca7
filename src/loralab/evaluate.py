"""Scoring a model on a task: greedy generation, classification, or perplexity."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .data import collate, encode_dataset
from .generate import generate
from .methods.prefix import prompt_tokens
from .tasks import TaskError


@dataclass
class Evaluation:
    """A task's metrics on some examples, with what the model produced."""

    metrics: dict[str, float]
    predictions: list = field(default_factory=list)
    seconds: float = 0.0


@torch.no_grad()
def classify(model: nn.Module, tokenizer, examples: list[dict], labels, batch_size: int = 32):
    """Predicted class indices from a classification head."""
    model.eval()
    limit = min(512, getattr(model.config, "max_position_embeddings", 512))
    data = encode_dataset(tokenizer, examples, limit, tuple(labels), prompt_tokens(model))
    predictions: list[int] = []
    for start in range(0, len(data), batch_size):
        batch = collate(data[start : start + batch_size], tokenizer.pad_token_id or 0)
        batch.pop("labels")
        predictions += model(**batch).logits.argmax(-1).tolist()
    return predictions


@torch.no_grad()
def perplexity(
    model: nn.Module, tokenizer, examples: list[dict], max_length: int = 512, batch_size: int = 8
) -> float:
    """exp(mean negative log-likelihood per predicted token) over ``{text}`` examples."""
    model.eval()
    data = encode_dataset(tokenizer, examples, max_length, prompt_tokens=prompt_tokens(model))
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        batch = collate(data[start : start + batch_size], tokenizer.pad_token_id or 0)
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        total += model(**batch).loss.item() * tokens
        count += tokens
    return math.exp(total / count)


def evaluate_task(
    model: nn.Module,
    tokenizer,
    task,
    examples: list[dict],
    batch_size: int = 16,
    chat_shots: Sequence[dict] | None = None,
) -> Evaluation:
    """Score ``model`` on ``examples`` of ``task`` with the task's own metric.

    A generation task's prompts are its raw prompts (what an adapter trains on), or, with
    ``chat_shots``, chats through the model's chat template: the task's instruction, after
    those worked examples as earlier turns (``[]`` for none). That is how an instruction-
    tuned model is meant to be asked, and the fair baseline for it.
    """
    started = time.perf_counter()
    if task.kind == "lm":
        value = perplexity(model, tokenizer, examples)
        return Evaluation({"perplexity": value}, [], time.perf_counter() - started)
    is_classifier = not hasattr(model, "generate") or type(model).__name__.endswith(
        "ForSequenceClassification"
    )
    if chat_shots is not None and (is_classifier or not hasattr(task, "chat_messages")):
        raise TaskError(
            f"{task.name}: no instruction to prompt a chat model with; chat prompts exist "
            "for e2e, scored by a causal LM"
        )
    if is_classifier:
        predictions = classify(model, tokenizer, examples, task.labels, batch_size)
    elif chat_shots is not None:
        chats = [task.chat_messages(example, chat_shots) for example in examples]
        # The reply ends at the template's end-of-turn token; the task's scorer reads its
        # first line, as for a raw completion.
        predictions = generate(
            model, tokenizer, chats, task.max_new_tokens, batch_size, stop_at_newline=False
        )
    else:
        prompts = [example["prompt"] for example in examples]
        predictions = generate(model, tokenizer, prompts, task.max_new_tokens, batch_size)
    metrics = task.score(predictions, examples)
    return Evaluation(metrics, predictions, time.perf_counter() - started)
