"""Adapter files: PEFT reads ours and we read PEFT's with the same logits, the files have
PEFT's exact keys and layout, bad files fail clearly without touching the model, saving is
atomic, and the paper's ``loralib`` dicts import exactly."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import peft
import pytest
import torch
from adapter_checks import (
    ATOL,
    assert_load_fails,
    assert_same_logits,
    model_logits,
    perturb_trainable_base,
    saved_llama,
    snapshot,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import loralab
import loralab.files.adapter_dir
import loralab.files.peft_config
from conftest import make_model, randomize_lora, tiny_llama, token_batch
from loralab import AdapterFileError, LoraConfig, LoraConv1D, LoraFusedLinear, lora_layers

WEIGHTS = "adapter_model.safetensors"


# -- helpers --------------------------------------------------------------------------------


def _randomize_peft(model: nn.Module, seed: int = 7) -> None:
    """PEFT starts B at zero; give every trainable tensor (A, B, biases, copies) values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if not parameter.requires_grad:
                continue
            noise = torch.randn(parameter.shape, generator=generator)
            if "lora_" in name:
                parameter.copy_(noise * 0.3)
            else:
                parameter.add_(noise * 0.5)


def _load_in_peft(model: nn.Module, directory) -> nn.Module:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(model, str(directory)).eval()
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "missing adapter keys" in m], messages
    # What PEFT would save from the model it built is exactly what we wrote.
    ours = load_file(str(directory / "adapter_model.safetensors"))
    theirs = peft.get_peft_model_state_dict(loaded)
    assert {k: tuple(v.shape) for k, v in theirs.items()} == {
        k: tuple(v.shape) for k, v in ours.items()
    }
    return loaded


# -- 1a. loralab -> PEFT ----------------------------------------------------------------------

EVERY_KIND = ("gpt2", "llama", "bert")
WITH_BIASES = ("gpt2", "bert")  # tiny Llama has no biases at all

SAVE_CASES = [
    *[(kind, "short q,v", {"target_modules": ["q", "v"]}) for kind in EVERY_KIND],
    *[
        (
            kind,
            "rank/alpha patterns",
            {
                "target_modules": ["q", "v", "o"],
                "rank_pattern": {"o": 2},
                "alpha_pattern": {"o": 3, "q": 16},
            },
        )
        for kind in EVERY_KIND
    ],
    *[
        (
            kind,
            "rslora, layer 1",
            {"target_modules": ["q", "v"], "use_rslora": True, "layers_to_transform": [1]},
        )
        for kind in EVERY_KIND
    ],
    *[
        (kind, f"bias={bias}", {"target_modules": ["q", "v", "o"], "bias": bias})
        for kind in WITH_BIASES
        for bias in ("lora_only", "all")
    ],
    ("bert", "modules_to_save", {"target_modules": ["q", "v"], "modules_to_save": ["classifier"]}),
    (
        "bert",
        "modules_to_save, bias=lora_only",
        {"target_modules": ["q", "v"], "modules_to_save": ["classifier"], "bias": "lora_only"},
    ),
    ("gpt2", "fused entry c_attn[q,v]", {"target_modules": ["c_attn[q,v]", "c_fc"]}),
    ("gpt2", "all-linear", {"target_modules": "all-linear"}),
    ("llama", "all-linear", {"target_modules": "all-linear"}),
]


@pytest.mark.parametrize(
    ("kind", "label", "settings"), SAVE_CASES, ids=[f"{k}-{lab}" for k, lab, _ in SAVE_CASES]
)
def test_peft_loads_what_loralab_saves(tmp_path, kind, label, settings):
    tokens = token_batch()
    model = make_model(kind)
    loralab.inject_adapter(model, LoraConfig(r=4, lora_alpha=8, **settings))
    randomize_lora(model, std=0.5)
    perturb_trainable_base(model)
    expected = model_logits(model, tokens)
    loralab.save_adapter(model, tmp_path)

    loaded = _load_in_peft(make_model(kind), tmp_path)
    assert_same_logits(
        f"loralab->peft {kind} {label}",
        model_logits(loaded, tokens),
        expected,
        model_logits(make_model(kind), tokens),
    )


