"""Datasets: reading user files, turning examples into token ids, and batching them.

A user file is JSONL or CSV whose records are one of four shapes:

- ``{prompt, completion}``: the loss counts only the completion's tokens;
- ``{messages}``: a chat, rendered with the model's chat template; the loss counts only
  the assistant turns;
- ``{text}``: language modelling, every token counts;
- ``{text, label}`` (and optionally ``text_pair``): classification.

Bad records are refused with the file, the line and the field.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor

IGNORE_INDEX = -100  # label of a position the loss does not count

SHAPES = {
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "text_label": ("text", "label"),
    "text": ("text",),
}


class DataError(ValueError):
    """A data file or record is malformed; the message names the file, line and field."""


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


def example_shape(example: dict, where: str = "example") -> str:
    """Which of the four shapes a record has, checking its fields' types."""
    if "prompt" in example or "completion" in example:
        for key in ("prompt", "completion"):
            if not isinstance(example.get(key), str):
                raise DataError(
                    f"{where}: field {key!r} must be a string, got {example.get(key)!r}"
                )
        return "prompt_completion"
    if "messages" in example:
        _check_messages(example["messages"], where)
        return "messages"
    if "text" in example:
        if not isinstance(example["text"], str) or not example["text"]:
            raise DataError(f"{where}: field 'text' must be a non-empty string")
        if "label" in example:
            if not isinstance(example["label"], (int, str)) or isinstance(example["label"], bool):
                raise DataError(f"{where}: field 'label' must be an integer or a label name")
            return "text_label"
        return "text"
    fields = ", ".join(" + ".join(f) for f in SHAPES.values())
    raise DataError(f"{where}: record has fields {sorted(example)}; expected one of: {fields}")


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: messages[{index}] needs a string 'content'")
        if message.get("role") not in ("system", "user", "assistant"):
            raise DataError(
                f"{where}: messages[{index}].role must be system, user or assistant, "
                f"got {message.get('role')!r}"
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: field 'messages' has no assistant turn to learn from")


def read_examples(path: str | Path) -> list[dict]:
    """Read a JSONL or CSV file of examples, all of one shape."""
    path = Path(path)
    if not path.is_file():
        what = "a directory, not a data file" if path.is_dir() else "no such data file"
        raise DataError(f"{path}: {what}")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        records = _read_jsonl(path)
    elif suffix == ".csv":
        records = _read_csv(path)
    else:
        raise DataError(f"{path}: unknown data format {suffix!r}; use .jsonl or .csv")
    if not records:
        raise DataError(f"{path}: the file has no examples")
    shapes = {}
    for line, record in records:
        shape = example_shape(record, f"{path}, line {line}")
        shapes.setdefault(shape, line)
    if len(shapes) > 1:
        described = ", ".join(f"{s} (first on line {n})" for s, n in shapes.items())
        raise DataError(f"{path}: records mix shapes: {described}")
    return [record for _, record in records]


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    records = []
    with path.open("rb") as handle:
        lines = _NumberedLines(path, handle)
        for line in lines:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{path}, line {lines.number}, column {error.colno}: not valid JSON "
                    f"({error.msg})"
                ) from None
            if not isinstance(record, dict):
                raise DataError(f"{path}, line {lines.number}: expected a JSON object")
            records.append((lines.number, record))
    return records


def _read_csv(path: Path) -> list[tuple[int, dict]]:
    """Records of an RFC 4180 CSV file with a header row, each with the line it starts on.

    Parsing is strict: a quoted field must end with its quote right before a comma or the
    line's end (a quote inside it is written twice), so a stray quote is refused where it
    is, instead of silently becoming part of the text or swallowing the following lines.
    """
    with path.open("rb") as handle:
        lines = _NumberedLines(path, handle)
        reader = csv.reader(lines, strict=True)
        header: list[str] | None = None
        records = []
        while True:
            start = lines.number + 1  # a record may span lines (a quoted newline)
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as error:
                raise _csv_quoting_error(path, start, lines.number, error) from None
            if not row:
                continue  # a blank line
            if header is None:
                header = _csv_header(path, start, row)
                continue
            if len(row) != len(header):
                many = "more" if len(row) > len(header) else "fewer"
                values = f"{len(row)} value" + ("s" if len(row) != 1 else "")
                raise DataError(
                    f"{path}, line {start}: {values}, {many} than the {len(header)} header "
                    f"columns ({', '.join(header)})"
                )
            record = dict(zip(header, row, strict=True))
            if "label" in record and record["label"].lstrip("-").isdigit():
                record["label"] = int(record["label"])
            records.append((start, record))
    return records


