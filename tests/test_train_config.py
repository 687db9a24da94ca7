"""A run's settings: validated once, with the field and value named; read from YAML."""

import pytest

from loralab.config import ConfigError
from loralab.train_config import TrainConfig, config_from_file


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_steps": 0}, r"max_steps must be an integer ≥ 1, got 0"),
        ({"learning_rate": 5.0}, r"learning_rate must be a number in \(0, 1\), got 5.0"),
        ({"schedule": "exp"}, r"schedule must be one of"),
        ({"warmup_steps": 200, "max_steps": 100}, r"warmup_steps=200 is longer than max_steps=100"),
        ({"r": -1}, r"r must be an integer ≥ 1, got -1"),
        ({"lora_dropout": 1.5}, r"lora_dropout must be a number in \[0, 1\)"),
        ({"task": None, "data": None}, r"give a built-in task"),
        ({"model_kind": "seq2seq"}, r"model_kind must be one of"),
    ],
)
def test_out_of_range_settings_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**settings)


def test_yaml_config_with_command_line_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("r: 16\nlearning_rate: 0.001\ntarget_modules: [q, k, v]\n")
    config = config_from_file(path, {"learning_rate": 0.002})
    assert (config.r, config.learning_rate, config.target_modules) == (16, 0.002, ["q", "k", "v"])
    path.write_text("lora_alfa: 4\n")
    with pytest.raises(
        ConfigError, match=r"unknown setting 'lora_alfa'; did you mean 'lora_alpha'"
    ):
        config_from_file(path)
    path.write_text("r: [1\n")
    # one line: PyYAML's own message quotes the line on several
    with pytest.raises(
        ConfigError,
        match=r"run.yaml, line 2, column 1: malformed YAML \(while parsing a flow sequence; "
        r"expected ',' or '\]', but got '<stream end>'\)$",
    ):
        config_from_file(path)
    path.write_text("r: 0\n")
    with pytest.raises(ConfigError, match=r"run.yaml: r must be"):
        config_from_file(path)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"r": 4, "target_r": 8}, "target_r=8 is larger than init_r=4"),
        ({"max_steps": 10, "adalora_tinit": 6, "adalora_tfinal": 4}, "tinit"),
        ({"adalora_delta_t": 0}, "deltaT"),
    ],
)
def test_adalora_settings_that_do_not_fit_are_refused_before_training(settings, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(task="e2e", method="adalora", **settings)
