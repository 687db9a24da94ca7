"""A config's regexes: re's syntax where PEFT places them, matched under a time bound."""

from __future__ import annotations

import re
import time

import pytest

from conftest import tiny_llama
from loralab import ConfigError, LoraConfig
from loralab.lora import patterns
from loralab.lora.inject import TargetError, base_module_names, layer_index, plan_targets

NAMES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.11.self_attn.v_proj",
    "model.layers.3.mlp.down_proj",
    "vision_tower.encoder.layers.2.self_attn.q_proj",
    "transformer.h.7.attn.c_attn",
    "lm_head",
    "model.embed_tokens",
]
# What PEFT users write: plain names, alternations, anchors, classes, look-ahead.
SOURCES = [
    r"q_proj",
    r".*\.(q_proj|v_proj)",
    r"model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj",
    r"^(?!.*vision).*q_proj",
    r".*(?<!vision_tower\.)layers\.[0-9]+\..*proj",
    r"(?:.*\.)?h\.\d+\.attn\.c_attn",
    r"[a-z_]+",
    r"model\.layers\.1[01]\..*",
    r"(?i)LM_HEAD",
]


@pytest.mark.parametrize("source", SOURCES)
def test_matching_equals_re_on_what_peft_users_write(source):
    for name in NAMES:
        assert bool(patterns.fullmatch("f", source, name)) == bool(re.fullmatch(source, name))
        try:
            expected = bool(re.match(rf"(.*\.)?({source})$", name))
        except re.error:  # (?i) is no longer at the start: PEFT's re refuses it too
            with pytest.raises(patterns.PatternError):
                patterns.match("f", source, name, patterns.NAME_END)
            continue
        assert bool(patterns.match("f", source, name, patterns.NAME_END)) == expected


def test_layer_indices_are_read_as_before():
    for name in NAMES:
        for source in ("layers", "h", ["h", "layers"]):
            match = None
            for each in [source] if isinstance(source, str) else source:
                match = match or re.match(rf"(?:^|.*?\.){each}\.(?P<idx>\d+)\.", name)
            assert layer_index(name, source) == (int(match["idx"]) if match else None)


@pytest.mark.parametrize(
    "config, words",
    [
        ({"rank_pattern": {"(?i)q_proj": 4}}, "rank_pattern key '(?i)q_proj' is not a valid"),
        ({"alpha_pattern": {"(?i)q_proj": 4}}, "alpha_pattern key '(?i)q_proj' is not a valid"),
        (
            {"layers_pattern": "(?P<idx>layers)", "layers_to_transform": [0]},
            "layers_pattern '(?P<idx>layers)' is not a valid regex (as PEFT reads it",
        ),
        (
            {"layers_pattern": ["layers", "h("], "layers_to_transform": [0]},
            "layers_pattern 'h(' is not a valid regex",
        ),
        ({"target_modules": "x" * 100_001}, "at most 100000 are allowed"),
    ],
)
def test_a_pattern_invalid_where_peft_places_it_is_refused_naming_it(config, words):
    with pytest.raises(ConfigError) as caught:
        LoraConfig(**config)
    assert words in str(caught.value)


def test_a_pattern_that_backtracks_without_end_stops_at_the_bound(monkeypatch):
    monkeypatch.setattr(patterns, "MATCH_SECONDS", 0.2)
    model = tiny_llama()
    config = LoraConfig(target_modules=r"(.*){1,22}[bc]")  # valid: only its matching is slow
    started = time.monotonic()
    with pytest.raises(TargetError) as caught:
        plan_targets(model, config)
    assert time.monotonic() - started < 5
    assert "target_modules '(.*){1,22}[bc]' took too long" in str(caught.value)
    assert "backtracks catastrophically" in str(caught.value)


def test_one_deadline_bounds_every_match_inside_it():
    names = [n for n in base_module_names(tiny_llama()) if n]
    slow = LoraConfig(rank_pattern={r"(.*){1,22}[bc]": 2})
    started = time.monotonic()
    with pytest.raises(patterns.PatternError), patterns.matching_deadline(0.3):
        slow.match_patterns(names)
    assert time.monotonic() - started < 3
    LoraConfig(rank_pattern={"q_proj": 2}, target_modules=".*proj").match_patterns(names)