def test_gpt2_fused_subset_is_written_as_an_equivalent_rank_2r_lora(tmp_path):
    model = make_model("gpt2")
    loralab.inject_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"]))
    randomize_lora(model)
    assert isinstance(model.transformer.h[0].attn.c_attn, LoraFusedLinear)
    loralab.save_adapter(model, tmp_path)

    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    prefix = "base_model.model.transformer.h.0.attn.c_attn"
    A, B = tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"]
    assert A.shape == (8, 32) and B.shape == (96, 8)  # rank 2r over the whole (in, 3d)
    assert B.count_nonzero() > 0
    assert torch.count_nonzero(B[32:64]) == 0  # k rows: exactly frozen
    assert torch.count_nonzero(B[:32, 4:]) == 0 and torch.count_nonzero(B[64:, :4]) == 0
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    # Same scale at rank 2r: alpha doubles with r.
    assert config["rank_pattern"] == {"c_attn": 8} and config["alpha_pattern"] == {"c_attn": 16}
    assert config["fan_in_fan_out"] is True

    # ΔW of the file (Conv1D: transposed) equals loralab's own ΔW for the layer.
    scale = config["alpha_pattern"]["c_attn"] / config["rank_pattern"]["c_attn"]
    expected = model.transformer.h[0].attn.c_attn.delta_weight()
    torch.testing.assert_close((B @ A * scale).T, expected, atol=1e-6, rtol=0)


# -- 1b. PEFT -> loralab ----------------------------------------------------------------------

LOAD_CASES = [
    ("gpt2", "c_attn fan_in_fan_out", {"target_modules": ["c_attn"], "fan_in_fan_out": True}),
    ("gpt2", "wte embedding", {"target_modules": ["wte"]}),
    (
        "llama",
        "rank/alpha patterns",
        {
            "target_modules": ["q_proj", "v_proj"],
            "rank_pattern": {"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 3},
            "alpha_pattern": {"q_proj": 16},
        },
    ),
    ("llama", "rslora", {"target_modules": ["q_proj", "v_proj"], "use_rslora": True}),
    (
        "llama",
        "layers_to_transform",
        {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1]},
    ),
    (
        "bert",
        "SEQ_CLS modules_to_save bias=lora_only",
        {
            "task_type": "SEQ_CLS",
            "target_modules": ["query", "value"],
            "modules_to_save": ["classifier"],
            "bias": "lora_only",
        },
    ),
    ("bert", "bias=all", {"target_modules": ["query", "value"], "bias": "all"}),
    ("gpt2", "all-linear", {"target_modules": "all-linear"}),
    ("llama", "all-linear", {"target_modules": "all-linear"}),
    ("bert", "SEQ_CLS all-linear", {"task_type": "SEQ_CLS", "target_modules": "all-linear"}),
    # No task type: PEFT puts LoRA on the (3, 32) classifier at r=4 > 3. Wasteful but exact,
    # so loading reproduces it where a user's own config would be refused.
    ("bert", "all-linear with rank above the head's size", {"target_modules": "all-linear"}),
    ("llama", "regex string", {"target_modules": r".*layers\.0\.mlp\.(up|down)_proj"}),
]


