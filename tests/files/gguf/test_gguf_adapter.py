"""Adapters exported for llama.cpp, checked by llama.cpp itself (llama-cpp-python)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from conftest import save_tiny_gguf
from llama_cpp_runs import ALL, adapted, llama_logits, loralab_logits
from loralab.files.gguf.adapter import export_adapter_gguf
from loralab.files.gguf.layout import ExportError
from loralab.models.gguf_layout import rotary_rows
from loralab.models.loading import load_model


def test_the_base_alone_agrees_with_llama_cpp(tiny_gguf_file):
    model, _ = load_model(str(tiny_gguf_file))
    difference = np.abs(llama_logits(tiny_gguf_file) - loralab_logits(model)).max()
    assert difference < 1e-4, difference


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"use_rslora": True},
        {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"o_proj": 3}},
        {"r": 3, "lora_alpha": 16, "target_modules": [*ALL, "lm_head"]},
        {"target_modules": ["embed_tokens", "q_proj"]},
    ],
    ids=["plain", "rslora", "patterns", "head-and-odd-rank", "embedding"],
)
def test_llama_cpp_runs_our_adapter_as_we_do(tiny_gguf_file, tmp_path, config):
    model, adapter = adapted(tiny_gguf_file, tmp_path, **config)
    exported = export_adapter_gguf(adapter, model.config, tmp_path / "adapter.gguf")
    ours = loralab_logits(model)
    theirs = llama_logits(tiny_gguf_file, exported.path)
    base = llama_logits(tiny_gguf_file)
    assert np.abs(base - ours).max() > 0.05  # the adapter changes what llama.cpp computes
    assert np.abs(theirs - ours).max() < 1e-4, np.abs(theirs - ours).max()
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()
    if config.get("use_rslora"):
        assert exported.alpha == pytest.approx(8 * 2)  # α/√r through alpha/r: α·√r, r = 4
        assert exported.rescaled == []
    if "rank_pattern" in config:
        assert exported.rescaled  # their scale differs from the file's alpha / r
    if config.get("r") == 3:
        assert exported.rescaled == []  # 16/3 · 3 is 16 up to rounding: nothing to fold


def test_the_file_holds_llama_cpps_keys_and_names(tiny_gguf_file, tmp_path):
    model, adapter = adapted(tiny_gguf_file, tmp_path, target_modules=["q_proj", "v_proj"])
    exported = export_adapter_gguf(adapter, model.config, tmp_path / "a.gguf", outtype="f16")
    reader = gguf.GGUFReader(exported.path)
    fields = {name: reader.fields[name] for name in reader.fields}

    def text(name):
        part = fields[name]
        return bytes(part.parts[part.data[0]]).decode()

    assert text("general.type") == "adapter" and text("adapter.type") == "lora"
    assert text("general.architecture") == "llama"
    assert float(fields["adapter.lora.alpha"].parts[-1][0]) == 8.0
    names = {t.name: t for t in reader.tensors}
    assert set(names) == {
        f"blk.{b}.{m}.weight.lora_{x}" for b in (0, 1) for m in ("attn_q", "attn_v") for x in "ab"
    }
    assert list(names["blk.0.attn_q.weight.lora_a"].shape) == [32, 4]  # ggml's (in, r)
    assert list(names["blk.0.attn_q.weight.lora_b"].shape) == [4, 32]
    assert names["blk.0.attn_q.weight.lora_a"].tensor_type == gguf.GGMLQuantizationType.F16
    theirs = llama_logits(tiny_gguf_file, exported.path)
    print(f"f16: max |Δ| {np.abs(theirs - loralab_logits(model)).max():.2e}")
    assert np.abs(theirs - loralab_logits(model)).max() < 2e-2  # f16 factors
    exported = export_adapter_gguf(adapter, model.config, tmp_path / "b.gguf", outtype="bf16")
    kinds = {t.name: t.tensor_type for t in gguf.GGUFReader(exported.path).tensors}
    assert kinds["blk.0.attn_q.weight.lora_a"] == gguf.GGMLQuantizationType.BF16
    theirs = llama_logits(tiny_gguf_file, exported.path)
    print(f"bf16: max |Δ| {np.abs(theirs - loralab_logits(model)).max():.2e}")
    assert np.abs(theirs - loralab_logits(model)).max() < 5e-2  # bf16 factors


def test_q8_0_keeps_rows_it_cannot_block_in_f16(tiny_gguf_file, tmp_path):
    model, adapter = adapted(tiny_gguf_file, tmp_path)
    exported = export_adapter_gguf(adapter, model.config, tmp_path / "a.gguf", outtype="q8_0")
    assert exported.kept_f16 and all(k.endswith("lora_b") for k in exported.kept_f16)  # rows of r
    theirs, ours = llama_logits(tiny_gguf_file, exported.path), loralab_logits(model)
    effect = np.abs(llama_logits(tiny_gguf_file) - ours).max()
    error = np.abs(theirs - ours).max()
    print(f"q8_0: max |Δ| {error:.2e} against the adapter's own effect {effect:.2e}")
    # llama.cpp multiplies a q8_0 weight with activations quantized to 8 bits as well;
    # on this tiny random model with a strong adapter that is 12% of the adapter's effect
    assert error < 0.25 * effect


def test_rotary_rows_is_llama_cpps_permutation():
    """Head by head, the first and second rotary halves become interleaved pairs."""
    rows = torch.arange(8.0)[:, None]  # two heads of four rows
    assert rotary_rows(rows, heads=2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_what_the_format_cannot_hold_is_refused_and_nothing_is_written(tiny_gguf_file, tmp_path):
    model, _ = load_model(str(tiny_gguf_file))
    cases = [
        ({"use_dora": True}, "DoRA's ΔW, not a product B·A"),
        ({"modules_to_save": ["lm_head"]}, "modules trained in full"),
        ({"bias": "lora_only"}, "trained biases"),
    ]
    for index, (extra, words) in enumerate(cases):
        directory = tmp_path / f"case{index}"
        _, adapter = adapted(tiny_gguf_file, directory, target_modules=["q_proj"], **extra)
        with pytest.raises(ExportError, match=words):
            export_adapter_gguf(adapter, model.config, directory / "out.gguf")
        assert not (directory / "out.gguf").exists()
    _, adapter = adapted(tiny_gguf_file, tmp_path / "ok", target_modules=["q_proj"])
    refused = "--outtype must be one of f32, f16, bf16, q8_0, got 'q4'"
    with pytest.raises(ExportError, match=refused):
        export_adapter_gguf(adapter, model.config, tmp_path / "x.gguf", outtype="q4")
    with pytest.raises(ExportError, match="is a directory"):
        export_adapter_gguf(adapter, model.config, tmp_path)
    gpt2 = type("Config", (), {"model_type": "gpt2"})()
    with pytest.raises(ExportError, match="the base is 'gpt2'"):
        export_adapter_gguf(adapter, gpt2, tmp_path / "y.gguf")
    assert not list(tmp_path.glob("*.gguf"))


def test_the_command_exports_and_refuses_in_one_line(tiny_gguf_file, tmp_path, capsys):
    from loralab.cli import main

    model, adapter = adapted(tiny_gguf_file, tmp_path, target_modules=["q_proj", "v_proj"])
    out = tmp_path / "out" / "adapter.gguf"
    argv = ["export", "--model", str(tiny_gguf_file), "--adapter", str(adapter)]
    assert main([*argv, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "llama.cpp LoRA adapter for llama, 8 tensors, adapter.lora.alpha = 8" in printed
    assert np.abs(llama_logits(tiny_gguf_file, out) - loralab_logits(model)).max() < 1e-4
    assert main([*argv, "--output", str(tmp_path / "q.gguf"), "--outtype", "q4"]) == 2
    assert "--outtype must be one of f32, f16, bf16, q8_0" in capsys.readouterr().err
    other = tmp_path / "other.gguf"
    save_tiny_gguf(other, hidden_size=48)
    bad = ["export", "--model", str(other), "--adapter", str(adapter), "--output", str(out)]
    assert main(bad) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after Transformers' GGUF bar
    assert last.startswith("loralab: error:") and "q_proj.lora_A.weight" in last
