"""Scoring a model on a task: greedy generation, classification, or perplexity."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .data import collate, encode_dataset, encode_prompt
from .methods.prefix import prompt_tokens


@dataclass
class Evaluation:
    """A task's metrics on some examples, with what the model produced."""

    metrics: dict[str, float]
    predictions: list = field(default_factory=list)
    seconds: float = 0.0


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 16,
    stop_at_newline: bool = True,
) -> list[str]:
    """Greedy completions of ``prompts`` (batched, left-padded), without the prompt.

    A prefix method's tokens go around each prompt: prefix + prompt + infix.
    """
    model.eval()
    tokens = prompt_tokens(model)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # new tokens must follow every prompt directly
    outputs: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            rows = [encode_prompt(tokenizer, prompt, tokens) for prompt in chunk]
            encoded = tokenizer.pad({"input_ids": rows}, return_tensors="pt")
            generated = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new_tokens = generated[:, encoded["input_ids"].shape[1] :]
            for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True):
                outputs.append(text.split("\n")[0] if stop_at_newline else text)
    finally:
        tokenizer.padding_side = side
    return outputs


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
    model: nn.Module, tokenizer, task, examples: list[dict], batch_size: int = 16
) -> Evaluation:
    """Score ``model`` on ``examples`` of ``task`` with the task's own metric."""
    started = time.perf_counter()
    if task.kind == "lm":
        value = perplexity(model, tokenizer, examples)
        return Evaluation({"perplexity": value}, [], time.perf_counter() - started)
    is_classifier = not hasattr(model, "generate") or type(model).__name__.endswith(
        "ForSequenceClassification"
    )
    if is_classifier:
        predictions = classify(model, tokenizer, examples, task.labels, batch_size)
    else:
        prompts = [example["prompt"] for example in examples]
        predictions = generate(model, tokenizer, prompts, task.max_new_tokens, batch_size)
    metrics = task.score(predictions, examples)
    return Evaluation(metrics, predictions, time.perf_counter() - started)
