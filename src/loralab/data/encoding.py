"""Examples as token ids: the prompt and the completion, a chat through the model's
template, or a classification input, each with the labels that say where the loss
counts (``IGNORE_INDEX`` elsewhere), and a prefix method's tokens where they go.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import jinja2

from .records import DataError, example_shape

T = TypeVar("T")
IGNORE_INDEX = -100  # label of a position the loss does not count
PREFERENCE_REFUSAL = (
    "supervised fine-tuning (objective sft) learns one reply, not a choice between two; "
    "give --objective dpo (or ipo, simpo, orpo, kto) to learn the choice, or the chosen replies "
    "as {prompt, completion} or {messages} records to fine-tune on them"
)


@dataclass(frozen=True)
class PromptTokens:
    """The special tokens of a prefix method (PreEmbed, PreLayer, LoRA+PE): ids past the
    vocabulary, whose embeddings the method trains. Each record places them (SPEC.md):

    - ``{prompt, completion}``: prefix + prompt + infix + completion;
    - ``{messages}``: the prefix first, the infix right before each assistant reply;
    - ``{text}``: the prefix first;
    - ``{text, label}``: the prefix after a leading [CLS], the infix before a final [SEP].

    They count against ``max_length`` and the loss never counts them.
    """

    prefix: tuple[int, ...] = ()
    infix: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.prefix) + len(self.infix)


@dataclass
class Encoded:
    """One example as token ids.

    For a causal LM ``labels`` has one entry per token, -100 where the loss does not
    count; for a classifier it is the class index. A packed row (``packing.py``) holds
    several examples, ``segments`` their lengths in order.
    """

    input_ids: list[int]
    labels: list[int] | int
    token_type_ids: list[int] | None = None
    segments: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


def counted(item: Encoded) -> int:
    """What the loss averages over in one example: its counted tokens (the label of token
    ``t`` is predicted from ``t - 1``, so the first never counts), or 1 for a classifier."""
    if isinstance(item.labels, int):
        return 1
    return sum(label != IGNORE_INDEX for label in item.labels[1:])


@functools.lru_cache(maxsize=8)
def newline_tokens(tokenizer) -> tuple[int, ...]:
    """The ids whose text holds a newline: after one, a first line is complete."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=True)
    return tuple(i for i, text in enumerate(texts) if "\n" in text)


def encode_prompt(
    tokenizer, prompt: str | list[dict], prompt_tokens: PromptTokens | None = None
) -> list[int]:
    """The ids a completion follows: prefix + prompt + infix (the prompt alone without).

    A list of messages is a chat: rendered by the model's chat template up to the start of
    the assistant's reply, with no special tokens added beyond what the template writes.
    """
    if isinstance(prompt, str):
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    else:
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataError("a chat prompt needs a tokenizer with a chat template")
        ids = _chat_ids(tokenizer, prompt, generation_prompt=True)
    if prompt_tokens is None:
        return ids
    return [*prompt_tokens.prefix, *ids, *prompt_tokens.infix]


TRAIN_ON = ("all", "last-turn")  # which assistant turns of a chat the loss counts
LONG_EXAMPLES = ("truncate", "refuse")  # what becomes of an example over max_length


def encode_causal(
    tokenizer,
    example: dict,
    max_length: int,
    prompt_tokens: PromptTokens | None = None,
    train_on: str = "all",
    long_examples: str = "truncate",
) -> Encoded:
    """Token ids and loss labels of one example, for a causal language model; a chat's
    loss counts every assistant turn, or its last (``train_on``). One longer than
    ``max_length`` is truncated, or refused (``long_examples``)."""
    shape = example_shape(example)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prefix = list(prompt_tokens.prefix) if prompt_tokens else []
    infix = list(prompt_tokens.infix) if prompt_tokens else []
    if shape in ("prompt_completion", "unpaired"):  # KTO's completion, encoded alike
        prompt = encode_prompt(tokenizer, example["prompt"], prompt_tokens)
        completion = tokenizer(example["completion"], add_special_tokens=False)["input_ids"] + eos
        ids, labels = prompt + completion, [IGNORE_INDEX] * len(prompt) + completion
    elif shape == "messages":
        ids, labels = _encode_chat(
            tokenizer, example["messages"], infix, train_on, example.get("tools")
        )
        ids, labels = prefix + ids, [IGNORE_INDEX] * len(prefix) + labels
    elif shape == "text":
        ids = tokenizer(example["text"], add_special_tokens=True)["input_ids"] + eos
        # The first text token is never predicted without a prefix; with one it stays so,
        # and the loss (and perplexity) counts the same tokens either way.
        labels = [IGNORE_INDEX] * (len(prefix) + 1) + ids[1:] if prefix else list(ids)
        ids = prefix + ids
    elif shape == "preference":
        raise DataError(f"a preference record trains a preference objective: {PREFERENCE_REFUSAL}")
    else:
        raise DataError("a {text, label} record needs a classification model, not a causal LM")
    if len(ids) > max_length and long_examples == "refuse":
        raise DataError(
            f"{len(ids)} tokens, longer than max_length={max_length} (long_examples: "
            "refuse); raise --max-length, or drop or shorten the record"
        )
    return Encoded(ids[:max_length], labels[:max_length])


