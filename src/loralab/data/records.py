"""Reading the user's records (encoding them: ``encoding.py``; batching: ``batches.py``).

A user file is JSONL, JSON (an array of records, or one a line) or CSV (Parquet, Arrow
and ``save_to_disk`` folders: ``arrow_files.py``), its records all of one of these shapes
(or of a layout ``layouts.py`` maps onto them: Alpaca, ShareGPT):

- ``{prompt, completion}``: the loss counts only the completion's tokens;
- ``{messages}`` (and ``tools``): a chat, rendered with the model's chat template; the
  loss counts only the assistant turns (tool calls included, tool results not);
- ``{text}``: language modelling, every token counts;
- ``{text, label}`` (and optionally ``text_pair``): classification;
- ``{prompt, chosen, rejected}``: a preference pair, for the preference objectives;
- ``{prompt, completion, label}`` with a true/false label: one completion and whether it
  is desirable, for KTO;
- ``{prompt}`` (and any other fields): a prompt GRPO samples completions for, the other
  fields for its reward to read.

Bad records are refused with the file, the line (or row) and the field.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, BinaryIO

from . import arrow_files, hub_cache  # they import datasets only to read their formats
from .errors import DataError
from .layouts import normalized

SHAPES = {
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "text_label": ("text", "label"),
    "text": ("text",),
    "preference": ("prompt", "chosen", "rejected"),
    "prompt": ("prompt",),
    "unpaired": ("prompt", "completion", "label"),
}
ROLES = ("system", "user", "assistant", "tool")


def example_shape(example: dict, where: str = "example") -> str:
    """Which of the shapes a record has, checking its fields' types."""
    if "chosen" in example or "rejected" in example:
        _check_preference(example, where)
        return "preference"
    if "prompt" in example or "completion" in example:
        shape = _completion_shape(example, where)
        if shape is not None:
            return shape
    if "messages" in example:
        _check_messages(example["messages"], where)
        _check_tools(example.get("tools"), where)
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
    raise DataError(
        f"{where}: record has fields {sorted(example)}; expected one of: {fields} (or a "
        "layout mapped onto them: Alpaca instruction + output, ShareGPT conversations)"
    )


