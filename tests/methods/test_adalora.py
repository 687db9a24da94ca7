"""AdaLoRA: the SVD-form layer, the importance scores and the cubic budget, the
orthogonality regulariser, the rank report, the merge and the plain-LoRA export, and
PEFT's ADALORA files read and written against ``peft`` itself."""

from __future__ import annotations

import copy
import functools
import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import loralab
from conftest import make_model, token_batch
from loralab.files.peft_config import AdapterFileError
from loralab.lora.config import ConfigError
from loralab.lora.inject import TargetError, trainable_parameters
from loralab.methods import MethodSettings, applied_method, get_method
from loralab.methods.adalora.budget import (
    apply_masks,
    keep_best,
    orthogonality,
    rank_budget,
    triplet_scores,
)
from loralab.methods.adalora.config import AdaLoraConfig
from loralab.methods.adalora.files import export_lora, load_adalora, save_adalora
from loralab.methods.adalora.layers import (
    SvdLinear,
    adalora_state,
    apply_adalora,
    merge_adalora,
    svd_factors,
)
from loralab.methods.adalora.method import AdaLora
from loralab.methods.adalora.report import (
    final_ranks,
    rank_table,
    save_rank_heatmap,
    write_rank_report,
)
from loralab.methods.method_files import load_method, save_method

ATOL = 1e-5
TARGETS = {"llama": ["q_proj", "v_proj", "o_proj"], "gpt2": ["c_attn", "c_proj"]}
PEFT_TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


# -- helpers --------------------------------------------------------------------------------


def _config(kind: str, **changes) -> AdaLoraConfig:
    settings = dict(
        init_r=6,
        target_r=3,
        tinit=2,
        tfinal=3,
        deltaT=2,
        total_step=12,
        lora_alpha=16,
        target_modules=TARGETS[kind],
    )
    return AdaLoraConfig(**{**settings, **changes})


def _logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def _train(model: nn.Module, steps: int, max_steps: int, lr: float = 2e-2) -> list[int]:
    """The training loop's contract: loss + regulariser, step, then the hook. Returns the
    total rank kept after each step."""
    method = AdaLora()  # the hooks keep no state: any instance drives the model's AdaLoRA
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr)
    totals = []
    for step in range(1, steps + 1):
        tokens = token_batch(seed=step)
        loss = model(input_ids=tokens, labels=tokens).loss + method.regularizer(model)
        loss.backward()
        optimizer.step()
        method.after_optimizer_step(model, step, max_steps)
        optimizer.zero_grad()
        totals.append(sum(final_ranks(model).values()))
    return totals