def _encode_chat(
    tokenizer,
    messages: list[dict],
    infix: list[int],
    train_on: str = "all",
    tools: list[dict] | None = None,
) -> tuple[list[int], list[int]]:
    """The loss counts the assistant turns (``train_on``: all, or the last), tool calls
    included; the infix goes right before each.

    A template with ``{% generation %}`` markers says itself which tokens are the
    assistant's; without them each turn is the tokens the template adds after the
    conversation so far with a generation prompt (which needs a template that renders a
    conversation as the prefix of its continuation)."""
    if train_on not in TRAIN_ON:
        raise DataError(f"train_on must be one of {', '.join(TRAIN_ON)}, not {train_on!r}")
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("{messages} records need a tokenizer with a chat template")
    if has_generation_markers(tokenizer):
        return _encode_marked_chat(tokenizer, messages, infix, train_on, tools)
    last = max(i for i, message in enumerate(messages) if message["role"] == "assistant")
    rendered: list[int] = []  # the conversation so far, as the template renders it
    ids: list[int] = []
    labels: list[int] = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _chat_ids(tokenizer, messages[:index], generation_prompt=True, tools=tools)
        after = _chat_ids(tokenizer, messages[: index + 1], generation_prompt=False, tools=tools)
        if after[: len(before)] != before or before[: len(rendered)] != rendered:
            raise DataError(
                "the chat template does not render conversations as prefixes (it rewrites "
                "earlier turns); a template with {% generation %} markers around the "
                "assistant's text says which tokens to learn instead"
            )
        context, reply = before[len(rendered) :] + infix, after[len(before) :]
        ids += context + reply
        counted = train_on == "all" or index == last
        labels += [IGNORE_INDEX] * len(context) + (
            reply if counted else [IGNORE_INDEX] * len(reply)
        )
        rendered = after
    return ids, labels


GENERATION_MARKER = re.compile(r"{%-?\s*generation\s*-?%}")


def has_generation_markers(tokenizer) -> bool:
    """Whether the chat template marks the assistant's tokens (``{% generation %}``)."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and GENERATION_MARKER.search(template) is not None


def _encode_marked_chat(
    tokenizer, messages: list[dict], infix: list[int], train_on: str, tools: list[dict] | None
) -> tuple[list[int], list[int]]:
    """The tokens the template's ``{% generation %}`` blocks enclose carry the loss (the
    last block alone for ``last-turn``)."""
    rendered = _apply_template(
        tokenizer,
        messages,
        tools,
        add_generation_prompt=False,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    ids, marked = list(rendered["input_ids"]), list(rendered["assistant_masks"])
    starts = [i for i, m in enumerate(marked) if m and (i == 0 or not marked[i - 1])]
    if not starts:
        raise DataError("the chat template's {% generation %} blocks enclose no token")
    spans, last = set(starts), starts[-1]
    out_ids: list[int] = []
    labels: list[int] = []
    for index, (token, mark) in enumerate(zip(ids, marked, strict=True)):
        if index in spans:
            out_ids += infix
            labels += [IGNORE_INDEX] * len(infix)
        counted = mark and (train_on == "all" or index >= last)
        out_ids.append(token)
        labels.append(token if counted else IGNORE_INDEX)
    return out_ids, labels


def _chat_ids(
    tokenizer, messages: list[dict], generation_prompt: bool, tools: list[dict] | None = None
) -> list[int]:
    text = _apply_template(
        tokenizer, messages, tools, tokenize=False, add_generation_prompt=generation_prompt
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _apply_template(tokenizer, messages: list[dict], tools: list[dict] | None, **options):
    """The chat template applied; a chat it refuses (a role it does not know, turns out of
    the order it requires) is a data error with the template's own reason."""
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, **options)
    except jinja2.TemplateError as error:
        raise DataError(f"the model's chat template refuses this chat: {error}") from None