def _csv_header(path: Path, line: int, row: list[str]) -> list[str]:
    seen = set()
    for name in row:
        if name in seen:
            raise DataError(f"{path}, line {line}: the header names column {name!r} twice")
        seen.add(name)
    return row


def _csv_quoting_error(path: Path, start: int, end: int, error: csv.Error) -> DataError:
    how = (
        "a quoted field must end with its quote right before a comma or the end of the line; "
        'write a quote inside a field twice ("") and put the whole field in quotes'
    )
    if "unexpected end of data" in str(error):
        return DataError(
            f"{path}, line {start}: a quoted field opened here is never closed (the file "
            f"ends inside it, at line {end}); {how}"
        )
    where = f"line {start}" if end == start else f"line {start} (the record runs to line {end})"
    return DataError(f"{path}, {where}: malformed CSV quoting ({error}); {how}")


class _NumberedLines:
    """A file's lines as text, counted (a CSV record may span several); a line that is not
    UTF-8 is refused with its number. Decoded line by line, so that number is exact; a
    byte-order mark (as some editors write) is not part of the first line."""

    def __init__(self, path: Path, handle: BinaryIO) -> None:
        self.path, self.handle, self.number = path, handle, 0

    def __iter__(self) -> _NumberedLines:
        return self

    def __next__(self) -> str:
        raw = next(self.handle)
        self.number += 1
        try:
            return raw.decode("utf-8-sig" if self.number == 1 else "utf-8")
        except UnicodeDecodeError as error:
            raise DataError(
                f"{self.path}, line {self.number}: not UTF-8 text ({error.reason} at byte "
                f"{error.start + 1} of the line); save the file as UTF-8"
            ) from None


# -- token ids ---------------------------------------------------------------------------------


@dataclass
class Encoded:
    """One example as token ids.

    For a causal LM ``labels`` has one entry per token, -100 where the loss does not
    count; for a classifier it is the class index.
    """

    input_ids: list[int]
    labels: list[int] | int
    token_type_ids: list[int] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


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


def encode_causal(
    tokenizer, example: dict, max_length: int, prompt_tokens: PromptTokens | None = None
) -> Encoded:
    """Token ids and loss labels of one example, for a causal language model."""
    shape = example_shape(example)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prefix = list(prompt_tokens.prefix) if prompt_tokens else []
    infix = list(prompt_tokens.infix) if prompt_tokens else []
    if shape == "prompt_completion":
        prompt = encode_prompt(tokenizer, example["prompt"], prompt_tokens)
        completion = tokenizer(example["completion"], add_special_tokens=False)["input_ids"] + eos
        ids, labels = prompt + completion, [IGNORE_INDEX] * len(prompt) + completion
    elif shape == "messages":
        ids, labels = _encode_chat(tokenizer, example["messages"], infix)
        ids, labels = prefix + ids, [IGNORE_INDEX] * len(prefix) + labels
    elif shape == "text":
        ids = tokenizer(example["text"], add_special_tokens=True)["input_ids"] + eos
        # The first text token is never predicted without a prefix; with one it stays so,
        # and the loss (and perplexity) counts the same tokens either way.
        labels = [IGNORE_INDEX] * (len(prefix) + 1) + ids[1:] if prefix else list(ids)
        ids = prefix + ids
    else:
        raise DataError("a {text, label} record needs a classification model, not a causal LM")
    return Encoded(ids[:max_length], labels[:max_length])


