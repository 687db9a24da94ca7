"""A training run that adapts an MoE's stacked expert weights (``target_parameters``):
the loss falls, and the adapter it writes loads back into the base as it trained."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import char_tokenizer
from loralab import load_adapter
from loralab.lora.config import ConfigError
from loralab.training.loop import train
from moe_models import tiny_moe
from tiny_runs import run_config


def test_a_run_trains_the_experts_and_its_adapter_loads_back(tmp_path):
    tokenizer = char_tokenizer()
    base = tiny_moe("qwen3_moe")
    base.resize_token_embeddings(len(tokenizer))
    config = run_config(
        tmp_path,
        target_modules=["q"],
        target_parameters=["experts"],
        lora_dropout=0.0,
        learning_rate=2e-2,
        max_steps=8,
        save_every=4,
        eval_every=0,
    )
    result = train(config, model=copy.deepcopy(base), tokenizer=tokenizer)
    assert result.losses[-1] < result.losses[0]
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "run" / "adapter").eval()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(ids).logits, result.model.eval()(ids).logits, atol=1e-5, rtol=0
        )


def test_only_lora_adapts_expert_weights(tmp_path):
    with pytest.raises(ConfigError, match="method='adalora' does not"):
        run_config(tmp_path, method="adalora", target_parameters=["experts"], lora_dropout=0.0)


def test_the_command_line_adapts_the_experts_alone():
    """``--target-modules`` with no name and ``--target-parameters experts``: a config of
    experts only, as PEFT writes it (``target_modules: []``)."""
    from loralab.cli import build_parser
    from loralab.training.config import TrainConfig

    args = build_parser().parse_args(
        ["train", "--task", "e2e", "--target-modules", "--target-parameters", "experts"]
    )
    config = TrainConfig(
        **{k: v for k, v in vars(args).items() if k not in ("command", "config", "overwrite")}
    )
    assert config.target_modules == [] and config.lora_config().target_parameters == ["experts"]