@pytest.mark.parametrize(
    ("kind", "label", "settings"), LOAD_CASES, ids=[f"{k}-{lab}" for k, lab, _ in LOAD_CASES]
)
def test_loralab_loads_what_peft_saves(tmp_path, kind, label, settings):
    tokens = token_batch()
    peft_model = peft.get_peft_model(
        make_model(kind), peft.LoraConfig(r=4, lora_alpha=8, **settings)
    )
    _randomize_peft(peft_model)
    peft_model.eval()
    expected = model_logits(peft_model, tokens)
    peft_model.save_pretrained(str(tmp_path))

    with warnings.catch_warnings():
        # PEFT's own keys are all known to loralab: not even a warning about one.
        warnings.filterwarnings("error", message=".*unknown key")
        model = loralab.load_adapter(make_model(kind), tmp_path)
    assert_same_logits(
        f"peft->loralab {kind} {label}",
        model_logits(model, tokens),
        expected,
        model_logits(make_model(kind), tokens),
    )
    peft_layers = {
        n.removeprefix("base_model.model.")
        for n, m in peft_model.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    assert set(lora_layers(model)) == peft_layers


def test_peft_embedding_file_uses_lora_embedding_keys(tmp_path):
    peft_model = peft.get_peft_model(
        make_model("gpt2"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["wte"])
    )
    peft_model.save_pretrained(str(tmp_path))
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys == {
        "base_model.model.transformer.wte.lora_embedding_A",
        "base_model.model.transformer.wte.lora_embedding_B",
    }
    model = loralab.inject_adapter(make_model("gpt2"), LoraConfig(r=4, target_modules=["wte"]))
    assert set(loralab.adapter_state_dict(model)) == keys


# -- 1c. loralab -> file -> loralab -------------------------------------------------------------


def test_fused_round_trip_restores_the_fused_subset(tmp_path):
    tokens = token_batch()
    model = make_model("gpt2")
    loralab.inject_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"]))
    randomize_lora(model)
    expected = model_logits(model, tokens)
    loralab.save_adapter(model, tmp_path)
    assert (tmp_path / "loralab.json").exists()

    loaded = loralab.load_adapter(make_model("gpt2"), tmp_path)
    for block in loaded.transformer.h:
        layer = block.attn.c_attn
        assert isinstance(layer, LoraFusedLinear)
        assert layer.parts.enabled == ("q", "v")
        assert layer.lora["default"].r == 4
    assert_same_logits(
        "loralab->loralab gpt2 fused",
        model_logits(loaded, tokens),
        expected,
        model_logits(make_model("gpt2"), tokens),
    )
    for name, layer in lora_layers(model).items():
        torch.testing.assert_close(
            lora_layers(loaded)[name].delta_weight(), layer.delta_weight(), atol=0, rtol=0
        )

    # Without loralab.json the file is still a plain PEFT LoRA (rank 2r) with equal outputs.
    (tmp_path / "loralab.json").unlink()
    plain = loralab.load_adapter(make_model("gpt2"), tmp_path)
    layer = plain.transformer.h[0].attn.c_attn
    assert type(layer) is LoraConv1D and layer.lora["default"].r == 8
    torch.testing.assert_close(model_logits(plain, tokens), expected, atol=ATOL, rtol=0)


def test_loralab_json_only_for_fused_adapters(tmp_path):
    fused = make_model("gpt2")
    loralab.inject_adapter(fused, LoraConfig(r=4, target_modules=["q", "v"]))
    loralab.save_adapter(fused, tmp_path)
    extra = json.loads((tmp_path / "loralab.json").read_text())
    assert extra["fused"]["transformer.h.1.attn.c_attn"] == {"parts": ["q", "v"], "r": 4}

    # A whole-matrix adapter saved into the same directory removes the stale file.
    whole = make_model("gpt2")
    loralab.inject_adapter(whole, LoraConfig(r=2, target_modules=["c_attn"]))
    randomize_lora(whole)
    loralab.save_adapter(whole, tmp_path)
    assert not (tmp_path / "loralab.json").exists()
    loaded = loralab.load_adapter(make_model("gpt2"), tmp_path)
    assert type(loaded.transformer.h[0].attn.c_attn) is LoraConv1D

    for kind in ("llama", "bert"):
        model = loralab.inject_adapter(make_model(kind), LoraConfig(r=2))
        loralab.save_adapter(model, tmp_path / kind)
        assert sorted(os.listdir(tmp_path / kind)) == [
            "adapter_config.json",
            "adapter_model.safetensors",
        ]


# -- 1d. Conv2d ------------------------------------------------------------------------------


def _conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()


def _images() -> torch.Tensor:
    return torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(2))