def _randomize_kept(model: nn.Module, seed: int = 3) -> None:
    """Large random P, Λ, Q (masked Λ stay zero), so ΔW is far from zero and tests see it."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for f in svd_factors(model).values():
            for parameter in (f.P, f.E, f.Q):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    apply_masks(svd_factors(model))


def _assert_same(label: str, actual, expected, base) -> None:
    assert (expected - base).abs().max().item() > 100 * ATOL, "the adapter changes nothing"
    diff = (actual - expected).abs().max().item()
    print(f"{label}: max |Δlogits| = {diff:.3g}")
    assert diff <= ATOL, f"{label}: max abs difference {diff}"


def _pruned_model(kind: str) -> nn.Module:
    """A model trained through the whole schedule, then given large kept factors (a copy:
    the training runs once per model kind)."""
    return copy.deepcopy(_trained_once(kind))


@functools.cache
def _trained_once(kind: str) -> nn.Module:
    model = make_model(kind)
    apply_adalora(model, _config(kind))
    _train(model, steps=12, max_steps=12)
    _randomize_kept(model)
    return model


# -- the layer ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_step_zero_equals_the_base_and_the_update_is_p_lambda_q(kind):
    tokens = token_batch()
    model = make_model(kind)
    base = _logits(model, tokens)
    apply_adalora(model, _config(kind))
    assert torch.equal(_logits(model, tokens), base)  # Λ starts at zero
    for f in svd_factors(model).values():
        assert not f.E.any() and f.P.std() > 0 and f.Q.std() > 0

    _randomize_kept(model)
    layer = next(m for m in model.modules() if isinstance(m, SvdLinear))
    f = layer.lora["default"]
    x = torch.randn(3, f.Q.shape[1])
    # h = W0 x + α / (init_r + 1e-5) · P diag(Λ) Q x, PEFT's SVDLinear (ranknum = init_r).
    by_hand = layer.base_layer(x) + 16 / (6 + 1e-5) * (x @ f.Q.T * f.E) @ f.P.T
    torch.testing.assert_close(layer(x), by_hand)
    delta = layer.delta_weight()
    assert delta.shape == layer.base_layer.weight.shape  # Conv1D's (in, out) too


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_only_p_lambda_q_train_and_the_count_is_the_formula(kind):
    model = make_model(kind)
    targets = {"llama": ["q", "v", "down"], "gpt2": ["c_attn", "o", "up"], "bert": ["q", "o"]}
    method = AdaLora(AdaLoraConfig(init_r=4, target_r=2, target_modules=targets[kind]))
    expected = method.expected_parameters(make_model(kind), MethodSettings(), None)
    method.apply(model, MethodSettings(), None)
    assert trainable_parameters(model).trainable == expected
    by_hand = 0
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and ".lora.default." in name:
            by_hand += parameter.numel()
    head = sum(
        p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora" not in n
    )
    layers = svd_factors(model).values()
    assert by_hand == sum(4 * (f.P.shape[0] + f.Q.shape[1] + 1) for f in layers)
    fresh = make_model(kind)
    assert head == (sum(p.numel() for p in fresh.classifier.parameters()) if kind == "bert" else 0)
    assert applied_method(model).name == "adalora"


def test_config_in_the_training_loop_is_registered():
    method = get_method("adalora")
    assert isinstance(method, AdaLora) and method.mergeable and not method.uses_lora
    assert callable(method.regularizer) and callable(method.after_optimizer_step)


# -- the schedule ---------------------------------------------------------------------------


def test_budget_at_each_step_is_the_cubic_schedule():
    # b0 = 24, bT = 8, tinit = 2, tfinal = 3, T = 12: the budget falls over steps 3…9,
    # b(t) = ⌊8 + 16 (1 − (t − 2)/7)³⌋: t=3: 8 + 16·(6/7)³ = 18.08; t=4: 8 + 16·(5/7)³ = 13.83;
    # t=5: 8 + 16·(4/7)³ = 10.99; t=6: 8 + 16·(3/7)³ = 9.26; t=7: 8.37; t=8: 8.05; t=9: 8.
    expected = {1: 24, 2: 24, 3: 18, 4: 13, 5: 10, 6: 9, 7: 8, 8: 8, 9: 8, 10: 8, 11: 8, 12: 8}
    for step, budget in expected.items():
        assert rank_budget(step, 24, 8, tinit=2, tfinal=3, total_step=12) == budget, step


def test_the_hook_allocates_on_schedule_and_fixes_the_final_ranks():
    model = make_model("llama")
    config = _config("llama")  # 6 matrices × init_r 6 = 36 → 6 × target_r 3 = 18
    apply_adalora(model, config)
    totals = _train(model, steps=14, max_steps=14)
    # Budgets from 36 to 18 over steps 3…9, b(t) = ⌊18 + 18 (1 − (t − 2)/7)³⌋: b(4) = 24.56,
    # b(6) = 19.42, b(8) = 18.05; allocated every deltaT = 2 steps (the even ones), then the
    # final allocation at step 9 = 12 − 3, fixed after it (the run goes on to step 14).
    budget = {t: rank_budget(t, 36, 18, 2, 3, 12) for t in range(1, 13)}
    assert [budget[t] for t in (4, 6, 8)] == [24, 19, 18]
    assert totals == [36, 36, 36, 24, 24, 19, 19, 18, 18, 18, 18, 18, 18, 18]
    assert adalora_state(model).allocations == 4  # steps 4, 6, 8 and the final one at 9
    ranks = final_ranks(model)
    assert sum(ranks.values()) == 18 and len(set(ranks.values())) > 1  # moved, not uniform
    for f in svd_factors(model).values():
        assert not f.E[~f.mask].any()  # masked Λ stay zero through the final phase


def test_pruning_masks_exactly_the_least_important_triplets():
    model = make_model("llama")
    apply_adalora(model, _config("llama", target_modules=["q_proj"]))
    factors = svd_factors(model)
    state = adalora_state(model)
    with torch.no_grad():
        for f in factors.values():
            f.E.copy_(torch.arange(1.0, 7.0))
    # Scores by hand: Ī·Ū of E is the triplet's own term; P's and Q's add their means.
    wanted = {
        "model.layers.0.self_attn.q_proj": [0.9, 0.1, 0.5, 0.05, 0.7, 0.3],
        "model.layers.1.self_attn.q_proj": [0.2, 0.8, 0.01, 0.6, 0.4, 0.02],
    }
    for name, f in factors.items():
        state.sensitivity[f"{name}.E"] = torch.tensor(wanted[name])
        state.uncertainty[f"{name}.E"] = torch.ones(6)
        for part, p in (("P", f.P), ("Q", f.Q)):
            state.sensitivity[f"{name}.{part}"] = torch.zeros(p.shape)
            state.uncertainty[f"{name}.{part}"] = torch.zeros(p.shape)
    state.allocate(factors, budget=5)
    # The five best of all twelve: 0.9, 0.8, 0.7, 0.6, 0.5.
    assert factors["model.layers.0.self_attn.q_proj"].mask.tolist() == [1, 0, 1, 0, 1, 0]
    assert factors["model.layers.1.self_attn.q_proj"].mask.tolist() == [0, 1, 0, 1, 0, 0]
    for f in factors.values():
        assert torch.equal(f.E, torch.arange(1.0, 7.0) * f.mask)  # kept ones untouched


def test_triplet_score_adds_the_mean_scores_of_p_column_and_q_row():
    class Triplet:
        P, E, Q = torch.zeros(3, 2), torch.zeros(2), torch.zeros(2, 4)

    sensitivity = {
        "m.E": torch.tensor([1.0, 2.0]),
        "m.P": torch.tensor([[1.0, 0.0], [2.0, 3.0], [3.0, 6.0]]),
        "m.Q": torch.tensor([[4.0, 4.0, 4.0, 4.0], [0.0, 0.0, 0.0, 8.0]]),
    }
    uncertainty = {key: torch.full_like(value, 0.5) for key, value in sensitivity.items()}
    scores = triplet_scores({"m": Triplet()}, sensitivity, uncertainty)["m"]
    # i=0: 0.5·(1 + mean(1, 2, 3) + mean(4, 4, 4, 4)) = 0.5·7; i=1: 0.5·(2 + 3 + 2) = 0.5·7.
    torch.testing.assert_close(scores, torch.tensor([3.5, 3.5]))


def test_importance_is_the_smoothed_sensitivity_times_its_uncertainty():
    model = make_model("llama")
    apply_adalora(model, _config("llama", target_modules=["q_proj"], beta1=0.8, beta2=0.6))
    factors = svd_factors(model)
    state = adalora_state(model)
    name, f = next(iter(factors.items()))
    with torch.no_grad():
        f.E.fill_(2.0)
    grads = [torch.full((6,), 3.0), torch.full((6,), -1.0)]
    for grad in grads:
        for p in model.parameters():
            p.grad = torch.zeros_like(p) if p.requires_grad else None
        f.E.grad = grad
        state.update_importance(factors)
    # s1 = |2·3| = 6, Ī1 = 0.2·6 = 1.2, Ū1 = 0.4·|6 − 1.2| = 1.92;
    # s2 = |2·(−1)| = 2, Ī2 = 0.8·1.2 + 0.2·2 = 1.36, Ū2 = 0.6·1.92 + 0.4·|2 − 1.36| = 1.408.
    torch.testing.assert_close(state.sensitivity[f"{name}.E"], torch.full((6,), 1.36))
    torch.testing.assert_close(state.uncertainty[f"{name}.E"], torch.full((6,), 1.408))


def test_keep_best_keeps_exactly_the_budget_on_ties():
    masks = keep_best({"a": torch.zeros(4), "b": torch.zeros(3)}, budget=5)
    assert masks["a"].tolist() == [True] * 4 and masks["b"].tolist() == [True, False, False]


# -- the regulariser ------------------------------------------------------------------------


def test_regularizer_is_the_weighted_mean_of_the_orthogonality_gaps():
    model = make_model("llama")
    apply_adalora(model, _config("llama", orth_reg_weight=0.3))
    _randomize_kept(model)
    gaps = []
    for f in svd_factors(model).values():
        eye = torch.eye(6)
        gaps += [torch.linalg.norm(f.P.T @ f.P - eye), torch.linalg.norm(f.Q @ f.Q.T - eye)]
    value = AdaLora().regularizer(model)
    torch.testing.assert_close(value, 0.3 * torch.stack(gaps).mean())
    assert AdaLora().regularizer(_with(make_model("llama"), orth_reg_weight=0.0)) is None


def _with(model, **changes):
    apply_adalora(model, _config("llama", **changes))
    return model


def test_the_regularizer_alone_drives_p_and_q_towards_orthogonal():
    model = make_model("llama")
    apply_adalora(model, _config("llama"))
    _randomize_kept(model)
    factors = svd_factors(model)
    before = orthogonality(factors).item()
    parameters = [p for f in factors.values() for p in (f.P, f.Q)]
    optimizer = torch.optim.Adam(parameters, lr=2e-2)
    for _ in range(60):
        optimizer.zero_grad()
        AdaLora().regularizer(model).backward()
        optimizer.step()
    after = orthogonality(factors).item()
    assert after < 0.1 * before, (before, after)
    for f in factors.values():
        torch.testing.assert_close(f.P.T @ f.P, torch.eye(6), atol=0.1, rtol=0)
        torch.testing.assert_close(f.Q @ f.Q.T, torch.eye(6), atol=0.1, rtol=0)


# -- report, merge, export ------------------------------------------------------------------


def test_rank_report_table_heatmap_and_json(tmp_path):
    model = _pruned_model("llama")
    ranks = final_ranks(model)
    table = rank_table(ranks, init_r=6)
    lines = table.splitlines()
    assert "18 triplets kept in 6 matrices (of 36, init_r=6)" in lines[0]
    assert lines[1].split() == ["layer", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]
    row0 = ranks["model.layers.0.self_attn.o_proj"], ranks["model.layers.0.self_attn.q_proj"]
    assert lines[2].split()[:3] == ["0", str(row0[0]), str(row0[1])]
    assert lines[-1].split()[0] == "total"
    written = write_rank_report(model, tmp_path / "report")
    assert written["heatmap"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(written["json"].read_text()) == ranks
    gpt2 = save_rank_heatmap(final_ranks(_pruned_model("gpt2")), tmp_path / "g.png", 6)
    assert gpt2.stat().st_size > 1000


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merge_folds_the_update_into_the_base_weights(kind):
    tokens = token_batch()
    model = _pruned_model(kind)
    expected = _logits(model, tokens)
    keys = set(make_model(kind).state_dict())
    merge_adalora(model)
    assert set(model.state_dict()) == keys
    assert not any(isinstance(m, SvdLinear) for m in model.modules())
    torch.testing.assert_close(_logits(model, tokens), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_exported_lora_reproduces_the_adalora_outputs(kind, tmp_path):
    tokens = token_batch()
    model = _pruned_model(kind)
    expected = _logits(model, tokens)
    base = _logits(make_model(kind), tokens)
    export_lora(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    ranks = {n: r for n, r in final_ranks(model).items() if r}
    written = {
        k.removeprefix("base_model.model.").removesuffix(".lora_A.weight"): v.shape[0]
        for k, v in load_file(str(tmp_path / "adapter_model.safetensors")).items()
        if k.endswith("lora_A.weight")
    }
    assert written == ranks

    ours = loralab.load_adapter(make_model(kind), tmp_path)
    _assert_same(f"adalora->lora loralab {kind}", _logits(ours, tokens), expected, base)
    layers = loralab.lora_layers(ours)
    assert {n: layers[n].lora["default"].r for n in layers} == ranks

    theirs = peft.PeftModel.from_pretrained(make_model(kind), str(tmp_path)).eval()
    _assert_same(f"adalora->lora peft {kind}", _logits(theirs, tokens), expected, base)


# -- PEFT's ADALORA files, both ways ----------------------------------------------------------


def _peft_adalora(kind: str):
    """A PEFT AdaLoRA trained through its schedule, then given large kept factors."""
    model = make_model(kind)
    config = peft.AdaLoraConfig(
        init_r=6,
        target_r=2,
        tinit=1,
        tfinal=2,
        deltaT=1,
        total_step=8,
        lora_alpha=16,
        target_modules=PEFT_TARGETS[kind],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    for step in range(1, 9):
        tokens = token_batch(seed=step)
        wrapped(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        wrapped.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for _, parameter in sorted(wrapped.named_parameters()):
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    rank_pattern = wrapped.peft_config["default"].rank_pattern
    wrapped.base_model.rankallocator.mask_using_rank_pattern(wrapped.base_model.model, rank_pattern)
    return wrapped.eval()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_loralab_loads_what_peft_saves(kind, tmp_path):
    tokens = token_batch()
    wrapped = _peft_adalora(kind)
    expected = _logits(wrapped, tokens)
    wrapped.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["rank_pattern"]

    ours = load_adalora(make_model(kind), tmp_path)
    _assert_same(f"peft->loralab {kind}", _logits(ours, tokens), expected, _base(kind, tokens))
    pattern = {k.removesuffix(".lora_E"): sum(v) for k, v in saved["rank_pattern"].items()}
    assert final_ranks(ours) == pattern
    assert adalora_state(ours).config.total_step == 8

    via_methods = load_method(make_model(kind), tmp_path)  # a PEFT ADALORA dir is "adalora"
    assert applied_method(via_methods).name == "adalora"
    torch.testing.assert_close(_logits(via_methods, tokens), _logits(ours, tokens), rtol=0, atol=0)


def _base(kind: str, tokens: torch.Tensor) -> torch.Tensor:
    return _logits(make_model(kind), tokens)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_peft_loads_what_loralab_saves(kind, tmp_path):
    tokens = token_batch()
    model = _pruned_model(kind)
    expected = _logits(model, tokens)
    save_adalora(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["total_step"] == 12
    ranks = final_ranks(model)
    assert {k.removesuffix(".lora_E"): sum(v) for k, v in saved["rank_pattern"].items()} == ranks

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(make_model(kind), str(tmp_path)).eval()
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    _assert_same(f"loralab->peft {kind}", _logits(theirs, tokens), expected, _base(kind, tokens))
    # What PEFT would save from the model it built is exactly what we wrote.
    ours = load_file(str(tmp_path / "adapter_model.safetensors"))
    theirs_state = peft.get_peft_model_state_dict(theirs)
    assert set(theirs_state) == set(ours)
    for key, tensor in ours.items():
        assert torch.equal(theirs_state[key], tensor), key


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_save_method_and_load_method_round_trip_exactly(kind, tmp_path):
    tokens = token_batch()
    model = make_model(kind)
    method = AdaLora(_config(kind))
    method.apply(model, MethodSettings(), None)
    _train(model, steps=12, max_steps=12)
    _randomize_kept(model)
    save_method(model, tmp_path, base_model_name_or_path="tiny")
    assert not (tmp_path / "method.json").exists()  # PEFT's files only
    loaded = load_method(make_model(kind), tmp_path)
    torch.testing.assert_close(_logits(loaded, tokens), _logits(model, tokens), rtol=0, atol=0)
    assert final_ranks(loaded) == final_ranks(model)


def test_an_unpruned_model_saves_no_rank_pattern_and_loads_in_peft(tmp_path):
    model = make_model("llama")
    apply_adalora(model, AdaLoraConfig(init_r=4, target_r=2, target_modules=["q", "v"]))
    _randomize_kept(model)
    save_adalora(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["rank_pattern"] is None and saved["total_step"] == 1  # PEFT needs one
    assert saved["target_modules"] == ["q_proj", "v_proj"]
    theirs = peft.PeftModel.from_pretrained(make_model("llama"), str(tmp_path)).eval()
    tokens = token_batch()
    _assert_same(
        "unpruned", _logits(theirs, tokens), _logits(model, tokens), _base("llama", tokens)
    )


def test_a_file_for_another_base_names_the_tensor_and_leaves_the_model(tmp_path):
    model = _pruned_model("llama")
    save_adalora(model, tmp_path)
    other = make_model("llama")
    with pytest.raises(AdapterFileError, match=r"lora_A.*has shape"):
        load_adalora(loralab_wider_llama(), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["use_dora"] = True
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterFileError, match="use_dora=True"):
        load_adalora(other, tmp_path)
    assert not any(isinstance(m, SvdLinear) for m in other.modules())
    config["use_dora"], config["init_rr"] = False, 5
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterFileError, match="did you mean init_r"):
        load_adalora(other, tmp_path)


def loralab_wider_llama() -> nn.Module:
    from conftest import tiny_llama

    torch.manual_seed(0)
    return tiny_llama(hidden_size=48)


# -- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"init_r": 4, "target_r": 8}, r"target_r=8 is larger than init_r=4"),
        ({"tinit": 5, "tfinal": 5, "total_step": 10}, r"tinit=5 \+ tfinal=5 .* total_step=10"),
        ({"tinit": 8, "tfinal": 4, "total_step": 10}, r"tinit=8 \+ tfinal=4"),
        ({"deltaT": 0}, r"deltaT must be an integer ≥ 1, got 0"),
        ({"init_r": 0}, r"init_r must be an integer ≥ 1"),
        ({"beta1": 1.0}, r"beta1 must be a number in \(0, 1\), got 1.0"),
        ({"orth_reg_weight": -0.1}, r"orth_reg_weight must be a finite number ≥ 0, got -0.1"),
        ({"total_step": 0}, r"total_step must be an integer ≥ 1"),
        ({"lora_dropout": 1.5}, r"lora_dropout must be a number in \[0, 1\), got 1.5"),
        ({"target_modules": []}, r"target_modules is an empty list"),
    ],
)
def test_bad_settings_are_refused_when_the_config_is_built(changes, message):
    with pytest.raises(ConfigError, match=message):
        AdaLoraConfig(**changes)


def test_a_schedule_longer_than_the_run_is_refused_before_training():
    with pytest.raises(ConfigError, match=r"total_step=100 is longer than the run \(max_steps=50"):
        AdaLoraConfig(total_step=100).for_steps(50)
    assert AdaLoraConfig().for_steps(50).total_step == 50
    with pytest.raises(ConfigError, match=r"tinit=30 \+ tfinal=30 must be less than total_step=50"):
        AdaLoraConfig(tinit=30, tfinal=30).for_steps(50)
    # Left to the run's length, the hook refuses it at the first step, before any pruning.
    model = _with(make_model("llama"), total_step=None, tinit=30, tfinal=30)
    with pytest.raises(ConfigError, match="total_step=50"):
        AdaLora().after_optimizer_step(model, 1, 50)


def test_unsupported_targets_are_refused_and_the_model_is_unchanged():
    gpt2 = make_model("gpt2")
    with pytest.raises(TargetError, match=r"not the parts \['q', 'v'\].*target 'c_attn' whole"):
        apply_adalora(gpt2, AdaLoraConfig(target_modules=["q", "v"]))
    with pytest.raises(TargetError, match=r"Embedding; AdaLoRA adapts Linear"):
        apply_adalora(gpt2, AdaLoraConfig(init_r=4, target_r=2, target_modules=["wte"]))
    with pytest.raises(TargetError, match=r"rank r=40 .* at most 32"):
        apply_adalora(gpt2, AdaLoraConfig(init_r=40, target_r=2, target_modules=["c_proj"]))
    assert not any(isinstance(m, SvdLinear) for m in gpt2.modules())
    llama = make_model("llama")
    loralab.inject_adapter(llama, loralab.LoraConfig(r=2))
    with pytest.raises(ConfigError, match="AdaLoRA must be the only one"):
        apply_adalora(llama, AdaLoraConfig())
    with pytest.raises(ValueError, match="carries no AdaLoRA"):
        AdaLora().regularizer(make_model("llama"))


def test_a_classifier_head_and_a_rank_zero_matrix_travel_in_both_formats(tmp_path):
    tokens = token_batch()
    model = make_model("bert")
    apply_adalora(model, AdaLoraConfig(init_r=4, target_r=2, target_modules=["q", "v"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:  # P, Λ, Q and the new head
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)
    factors = svd_factors(model)
    scores = [[4.0, 3.0, 2.0, 1.0], [8.0, 7.0, 6.0, 5.0], [0.5, 0.6, 0.7, 0.8], [0.0] * 4]
    state = adalora_state(model)
    for (name, f), score in zip(factors.items(), scores, strict=True):
        for part in "PEQ":
            shape = getattr(f, part).shape
            state.sensitivity[f"{name}.{part}"] = torch.zeros(shape)
            state.uncertainty[f"{name}.{part}"] = torch.ones(shape)
        state.sensitivity[f"{name}.E"] = torch.tensor(score)
    state.allocate(factors, budget=10)
    assert [f.rank for f in factors.values()] == [4, 4, 2, 0]
    expected = _logits(model, tokens)
    base = _base("bert", tokens)

    save_adalora(model, tmp_path / "adalora")
    export_lora(model, tmp_path / "lora")
    for label, directory in (("ADALORA", "adalora"), ("LORA", "lora")):
        config = json.loads((tmp_path / directory / "adapter_config.json").read_text())
        assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]
        theirs = peft.PeftModel.from_pretrained(make_model("bert"), str(tmp_path / directory))
        _assert_same(f"bert {label} -> peft", _logits(theirs.eval(), tokens), expected, base)
    ours = load_adalora(make_model("bert"), tmp_path / "adalora")
    _assert_same("bert ADALORA -> loralab", _logits(ours, tokens), expected, base)
    lora = loralab.load_adapter(make_model("bert"), tmp_path / "lora")
    _assert_same("bert LORA -> loralab", _logits(lora, tokens), expected, base)
    assert len(loralab.lora_layers(lora)) == 3  # the rank-0 matrix is left out


def test_lora_only_calls_refuse_an_adalora_adapter_with_the_way_out(tmp_path):
    from loralab import combine_adapters, hot_swap_adapter, mixed_adapters, save_adapter

    model = _pruned_model("llama")
    expected = _logits(model, token_batch())
    calls = {
        "written in PEFT's LoRA format": lambda: save_adapter(model, tmp_path / "lora"),
        "combined": lambda: combine_adapters(model, ["default"], [1.0], "sum"),
        "hot-swapped": lambda: hot_swap_adapter(model, tmp_path, "default"),
        "mixed per row": lambda: mixed_adapters(model, ["default", None]).__enter__(),
    }
    for action, call in calls.items():
        with pytest.raises(TypeError, match=rf"cannot be {action}.*save_method.*export_lora"):
            call()
    assert not (tmp_path / "lora").exists()
    torch.testing.assert_close(_logits(model, token_batch()), expected, atol=0, rtol=0)
