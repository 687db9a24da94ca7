"""Batched greedy completions, shared by evaluation, the demo and the command line.

A prompt is a text or a chat that the model's chat template renders. The Llama family
runs on loralab's engine (``engine/``): each row at its own positions (no padding), a
row that has ended (the end token, or a newline where only the first line is kept) stops
costing anything, and the step runs the model's tensors directly. Every other model, a
prefix method's virtual tokens, or generation settings the engine does not apply run
Transformers' ``generate`` over a left-padded batch, and the reason is said once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from .data.encoding import encode_prompt, newline_tokens
from .methods.prefix import prompt_tokens
from .models.devices import model_device

log = logging.getLogger("loralab.generate")

ENGINES = ("auto", "engine", "hf")
_default_engine = "auto"  # the command line's --engine, for everything a command generates
_default_weights = "fp32"  # and its --engine-weights (``engine/weights.py``)

# Settings of a generation config that change greedy tokens, which only Transformers'
# ``generate`` applies: with any of them set, the engine's tokens would differ.
_PROCESSORS = {
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "min_new_tokens": None,
    "min_length": 0,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "sequence_bias": None,
}

_said: set = set()  # the fallback reasons (and weights) already told, once each per process


def use_engine(engine: str, weights: str = "fp32") -> None:
    """What ``generate`` runs on when not told (``--engine``): one of ``ENGINES``, and the
    engine's base weights (``--engine-weights``: fp32, bf16, int8 or auto;
    ``engine/weights.py``)."""
    global _default_engine, _default_weights
    _check_engine(engine)
    from .engine.weights import WEIGHTS

    if weights not in WEIGHTS:
        raise ValueError(f"engine weights must be one of {', '.join(WEIGHTS)}, not {weights!r}")
    _default_engine, _default_weights = engine, weights


def _check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")


def engine_reason(model: nn.Module) -> str | None:
    """Why ``generate`` cannot run ``model`` on the engine (None: it can)."""
    from .engine import supported_reason

    reason = supported_reason(model)
    if reason is not None:
        return reason
    if prompt_tokens(model) is not None:
        return "a prefix method's virtual tokens ride in Transformers' own forward"
    config = getattr(model, "generation_config", None)
    for name, neutral in _PROCESSORS.items():
        value = getattr(config, name, neutral)
        if value is not None and value != neutral:
            return f"the model's generation config sets {name}={value!r}"
    return None


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str | list[dict]],
    max_new_tokens: int,
    batch_size: int = 16,
    stop_at_newline: bool = True,
    progress: str | None = None,
    engine: str | None = None,
    weights: str | None = None,
) -> list[str]:
    """Greedy completions of ``prompts`` (batched), without the prompt.

    A prompt is a text, or a chat (a list of ``{role, content}`` messages) that the
    model's chat template renders up to the assistant's reply. A prefix method's tokens go
    around each prompt: prefix + prompt + infix. ``progress`` names a progress bar over
    the prompts (none by default). ``engine``: ``auto`` (the engine where it runs the
    model, else Transformers'), ``engine`` (refused with the reason where it cannot) or
    ``hf`` (Transformers' ``generate`` always, for comparison); None: ``use_engine``'s.
    ``weights``: the engine's base weights, ``fp32`` (exact), ``bf16`` or ``auto`` (bf16
    where the CPU multiplies it natively; ``engine/weights.py``); None: ``use_engine``'s.
    """
    engine = _default_engine if engine is None else engine
    weights = _default_weights if weights is None else weights
    _check_engine(engine)
    reason = engine_reason(model) if engine != "hf" else "asked for"
    if reason is not None and engine == "engine":
        raise ValueError(f"the engine cannot generate here: {reason}")
    if reason is not None and engine == "auto" and reason not in _said:
        _said.add(reason)
        log.warning("generating with Transformers' generate: %s", reason)
    model.eval()
    if reason is None:
        weights = _weights_said(model, weights)
    run = _engine_batch if reason is None else _transformers_batch
    outputs: list[str] = []
    bar = None
    if progress is not None:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc=progress, unit="prompt")
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            texts = run(model, tokenizer, chunk, max_new_tokens, stop_at_newline, weights)
            outputs += [text.split("\n")[0] if stop_at_newline else text for text in texts]
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return outputs


def _weights_said(model: nn.Module, weights: str) -> str:
    """The engine's weights for ``weights`` on the model's device, told once unless fp32
    was asked for (the default, exact)."""
    from .engine.weights import choose

    chosen, why = choose(weights, model_device(model))
    if weights != "fp32" and (chosen, why) not in _said:
        _said.add((chosen, why))
        log.warning("the engine's weights: %s (%s)", chosen, why)
    return chosen


def _engine_batch(
    model: nn.Module, tokenizer, prompts, max_new_tokens: int, stop_at_newline: bool, weights: str
) -> list[str]:
    from .engine import decode

    rows = [encode_prompt(tokenizer, prompt) for prompt in prompts]
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if stop_at_newline:  # only the first line is kept: a row ends with its first newline
        stops += newline_tokens(tokenizer)
    new = decode(model, rows, max_new_tokens, stops, weights=weights)
    return tokenizer.batch_decode(new, skip_special_tokens=True)


def _transformers_batch(
    model: nn.Module, tokenizer, prompts, max_new_tokens: int, stop_at_newline: bool, weights: str
) -> list[str]:  # ``weights`` are the engine's: Transformers' runs the model's own
    tokens = prompt_tokens(model)
    rows = [encode_prompt(tokenizer, prompt, tokens) for prompt in prompts]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # new tokens must follow every prompt directly
    try:
        encoded = tokenizer.pad({"input_ids": rows}, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    encoded = encoded.to(model_device(model))
    generated = model.generate(
        **encoded,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    new_tokens = generated[:, encoded["input_ids"].shape[1] :]
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