def test_conv2d_lora_loralab_to_peft(tmp_path):
    model = _conv_net()
    loralab.inject_adapter(model, LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"]))
    randomize_lora(model, std=0.5)
    with torch.no_grad():
        expected = model(_images())
        base = _conv_net()(_images())
    loralab.save_adapter(model, tmp_path)
    shapes = {k: tuple(v.shape) for k, v in load_file(str(tmp_path / WEIGHTS)).items()}
    assert shapes == {
        "base_model.model.0.lora_A.weight": (2, 3, 3, 3),
        "base_model.model.0.lora_B.weight": (8, 2, 1, 1),
        "base_model.model.2.lora_A.weight": (2, 8, 3, 3),
        "base_model.model.2.lora_B.weight": (4, 2, 1, 1),
    }
    loaded = _load_in_peft(_conv_net(), tmp_path)
    with torch.no_grad():
        assert_same_logits("loralab->peft conv2d", loaded(_images()), expected, base)


def test_conv2d_lora_peft_to_loralab(tmp_path):
    peft_model = peft.get_peft_model(
        _conv_net(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"])
    )
    _randomize_peft(peft_model)
    with torch.no_grad():
        expected = peft_model(_images())
        base = _conv_net()(_images())
    peft_model.save_pretrained(str(tmp_path))
    model = loralab.load_adapter(_conv_net(), tmp_path)
    assert all(isinstance(model[i], loralab.LoraConv2d) for i in (0, 2))
    with torch.no_grad():
        assert_same_logits("peft->loralab conv2d", model(_images()), expected, base)


# -- 2. the files themselves -----------------------------------------------------------------


def test_classifier_left_frozen_is_not_written_as_seq_cls(tmp_path):
    # PEFT would add the head to modules_to_save for SEQ_CLS and then expect it in the file.
    model = loralab.inject_adapter(make_model("bert"), LoraConfig(r=4, target_modules=["q", "v"]))
    loralab.save_adapter(model, tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["task_type"] is None
    assert data["modules_to_save"] is None


def test_weights_file_metadata_and_keys_match_peft(tmp_path):
    ours = loralab.inject_adapter(
        make_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"])
    )
    loralab.save_adapter(ours, tmp_path / "ours")
    theirs = peft.get_peft_model(
        make_model("llama"),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    theirs.save_pretrained(str(tmp_path / "theirs"))

    with safe_open(str(tmp_path / "ours" / WEIGHTS), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    our_tensors = load_file(str(tmp_path / "ours" / WEIGHTS))
    their_tensors = load_file(str(tmp_path / "theirs" / WEIGHTS))
    assert {k: v.shape for k, v in our_tensors.items()} == {
        k: v.shape for k, v in their_tensors.items()
    }
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in our_tensors
    assert len(our_tensors) == 8  # 2 layers × (q, v) × (A, B)
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in our_tensors.values())

    ours_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs_config = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "use_rslora", "bias", "fan_in_fan_out", "peft_type"):
        assert ours_config[key] == theirs_config[key], key
    assert sorted(ours_config["target_modules"]) == sorted(theirs_config["target_modules"])


# -- 3. merge_state_dicts ----------------------------------------------------------------------


# -- 4. bad input --------------------------------------------------------------------------------


def _llama_hidden(hidden: int) -> nn.Module:
    torch.manual_seed(0)
    return tiny_llama(hidden)


def test_adapter_for_another_base_names_tensor_and_shapes(tmp_path):
    _, directory = saved_llama(tmp_path, target_modules=["q", "v"])
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert_load_fails(
        directory,
        AdapterFileError,
        rf"'{key}' has shape \(4, 32\) in the file but the model expects \(4, 48\)",
        model=_llama_hidden(48),
    )


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    _, directory = saved_llama(tmp_path, target_modules=["q", "v"])
    path = directory / WEIGHTS
    tensors = load_file(str(path))
    gone = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    save_file({k: v for k, v in tensors.items() if k != gone}, str(path))
    assert_load_fails(directory, AdapterFileError, rf"'{gone}' is missing")

    stray = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
    save_file({**tensors, stray: torch.zeros(4, 32)}, str(path))
    assert_load_fails(directory, AdapterFileError, rf"'{stray}' has no place")


def test_fused_file_with_nonzero_k_block_is_refused(tmp_path):
    model = loralab.inject_adapter(make_model("gpt2"), LoraConfig(r=4, target_modules=["q", "v"]))
    randomize_lora(model)
    loralab.save_adapter(model, tmp_path)
    tensors = load_file(str(tmp_path / WEIGHTS))
    key = "base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"
    tensors[key][40, 0] = 1.0  # a k row
    save_file(tensors, str(tmp_path / WEIGHTS), metadata={"format": "pt"})
    assert_load_fails(tmp_path, AdapterFileError, rf"{key}.*not zero", kind="gpt2")


@pytest.mark.parametrize("damage", ["truncated", "random bytes"])
def test_damaged_weights_file(tmp_path, damage):
    _, directory = saved_llama(tmp_path)
    path = directory / WEIGHTS
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(os.urandom(len(data)))
    assert_load_fails(
        directory,
        AdapterFileError,
        r"adapter_model\.safetensors is truncated or corrupted",
    )


class _Malicious:
    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_run(tmp_path):
    _, directory = saved_llama(tmp_path)
    (directory / WEIGHTS).unlink()
    marker = tmp_path / "pwned"
    payload = _Malicious()
    payload.marker = str(marker)
    torch.save({"base_model.model.x": payload}, directory / "adapter_model.bin")
    assert_load_fails(directory, AdapterFileError, r"adapter_model\.bin: refused to unpickle")
    assert not marker.exists()


def test_plain_pickle_of_tensors_loads(tmp_path):
    tokens = token_batch()
    adapted, directory = saved_llama(tmp_path)
    tensors = load_file(str(directory / WEIGHTS))
    (directory / WEIGHTS).unlink()
    torch.save(tensors, directory / "adapter_model.bin")
    model = loralab.load_adapter(make_model("llama"), directory)
    torch.testing.assert_close(
        model_logits(model, tokens), model_logits(adapted, tokens), atol=ATOL, rtol=0
    )


def test_pickle_of_something_else_is_refused(tmp_path):
    _, directory = saved_llama(tmp_path)
    (directory / WEIGHTS).unlink()
    torch.save([torch.zeros(2)], directory / "adapter_model.bin")
    assert_load_fails(directory, AdapterFileError, "expected a dict from names to tensors")


def test_missing_directory_and_missing_files(tmp_path):
    assert_load_fails(tmp_path / "nowhere", AdapterFileError, "nowhere is not an adapter")
    _, directory = saved_llama(tmp_path)
    (directory / WEIGHTS).unlink()
    assert_load_fails(
        directory, AdapterFileError, "has neither adapter_model.safetensors nor adapter_model.bin"
    )
    _, directory = saved_llama(tmp_path / "again")
    (directory / "adapter_config.json").unlink()
    assert_load_fails(directory, AdapterFileError, r"adapter_config\.json does not exist")


def test_loading_the_same_adapter_name_twice_leaves_the_first(tmp_path):
    tokens = token_batch()
    adapted, directory = saved_llama(tmp_path)
    model = loralab.load_adapter(make_model("llama"), directory)
    before = snapshot(model)
    with pytest.raises(AdapterFileError, match="already has an adapter named 'default'"):
        loralab.load_adapter(model, directory)
    assert snapshot(model)["modules"] == before["modules"]
    torch.testing.assert_close(
        model_logits(model, tokens), model_logits(adapted, tokens), atol=ATOL, rtol=0
    )


# -- 5. atomic saving ------------------------------------------------------------------------


def _adapted_llama(seed: int) -> nn.Module:
    model = loralab.inject_adapter(make_model("llama"), LoraConfig(r=4, target_modules=["q"]))
    randomize_lora(model, seed=seed)
    return model


def test_saving_twice_leaves_no_temporary_files(tmp_path):
    loralab.save_adapter(_adapted_llama(1), tmp_path)
    loralab.save_adapter(_adapted_llama(2), tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", WEIGHTS]
    # the files get the mode a plain write gives (not the private 0600 of a temp file)
    (tmp_path / "plain").write_text("")
    plain_mode = (tmp_path / "plain").stat().st_mode & 0o777
    assert {(tmp_path / n).stat().st_mode & 0o777 for n in (WEIGHTS, "adapter_config.json")} == {
        plain_mode
    }
    saved = load_file(str(tmp_path / WEIGHTS))
    second = loralab.adapter_state_dict(_adapted_llama(2))
    assert all(torch.equal(saved[k], v) for k, v in second.items())


@pytest.mark.parametrize("failing", ["weights", "config"])
def test_failed_save_leaves_previous_files(tmp_path, monkeypatch, failing):
    loralab.save_adapter(_adapted_llama(1), tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}

    def broken_save_file(tensors, path, metadata=None):
        with open(path, "wb") as handle:
            handle.write(b"half a file")
        raise OSError("disk full")

    def broken_write_text(self, text, *args, **kwargs):
        with open(self, "w") as handle:
            handle.write(text[: len(text) // 2])
        raise OSError("disk full")

    if failing == "weights":
        monkeypatch.setattr(loralab.files.adapter_dir, "save_file", broken_save_file)
    else:  # the config is written after the weights: they must not be replaced alone
        monkeypatch.setattr(Path, "write_text", broken_write_text)
    changed = loralab.inject_adapter(make_model("llama"), LoraConfig(r=2, target_modules=["v"]))
    randomize_lora(changed)
    with pytest.raises(OSError, match="disk full"):
        loralab.save_adapter(changed, tmp_path)
    after = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    assert after == before


# -- 6. loralib import ---------------------------------------------------------------------
