"""Reading the user's records (encoding them: ``encoding.py``; batching: ``batches.py``).

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
from pathlib import Path
from typing import Any, BinaryIO

SHAPES = {
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "text_label": ("text", "label"),
    "text": ("text",),
}


class DataError(ValueError):
    """A data file or record is malformed; the message names the file, line and field."""


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


def label_names_of(examples: list[dict]) -> tuple[str, ...]:
    """The classes of ``{text, label}`` records: integers 0..n-1 or their sorted names."""
    labels = {example["label"] for example in examples}
    if all(isinstance(label, int) for label in labels):
        return tuple(str(i) for i in range(max(labels) + 1))
    if any(isinstance(label, int) for label in labels):
        raise DataError("labels mix integers and names; use one or the other")
    return tuple(sorted(labels))


# -- batches -----------------------------------------------------------------------------------
