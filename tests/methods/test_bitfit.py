"""BitFit: only biases train; zero biases are added where the block's linears have none."""

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from conftest import make_model, token_batch
from loralab.lora.config import ConfigError
from loralab.lora.inject import trainable_parameters
from loralab.methods import METHODS, MethodSettings, get_method
from loralab.methods.method_files import load_method, save_method

SETTINGS = MethodSettings()


def bias_formula(model) -> int:
    """|Θ| by hand from the config: every bias vector's length, plus a classifier's head."""
    c = model.config
    d, layers = c.hidden_size, c.num_hidden_layers
    if c.model_type == "llama":  # biases added to q, k, v, o, gate, up, down; RMSNorm has none
        kv = c.num_key_value_heads * (d // c.num_attention_heads)
        return layers * (d + 2 * kv + d + 2 * c.intermediate_size + d)
    if c.model_type == "gpt2":  # ln_1, c_attn (3d), c_proj, ln_2, c_fc (4d), c_proj; ln_f
        return layers * (d + 3 * d + d + d + 4 * d + d) + d
    if c.model_type == "bert":  # q, k, v, attention out, LN, intermediate, out, LN; emb LN,
        per_layer = 3 * d + d + d + c.intermediate_size + d + d  # pooler; the head in full
        return d + layers * per_layer + d + (d * c.num_labels + c.num_labels)
    raise AssertionError(c.model_type)


def applied(kind: str):
    model = make_model(kind)
    get_method("bitfit").apply(model, SETTINGS, None)
    return model


def randomize_trained(model, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in sorted(model.named_parameters()):
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)


def test_registered():
    method = METHODS["bitfit"]
    assert (method.mergeable, method.adds_depth, method.uses_lora) == (True, False, False)


def test_trainable_count_is_the_bias_formula(model_kind):
    model = applied(model_kind)
    counted = trainable_parameters(model).trainable
    assert counted == get_method("bitfit").expected_parameters(model, SETTINGS, None)
    assert counted == bias_formula(model)
    head = {"bert": "classifier."}.get(model_kind, "\0")
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(n.endswith(".bias") or n.startswith(head) for n in trained)


def test_expected_parameters_before_apply_is_the_same(model_kind):
    model = make_model(model_kind)
    assert get_method("bitfit").expected_parameters(model, SETTINGS, None) == bias_formula(model)


def test_count_on_the_meta_device(model_kind):
    config = make_model(model_kind).config
    cls = type(make_model(model_kind))
    with torch.device("meta"):
        model = cls(config)
    get_method("bitfit").apply(model, SETTINGS, None)
    assert trainable_parameters(model).trainable == bias_formula(model)
    assert all(p.is_meta for p in model.parameters())


def test_step_zero_equals_the_base(model_kind):
    ids = token_batch()
    assert torch.equal(applied(model_kind)(ids).logits, make_model(model_kind)(ids).logits)


def test_added_biases_are_plain_linear_biases():
    model = applied("llama")
    q_proj = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert type(q_proj) is nn.Linear
    assert q_proj.bias.requires_grad and not q_proj.weight.requires_grad
    assert torch.equal(q_proj.bias, torch.zeros(q_proj.out_features))
    keys = model.state_dict()
    assert "model.layers.1.mlp.down_proj.bias" in keys
    assert "lm_head.bias" not in keys  # only the blocks' linears get one


def test_a_training_step_changes_only_biases(model_kind):
    model = applied(model_kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(token_batch()).logits.pow(2).mean().backward()
    optimizer.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= trained


def test_save_and_load_restore_the_outputs(model_kind, tmp_path):
    model = applied(model_kind)
    randomize_trained(model)
    ids = token_batch()
    expected = model(ids).logits
    assert not torch.equal(expected, make_model(model_kind)(ids).logits)
    save_method(model, tmp_path)
    loaded = load_method(make_model(model_kind), tmp_path)
    assert torch.equal(loaded(ids).logits, expected)


def test_merged_llama_is_a_llama_with_biases():
    # The docstring's promise: the trained model loads into attention_bias/mlp_bias=True.
    model = applied("llama")
    randomize_trained(model)
    config = model.config.to_dict() | {"attention_bias": True, "mlp_bias": True}
    plain = LlamaForCausalLM(type(model.config).from_dict(config)).eval()
    plain.load_state_dict(model.state_dict(), strict=True)
    ids = token_batch()
    assert torch.equal(plain(ids).logits, model(ids).logits)


def test_a_model_without_blocks_is_refused_unchanged():
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    with pytest.raises(ConfigError, match="transformer blocks"):
        get_method("bitfit").check(model, SETTINGS, None, 0)
