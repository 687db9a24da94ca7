"""Batched greedy completions, shared by evaluation, the demo and the command line.

Prompts are left-padded so that every row's new tokens follow its own prompt directly; a
prompt is a text or a chat that the model's chat template renders.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .data.encoding import encode_prompt
from .methods.prefix import prompt_tokens
from .models.devices import model_device


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str | list[dict]],
    max_new_tokens: int,
    batch_size: int = 16,
    stop_at_newline: bool = True,
    progress: str | None = None,
) -> list[str]:
    """Greedy completions of ``prompts`` (batched, left-padded), without the prompt.

    A prompt is a text, or a chat (a list of ``{role, content}`` messages) that the
    model's chat template renders up to the assistant's reply. A prefix method's tokens go
    around each prompt: prefix + prompt + infix. ``progress`` names a progress bar over
    the prompts (none by default).
    """
    model.eval()
    device = model_device(model)
    tokens = prompt_tokens(model)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # new tokens must follow every prompt directly
    outputs: list[str] = []
    bar = None
    if progress is not None:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc=progress, unit="prompt")
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            rows = [encode_prompt(tokenizer, prompt, tokens) for prompt in chunk]
            encoded = tokenizer.pad({"input_ids": rows}, return_tensors="pt").to(device)
            generated = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new_tokens = generated[:, encoded["input_ids"].shape[1] :]
            for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True):
                outputs.append(text.split("\n")[0] if stop_at_newline else text)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        tokenizer.padding_side = side
        if bar is not None:
            bar.close()
    return outputs
