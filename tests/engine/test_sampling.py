"""Choosing the next token: greedy where the temperature is 0, otherwise exactly the
tempered, top-p-cut distribution (checked by walking the uniform numbers over a grid),
each row with its own settings and a seed that makes its draws repeat."""

from __future__ import annotations

import pytest
import torch

from conftest import make_model
from loralab.engine import RowSampling, choose, decode, decode_greedy

LOGITS = torch.log(torch.tensor([0.1, 0.5, 0.1, 0.3]))  # most likely: 1, then 3


def _counts(temperature: float, top_p: float, draws: int = 1000) -> list[int]:
    """How often each token is chosen when the uniform number walks a grid of ``draws``."""
    uniform = (torch.arange(draws) + 0.5) / draws
    logits = LOGITS.expand(draws, -1)
    rows = torch.full((draws,), temperature), torch.full((draws,), top_p)
    chosen = choose(logits, *rows, uniform)
    return torch.bincount(chosen, minlength=4).tolist()


def test_temperature_zero_is_the_argmax_whatever_the_draw():
    assert _counts(0.0, 1.0) == [0, 1000, 0, 0]


def test_the_draws_follow_the_distribution():
    assert _counts(1.0, 1.0) == [100, 500, 100, 300]


def test_top_p_keeps_the_smallest_set_reaching_it():
    # 0.5 alone is short of 0.7, so 3 (0.3) joins; the rest is cut: 5 : 3
    assert _counts(1.0, 0.7) == [0, 625, 0, 375]
    assert _counts(1.0, 1e-6) == [0, 1000, 0, 0]  # only the most likely


def test_the_temperature_flattens_or_sharpens():
    expected = (LOGITS / 2).softmax(-1) * 1000
    counts = _counts(2.0, 1.0)
    assert all(abs(c - e) <= 1 for c, e in zip(counts, expected.tolist(), strict=True))


def test_each_row_its_own_settings():
    logits = LOGITS.expand(3, -1)
    temperature, top_p = torch.tensor([0.0, 1.0, 1.0]), torch.ones(3)
    chosen = choose(logits, temperature, top_p, torch.tensor([0.99, 0.6, 0.05]))
    # greedy whatever the draw; then the most likely first: 1 up to 0.5, 3 up to 0.8
    assert chosen.tolist() == [1, 3, 1]


def test_a_seed_repeats_the_draws_and_bad_settings_are_named():
    one, other = RowSampling(1.0, seed=7), RowSampling(1.0, seed=7)
    assert [one.draw() for _ in range(3)] == [other.draw() for _ in range(3)]
    assert RowSampling().draw() == 0.0  # a greedy row draws nothing
    with pytest.raises(ValueError, match="temperature must be ≥ 0, got -1"):
        RowSampling(temperature=-1)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 0"):
        RowSampling(temperature=1, top_p=0)


def test_decoding_with_seeds_repeats_and_greedy_rows_stay_greedy():
    torch.manual_seed(0)
    model = make_model("llama").eval()
    prompts = [[5, 17, 40], [2, 9, 11, 3]]

    def sampled(seed: int) -> list[list[int]]:
        rows = [RowSampling(temperature=1.5, top_p=0.9, seed=seed), RowSampling()]
        return decode(model, prompts, 12, sampling=rows)

    first, again, other = sampled(1), sampled(1), sampled(2)
    assert first == again and first[0] != other[0]
    assert first[1] == other[1] == decode_greedy(model, prompts, 12)[1]
    with pytest.raises(ValueError, match="1 sampling settings for 2 prompts"):
        decode(model, prompts, 4, sampling=[RowSampling()])
    with pytest.raises(ValueError, match="every prompt needs at least one token"):
        decode(model, [[1], []], 4)


@pytest.mark.parametrize("top_p", [1.0, 0.9, 0.5])
def test_the_head_first_draw_is_the_full_sort_s_draw(top_p):
    """Past ``HEAD_TOKENS`` tokens the draw is looked for among the most likely first; the
    tokens chosen are those of the draw on the whole sorted vocabulary, in the head and in
    the tail (where a fifth of the mass lies here)."""
    from loralab.engine.sampling import HEAD_TOKENS, _from_sorted

    generator = torch.Generator().manual_seed(0)
    vocabulary = 4 * HEAD_TOKENS
    logits = torch.randn(vocabulary, generator=generator)
    draws = 4000
    uniform = (torch.arange(draws) + 0.5) / draws
    rows = logits.expand(draws, -1)
    temperature, nucleus = torch.ones(draws), torch.full((draws,), top_p)
    chosen = choose(rows, temperature, nucleus, uniform)
    reference = _from_sorted(rows.softmax(-1), nucleus, uniform)
    assert (chosen != reference).sum() <= 2  # a draw on a boundary may round either way
    probabilities = logits.softmax(-1)
    tail = probabilities.sort(descending=True).values[HEAD_TOKENS:].sum()
    assert top_p < 1 or tail > 0.05  # the tail is drawn from, not only the head