def _encode_chat(tokenizer, messages: list[dict], infix: list[int]) -> tuple[list[int], list[int]]:
    """The loss counts the assistant turns: each is the tokens the template adds after the
    conversation so far with a generation prompt. The infix goes right before each."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("{messages} records need a tokenizer with a chat template")
    rendered: list[int] = []  # the conversation so far, as the template renders it
    ids: list[int] = []
    labels: list[int] = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _chat_ids(tokenizer, messages[:index], generation_prompt=True)
        after = _chat_ids(tokenizer, messages[: index + 1], generation_prompt=False)
        if after[: len(before)] != before or before[: len(rendered)] != rendered:
            raise DataError("the chat template does not render conversations as prefixes")
        context, reply = before[len(rendered) :] + infix, after[len(before) :]
        ids += context + reply
        labels += [IGNORE_INDEX] * len(context) + reply
        rendered = after
    return ids, labels


def _chat_ids(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


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


def label_names_of(examples: list[dict]) -> tuple[str, ...]:
    """The classes of ``{text, label}`` records: integers 0..n-1 or their sorted names."""
    labels = {example["label"] for example in examples}
    if all(isinstance(label, int) for label in labels):
        return tuple(str(i) for i in range(max(labels) + 1))
    if any(isinstance(label, int) for label in labels):
        raise DataError("labels mix integers and names; use one or the other")
    return tuple(sorted(labels))


def encode_dataset(
    tokenizer,
    examples: list[dict],
    max_length: int,
    label_names: tuple[str, ...] | None = None,
    prompt_tokens: PromptTokens | None = None,
) -> list[Encoded]:
    """Encode every example; for a causal LM, ones whose loss counts no token are dropped.

    With ``label_names`` the examples are classification records for a classifier; with
    ``prompt_tokens`` (a prefix method's) every example gets them in its place.
    """
    if label_names is not None:
        return [
            encode_classification(tokenizer, e, max_length, label_names, prompt_tokens)
            for e in examples
        ]
    encoded = [encode_causal(tokenizer, e, max_length, prompt_tokens) for e in examples]
    kept = [e for e in encoded if any(label != IGNORE_INDEX for label in e.labels[1:])]
    if not kept:
        raise DataError(
            f"no example keeps a completion token within max_length={max_length}; "
            "raise max_length or shorten the prompts"
        )
    return kept


# -- batches -----------------------------------------------------------------------------------


def length_grouped_order(
    lengths: list[int], batch_size: int, seed: int, epoch: int
) -> list[list[int]]:
    """Batches of example indices with similar lengths, so padding stays small.

    Shuffled by ``(seed, epoch)`` alone, so the order is a pure function of them: a resumed
    run finds its place from the step number. Examples are shuffled, cut into groups of
    50 batches, sorted by length within a group, batched, and the batches shuffled.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    indices = list(range(len(lengths)))
    rng.shuffle(indices)
    group = batch_size * 50
    batches = []
    for start in range(0, len(indices), group):
        chunk = sorted(indices[start : start + group], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def batch_stream(
    lengths: list[int], batch_size: int, seed: int, start: int = 0
) -> Iterator[list[int]]:
    """Batches forever, epoch after epoch, from the ``start``-th batch on."""
    epoch, position = 0, 0
    while True:
        batches = length_grouped_order(lengths, batch_size, seed, epoch)
        for batch in batches:
            if position >= start:
                yield batch
            position += 1
        epoch += 1


def collate(items: list[Encoded], pad_id: int) -> dict[str, Tensor]:
    """Right-pad a batch: ``input_ids``, ``attention_mask`` and ``labels`` (-100 on pads)."""
    width = max(len(item) for item in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        input_ids[row, : len(item)] = torch.tensor(item.input_ids)
        attention_mask[row, : len(item)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if isinstance(items[0].labels, int):
        batch["labels"] = torch.tensor([item.labels for item in items])
    else:
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        for row, item in enumerate(items):
            labels[row, : len(item)] = torch.tensor(item.labels)
        batch["labels"] = labels
    if items[0].token_type_ids is not None:
        token_types = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            token_types[row, : len(item)] = torch.tensor(item.token_type_ids)
        batch["token_type_ids"] = token_types
    return batch
