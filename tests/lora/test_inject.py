"""Finding targets in any model, wrapping them, freezing the rest, and counting."""

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import make_model, randomize_lora, token_batch
from loralab import LoraConfig, TargetError, inject_adapter, lora_layers, trainable_parameters
from loralab.lora.layers import LoraFusedLinear, TrainableCopy


def _adapted(model):
    return {name: layer for name, layer in lora_layers(model).items()}


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, before):
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not lora_layers(model)
    assert not any(isinstance(m, TrainableCopy) for m in model.modules())


@pytest.mark.parametrize(
    ("kind", "targets", "expected"),
    [
        (
            "llama",
            ["q", "v"],
            {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"},
        ),
        (
            "llama",
            ["o", "down"],
            {"model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"},
        ),
        (
            "bert",
            ["q", "v"],
            {
                "bert.encoder.layer.0.attention.self.query",
                "bert.encoder.layer.0.attention.self.value",
            },
        ),
        (
            "bert",
            ["o", "down"],
            {"bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.output.dense"},
        ),
        ("gpt2", ["o", "up"], {"transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc"}),
    ],
)
def test_short_names_resolve_per_architecture(kind, targets, expected):
    model = make_model(kind)
    inject_adapter(model, LoraConfig(target_modules=targets))
    layer0 = {n for n in _adapted(model) if ".0." in n}
    assert layer0 == expected


def test_gpt2_q_and_v_are_the_fused_parts_of_c_attn():
    model = make_model("gpt2")
    inject_adapter(model, LoraConfig(r=2, target_modules=["q", "v"]))
    layers = _adapted(model)
    assert set(layers) == {"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"}
    assert all(isinstance(layer, LoraFusedLinear) for layer in layers.values())
    assert layers["transformer.h.0.attn.c_attn"].parts.enabled == ("q", "v")
    # the explicit form and the short names mean the same thing
    other = make_model("gpt2")
    inject_adapter(other, LoraConfig(r=2, target_modules=["c_attn[v,q]"]))
    assert lora_layers(other)["transformer.h.1.attn.c_attn"].parts.enabled == ("q", "v")


def test_literal_names_follow_peft_rules_before_short_names():
    model = make_model("llama")
    inject_adapter(
        model, LoraConfig(target_modules=["self_attn.q_proj", "model.layers.1.mlp.up_proj"])
    )
    assert set(_adapted(model)) == {
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.mlp.up_proj",
    }


def test_regex_all_linear_and_exclusions():
    model = make_model("llama")
    inject_adapter(model, LoraConfig(target_modules=r".*\.layers\.1\..*_proj"))
    assert len(_adapted(model)) == 7 and all(".1." in n for n in _adapted(model))

    model = make_model("llama")
    inject_adapter(model, LoraConfig(target_modules="all-linear", exclude_modules=["gate_proj"]))
    names = set(_adapted(model))
    assert "lm_head" not in names and not any("gate_proj" in n for n in names)
    assert len(names) == 2 * 6

    model = make_model("gpt2")
    inject_adapter(model, LoraConfig(target_modules="all-linear", exclude_modules=r".*\.h\.0\..*"))
    assert set(_adapted(model)) == {
        f"transformer.h.1.{m}" for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }


def test_layers_to_transform_and_layers_pattern():
    model = make_model("llama")
    inject_adapter(model, LoraConfig(target_modules=["q", "v"], layers_to_transform=[1]))
    assert set(_adapted(model)) == {
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    }
    model = make_model("bert")
    config = LoraConfig(target_modules=["query"], layers_to_transform=0, layers_pattern="layer")
    inject_adapter(model, config)
    assert set(_adapted(model)) == {"bert.encoder.layer.0.attention.self.query"}


def test_rank_and_alpha_patterns_per_module():
    model = make_model("llama")
    config = LoraConfig(
        r=8,
        lora_alpha=8,
        target_modules=["q", "v"],
        rank_pattern={"v": 2},
        alpha_pattern={r"layers\.1\.self_attn\.q_proj": 32},
    )
    inject_adapter(model, config)
    layers = _adapted(model)
    assert layers["model.layers.0.self_attn.v_proj"].lora["default"].r == 2
    assert layers["model.layers.0.self_attn.q_proj"].lora["default"].r == 8
    assert layers["model.layers.1.self_attn.q_proj"].lora["default"].scale == 32 / 8
    assert layers["model.layers.0.self_attn.v_proj"].lora["default"].scale == 8 / 2


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_freezing_follows_bias():
    model = make_model("bert")
    inject_adapter(model, LoraConfig(target_modules=["q"], bias="none"))
    assert all(".lora." in n for n in _trainable(model))
    assert len(_trainable(model)) == 4

    model = make_model("bert")
    inject_adapter(model, LoraConfig(target_modules=["q"], bias="lora_only"))
    extra = {n for n in _trainable(model) if ".lora." not in n}
    assert extra == {f"bert.encoder.layer.{i}.attention.self.query.base_layer.bias" for i in (0, 1)}

    model = make_model("bert")
    all_biases = {n for n, _ in model.named_parameters() if n.endswith("bias")}
    inject_adapter(model, LoraConfig(target_modules=["q"], bias="all"))
    extra = {n.replace(".base_layer", "") for n in _trainable(model) if ".lora." not in n}
    assert extra == all_biases


def test_modules_to_save_train_a_copy_and_keep_the_original():
    model = make_model("bert")
    original = model.classifier.weight.detach().clone()
    inject_adapter(model, LoraConfig(target_modules=["q"], modules_to_save=["classifier"]))
    assert isinstance(model.classifier, TrainableCopy)
    assert {n for n in _trainable(model) if ".lora." not in n} == {
        "classifier.copies.default.weight",
        "classifier.copies.default.bias",
    }
    with torch.no_grad():
        model.classifier.copies["default"].weight.add_(1.0)
    assert torch.equal(model.classifier.original.weight, original)
    assert model.classifier.weight is model.classifier.copies["default"].weight


def test_training_step_touches_only_adapter_parameters():
    model = make_model("llama")
    inject_adapter(model, LoraConfig(target_modules=["q", "v"]))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora." not in n}
    assert frozen and not any(model.get_parameter(n).requires_grad for n in frozen)
    model.train()
    tokens = token_batch()
    model(input_ids=tokens, labels=tokens).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {n for n, _ in model.named_parameters() if ".lora." in n}
    # B is zero at step 0, so A's gradient (through B) is exactly zero and B's is not
    for name in grads:
        gradient = model.get_parameter(name).grad
        assert (torch.count_nonzero(gradient) == 0) == name.endswith(".A")
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert all(torch.equal(model.get_parameter(n), value) for n, value in frozen.items())


def test_model_forward_equals_hand_merged_weights():
    """W0 x + (α/r) B A x, with ΔW computed here by hand from A and B, over a whole model."""
    for kind in ("llama", "gpt2", "bert"):
        model = make_model(kind)
        base = make_model(kind)
        config = LoraConfig(r=3, lora_alpha=5, target_modules=["q", "v", "o"])
        inject_adapter(model, config)
        randomize_lora(model)
        state = base.state_dict()
        for name, layer in lora_layers(model).items():
            A, B = layer.lora["default"].A.detach(), layer.lora["default"].B.detach()
            if A.dim() == 3:  # GPT-2 fused q and v: blocks of the (in, 3d) Conv1D weight
                d = B.shape[1]
                for index, part in enumerate((0, 2)):
                    state[f"{name}.weight"][:, part * d : (part + 1) * d] += (5 / 3) * (
                        B[index] @ A[index]
                    ).T
            elif kind == "gpt2":  # Conv1D stores (in, out)
                state[f"{name}.weight"] += (5 / 3) * (B @ A).T
            else:
                state[f"{name}.weight"] += (5 / 3) * (B @ A)
        base.load_state_dict(state)
        tokens = token_batch()
        torch.testing.assert_close(model(tokens).logits, base(tokens).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("kind", "config", "message"),
    [
        ("llama", LoraConfig(target_modules=["q_prj"]), r"'q_prj' matches no module.*q_proj"),
        (
            "bert",
            LoraConfig(target_modules=["query", "vaule"]),
            r"'vaule' matches no module.*value",
        ),
        (
            "gpt2",
            LoraConfig(target_modules=["gate"]),
            r"'gate' matches no module \(this model looks gpt2",
        ),
        ("llama", LoraConfig(r=33, target_modules=["q"]), r"r=33 .*q_proj.* at most 32"),
        (
            "llama",
            LoraConfig(rank_pattern={"v_proj": 17}, target_modules=["q", "v"]),
            r"r=17 .*v_proj.*\(32, 16\)|r=17 .*v_proj.*at most 16",
        ),
        (
            "llama",
            LoraConfig(target_modules=["input_layernorm"]),
            r"is a LlamaRMSNorm, which LoRA cannot adapt",
        ),
        (
            "gpt2",
            LoraConfig(target_modules=["c_attn[q,x]"]),
            r"has parts \('q', 'k', 'v'\), not 'x'",
        ),
        ("llama", LoraConfig(target_modules=["q_proj[q]"]), r"has no known fused layout"),
        ("llama", LoraConfig(target_modules=["q"], layers_to_transform=[7]), r"selects no module"),
        (
            "bert",
            LoraConfig(target_modules=["q"], modules_to_save=["clasifier"]),
            r"modules_to_save entry 'clasifier' matches no module.*classifier",
        ),
        (
            "gpt2",
            LoraConfig(target_modules=["q", "c_attn"]),
            r"both as a whole and by its fused parts",
        ),
    ],
)
def test_bad_targets_raise_clear_errors_and_leave_the_model_unchanged(kind, config, message):
    model = make_model(kind)
    before = _snapshot(model)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(TargetError, match=message):
        inject_adapter(model, config)
    _assert_unchanged(model, before)
    assert grads == {n: p.requires_grad for n, p in model.named_parameters()}


def test_same_adapter_name_twice_is_refused_without_change():
    model = make_model("llama")
    inject_adapter(model, LoraConfig(target_modules=["q"]))
    layers = set(lora_layers(model))
    with pytest.raises(TargetError, match="already"):
        inject_adapter(model, LoraConfig(target_modules=["q", "v"]))
    assert set(lora_layers(model)) == layers


def test_unsupported_conv2d_is_refused():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(TargetError, match="groups=2"):
        inject_adapter(model, LoraConfig(target_modules=["0"]))


def test_parameter_count_matches_the_papers_formula():
    model = make_model("llama")  # d_model 32, 2 layers, GQA: v_proj is 32 -> 16
    report = trainable_parameters(inject_adapter(model, LoraConfig(r=4, target_modules=["q", "v"])))
    assert report.trainable == 2 * (4 * (32 + 32) + 4 * (32 + 16))
    assert (
        report.total == sum(p.numel() for p in make_model("llama").parameters()) + report.trainable
    )
    assert report.by_type["model.layers.*.self_attn.q_proj (lora)"] == (2, 2 * 4 * 64)


def test_gpt3_175b_shaped_config_counts_on_the_meta_device():
    """The paper's Table 4 figure: LoRA r=8 on W_q, W_v of GPT-3 175B trains 37.7M."""
    config = GPT2Config(n_layer=96, n_embd=12288, n_head=96, vocab_size=50257, n_positions=2048)
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    inject_adapter(model, LoraConfig(r=8, target_modules=["q", "v"]))
    report = trainable_parameters(model)
    assert report.trainable == 2 * 96 * 12288 * 8 * 2 == 37_748_736  # 2 · L̂ · d_model · r per W
    assert 174.5e9 < report.total - report.trainable < 175.5e9
    assert all(p.device.type == "meta" for p in model.parameters())
    assert "transformer.h.*.attn.c_attn[q,v] (lora)" in str(report)


def test_injecting_into_a_model_in_eval_mode_keeps_it_in_eval_mode():
    model = make_model("bert").eval()
    inject_adapter(
        model, LoraConfig(target_modules=["q"], lora_dropout=0.5, modules_to_save=["classifier"])
    )
    assert not any(module.training for module in model.modules())
    randomize_lora(model)
    tokens = token_batch()
    assert torch.equal(model(tokens).logits, model(tokens).logits)  # no dropout at inference
    model.train()
    assert all(module.training for module in model.modules())


def test_frozen_head_keeps_the_single_matrix_product_on_kept_positions():
    # logits_to_keep slices the hidden states; torch.matmul would broadcast a frozen head
    # into a batched product over every row (slow), so the head's input is made contiguous.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    model = make_model("llama").eval()
    ids = token_batch(batch=4, length=6)
    with torch.no_grad():
        before = model(ids, logits_to_keep=1).logits
        inject_adapter(model, LoraConfig(r=2, target_modules=["q", "v"]))
        model.lm_head.weight.requires_grad_(False)
        with Ops() as ops:
            after = model(ids, logits_to_keep=1).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    assert "bmm" not in ops.seen
