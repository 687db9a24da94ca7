"""PiSSA (``init="pissa"``) against PEFT's ``init_lora_weights="pissa"``: the same start,
and an adapter converted for the original base by either side runs the same on the other."""

from __future__ import annotations

import json

import peft
import pytest
import torch

import loralab
from conftest import make_model, randomize_lora, token_batch
from loralab import LoraConfig, TargetError
from loralab.lora.inject import lora_layers

TARGETS = ["q_proj", "v_proj", "down_proj"]
R, ALPHA = 4, 8


def _ours(init: str = "pissa", kind: str = "llama", targets=TARGETS):
    model = make_model(kind)
    loralab.inject_adapter(
        model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets, init=init)
    )
    return model


def _peft(init: str = "pissa"):
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=init)
    return peft.get_peft_model(make_model("llama"), config)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_the_start_is_w0s_principal_part_and_the_model_is_unchanged(kind):
    targets = TARGETS if kind == "llama" else ["c_attn", "c_fc"]
    tokens = token_batch()
    model = _ours(kind=kind, targets=targets)
    with torch.no_grad():
        torch.testing.assert_close(
            model(tokens).logits, make_model(kind)(tokens).logits, atol=1e-5, rtol=0
        )
    original = dict(make_model(kind).named_parameters())
    for name, layer in lora_layers(model).items():
        factors = layer.lora["default"]
        start = layer.delta_weight("default").double()  # s·B A, in the weight's layout
        weight = original[f"{name}.weight"].double()
        matrix = weight if kind == "llama" else weight.T  # GPT-2's Conv1D: (in, out)
        U, S, Vh = torch.linalg.svd(matrix)
        best = (U[:, :R] * S[:R]) @ Vh[:R]  # the best rank-r approximation (Eckart-Young)
        torch.testing.assert_close(start, best if kind == "llama" else best.T, atol=1e-5, rtol=0)
        torch.testing.assert_close(
            layer.base_layer.weight.double(), weight - start, atol=1e-5, rtol=0
        )
        assert factors.A.requires_grad and factors.B.requires_grad


def test_the_start_equals_peft_s_factors_up_to_sign_and_its_residual():
    ours, theirs = _ours(), _peft()
    peft_layers = {
        name.removeprefix("base_model.model."): module
        for name, module in theirs.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    }
    factors = residual = 0.0
    for name, layer in lora_layers(ours).items():
        mine, other = layer.lora["default"], peft_layers[name]
        their_a = other.lora_A["default"].weight
        their_b = other.lora_B["default"].weight
        signs = torch.sign((mine.A * their_a).sum(dim=1))  # a singular pair's sign is free
        torch.testing.assert_close(mine.A, their_a * signs[:, None], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(mine.B, their_b * signs[None, :], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(
            layer.base_layer.weight, other.base_layer.weight, atol=1e-6, rtol=0
        )
        factors = max(factors, (mine.A - their_a * signs[:, None]).abs().max().item())
        factors = max(factors, (mine.B - their_b * signs[None, :]).abs().max().item())
        gap = (layer.base_layer.weight - other.base_layer.weight).abs().max().item()
        residual = max(residual, gap)
    print(f"PiSSA against PEFT at step 0: factors {factors:.1e}, residual W0 {residual:.1e}")


def test_ours_converted_runs_the_same_in_peft_on_the_original_base(tmp_path):
    tokens = token_batch()
    model = _ours()
    randomize_lora(model)  # trained
    with torch.no_grad():
        trained = model.eval()(tokens).logits
    loralab.save_adapter(model, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (written["r"], written["lora_alpha"], written["init_lora_weights"]) == (
        2 * R,
        2 * ALPHA,
        True,
    )
    theirs = peft.PeftModel.from_pretrained(make_model("llama"), tmp_path).eval()
    with torch.no_grad():
        logits = theirs(tokens).logits
    print(f"PiSSA, loralab's converted adapter in PEFT: max |Δlogits| {_gap(logits, trained):.1e}")
    torch.testing.assert_close(logits, trained, atol=1e-5, rtol=0)


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_peft_s_converted_runs_the_same_in_loralab_on_the_original_base(tmp_path):
    tokens = token_batch()
    theirs = _peft()
    theirs.peft_config["default"].init_lora_weights = True  # PEFT's recipe for the start
    theirs.save_pretrained(tmp_path / "initial")
    theirs.peft_config["default"].init_lora_weights = "pissa"
    randomize_lora(theirs)  # trained
    with torch.no_grad():
        trained = theirs.eval()(tokens).logits
    theirs.save_pretrained(
        tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial")
    )
    ours = loralab.load_adapter(make_model("llama"), tmp_path / "converted")
    with torch.no_grad():
        logits = ours.eval()(tokens).logits
    print(f"PiSSA, PEFT's converted adapter in loralab: max |Δlogits| {_gap(logits, trained):.1e}")
    torch.testing.assert_close(logits, trained, atol=1e-5, rtol=0)


def test_the_randomized_svd_starts_the_same_on_every_load_and_nearly_as_well():
    """The same start on every load (a resumed run repeats it), and a residual nearly as
    small as the exact SVD's (a random matrix's flat spectrum is its hardest case)."""
    fast, again, full = _ours("pissa_niter_4"), _ours("pissa_niter_4"), _ours()
    for name, layer in lora_layers(fast).items():
        assert torch.equal(
            layer.delta_weight("default"), lora_layers(again)[name].delta_weight("default")
        )
        residual = layer.base_layer.weight.norm()
        exact = lora_layers(full)[name].base_layer.weight.norm()
        assert exact <= residual < 1.05 * exact


def test_pissa_refuses_what_has_no_single_matrix_before_touching_the_model():
    for options, where in (
        ({"target_modules": ["c_attn[q,v]"]}, "LoraFusedLinear"),
        ({"target_modules": ["q_proj"], "use_dora": True}, "DoraLinear"),
    ):
        kind = "gpt2" if "c_attn[q,v]" in options["target_modules"] else "llama"
        model = make_model(kind)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(TargetError, match=rf"init='pissa' cannot start .*{where} has none"):
            loralab.inject_adapter(model, LoraConfig(r=2, init="pissa", **options))
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_pissa_run_stopped_and_resumed_ends_with_the_same_adapter(
    tmp_path, tiny_model_dir, monkeypatch
):
    """The checkpoint holds the adapter as trained, with its init named: a resume runs the
    init again on the original base and goes on from the same residual and factors."""
    import os
    import signal

    from safetensors.torch import load_file

    import loralab.training.loop as loop
    from tiny_runs import run_config, tiny_pair

    def run(name: str, **options) -> None:
        model, tokenizer = tiny_pair(tiny_model_dir)
        config = run_config(tmp_path, name, init="pissa", save_every=0, **options)
        loop.train(config, model=model, tokenizer=tokenizer)

    run("straight")
    real_step, calls = loop._optimizer_step, []

    def step_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "_optimizer_step", step_then_interrupt)
    with pytest.raises(loop.TrainingInterrupted):
        run("stopped")
    monkeypatch.setattr(loop, "_optimizer_step", real_step)
    run("stopped", resume=True)
    straight, resumed = (
        load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")
        for name in ("straight", "stopped")
    )
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    written = json.loads((tmp_path / "straight" / "adapter" / "adapter_config.json").read_text())
    assert written["init_lora_weights"] is True and written["r"] == 8  # converted, 2r
