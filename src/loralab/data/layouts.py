"""The layouts of records users already have, recognized by their fields (or named with
``--data-format`` where a record fits two), each mapped onto a shape the encoder knows
(``records.SHAPES``) as the records are read:

| layout | fields | shape |
|---|---|---|
| ``prompt-completion`` | ``prompt``, ``completion`` | itself |
| ``prompts`` | ``prompt`` alone (any other fields kept: GRPO's reward reads them) | ``prompt`` |
| ``messages`` | ``messages`` (system, user, assistant, tool; ``tools``) | itself |
| ``text`` | ``text`` | itself |
| ``classification`` | ``text``, ``label`` (``text_pair``) | ``text_label`` |
| ``alpaca`` | ``instruction``, ``output`` (``input``, ``system``) | ``messages`` |
| ``sharegpt`` | ``conversations`` of ``from``/``value`` | ``messages`` |
| ``preference`` | ``chosen``, ``rejected`` (``prompt``): text or chats, as TRL has them | itself |
| ``unpaired-preference`` | ``prompt``, ``completion``, ``label`` (true/false: KTO) | ``unpaired`` |

Alpaca becomes a chat: the instruction (and its input, after a blank line) from the user,
the output from the assistant, which the loss counts (the model's chat template renders
it, as LLaMA-Factory and Axolotl do). A record keeps only its layout's fields; a
``text`` or ``label`` column beside a structured layout's fields (a chat dataset's
rendered text) does not make it ambiguous.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import DataError

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "tool": "tool",
    "function_call": "assistant",
    "observation": "tool",
}


@dataclass(frozen=True)
class Layout:
    name: str
    required: tuple[str, ...]  # the fields every record of it has
    recognized: Callable[[dict], bool]  # whether a record has this layout's own fields
    convert: Callable[[dict, str], dict]  # (record, where) → a record of the encoder's shapes
    plain: bool = False
    """Text or a label alone: a layout that a record with a structured layout's fields
    as well has as a by-product (a chat dataset's rendered ``text`` column), not as its
    layout."""


def _keep(*names: str) -> Callable[[dict, str], dict]:
    return lambda record, where: {k: record[k] for k in names if k in record}


LAYOUTS: dict[str, Layout] = {}


def _register(layout: Layout) -> None:
    LAYOUTS[layout.name] = layout


def normalized(record: dict, where: str, data_format: str = "auto") -> dict:
    """``record`` in one of the encoder's shapes: its layout's (``data_format``, or the one
    its fields say), converted, with that layout's fields alone."""
    if data_format != "auto":
        layout = LAYOUTS[data_format]
        missing = [name for name in layout.required if name not in record]
        if missing:
            raise DataError(
                f"{where}: --data-format {layout.name} reads {', '.join(layout.required)}; "
                f"the record has {', '.join(sorted(record)) or 'no fields'}"
            )
        return layout.convert(record, where)
    found = [layout for layout in LAYOUTS.values() if layout.recognized(record)]
    found = [layout for layout in found if not layout.plain] or found
    if len(found) > 1:
        named = " and ".join(f"{layout.name} ({', '.join(layout.required)})" for layout in found)
        flags = " or ".join(f"--data-format {layout.name}" for layout in found)
        raise DataError(f"{where}: the record has the fields of {named}; choose with {flags}")
    if not found:
        return record  # refused with its fields by records.example_shape
    return found[0].convert(record, where)


def _alpaca(record: dict, where: str) -> dict:
    for key in ("instruction", "output"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise DataError(f"{where}: Alpaca field {key!r} must be a non-empty string")
    extra = record.get("input")
    if extra is not None and not isinstance(extra, str):
        raise DataError(f"{where}: Alpaca field 'input' must be a string, got {extra!r}")
    request = record["instruction"] + (f"\n\n{extra}" if extra else "")
    messages = []
    system = record.get("system")
    if system:
        if not isinstance(system, str):
            raise DataError(f"{where}: Alpaca field 'system' must be a string")
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": request})
    messages.append({"role": "assistant", "content": record["output"]})
    return {"messages": messages}


def _sharegpt(record: dict, where: str) -> dict:
    turns: Any = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: ShareGPT field 'conversations' must be a non-empty list")
    messages = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: conversations[{index}] needs a string 'value'")
        role = SHAREGPT_ROLES.get(turn.get("from"))
        if role is None:
            raise DataError(
                f"{where}: conversations[{index}].from must be one of "
                f"{', '.join(SHAREGPT_ROLES)}, got {turn.get('from')!r}"
            )
        messages.append({"role": role, "content": turn["value"]})
    return _with_tools({"messages": messages}, record, where)


def _messages(record: dict, where: str) -> dict:
    return _with_tools({"messages": record["messages"]}, record, where)


def _with_tools(converted: dict, record: dict, where: str) -> dict:
    """The record's ``tools`` (their schemas) beside its chat: a list, or that list as a
    JSON string (as LLaMA-Factory writes it, and Arrow columns often hold it)."""
    tools = record.get("tools")
    if isinstance(tools, str):
        if not tools.strip():
            return converted
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{where}: field 'tools' is a string but not JSON ({error.msg})"
            ) from None
    if tools is not None:
        converted["tools"] = tools
    return converted


def _has(*names: str) -> Callable[[dict], bool]:
    return lambda record: any(name in record for name in names)


_STRUCTURED = ("messages", "chosen", "rejected", "conversations", "instruction")
_register(
    Layout(
        "prompt-completion",
        ("prompt", "completion"),
        lambda r: "completion" in r and not isinstance(r.get("label"), bool),
        _keep("prompt", "completion"),
    )
)
_register(
    Layout(
        "unpaired-preference",
        ("prompt", "completion", "label"),
        # TRL's KTO layout: one completion and whether it is desirable
        lambda r: "completion" in r and isinstance(r.get("label"), bool),
        _keep("prompt", "completion", "label"),
    )
)
_register(
    Layout(
        "prompts",
        ("prompt",),
        # A prompt beside messages or chosen/rejected is theirs (UltraChat, TRL's
        # preference records), not a prompt to sample from.
        lambda r: "prompt" in r and "completion" not in r and not _has(*_STRUCTURED)(r),
        lambda record, where: dict(record),  # the other fields are the reward's to read
    )
)
_register(Layout("messages", ("messages",), _has("messages"), _messages))
_register(
    Layout("text", ("text",), lambda r: "text" in r and "label" not in r, _keep("text"), plain=True)
)
_register(
    Layout(
        "classification",
        ("text", "label"),
        lambda r: "text" in r and "label" in r,
        _keep("text", "label", "text_pair"),
        plain=True,
    )
)
_register(
    Layout(
        "alpaca",
        ("instruction", "output"),
        lambda r: "instruction" in r and "output" in r,
        _alpaca,
    )
)
_register(Layout("sharegpt", ("conversations",), _has("conversations"), _sharegpt))
_register(
    Layout(
        "preference",
        ("chosen", "rejected"),
        _has("chosen", "rejected"),
        _keep("prompt", "chosen", "rejected"),
    )
)

DATA_FORMATS = ("auto", *LAYOUTS)  # --data-format: auto recognizes a layout by its fields
