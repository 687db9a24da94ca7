"""Preference data as token ids: pairs (one prompt, a chosen and a rejected reply, each side
encoded as a supervised example of its own, ``encoding.py``, so that the loss counts the
reply's tokens exactly where supervised fine-tuning on it would), and unpaired completions
(KTO's: one reply and whether it is desirable; a pair gives one of each).

A pair is given as TRL writes it: ``{prompt, chosen, rejected}`` as text or as chats, or
``{chosen, rejected}`` alone with the prompt inside each side (the longest common start
of the two is the prompt).
"""

from __future__ import annotations

from dataclasses import dataclass

from .encoding import (
    IGNORE_INDEX,
    Encoded,
    PromptTokens,
    counted,
    encode_causal,
    encode_each,
    encode_prompt,
)
from .records import DataError


@dataclass
class EncodedPair:
    """A preference pair as token ids: the chosen and the rejected side, each with the
    labels of its reply (``IGNORE_INDEX`` on the prompt)."""

    chosen: Encoded
    rejected: Encoded

    def __len__(self) -> int:  # what a batch of pairs computes: both sides
        return len(self.chosen) + len(self.rejected)


def pair_counted(pair: EncodedPair) -> int:
    """The reply tokens a pair's loss reads, both sides."""
    return counted(pair.chosen) + counted(pair.rejected)


def split_pair(record: dict) -> tuple[str | list[dict], str | list[dict], str | list[dict]]:
    """(prompt, chosen, rejected) of a preference record; without a ``prompt`` field the
    prompt is what the two sides start with (the leading messages they share, or the
    text they share up to its last whitespace)."""
    chosen, rejected = record["chosen"], record["rejected"]
    if record.get("prompt") is not None:
        return record["prompt"], chosen, rejected
    if isinstance(chosen, list):
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        return chosen[:shared], chosen[shared:], rejected[shared:]
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    cut = max(chosen.rfind(" ", 0, shared), chosen.rfind("\n", 0, shared)) + 1
    return chosen[:cut], chosen[cut:], rejected[cut:]


def encode_pair(
    tokenizer,
    record: dict,
    max_length: int,
    prompt_tokens: PromptTokens | None = None,
    long_examples: str = "truncate",
) -> EncodedPair:
    """Both sides of a preference record as supervised examples: the prompt with each
    reply, the loss on the reply's tokens only (a chat's earlier assistant turns are
    prompt)."""
    prompt, chosen, rejected = split_pair(record)
    if isinstance(chosen, list):
        if not any(message["role"] == "assistant" for message in chosen) or not any(
            message["role"] == "assistant" for message in rejected
        ):
            raise DataError(
                "each side of a preference pair needs an assistant reply after the prompt "
                "they share"
            )
        prompt_length = len(encode_prompt(tokenizer, prompt, prompt_tokens)) if prompt else 0
        sides = [{"messages": [*prompt, *reply]} for reply in (chosen, rejected)]
        for key in ("tools",):
            if key in record:
                for side in sides:
                    side[key] = record[key]
    else:
        prompt_length = 0
        sides = [{"prompt": prompt, "completion": reply} for reply in (chosen, rejected)]
    encoded = [
        _reply_only(
            encode_causal(tokenizer, side, max_length, prompt_tokens, "all", long_examples),
            prompt_length,
        )
        for side in sides
    ]
    for name, side in zip(("chosen", "rejected"), encoded, strict=True):
        if counted(side) == 0:
            raise DataError(
                f"the {name} reply starts after max_length={max_length} tokens; raise "
                "--max-length or shorten the prompt"
            )
    return EncodedPair(*encoded)


def _reply_only(side: Encoded, prompt_length: int) -> Encoded:
    """A chat side's labels with the prompt's turns (its earlier assistant turns
    included) ignored: only the reply is preferred or not."""
    if not prompt_length:
        return side
    labels = [IGNORE_INDEX] * min(prompt_length, len(side)) + list(side.labels[prompt_length:])
    return Encoded(side.input_ids, labels, side.token_type_ids)


def encode_pairs(
    tokenizer,
    records: list[dict],
    max_length: int,
    prompt_tokens: PromptTokens | None = None,
    long_examples: str = "truncate",
    where: str | list[str] = "record",
) -> list[EncodedPair]:
    """Every pair encoded; a record refused is named by ``where`` (where each is, or a
    label before its number, from 1)."""
    return encode_each(
        records,
        where,
        lambda r: encode_pair(tokenizer, r, max_length, prompt_tokens, long_examples),
    )


@dataclass
class EncodedCompletion:
    """One completion of a prompt and whether it is desirable (KTO), as token ids; KTO's
    KL estimate puts another example's completion after this prompt."""

    prompt: list[int]
    completion: list[int]
    desirable: bool

    def __len__(self) -> int:
        return len(self.prompt) + len(self.completion)


def split_side(side: Encoded, desirable: bool) -> EncodedCompletion:
    """A supervised example as its prompt's ids and its reply's (the counted tail)."""
    start = next(i for i, label in enumerate(side.labels) if label != IGNORE_INDEX)
    return EncodedCompletion(side.input_ids[:start], side.input_ids[start:], desirable)


def encode_completions(
    tokenizer,
    records: list[dict],
    max_length: int,
    prompt_tokens: PromptTokens | None = None,
    long_examples: str = "truncate",
    where: str | list[str] = "record",
) -> list[EncodedCompletion]:
    """KTO's examples: each ``{prompt, completion, label}`` record, or both replies of a
    preference pair (the chosen desirable, the rejected not)."""

    def encode(record: dict) -> list[EncodedCompletion]:
        if "chosen" in record:
            pair = encode_pair(tokenizer, record, max_length, prompt_tokens, long_examples)
            return [split_side(pair.chosen, True), split_side(pair.rejected, False)]
        side = encode_causal(tokenizer, record, max_length, prompt_tokens, "all", long_examples)
        if counted(side) == 0:
            raise DataError(
                f"the completion starts after max_length={max_length} tokens; raise "
                "--max-length or shorten the prompt"
            )
        return [split_side(side, record["label"])]

    return [example for both in encode_each(records, where, encode) for example in both]
