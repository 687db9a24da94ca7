"""DoRA: W = m · (W0 + s·B A) / ‖W0 + s·B A‖ per output row, the norm constant in the
backward pass; PEFT's files both ways, exact merge and unmerge, clear refusals."""

import json

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import loralab
from conftest import load_tiny_causal_lm, make_model, randomize_lora, token_batch
from loralab import DoraConv1D, DoraLinear, LoraConfig, TargetError
from loralab.cli import main
from loralab.lora.mixing import mixed_adapters

R, ALPHA = 4, 8.0
SCALE = ALPHA / R
TARGETS = {
    "llama": (["q", "v", "o"], ["q_proj", "v_proj", "o_proj"]),
    "gpt2": (["c_attn", "c_proj"],) * 2,
}


def _randomized(layer: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in layer.lora["default"].parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return layer


@pytest.mark.parametrize("conv1d", [False, True])
def test_the_layer_computes_the_formula_and_starts_as_its_base(conv1d):
    torch.manual_seed(0)
    base = Conv1D(6, 10) if conv1d else nn.Linear(10, 6)
    weight = (base.weight.T if conv1d else base.weight).detach()  # (out, in)
    layer = (DoraConv1D if conv1d else DoraLinear)(base)
    layer.add_adapter("default", R, ALPHA, SCALE, 0.0, "kaiming")
    x = torch.randn(3, 5, 10)
    torch.testing.assert_close(layer(x), base(x))  # B = 0 and m = ‖W0‖: W = W0 at step 0
    torch.testing.assert_close(layer.lora["default"].magnitude, weight.norm(dim=1))
    _randomized(layer)
    f = layer.lora["default"]
    adapted = weight + SCALE * f.B @ f.A
    merged = f.magnitude[:, None] * adapted / adapted.norm(dim=1, keepdim=True)
    expected = x @ merged.T + base.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    delta = layer.delta_weight()
    torch.testing.assert_close(delta, (merged - weight).T if conv1d else merged - weight)


def test_the_norm_is_a_constant_in_the_backward_pass():
    torch.manual_seed(0)
    layer = DoraLinear(nn.Linear(8, 5))
    layer.add_adapter("default", R, ALPHA, SCALE, 0.0, "kaiming")
    _randomized(layer)
    f = layer.lora["default"]
    x = torch.randn(4, 8)
    layer(x).pow(2).sum().backward()
    weight = layer.base_layer.weight.detach()
    A, B, m = (t.detach().clone().requires_grad_(True) for t in (f.A, f.B, f.magnitude))
    norm = (weight + SCALE * B.detach() @ A.detach()).norm(dim=1)  # no gradient through it
    by_hand = x @ (m[:, None] * (weight + SCALE * B @ A) / norm[:, None]).T + layer.base_layer.bias
    by_hand.pow(2).sum().backward()
    for ours, theirs in ((f.A, A), (f.B, B), (f.magnitude, m)):
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_peft_reads_what_loralab_saves(kind, tmp_path):
    targets, _ = TARGETS[kind]
    tokens = token_batch()
    model = make_model(kind)
    loralab.inject_adapter(
        model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets, use_dora=True)
    )
    randomize_lora(model, seed=3)
    loralab.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    names = load_file(tmp_path / "adapter_model.safetensors")
    assert any(name.endswith(".lora_magnitude_vector") for name in names)
    theirs = peft.PeftModel.from_pretrained(make_model(kind), tmp_path).eval()
    with torch.no_grad():
        ours, peft_logits = model.eval()(tokens).logits, theirs(tokens).logits
        base = make_model(kind)(tokens).logits
    print(f"{kind}: loralab -> PEFT, max |Δlogits| = {(ours - peft_logits).abs().max():.2e}")
    torch.testing.assert_close(ours, peft_logits, atol=1e-6, rtol=0)
    assert (ours - base).abs().max() > 0.1  # the adapter does something


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_loralab_reads_what_peft_saves_and_trains_as_peft_does(kind, tmp_path):
    _, peft_targets = TARGETS[kind]
    tokens = token_batch()
    config = peft.LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=peft_targets, use_dora=True,
        fan_in_fan_out=kind == "gpt2",
    )  # fmt: skip
    theirs = peft.get_peft_model(make_model(kind), config)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if "lora_" in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)
    theirs.save_pretrained(tmp_path)
    ours = loralab.load_adapter(make_model(kind), tmp_path)
    assert all(isinstance(layer, DoraLinear) for layer in loralab.lora_layers(ours).values())
    with torch.no_grad():
        difference = (ours.eval()(tokens).logits - theirs.eval()(tokens).logits).abs().max()
    print(f"{kind}: PEFT -> loralab, max |Δlogits| = {difference:.2e}")
    assert difference <= 1e-6
    ours.train()
    theirs.train()
    ours(tokens, labels=tokens).loss.backward()
    theirs(tokens, labels=tokens).loss.backward()
    their_grads = {
        n.removeprefix("base_model.model.").replace(".default", ""): p.grad
        for n, p in theirs.named_parameters()
        if p.grad is not None
    }
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    assert len(ours_grads) == len(their_grads) > 0
    for name, grad in ours_grads.items():
        key = (
            name.replace(".lora.default.A", ".lora_A.weight")
            .replace(".lora.default.B", ".lora_B.weight")
            .replace(".lora.default.magnitude", ".lora_magnitude_vector.weight")
        )
        torch.testing.assert_close(grad, their_grads[key], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merge_and_unmerge_are_exact_and_the_state_dict_merge_agrees(kind, tmp_path):
    targets, _ = TARGETS[kind]
    tokens = token_batch()
    model = make_model(kind)
    loralab.inject_adapter(
        model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets, use_dora=True)
    )
    randomize_lora(model, seed=5)
    model.eval()
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        unmerged = model(tokens).logits
        loralab.merge_adapter(model)
        merged = model(tokens).logits
        loralab.unmerge_adapter(model)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    for name, parameter in model.named_parameters():
        if name in weights:  # back to W0 to rounding: the ΔW added is what is subtracted
            torch.testing.assert_close(parameter, weights[name], atol=1e-6, rtol=0)
    loralab.save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    pure = loralab.merge_state_dicts(make_model(kind).state_dict(), tensors, config)
    plain = make_model(kind)
    plain.load_state_dict(pure)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(tokens).logits, unmerged, atol=1e-5, rtol=0)
        torch.testing.assert_close(
            loralab.merge_and_unload(model)(tokens).logits, unmerged, atol=1e-5, rtol=0
        )


