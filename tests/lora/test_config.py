"""LoraConfig: validated at construction, errors name the field and the value."""

import pytest

from loralab import ConfigError, LoraConfig


def test_defaults_are_the_papers_choice():
    config = LoraConfig()
    assert config.target_modules == ["q", "v"]
    assert config.bias == "none" and config.init == "kaiming"
    assert config.scale(config.r, config.lora_alpha) == config.lora_alpha / config.r


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, r"r must be an integer ≥ 1, got 0"),
        ({"r": -3}, r"r must be an integer ≥ 1, got -3"),
        ({"r": 2.5}, r"r must be an integer"),
        ({"r": True}, r"r must be an integer"),
        ({"lora_alpha": 0}, r"lora_alpha must be a finite number > 0, got 0"),
        ({"lora_alpha": -1.0}, r"lora_alpha .* got -1.0"),
        ({"lora_alpha": float("inf")}, r"lora_alpha .* got inf"),
        ({"lora_dropout": 1.0}, r"lora_dropout must be a number in \[0, 1\), got 1.0"),
        ({"lora_dropout": -0.1}, r"lora_dropout must be a number in \[0, 1\), got -0.1"),
        ({"lora_dropout": "0.1"}, r"lora_dropout must be a number"),
        ({"bias": "some"}, r"bias must be one of 'none', 'all', 'lora_only', got 'some'"),
        ({"init": "loftq"}, r"init must be one of 'kaiming', 'gaussian'.*, got 'loftq'"),
        ({"target_modules": []}, r"target_modules is an empty list"),
        ({"target_modules": ["q", 3]}, r"target_modules entries must be non-empty strings"),
        ({"target_modules": "(unclosed"}, r"target_modules '\(unclosed' is not a valid regex"),
        ({"target_modules": 5}, r"target_modules must be a list of names or a regex"),
        (
            {"rank_pattern": {"q_proj": 0}},
            r"rank_pattern\['q_proj'\] must be an integer ≥ 1, got 0",
        ),
        ({"rank_pattern": ["q_proj"]}, r"rank_pattern must be a dict"),
        ({"alpha_pattern": {"v": -2}}, r"alpha_pattern\['v'\] must be a finite number > 0"),
        ({"alpha_pattern": {"[": 2}}, r"alpha_pattern key '\[' is not a valid regex"),
        (
            {"layers_to_transform": [0, -1]},
            r"layers_to_transform entry must be an integer ≥ 0, got -1",
        ),
        ({"layers_to_transform": "0"}, r"layers_to_transform must be an int, a list"),
        ({"layers_pattern": "layers"}, r"layers_pattern is set but layers_to_transform is None"),
        ({"use_rslora": "yes"}, r"use_rslora must be true or false, got 'yes'"),
        ({"modules_to_save": "classifier"}, r"modules_to_save must be a list of module names"),
    ],
)
def test_bad_values_are_refused_naming_the_field(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LoraConfig(**kwargs)


def test_accepted_forms_are_normalised():
    config = LoraConfig(target_modules=("q_proj", "v_proj"), layers_to_transform=3)
    assert config.target_modules == ["q_proj", "v_proj"]
    assert config.layers_to_transform == [3]
    assert LoraConfig(target_modules="all-linear").target_modules == "all-linear"
    assert LoraConfig(target_modules=r".*\.q_proj").target_modules == r".*\.q_proj"


def test_rank_and_alpha_patterns_match_name_suffixes_and_short_names():
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        rank_pattern={"q_proj": 2, "v": 4},
        alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3},
    )
    assert config.rank_for("model.layers.0.self_attn.q_proj") == 2
    assert config.rank_for("model.layers.0.self_attn.k_proj") == 8
    # a key matches the end of the name at a dot boundary, never inside a word
    assert config.rank_for("model.layers.0.self_attn.xq_proj") == 8
    # short names count when the module was selected through them
    assert config.rank_for("model.layers.0.self_attn.v_proj", ("v",)) == 4
    assert config.alpha_for("model.layers.1.self_attn.q_proj") == 3
    assert config.alpha_for("model.layers.0.self_attn.q_proj") == 16


def test_rslora_scale():
    config = LoraConfig(r=16, lora_alpha=8, use_rslora=True)
    assert config.scale(16, 8) == pytest.approx(2.0)
    assert LoraConfig(r=16, lora_alpha=8).scale(16, 8) == pytest.approx(0.5)
