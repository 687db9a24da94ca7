"""Scoring a model on a task (greedy generation, classification, or perplexity), or on a
user's own records (loss and perplexity, and for completions generation's metrics)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .data.batches import collate
from .data.encoding import encode_dataset
from .data.records import DataError, example_shape
from .generate import generate
from .methods.prefix import prompt_tokens
from .models.devices import model_device
from .tasks import TaskError
from .tasks.text_metrics import bleu_rouge, exact_match
from .training.distributed import to_device


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
    device = model_device(model)
    predictions: list[int] = []
    for start in range(0, len(data), batch_size):
        batch = collate(data[start : start + batch_size], tokenizer.pad_token_id or 0)
        batch.pop("labels")
        batch = to_device(batch, device)
        predictions += model(**batch).logits.argmax(-1).tolist()
    return predictions


@torch.no_grad()
def perplexity(
    model: nn.Module, tokenizer, examples: list[dict], max_length: int = 512, batch_size: int = 8
) -> float:
    """exp(mean negative log-likelihood per predicted token) over ``{text}`` examples."""
    model.eval()
    data = encode_dataset(tokenizer, examples, max_length, prompt_tokens=prompt_tokens(model))
    device = model_device(model)
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        batch = collate(data[start : start + batch_size], tokenizer.pad_token_id or 0)
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        batch = to_device(batch, device)
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
    progress: str | None = None,
) -> Evaluation:
    """Score ``model`` on ``examples`` of ``task`` with the task's own metric.

    A generation task's prompts are its raw prompts (what an adapter trains on), or, with
    ``chat_shots``, chats through the model's chat template: the task's instruction, after
    those worked examples as earlier turns (``[]`` for none). That is how an instruction-
    tuned model is meant to be asked, and the fair baseline for it. ``progress`` names a
    progress bar over the generated examples.
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
            model,
            tokenizer,
            chats,
            task.max_new_tokens,
            batch_size,
            stop_at_newline=False,
            progress=progress,
        )
    else:
        prompts = [example["prompt"] for example in examples]
        predictions = generate(
            model, tokenizer, prompts, task.max_new_tokens, batch_size, progress=progress
        )
    metrics = task.score(predictions, examples)
    return Evaluation(metrics, predictions, time.perf_counter() - started)


# A user's metric: (predictions, references) -> {name: value}.
Metric = Callable[[list[str], list[str]], dict[str, float]]


def evaluate_records(
    model: nn.Module,
    tokenizer,
    records: list[dict],
    max_new_tokens: int = 128,
    batch_size: int = 16,
    max_length: int = 1024,
    metrics: Sequence[Metric] = (),
) -> Evaluation:
    """Score ``model`` on a user's own records, in the layouts ``train`` reads.

    Preference pairs are scored by ``score_pairs``. Other records: always the loss on
    what would be learnt (the completion, the assistant's turns, the whole text) and its
    perplexity. For completions (``prompt``/``completion``, and chats,
    whose last assistant turn is the reference), also greedy generation scored by exact
    match, corpus BLEU and ROUGE-L, and by each of ``metrics``; ``predictions`` then
    holds ``{prompt, reference, prediction}`` for each record.
    """
    started = time.perf_counter()
    shape = example_shape(records[0], "records[0]")
    if shape == "preference":
        scores = score_pairs(model, tokenizer, records, batch_size, max_length)
        return Evaluation(scores, [], time.perf_counter() - started)
    if shape == "text_label":
        raise TaskError(
            "{text, label} records are scored by a classifier: use --task nli's shape, or "
            "train and evaluate them with --model-kind classification"
        )
    if shape in ("prompt", "unpaired"):
        what = "prompts without a completion" if shape == "prompt" else "KTO's completions"
        raise TaskError(
            f"{what} have no reference to score against; give {{prompt, completion}} "
            "records (or preference pairs, scored by preference accuracy)"
        )
    ppl = perplexity(model, tokenizer, records, max_length, batch_size)
    scores = {"loss": math.log(ppl), "perplexity": ppl}
    if shape == "text":
        return Evaluation(scores, [], time.perf_counter() - started)
    prompts, references = zip(*(_prompt_and_reference(r, shape) for r in records), strict=True)
    predictions = generate(
        model,
        tokenizer,
        list(prompts),
        max_new_tokens,
        batch_size,
        stop_at_newline=False,
        progress="generate",
    )
    hypotheses = [p.strip() for p in predictions]
    scores["exact_match"] = exact_match(hypotheses, references)
    scores.update(bleu_rouge(hypotheses, [[r.strip()] for r in references]))
    for metric in metrics:
        scores.update(metric(hypotheses, list(references)))
    rows = [
        {"prompt": p, "reference": r, "prediction": h}
        for p, r, h in zip(prompts, references, hypotheses, strict=True)
    ]
    return Evaluation(scores, rows, time.perf_counter() - started)


@torch.no_grad()
def score_pairs(
    model: nn.Module, tokenizer, records: list[dict], batch_size: int = 16, max_length: int = 1024
) -> dict[str, float]:
    """How a model ranks the replies of preference pairs: ``preference_accuracy``, the
    percentage of pairs whose chosen reply it gives the higher log-probability, and
    ``logp_margin``, the mean of log π(chosen) − log π(rejected) (reference-free, so an
    SFT model and a DPO model are measured alike)."""
    from .data.pairs import encode_pairs
    from .training.loop import without_cache
    from .training.objectives.step import collate_pairs, pair_log_probs

    was_training = model.training
    model.eval()
    pairs = encode_pairs(tokenizer, records, max_length, prompt_tokens(model), where="pair")
    device = model_device(model)
    wins, margins = 0, 0.0
    try:
        for start in range(0, len(pairs), batch_size):
            items = pairs[start : start + batch_size]
            batch = to_device(collate_pairs(items, tokenizer.pad_token_id or 0), device)
            extra = without_cache(model)
            scored = pair_log_probs(model, model, batch, reference=False, extra=extra)
            margin = scored.chosen.total - scored.rejected.total
            wins += int((margin > 0).sum())
            margins += float(margin.sum())
    finally:
        model.train(was_training)
    return {
        "preference_accuracy": 100.0 * wins / len(pairs),
        "logp_margin": margins / len(pairs),
    }


def _prompt_and_reference(record: dict, shape: str) -> tuple[str | list[dict], str]:
    if shape == "prompt_completion":
        return record["prompt"], record["completion"]
    messages = record["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    if last == 0:
        raise DataError("a chat to evaluate needs a turn before its last assistant turn")
    if record.get("tools") or messages[last].get("tool_calls"):
        raise DataError(
            "eval --data scores text replies; this chat's tools or tool calls are learnt "
            "in training but not generated and scored here"
        )
    return messages[:last], messages[last]["content"]
