"""OpenAI's completion and chat requests, checked field by field into what the engine runs.

Every refusal names the field (OpenAI's ``param``) and the value. Fields OpenAI defines
that this server does not implement are refused when they ask for something (``logprobs``,
``echo``, penalties, tools …) rather than silently ignored; unknown fields are ignored, as
OpenAI-compatible servers do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..data.encoding import encode_prompt
from ..data.records import DataError
from .errors import RequestError
from .sampling import Sampling

MAX_STOPS = 4  # OpenAI's limit
MAX_STOP_TOKEN_IDS = 256
MAX_CHOICES = 16

# Fields that change the output and that we do not implement, with their "off" values.
_UNSUPPORTED = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "tools": (None, []),
    "functions": (None, []),
    "response_format": (None, {"type": "text"}),
}


@dataclass
class Completion:
    """A parsed request: one engine job per (prompt, choice)."""

    chat: bool
    model: str
    adapter: str | None
    prompts: list[list[int]]
    n: int
    max_tokens: int | list[int]
    sampling: Sampling
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    ignore_eos: bool = False  # vLLM's extension: run to max_tokens (benchmarks use it)
    # vLLM's extensions that RL loops use (GRPO's --rollout-server): end on any of these
    # tokens, and give back the prompt's and each completion's token ids
    stop_token_ids: frozenset[int] = frozenset()
    return_token_ids: bool = False


def parse_completion(
    body: Any,
    chat: bool,
    tokenizer,
    base_name: str,
    adapters: list[str],
    context_length: int,
    vocab_size: int,
) -> Completion:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    model = _model(body, base_name, adapters)
    for name, off in _UNSUPPORTED.items():
        if body.get(name) not in off:
            raise RequestError(f"{name} is not supported by loralab serve", param=name)
    prompts = _chat_prompt(body, tokenizer) if chat else _text_prompts(body, tokenizer, vocab_size)
    if any(not ids for ids in prompts):
        raise RequestError(
            "the prompt is empty (it encodes to no tokens)", param="messages" if chat else "prompt"
        )
    lengths = _new_tokens(body, chat, prompts, context_length)
    stream = _optional(body, "stream", bool, False)
    include_usage = _include_usage(body, stream)
    return Completion(
        chat=chat,
        model=model,
        adapter=None if model == base_name else model,
        prompts=prompts,
        n=_optional_int(body, "n", minimum=1, maximum=MAX_CHOICES) or 1,
        max_tokens=lengths,
        sampling=_sampling(body),
        stop=_stops(body),
        stream=stream,
        include_usage=include_usage,
        ignore_eos=_optional(body, "ignore_eos", bool, False),
        stop_token_ids=_stop_token_ids(body, vocab_size),
        return_token_ids=_optional(body, "return_token_ids", bool, False),
    )


def _model(body: dict, base_name: str, adapters: list[str]) -> str:
    model = _required(body, "model", str)
    if model != base_name and model not in adapters:
        raise RequestError(
            f"the model {model!r} does not exist; available: {[base_name, *adapters]}",
            status=404,
            param="model",
            code="model_not_found",
        )
    return model


def _new_tokens(body: dict, chat: bool, prompts: list[list[int]], context_length: int) -> list[int]:
    """How many tokens each prompt may get: the request's limit where it fits the context,
    else OpenAI's defaults (16 for a completion, the rest of the context for a chat)."""
    limit_name = (
        "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    )
    max_tokens = _optional_int(body, limit_name, minimum=1)
    lengths = []
    for ids in prompts:
        if len(ids) >= context_length:
            raise RequestError(
                f"the prompt has {len(ids)} tokens but the model's context holds "
                f"{context_length}, with room for at least one new token",
                param="messages" if chat else "prompt",
                code="context_length_exceeded",
            )
        if max_tokens is not None and len(ids) + max_tokens > context_length:
            raise RequestError(
                f"the model's context holds {context_length} tokens; the prompt has "
                f"{len(ids)} and {limit_name} asks for {max_tokens} more",
                param=limit_name,
                code="context_length_exceeded",
            )
        room = context_length - len(ids)
        lengths.append(max_tokens or (room if chat else min(16, room)))
    return lengths


def _include_usage(body: dict, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise RequestError(
            "stream_options is only allowed with stream=true", param="stream_options"
        )
    if not isinstance(options, dict):
        raise RequestError("stream_options must be an object", param="stream_options")
    return _optional(options, "include_usage", bool, False, "stream_options.include_usage")


def _sampling(body: dict) -> Sampling:
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise RequestError("top_p must be in (0, 1], got 0", param="top_p")
    seed = _optional_int(body, "seed")
    return Sampling(temperature=temperature, top_p=top_p, seed=seed)


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (_text(stop, "stop"),)
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise RequestError("stop must be a string or a list of strings", param="stop")
    if len(stop) > MAX_STOPS:
        raise RequestError(f"stop takes at most {MAX_STOPS} strings, got {len(stop)}", param="stop")
    return tuple(_text(s, "stop") for s in stop)


def _stop_token_ids(body: dict, vocab: int) -> frozenset[int]:
    ids = body.get("stop_token_ids")
    if ids is None:
        return frozenset()
    if not isinstance(ids, list) or not all(_is_token(t, vocab) for t in ids):
        raise RequestError(
            f"stop_token_ids must be a list of token ids (integers in [0, {vocab}))",
            param="stop_token_ids",
        )
    if len(ids) > MAX_STOP_TOKEN_IDS:
        raise RequestError(
            f"stop_token_ids takes at most {MAX_STOP_TOKEN_IDS} ids, got {len(ids)}",
            param="stop_token_ids",
        )
    return frozenset(ids)


def _text_prompts(body: dict, tokenizer, vocab: int) -> list[list[int]]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [encode_prompt(tokenizer, _text(prompt, "prompt"))]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return [
                encode_prompt(tokenizer, _text(p, f"prompt[{i}]", "prompt"))
                for i, p in enumerate(prompt)
            ]
        if all(_is_token(t, vocab) for t in prompt):
            return [list(prompt)]
        if all(isinstance(p, list) and p and all(_is_token(t, vocab) for t in p) for p in prompt):
            return [list(p) for p in prompt]
    raise RequestError(
        "prompt must be a string, a list of strings, or token ids (a list of integers in "
        f"[0, {vocab}), or a list of such lists)",
        param="prompt",
    )


def _text(value: str, where: str, param: str | None = None) -> str:
    """``value`` if it is text: JSON's ``\\ud800`` escapes can give a lone surrogate,
    which no tokenizer (and no UTF-8) can take."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise RequestError(
            f"{where} holds a lone UTF-16 surrogate {value[error.start]!r} at character "
            f"{error.start}; it is not text",
            param=param or where,
        ) from None
    return value


def _is_token(value: Any, vocab: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab


_ROLES = ("system", "developer", "user", "assistant")


def _chat_prompt(body: dict, tokenizer) -> list[list[int]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", param="messages")
    chat = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object", param=where)
        role = message.get("role")
        if role not in _ROLES:
            raise RequestError(
                f"{where}.role must be one of {list(_ROLES)}, got {role!r}", param=f"{where}.role"
            )
        chat.append(
            {
                "role": "system" if role == "developer" else role,
                "content": _content(message.get("content"), where),
            }
        )
    try:
        return [encode_prompt(tokenizer, chat)]
    except DataError as error:
        raise RequestError(f"messages: {error}", param="messages") from None
    except Exception as error:  # the model's own template refused the conversation
        raise RequestError(
            f"messages: the chat template refused them: {error}", param="messages"
        ) from None


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return _text(content, f"{where}.content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise RequestError(
                    f"{where}.content: only text parts are supported", param=f"{where}.content"
                )
            texts.append(_text(part["text"], f"{where}.content"))
        return "".join(texts)
    raise RequestError(
        f"{where}.content must be a string or a list of text parts", param=f"{where}.content"
    )


# -- plain fields ---------------------------------------------------------------------


def _required(body: dict, name: str, kind: type) -> Any:
    if name not in body:
        raise RequestError(f"{name} is required", param=name)
    value = body[name]
    if not isinstance(value, kind):
        raise RequestError(f"{name} must be a {kind.__name__}, got {value!r}", param=name)
    return value


def _optional(body: dict, name: str, kind: type, default: Any, param: str | None = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise RequestError(
            f"{param or name} must be a {kind.__name__}, got {value!r}", param=param or name
        )
    return value


def _optional_int(
    body: dict, name: str, minimum: int | None = None, maximum: int | None = None
) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise RequestError(f"{name} must be an integer, got {value!r}", param=name)
    if minimum is not None and value < minimum:
        raise RequestError(f"{name} must be ≥ {minimum}, got {value}", param=name)
    if maximum is not None and value > maximum:
        raise RequestError(f"{name} must be ≤ {maximum}, got {value}", param=name)
    return value


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        raise RequestError(
            f"{name} must be a number in [{low:g}, {high:g}], got {value!r}", param=name
        )
    return float(value)
