"""Decoding a batch of prompts through the engine: the prompts prefilled in one
right-padded pass (each row at its own positions, no left padding), then one step per
new token for every running row, each at its own position; a row that stops leaves the
batch at once (the last row takes its place in the cache). Each row chooses its tokens
greedily or samples with its own settings and seed."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .runner import Runner
from .sampling import RowSampling, choose


def decode_greedy(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
) -> list[list[int]]:
    """The greedy continuation of each prompt (token ids): ``decode`` without sampling."""
    return decode(model, prompts, max_new_tokens, stop_ids)


@torch.no_grad()
def decode(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
    sampling: Sequence[RowSampling] | None = None,
    row_adapters: Sequence[str | None] | None = None,
    weights: str = "fp32",
) -> list[list[int]]:
    """The continuation of each prompt (token ids), up to ``max_new_tokens`` tokens and
    ending with the first of ``stop_ids`` it produces (which is kept); row ``i`` chooses
    as ``sampling[i]`` says (None: every row greedy) and runs adapter ``row_adapters[i]``
    (None there: the bare base; no list: every row the layers' active adapter);
    ``weights``: the base weights' format (``weights.WEIGHTS``; fp32 is exact)."""
    if any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("every prompt needs at least one token")
    rows_sampling = list(sampling) if sampling is not None else [RowSampling()] * len(prompts)
    if len(rows_sampling) != len(prompts):
        raise ValueError(f"{len(rows_sampling)} sampling settings for {len(prompts)} prompts")
    if row_adapters is not None and len(row_adapters) != len(prompts):
        raise ValueError(f"{len(row_adapters)} row adapters for {len(prompts)} prompts")
    device = model.get_input_embeddings().weight.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    rows, longest = len(prompts), int(lengths.max())
    runner = Runner(model, rows, longest + max_new_tokens, weights)
    plan = runner.plan(row_adapters)
    tokens = torch.zeros(rows, longest, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = torch.as_tensor(prompt, device=device)
    positions = torch.arange(longest, device=device).expand(rows, longest)
    hidden = runner.forward(plan, tokens, positions)
    last = hidden[torch.arange(rows, device=device), lengths - 1]  # each row's last real token
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    temperature = torch.tensor([r.temperature for r in rows_sampling], device=device)
    top_p = torch.tensor([r.top_p for r in rows_sampling], device=device)
    uniform = torch.tensor([r.draw() for r in rows_sampling], device=device)
    chosen = choose(runner.logits(plan, last), temperature, top_p, uniform)
    outputs: list[list[int]] = [[] for _ in range(rows)]
    live = list(range(rows))  # the prompt each cache row continues
    position = lengths
    for step in range(max_new_tokens):
        for row, token in zip(live, chosen.tolist(), strict=True):
            outputs[row].append(token)
        ended = torch.isin(chosen, stops).nonzero().flatten().tolist()
        if len(ended) == len(live) or step == max_new_tokens - 1:
            break
        if ended:  # a row that ended costs nothing more: the last row takes its place
            keep = runner.cache.drop(ended, len(live), position.tolist())
            live = [live[i] for i in keep]
            chosen, position = chosen[keep], position[keep]
            temperature, top_p = temperature[keep], top_p[keep]
            if row_adapters is not None:
                plan = runner.plan([row_adapters[i] for i in live], checked=plan)
        uniform = torch.tensor([rows_sampling[i].draw() for i in live], device=device)
        chosen = runner.decode_step(plan, chosen, position, temperature, top_p, uniform)
        position = position + 1
    return outputs