def encode_classification(
    tokenizer,
    example: dict,
    max_length: int,
    label_names: tuple[str, ...],
    prompt_tokens: PromptTokens | None = None,
) -> Encoded:
    """Token ids (with ``text_pair`` as the second segment) and the class index."""
    label = example["label"]
    if isinstance(label, str):
        if label not in label_names:
            raise DataError(f"label {label!r} is not one of {list(label_names)}")
        label = label_names.index(label)
    if not 0 <= label < len(label_names):
        raise DataError(f"label {label} is outside 0..{len(label_names) - 1}")
    reserved = len(prompt_tokens) if prompt_tokens else 0
    encoded = tokenizer(
        example["text"],
        example.get("text_pair"),
        truncation=True,
        max_length=max_length - reserved,
    )
    ids, types = encoded["input_ids"], encoded.get("token_type_ids")
    if prompt_tokens:
        ids, types = _place_classification_prompt(tokenizer, ids, types, prompt_tokens)
    return Encoded(ids, label, types)


def _place_classification_prompt(
    tokenizer, ids: list[int], types: list[int] | None, tokens: PromptTokens
) -> tuple[list[int], list[int] | None]:
    """The prefix after a leading [CLS] (the head reads position 0), the infix before a
    final [SEP]; in the first and the last segment."""
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    start = 1 if cls is not None and ids[:1] == [cls] else 0
    end = len(ids) - 1 if sep is not None and len(ids) > start and ids[-1] == sep else len(ids)
    prefix, infix = list(tokens.prefix), list(tokens.infix)
    ids = ids[:start] + prefix + ids[start:end] + infix + ids[end:]
    if types is not None:
        last = types[-1] if types else 0
        types = (
            types[:start] + [0] * len(prefix) + types[start:end] + [last] * len(infix) + types[end:]
        )
    return ids, types


def encode_each(
    records: list[dict], where: str | list[str], encode: Callable[[dict], T]
) -> list[T]:
    """``encode(record)`` for every record; a record it refuses is named in the error by
    ``where``: where each is (a list, one entry a record: file and line or row), or a
    label before its number (from 1)."""
    encoded = []
    for number, record in enumerate(records, start=1):
        try:
            encoded.append(encode(record))
        except DataError as error:
            named = where[number - 1] if isinstance(where, list) else f"{where} {number}"
            raise DataError(f"{named}: {error}") from None
    return encoded


def encode_dataset(
    tokenizer,
    examples: list[dict],
    max_length: int,
    label_names: tuple[str, ...] | None = None,
    prompt_tokens: PromptTokens | None = None,
    train_on: str = "all",
    long_examples: str = "truncate",
    where: str | list[str] = "record",
) -> list[Encoded]:
    """Encode every example; for a causal LM, ones whose loss counts no token are dropped.

    With ``label_names`` the examples are classification records for a classifier; with
    ``prompt_tokens`` (a prefix method's) every example gets them in its place. A record
    refused is named by ``where``: where each is, or a label before its number (from 1).
    """
    if label_names is not None:
        return [
            encode_classification(tokenizer, e, max_length, label_names, prompt_tokens)
            for e in examples
        ]
    encoded = encode_each(
        examples,
        where,
        lambda e: encode_causal(tokenizer, e, max_length, prompt_tokens, train_on, long_examples),
    )
    kept = [e for e in encoded if any(label != IGNORE_INDEX for label in e.labels[1:])]
    if not kept:
        raise DataError(
            f"all {len(encoded)} examples were dropped: none keeps a token the loss counts "
            f"within max_length={max_length}; raise max_length or shorten the prompts"
        )
    return kept