def _check_messages(messages: Any, where: str, field: str = "messages", reply: bool = True) -> None:
    """A chat: messages of known roles, each with string content (an assistant turn may
    call tools instead), and an assistant turn to learn from where ``reply``."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field {field!r} must be a non-empty list of messages")
    for index, message in enumerate(messages):
        at = f"{where}: {field}[{index}]"
        if not isinstance(message, dict):
            raise DataError(f"{at} must be a message ({{role, content}}), got {message!r}")
        if message.get("role") not in ROLES:
            raise DataError(
                f"{at}.role must be one of {', '.join(ROLES)}, got {message.get('role')!r}"
            )
        calls = message.get("tool_calls")  # an empty list (OpenAI's exports) calls nothing
        if calls:
            if message["role"] != "assistant":
                raise DataError(f"{at}: only an assistant turn calls tools (tool_calls)")
            _check_tool_calls(calls, at)
        content = message.get("content")
        if not isinstance(content, str) and not (calls and content is None):
            raise DataError(f"{at} needs a string 'content' (or tool_calls, for an assistant)")
    if reply and not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: field {field!r} has no assistant turn to learn from")


def _check_tool_calls(calls: Any, at: str) -> None:
    if not isinstance(calls, list):
        raise DataError(f"{at}.tool_calls must be a list of calls, got {calls!r}")
    for index, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise DataError(
                f"{at}.tool_calls[{index}] must be {{type: function, function: {{name, "
                f"arguments}}}}, got {call!r}"
            )
        if not isinstance(function.get("arguments", {}), (dict, str)):
            raise DataError(f"{at}.tool_calls[{index}].function.arguments must be an object")


def _check_tools(tools: Any, where: str) -> None:
    if tools is None:
        return
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise DataError(f"{where}: field 'tools' must be a list of tool schemas (objects)")


def _completion_shape(example: dict, where: str) -> str | None:
    """A record with a prompt or a completion: KTO's unpaired completion (a true/false
    label), GRPO's prompt alone, or a prompt and its completion; None for a chat's record
    (a ``prompt`` beside ``messages``)."""
    if "completion" in example and isinstance(example.get("label"), bool):
        for key in ("prompt", "completion"):
            if not isinstance(example.get(key), str) or not example[key]:
                raise DataError(f"{where}: field {key!r} must be a non-empty string")
        return "unpaired"
    if "completion" not in example:
        if "messages" in example:
            return None
        _check_prompt(example["prompt"], where)
        return "prompt"
    for key in ("prompt", "completion"):
        if not isinstance(example.get(key), str):
            raise DataError(f"{where}: field {key!r} must be a string, got {example.get(key)!r}")
    return "prompt_completion"


def _check_prompt(prompt: Any, where: str) -> None:
    """A prompt to sample completions from (GRPO): text, or a chat before its reply."""
    if isinstance(prompt, str):
        if not prompt:
            raise DataError(f"{where}: field 'prompt' must be non-empty")
        return
    if not isinstance(prompt, list):
        raise DataError(f"{where}: field 'prompt' must be text or a list of messages")
    _check_messages(prompt, where, "prompt", reply=False)


def _check_preference(example: dict, where: str) -> None:
    """TRL's preference records: ``chosen`` and ``rejected`` replies (with their
    ``prompt``, or with the prompt inside each), both text or both chats."""
    for key, other in (("chosen", "rejected"), ("rejected", "chosen")):
        if key not in example:
            raise DataError(f"{where}: a preference record needs {key!r} beside {other!r}")
    chosen, rejected, prompt = example["chosen"], example["rejected"], example.get("prompt")
    if isinstance(chosen, str) and isinstance(rejected, str):
        if prompt is not None and not isinstance(prompt, str):
            raise DataError(f"{where}: field 'prompt' must be text, as 'chosen' is")
        if not chosen.strip() or not rejected.strip():
            raise DataError(f"{where}: 'chosen' and 'rejected' must be non-empty")
    elif isinstance(chosen, list) and isinstance(rejected, list):
        if prompt is not None:
            _check_messages(prompt, where, "prompt", reply=False)
        _check_messages(chosen, where, "chosen")
        _check_messages(rejected, where, "rejected")
    else:
        raise DataError(
            f"{where}: 'chosen' and 'rejected' must both be text or both be lists of "
            f"messages, got {type(chosen).__name__} and {type(rejected).__name__}"
        )
    if chosen == rejected:
        raise DataError(
            f"{where}: 'chosen' and 'rejected' are the same; a preference pair needs two "
            "different replies"
        )


def read_examples(path: str | Path, data_format: str = "auto") -> list[dict]:
    """The examples of a data file (of a saved dataset folder: its ``train`` split), all
    of one shape."""
    return [record for _, record in read_located_examples(path, data_format)]


def read_located_examples(path: str | Path, data_format: str = "auto") -> list[tuple[str, dict]]:
    """``read_examples``, each record with where it is."""
    splits = read_located_splits(path, data_format)
    if "train" not in splits:
        raise DataError(f"{path}: no 'train' split (it has {', '.join(splits)})")
    return splits["train"]


def read_splits(path: str | Path, data_format: str = "auto") -> dict[str, list[dict]]:
    """Each split's examples in ``path`` (``read_located_splits``, without where each is)."""
    located = read_located_splits(path, data_format)
    return {name: [record for _, record in rows] for name, rows in located.items()}


def read_located_splits(
    path: str | Path, data_format: str = "auto"
) -> dict[str, list[tuple[str, dict]]]:
    """Each split's examples in ``path``, each with where it is (the file and line or
    row), each split all of one shape: a file is one split, ``train``; a folder
    ``Dataset.save_to_disk`` wrote, or a Hub dataset in the local cache, has its own
    splits. JSONL, JSON (an array of records, or one record a line), CSV; Parquet, Arrow
    and saved folders through the ``datasets`` library (``arrow_files.py``). Each record
    in the layout ``data_format`` names (``layouts.py``; ``auto``: the one its fields
    say)."""
    path = Path(path)
    if arrow_files.is_saved_dataset(path) or (
        path.is_file() and path.suffix.lower() in arrow_files.SUFFIXES
    ):
        splits = arrow_files.read_splits(path)
    elif not path.exists() and hub_cache.looks_like_hub_id(str(path)):
        splits = _from_hub_cache(str(path))
    else:
        rows = _read_file(path)
        return {"train": checked_rows(rows, str(path), "the file has no examples", data_format)}
    return {
        name: checked_rows(rows, f"{path} ({name})", data_format=data_format)
        for name, rows in splits.items()
    }


