"""One GRPO step: sample G completions for each prompt of the batch with the adapter as it
is now, score them, and take one optimizer step on the clipped surrogate (``grpo.py``).

The rollouts run through loralab's engine (``engine_rollouts``): every completion of the
batch in one batch of rows, each row leaving as soon as it stops, each sampling with its
own seed, drawn from (run seed, step, row). So a step's completions depend on the model
and the step alone, and a resumed run samples exactly what the run it continues did.
The engine runs the LoRA layers unmerged with the live factors: what is sampled is the
policy that is trained, with no copy of its weights to keep in step. Or they run on a
separate server that receives each step's adapter (``rollout_server.py``).

One rollout batch serves one optimizer step (TRL's ``num_iterations`` = 1): the
probabilities it was sampled with are the policy's before the step, so π_old is the
policy's own log-probabilities, detached, as in TRL.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ...data.batches import collate
from ...data.encoding import IGNORE_INDEX, Encoded, encode_each, encode_prompt, newline_tokens
from ...data.records import DataError
from ...engine import RowSampling, decode
from ..sequence_logps import token_log_probs
from .grpo import GrpoSettings, clip_fractions, group_advantages, grpo_loss
from .rewards import RewardFunction, compute_rewards
from .step import reference_policy


@dataclass
class SamplingPrompt:
    """A prompt to sample from, as token ids, with the record its reward reads."""

    input_ids: list[int]
    record: dict

    def __len__(self) -> int:
        return len(self.input_ids)


def encode_prompts(
    tokenizer, records: list[dict], max_length: int, where: str | list[str] = "record"
) -> list[SamplingPrompt]:
    """Each record's prompt as ids (a chat through the template, up to the reply); one
    longer than ``max_length`` is refused by its location (a cut prompt asks another
    question)."""

    def encode(record: dict) -> SamplingPrompt:
        ids = encode_prompt(tokenizer, record["prompt"])
        if len(ids) > max_length:
            raise DataError(
                f"the prompt has {len(ids)} tokens, more than max_length={max_length}; "
                "raise --max-length or shorten it"
            )
        return SamplingPrompt(ids, record)

    return encode_each(records, where, encode)


@dataclass(frozen=True)
class Sampling:
    """How a step samples: G completions a prompt, each of at most ``max_new_tokens``
    tokens, at ``temperature`` and ``top_p``, ending at one of ``stop_ids``."""

    group_size: int
    max_new_tokens: int
    temperature: float
    top_p: float
    stop_ids: tuple[int, ...]


def stop_ids(tokenizer, one_line: bool) -> tuple[int, ...]:
    """End of sequence, and for tasks whose answers are one line, any newline."""
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return tuple(stops + (list(newline_tokens(tokenizer)) if one_line else []))


def row_seed(seed: int, step: int, row: int) -> int:
    """The sampling seed of one rollout row: a pure function of the run's seed, the step
    and the row, so a resumed run draws what the first run drew."""
    return ((seed * 1_000_003 + step) * 65_537 + row) % (1 << 62)


# How a step's rows are sampled: (model, prompts, sampling, each row's seed) → the rows'
# completions (token ids, each ending with its stop token where it stopped).
Generate = Callable[[nn.Module, list[list[int]], Sampling, list[int]], list[list[int]]]


def engine_rollouts(
    model: nn.Module, prompts: list[list[int]], sampling: Sampling, seeds: list[int]
) -> list[list[int]]:
    """The rows sampled here, through loralab's engine, in one batch."""
    settings = [RowSampling(sampling.temperature, sampling.top_p, seed=s) for s in seeds]
    return decode(model, prompts, sampling.max_new_tokens, sampling.stop_ids, sampling=settings)


@dataclass
class Rollouts:
    """A step's completions (G a prompt, in prompt order), their rewards and advantages."""

    prompts: list[SamplingPrompt]  # one per completion
    completions: list[list[int]]
    rewards: Tensor  # (N,), NaN where skipped
    advantages: Tensor  # (N,)
    seconds: float

    @property
    def sampled_tokens(self) -> int:
        return sum(len(c) for c in self.completions)


def sample(
    model: nn.Module,
    tokenizer,
    prompts: list[SamplingPrompt],
    sampling: Sampling,
    seed: int,
    step: int,
    reward: RewardFunction,
    scale_rewards: str,
    said: set[str],
    generate: Generate = engine_rollouts,
) -> Rollouts:
    """G completions of every prompt, sampled by ``generate`` (the engine, or a rollout
    server), scored by ``reward``."""
    rows = [p for p in prompts for _ in range(sampling.group_size)]
    seeds = [row_seed(seed, step, row) for row in range(len(rows))]
    was_training = model.training
    model.eval()  # no dropout while sampling
    started = time.perf_counter()
    try:
        completions = generate(model, [p.input_ids for p in rows], sampling, seeds)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - started
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    prompts_given = [p.record["prompt"] for p in rows]
    # A chat prompt's completion goes to the reward as TRL gives it: an assistant message
    given = [
        [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text
        for prompt, text in zip(prompts_given, texts, strict=True)
    ]
    rewards = compute_rewards(reward, prompts_given, given, [p.record for p in rows], said)
    values = torch.tensor(rewards, dtype=torch.float32)
    advantages = group_advantages(values, sampling.group_size, scale_rewards)
    return Rollouts(rows, completions, values, advantages, seconds)


def rollout_batch(rollouts: Rollouts, rows: list[int], pad_id: int) -> dict[str, Tensor]:
    """Prompt + completion of ``rows``, the completion's tokens as labels."""
    items = []
    for row in rows:
        prompt, completion = rollouts.prompts[row].input_ids, rollouts.completions[row]
        items.append(Encoded(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion))
    return collate(items, pad_id)


def grpo_micro_loss(
    runner: nn.Module,
    model: nn.Module,
    batch: dict[str, Tensor],
    advantages: Tensor,
    settings: GrpoSettings,
    tokens_in_step: int,
    extra: dict[str, Any],
    temperature: float = 1.0,
) -> tuple[Tensor, dict[str, float]]:
    """The surrogate loss of one micro-batch of completions, and its clip and KL figures;
    the log-probabilities are those of the sampling distribution (the logits over
    ``temperature``)."""
    inputs = {**batch, **extra}
    logps = token_log_probs(runner, model, inputs, temperature)  # (R, T - 1)
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    old = logps.detach()  # one step per rollout batch: π_old is the policy now
    reference = None
    metrics = clip_fractions(logps, old, advantages, mask, settings)
    if settings.beta:
        with torch.no_grad(), reference_policy(model):
            reference = token_log_probs(runner, model, inputs, temperature)
        gap = (reference - logps.detach())[mask]
        metrics["kl"] = float((torch.exp(gap) - gap - 1).mean())
    loss = grpo_loss(logps, old, advantages, mask, settings, reference, tokens_in_step)
    return loss, metrics


__all__ = [
    "Generate",
    "Rollouts",
    "Sampling",
    "SamplingPrompt",
    "encode_prompts",
    "engine_rollouts",
    "grpo_micro_loss",
    "rollout_batch",
    "row_seed",
    "sample",
    "stop_ids",
]
