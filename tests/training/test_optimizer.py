"""The optimizer's groups: a classifier's head at its own rate, and LoRA+ (B's factors and
the 1-D parameters at λ times the rate), as PEFT's ``create_loraplus_optimizer`` groups."""

from __future__ import annotations

import peft
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer

import loralab
from conftest import make_model
from loralab import LoraConfig
from loralab.lora.config import ConfigError
from loralab.training.config import TrainConfig
from loralab.training.optimizer import build_optimizer, parameter_groups


def _rates(optimizer) -> dict[int, float]:
    return {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}


@pytest.mark.parametrize("use_dora", [False, True])
def test_loraplus_gives_each_parameter_peft_s_rate(use_dora):
    targets = ["q_proj", "v_proj"]
    ours = make_model("llama")
    loralab.inject_adapter(ours, LoraConfig(r=4, target_modules=targets, use_dora=use_dora))
    config = TrainConfig(learning_rate=1e-3, loraplus_lr_ratio=16, use_dora=use_dora)
    parameters = [p for p in ours.parameters() if p.requires_grad]
    optimizer, _ = build_optimizer(config, parameter_groups(ours, config, parameters))
    rates = _rates(optimizer)
    theirs = peft.get_peft_model(
        make_model("llama"), peft.LoraConfig(r=4, target_modules=targets, use_dora=use_dora)
    )
    their_optimizer = create_loraplus_optimizer(
        theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16
    )
    their_rates = _rates(their_optimizer)
    names = {  # PEFT's name of each of our factors
        ".lora.default.A": ".lora_A.default.weight",
        ".lora.default.B": ".lora_B.default.weight",
        ".lora.default.magnitude": ".lora_magnitude_vector.default.weight",
    }
    theirs_by_name = dict(theirs.named_parameters())
    seen = set()
    for name, parameter in ours.named_parameters():
        if not parameter.requires_grad:
            continue
        suffix = next(s for s in names if name.endswith(s))
        their_name = "base_model.model." + name.removesuffix(suffix) + names[suffix]
        assert rates[id(parameter)] == pytest.approx(their_rates[id(theirs_by_name[their_name])]), (
            name
        )
        seen.add(suffix)
    assert {".lora.default.A", ".lora.default.B"} <= seen
    assert sorted(set(rates.values())) == [1e-3, 16e-3]


def test_without_loraplus_one_group_and_refusals_name_the_reason():
    model = make_model("llama")
    loralab.inject_adapter(model, LoraConfig(r=4))
    parameters = [p for p in model.parameters() if p.requires_grad]
    assert parameter_groups(model, TrainConfig(), parameters) is parameters
    with pytest.raises(ConfigError, match="method='full' trains none"):
        TrainConfig(method="full", loraplus_lr_ratio=16)
    with pytest.raises(ConfigError, match="loraplus_lr_ratio must be a finite number > 0"):
        TrainConfig(loraplus_lr_ratio=0)
    with pytest.raises(ConfigError, match="fsdp trains every parameter at one learning rate"):
        TrainConfig(loraplus_lr_ratio=16, fsdp=True)


def test_a_loraplus_run_trains_and_its_b_factors_move_faster(tmp_path, tiny_model_dir):
    from loralab.training.loop import train
    from tiny_runs import run_config, tiny_pair

    moved = {}
    for ratio in (None, 16.0):
        model, tokenizer = tiny_pair(tiny_model_dir)
        name = f"ratio-{ratio}"
        config = run_config(tmp_path, name, loraplus_lr_ratio=ratio, learning_rate=1e-3)
        result = train(config, model=model, tokenizer=tokenizer)
        assert all(torch.isfinite(torch.tensor(result.losses)))
        factors = [f for layer in loralab.lora_layers(model).values() for f in layer.lora.values()]
        moved[ratio] = sum(float(f.B.detach().norm()) for f in factors)
    assert moved[16.0] > 4 * moved[None]  # B starts at zero: its size is what it moved
