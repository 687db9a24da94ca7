"""A run's settings: validated once, with the field and value named; read from YAML."""

import pytest

from loralab.lora.config import ConfigError
from loralab.training.config import TrainConfig, config_from_file


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


def test_every_lora_setting_is_a_run_setting_declared_once_with_lora_configs_defaults(tmp_path):
    """LoRA's settings are LoraConfig's fields, with its defaults: all of them can be set
    from a file (a config's use_rslora was once "did you mean use_dora?")."""
    import dataclasses

    from loralab.lora.config import LoraConfig

    assert TrainConfig().lora_config() == LoraConfig()
    path = tmp_path / "run.yaml"
    path.write_text(
        "use_rslora: true\nbias: lora_only\ninit: gaussian\nrank_pattern: {q: 16}\n"
        "alpha_pattern: {q: 32}\nlayers_to_transform: [0]\nexclude_modules: [k]\n"
    )
    lora = config_from_file(path).lora_config()
    assert lora.use_rslora and (lora.bias, lora.init) == ("lora_only", "gaussian")
    assert (lora.rank_pattern, lora.alpha_pattern) == ({"q": 16}, {"q": 32})
    assert (lora.layers_to_transform, lora.exclude_modules) == ([0], ["k"])
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(LoraConfig.field_names()) <= fields
    with pytest.raises(ConfigError, match="bias must be one of"):
        TrainConfig(bias="some")


def test_each_setting_is_in_one_section_of_the_help_and_the_saved_config():
    import dataclasses

    from loralab.training.config import SECTIONS

    listed = [name for names in SECTIONS.values() for name in names]
    assert sorted(listed) == sorted(f.name for f in dataclasses.fields(TrainConfig))
    assert list(TrainConfig().to_dict()) == listed


def test_epochs_count_the_steps_from_the_examples_kept():
    config = TrainConfig(epochs=2.5, batch_size=4, gradient_accumulation=2)
    assert config.max_steps is None and TrainConfig().max_steps == 100
    assert config.steps_per_epoch(17) == 3  # 17 examples, 8 a step: the last step is short
    resolved = config.with_steps(17)
    assert (resolved.max_steps, resolved.epochs) == (8, None)  # ceil(2.5 × 3)
    with pytest.raises(ConfigError, match="both say how long to train; give one"):
        TrainConfig(epochs=1, max_steps=10)
    with pytest.raises(ConfigError, match="epochs must be a finite number > 0"):
        TrainConfig(epochs=0)
    with pytest.raises(ConfigError, match="warmup_steps=20 is longer than the run"):
        TrainConfig(epochs=1, warmup_steps=20).with_steps(16)
    with pytest.raises(ConfigError, match="give max_steps instead of epochs"):
        TrainConfig(epochs=1, method="adalora")
