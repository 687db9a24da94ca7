"""Layouts users already have, recognized by their fields and mapped onto the shapes the
encoder knows (``records.py``), as they are read:

- Alpaca: ``{instruction, input?, output, system?}`` → a chat: the instruction (and its
  input, after a blank line) from the user, the output from the assistant, the loss on
  the output (the model's chat template renders it, as LLaMA-Factory and Axolotl do);
- ShareGPT: ``{conversations: [{from, value}, …]}`` (``from`` human, gpt, system, or
  user, assistant) → ``{messages}``.

A record of any other layout passes unchanged.
"""

from __future__ import annotations

from typing import Any

from .errors import DataError

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


def normalized(record: dict, where: str) -> dict:
    """``record`` in one of the encoder's shapes, if it has a layout this module knows."""
    if "instruction" in record and "output" in record:
        return _alpaca(record, where)
    if "conversations" in record and "messages" not in record:
        return {"messages": _sharegpt(record["conversations"], where)}
    return record


def _alpaca(record: dict, where: str) -> dict:
    for key in ("instruction", "output"):
        if not isinstance(record[key], str) or not record[key].strip():
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


def _sharegpt(turns: Any, where: str) -> list[dict]:
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
    return messages