def test_hot_swap_replaces_the_magnitude_too(tmp_path):
    tokens = token_batch()
    configs = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q", "v"], use_dora=True)
    for seed in (1, 2):
        single = make_model("llama")
        loralab.inject_adapter(single, configs)
        randomize_lora(single, seed=seed)
        loralab.save_adapter(single, tmp_path / str(seed))
    model = loralab.load_adapter(make_model("llama"), tmp_path / "1").eval()
    loralab.hot_swap_adapter(model, tmp_path / "2", "default")
    expected = loralab.load_adapter(make_model("llama"), tmp_path / "2").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, expected(tokens).logits)


def test_where_dora_cannot_work_it_says_so(tmp_path):
    dora = LoraConfig(r=2, target_modules=["q", "v"], use_dora=True)
    model = make_model("llama")
    loralab.inject_adapter(model, dora, adapter_name="a")
    loralab.inject_adapter(model, dora, adapter_name="b")
    with (
        pytest.raises(ValueError, match=r"'a' cannot be mixed per row.*DoraFactors"),
        mixed_adapters(model, ["a", None]),
    ):
        pass
    with pytest.raises(ValueError, match=r"'a' cannot be combined.*not a product of two"):
        loralab.combine_adapters(model, ["a", "b"], [1.0, 1.0], "sum")
    with pytest.raises(TargetError, match=r"already holds DoraLinear adapters.*same kind"):
        loralab.inject_adapter(model, LoraConfig(r=2, target_modules=["q"]), adapter_name="c")
    with pytest.raises(TargetError, match=r"Embedding, which DoRA cannot adapt"):
        loralab.inject_adapter(
            make_model("llama"), LoraConfig(target_modules=["embed_tokens"], use_dora=True)
        )
    with pytest.raises(TargetError, match=r"DoRA adapts whole matrices, not the parts"):
        loralab.inject_adapter(
            make_model("gpt2"), LoraConfig(target_modules=["q", "v"], use_dora=True)
        )
    # a LoRA file that claims DoRA but holds no magnitudes names the missing tensor
    plain = make_model("llama")
    loralab.inject_adapter(plain, LoraConfig(r=2, target_modules=["q"]))
    loralab.save_adapter(plain, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(loralab.AdapterFileError, match=r"lora_magnitude_vector' is missing"):
        loralab.load_adapter(make_model("llama"), tmp_path)


def test_training_with_use_dora_writes_a_dora_adapter(tmp_path, tiny_model_dir):
    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"Say {w}:", "completion": f" {w}"}) + "\n"
            for w in ["cat", "dog"] * 8
        )
    )
    run = tmp_path / "run"
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--use-dora", "--r", "2"]
    argv += ["--max-steps", "3", "--batch-size", "4", "--max-length", "32", "--no-progress"]
    assert main([*argv, "--output-dir", str(run), "--learning-rate", "0.01"]) == 0
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    tensors = load_file(run / "adapter" / "adapter_model.safetensors")
    magnitudes = {k: v for k, v in tensors.items() if k.endswith("lora_magnitude_vector")}
    assert len(magnitudes) == 4  # q and v in two layers
    loaded = loralab.load_adapter(load_tiny_causal_lm(tiny_model_dir)[0], run / "adapter")
    assert all(isinstance(layer, DoraLinear) for layer in loralab.lora_layers(loaded).values())


def test_a_merged_adapter_reports_the_delta_it_added():
    layer = DoraLinear(nn.Linear(8, 5))
    layer.add_adapter("default", R, ALPHA, SCALE, 0.0, "kaiming")
    _randomized(layer)
    before = layer.delta_weight()
    layer.merge()  # the weight now holds W0 + ΔW; ΔW is not recomputed from it
    torch.testing.assert_close(layer.delta_weight(), before)


def test_hot_swapping_a_dora_file_into_a_lora_adapter_says_why(tmp_path):
    dora = make_model("llama")
    loralab.inject_adapter(dora, LoraConfig(r=2, target_modules=["q"], use_dora=True))
    loralab.save_adapter(dora, tmp_path)
    model = make_model("llama")
    loralab.inject_adapter(model, LoraConfig(r=2, target_modules=["q"]))
    with pytest.raises(
        loralab.AdapterFileError, match=r"cannot hot-swap into 'default'.*same kind"
    ):
        loralab.hot_swap_adapter(model, tmp_path, "default")