def _read_file(path: Path) -> list[tuple[str, dict]]:
    """The records of a JSONL, JSON or CSV file, each with its file and line."""
    if not path.is_file():
        raise DataError(f"{path}: {_missing(path)}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = _read_jsonl(path)
    elif suffix == ".json":
        records = _read_json(path)
    elif suffix == ".csv":
        records = _read_csv(path)
    else:
        raise DataError(
            f"{path}: unknown data format {suffix!r}; use .jsonl, .json, .csv, .parquet or "
            ".arrow (or a folder written by Dataset.save_to_disk)"
        )
    return [(f"{path}, line {line}", record) for line, record in records]


def checked_records(
    rows: list[tuple[str, dict]],
    label: str,
    empty: str = "no examples",
    data_format: str = "auto",
) -> list[dict]:
    """The records of ``rows`` (``checked_rows``, without where each is)."""
    return [record for _, record in checked_rows(rows, label, empty, data_format)]


def checked_rows(
    rows: list[tuple[str, dict]],
    label: str,
    empty: str = "no examples",
    data_format: str = "auto",
) -> list[tuple[str, dict]]:
    """The records of ``rows`` (each with where it is) in the encoder's shapes, checked to
    be of one shape, each still with where it is."""
    if not rows:
        raise DataError(f"{label}: {empty}")
    rows = [(where, normalized(record, where, data_format)) for where, record in rows]
    shapes: dict[str, str] = {}
    for where, record in rows:
        shapes.setdefault(example_shape(record, where), where)
    if len(shapes) > 1:
        described = ", ".join(
            f"{shape} (first on {where.rpartition(', ')[2]})" for shape, where in shapes.items()
        )
        raise DataError(f"{label}: records mix shapes: {described}")
    return rows


def _missing(path: Path) -> str:
    if path.is_dir():
        return "a directory, not a data file (nor a folder written by Dataset.save_to_disk)"
    return "no such data file"


def _from_hub_cache(name: str) -> dict[str, list[tuple[str, dict]]]:
    snapshot = hub_cache.cached_snapshot(name)
    if snapshot is None:
        raise DataError(
            f"{name}: no such data file, and no Hub dataset of that name in the local "
            f"cache ({hub_cache.hub_cache()}); loralab fetches nothing (download it where "
            "there is a network, or save it with datasets' save_to_disk and give the folder)"
        )
    return hub_cache.read_cached(name, snapshot)


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


def _read_json(path: Path) -> list[tuple[int, dict]]:
    """A JSON array of records (each with the line it starts on), or JSON Lines."""
    if _first_character(path) != "[":
        return _read_jsonl(path)
    text = _utf8_text(path)
    decoder = json.JSONDecoder()
    # One pass, element by element, the lines counted as it goes (not from the start of
    # the file for each element, which grows with the square of the file's length).
    records: list[tuple[int, dict]] = []
    position, line, counted = text.index("[") + 1, 1, 0
    while True:
        position = _skip_space(text, position)
        if text.startswith("]", position) and not records:
            position += 1
            break
        line += text.count("\n", counted, position)
        counted = position
        try:
            value, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path}, line {error.lineno}, column {error.colno}: not valid JSON ({error.msg})"
            ) from None
        if not isinstance(value, dict):
            raise DataError(f"{path}, line {line}: element {len(records)} is not a JSON object")
        records.append((line, value))
        position = _skip_space(text, position)
        if text.startswith(",", position):
            position += 1
        elif text.startswith("]", position):
            position += 1
            break
        else:
            where = line + text.count("\n", counted, position)
            raise DataError(
                f"{path}, line {where}: ',' or ']' expected after element {len(records) - 1}"
            )
    if text[position:].strip():
        where = line + text.count("\n", counted, position)
        raise DataError(f"{path}, line {where}: text after the JSON array")
    return records


def _first_character(path: Path) -> str:
    """The first character of the file that is not white space (or a byte-order mark)."""
    with path.open("rb") as handle:
        while chunk := handle.read(4096):
            stripped = chunk.lstrip(b" \t\r\n\xef\xbb\xbf")
            if stripped:
                return chr(stripped[0])
    return ""


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _utf8_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataError(f"{path}, line {line}: not UTF-8 text ({error.reason})") from None


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
