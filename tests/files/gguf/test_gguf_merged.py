"""Merged models as one GGUF file (``loralab merge --format gguf``), run by llama.cpp."""

from __future__ import annotations

import shutil

import gguf
import numpy as np
import pytest
import torch

from conftest import save_random_adalora, save_tiny_gguf
from llama_cpp_runs import adapted, llama_logits, loralab_logits
from loralab.cli import main
from loralab.files.gguf.layout import ExportError
from loralab.files.gguf.merged import source_gguf, write_merged_gguf
from loralab.lora.merge import merge_and_unload
from loralab.models.loading import load_model

Q8_0, F32, BF16 = (
    gguf.GGMLQuantizationType.Q8_0,
    gguf.GGMLQuantizationType.F32,
    gguf.GGMLQuantizationType.BF16,
)


def _tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def _fields(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def test_the_base_alone_in_f32_is_the_source_and_q8_0_runs(tiny_gguf_file, tmp_path):
    f32 = write_merged_gguf(tiny_gguf_file, tmp_path / "base-f32.gguf", "f32")
    assert f32.replaced == [] and f32.tensors == len(_tensors(tiny_gguf_file))
    assert _fields(f32.path) == {**_fields(tiny_gguf_file), "general.file_type": 0}
    assert (llama_logits(f32.path) == llama_logits(tiny_gguf_file)).all()
    q8 = write_merged_gguf(tiny_gguf_file, tmp_path / "base-q8_0.gguf", "q8_0")
    kinds = {name: t.tensor_type for name, t in _tensors(q8.path).items()}
    assert kinds["blk.0.attn_q.weight"] == Q8_0 and kinds["blk.0.attn_norm.weight"] == F32
    assert _fields(q8.path)["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    error = np.abs(llama_logits(q8.path) - llama_logits(tiny_gguf_file)).max()
    assert 0 < error < 0.05, error


def test_a_bf16_base_is_the_source_rounded_to_bf16_and_llama_cpp_runs_it(tiny_gguf_file, tmp_path):
    bf16 = write_merged_gguf(tiny_gguf_file, tmp_path / "base-bf16.gguf", "bf16")
    source, written = _tensors(tiny_gguf_file), _tensors(bf16.path)
    assert written["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.BF16
    assert written["blk.0.attn_norm.weight"].tensor_type == F32
    values = gguf.quants.dequantize(written["blk.0.ffn_up.weight"].data, BF16)
    expected = torch.from_numpy(np.array(source["blk.0.ffn_up.weight"].data))
    assert np.array_equal(values, expected.bfloat16().float().numpy())  # rounded to nearest
    assert _fields(bf16.path)["general.file_type"] == gguf.LlamaFileType.MOSTLY_BF16
    error = np.abs(llama_logits(bf16.path) - llama_logits(tiny_gguf_file)).max()
    assert 0 < error < 0.05, error


@pytest.mark.parametrize("config", [{}, {"use_dora": True}], ids=["lora", "dora"])
def test_a_merged_f32_gguf_computes_what_the_unmerged_model_does(tiny_gguf_file, tmp_path, config):
    model, _ = adapted(tiny_gguf_file, tmp_path, **config)
    expected = loralab_logits(model)
    merged = write_merged_gguf(
        tiny_gguf_file, tmp_path / "m.gguf", "f32", merge_and_unload(model, safe=True)
    )
    projections = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    assert sorted(merged.replaced) == sorted(
        f"blk.{b}.{p}.weight" for b in (0, 1) for p in projections
    )
    source, written = _tensors(tiny_gguf_file), _tensors(merged.path)
    for name in ("token_embd.weight", "output.weight", "blk.1.ffn_norm.weight"):
        assert bytes(written[name].data) == bytes(source[name].data)  # kept byte for byte
    theirs = llama_logits(merged.path)
    assert np.abs(llama_logits(tiny_gguf_file) - expected).max() > 0.05
    assert np.abs(theirs - expected).max() < 1e-4, np.abs(theirs - expected).max()


def test_merged_tensors_take_the_outtype_and_the_others_keep_theirs(tiny_gguf_file, tmp_path):
    q8_base = write_merged_gguf(tiny_gguf_file, tmp_path / "base-q8_0.gguf", "q8_0").path
    model, _ = adapted(q8_base, tmp_path, target_modules=["q_proj"])
    expected = loralab_logits(model)  # on the q8_0 base's weights, dequantized
    merged = write_merged_gguf(
        q8_base, tmp_path / "m.gguf", "f32", merge_and_unload(model, safe=True)
    )
    assert merged.replaced == ["blk.0.attn_q.weight", "blk.1.attn_q.weight"]
    source, written = _tensors(q8_base), _tensors(merged.path)
    assert written["blk.0.attn_q.weight"].tensor_type == F32
    assert written["blk.0.attn_k.weight"].tensor_type == Q8_0
    assert bytes(written["blk.0.attn_k.weight"].data) == bytes(source["blk.0.attn_k.weight"].data)
    # llama.cpp multiplies the kept q8_0 weights with 8-bit activations, loralab in f32
    assert np.abs(llama_logits(merged.path) - expected).max() < 0.05


def test_merge_refuses_and_leaves_nothing(tiny_gguf_file, tmp_path, tiny_model_dir):
    with pytest.raises(ExportError, match=r"did not come from a GGUF file.*convert_hf_to_gguf"):
        source_gguf(str(tiny_model_dir))
    with pytest.raises(ExportError, match="is the source GGUF itself"):
        write_merged_gguf(tiny_gguf_file, tiny_gguf_file)
    not_gguf = tmp_path / "not.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf at all")
    with pytest.raises(ExportError, match=r"not\.gguf is not a readable GGUF file"):
        write_merged_gguf(not_gguf, tmp_path / "out.gguf")
    with pytest.raises(ExportError, match="--outtype must be one of"):
        write_merged_gguf(tiny_gguf_file, tmp_path / "out.gguf", "q4_0")
    with pytest.raises(ExportError, match="is a directory"):
        write_merged_gguf(tiny_gguf_file, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not.gguf"]


def test_the_command_merges_writes_a_modelfile_and_refuses_in_one_line(
    tiny_gguf_file, tmp_path, tiny_model_dir, capsys
):
    model, adapter = adapted(tiny_gguf_file, tmp_path, target_modules=["q_proj", "v_proj"])
    expected = loralab_logits(model)
    out = tmp_path / "out" / "merged.gguf"
    argv = ["merge", "--format", "gguf", "--model", str(tiny_gguf_file)]
    assert main([*argv, "--adapter", str(adapter), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "4 merged tensors in f32" in printed and "ollama create NAME -f" in printed
    assert np.abs(llama_logits(out) - expected).max() < 1e-4
    modelfile = (tmp_path / "out" / "merged.Modelfile").read_text()
    assert "FROM ./merged.gguf\n" in modelfile and "ADAPTER" not in modelfile
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}' in modelfile
    assert "PARAMETER stop <|im_end|>" in modelfile
    assert main([*argv, "--output", str(tmp_path / "base.gguf")]) == 0  # the base alone
    assert "the base, every tensor in f32" in capsys.readouterr().out
    cases = [
        ([*argv, "--output", str(tmp_path / "x.gguf"), "--outtype", "q4_k"], "--outtype must"),
        ([*argv, "--output", str(tmp_path)], "is a directory"),
        (
            ["merge", "--format", "gguf", "--model", str(tiny_model_dir), "--output", "y.gguf"],
            "did not come from a GGUF file",
        ),
        (["merge", "--output", str(tmp_path / "dir")], "--adapter is required"),
    ]
    not_gguf = tmp_path / "not.gguf"
    not_gguf.write_text("not a GGUF file")
    cases.append(
        (["merge", "--format", "gguf", "--model", str(not_gguf), "--output", "y.gguf"],
         "not.gguf is not a readable GGUF file")
    )  # fmt: skip
    other = tmp_path / "other.gguf"
    save_tiny_gguf(other, hidden_size=48)
    cases.append(
        (
            [
                "merge",
                "--format",
                "gguf",
                "--model",
                str(other),
                "--adapter",
                str(adapter),
                "--output",
                str(tmp_path / "z.gguf"),
            ],
            "q_proj.lora_A.weight",
        )
    )
    for words, message in cases:
        assert main(words) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("loralab: error:") and message in last, last
    assert not list(tmp_path.glob("[xyz].gguf")) and not (tmp_path / "dir").exists()


def test_an_adapter_export_writes_its_modelfile(tiny_gguf_file, tmp_path, capsys):
    _, adapter = adapted(tiny_gguf_file, tmp_path, target_modules=["q_proj"])
    out = tmp_path / "e2e.gguf"
    argv = ["export", "--model", str(tiny_gguf_file), "--adapter", str(adapter)]
    assert main([*argv, "--output", str(out)]) == 0
    modelfile = (tmp_path / "e2e.Modelfile").read_text().splitlines()
    assert modelfile[1] == f"FROM {tiny_gguf_file.resolve()}"
    assert modelfile[2] == "ADAPTER ./e2e.gguf"
    assert f"llama-cli -m {tiny_gguf_file} --lora {out}" in capsys.readouterr().out


def test_a_base_in_the_cache_goes_beside_the_export_not_named_in_it(
    tiny_gguf_file, tmp_path, monkeypatch, capsys
):
    """The Modelfile's FROM never points into loralab's cache (ours to clear): the base
    is linked beside the adapter, and the folder works wherever it moves."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LORALAB_CACHE", str(cache))
    base = cache / "models" / "tiny-llama.gguf"
    base.parent.mkdir(parents=True)
    shutil.copyfile(tiny_gguf_file, base)
    _, adapter = adapted(base, tmp_path, target_modules=["q_proj"])
    out = tmp_path / "out" / "e2e.gguf"
    argv = ["export", "--model", str(base), "--adapter", str(adapter), "--output", str(out)]
    assert main(argv) == 0
    modelfile = (out.parent / "e2e.Modelfile").read_text().splitlines()
    assert modelfile[1:3] == ["FROM ./tiny-llama.gguf", "ADAPTER ./e2e.gguf"]
    beside = out.parent / "tiny-llama.gguf"
    assert beside.read_bytes() == base.read_bytes() and beside.stat().st_ino == base.stat().st_ino
    assert f"llama-cli -m {beside} --lora {out}" in capsys.readouterr().out


def test_a_tied_base_refuses_an_embedding_adapter_llama_cpp_would_apply_twice(tmp_path):
    from loralab.files.gguf.adapter import export_adapter_gguf

    tied = tmp_path / "tied.gguf"
    save_tiny_gguf(tied, tied=True)
    for target in ("embed_tokens", "lm_head"):
        model, adapter = adapted(tied, tmp_path / target, target_modules=[target])
        assert model.config.tie_word_embeddings
        with pytest.raises(ExportError, match="ties its head to its embedding"):
            export_adapter_gguf(adapter, model.config, tmp_path / "a.gguf")
    model, _ = load_model(str(tied))
    merged = write_merged_gguf(tied, tmp_path / "same.gguf", "f32", model)
    assert merged.replaced == []  # the tied head is the embedding's tensor, not a new one
    assert "output.weight" not in _tensors(merged.path)


def test_the_command_merges_an_adalora_adapter_too(tiny_gguf_file, tmp_path):
    """Any mergeable method's files: AdaLoRA's P Λ Q is folded in as LoRA's B A is."""
    model, _ = load_model(str(tiny_gguf_file))
    save_random_adalora(model, tmp_path / "adalora", ["q_proj", "k_proj"])
    expected = loralab_logits(model)
    out = tmp_path / "merged.gguf"
    argv = ["merge", "--format", "gguf", "--model", str(tiny_gguf_file)]
    assert main([*argv, "--adapter", str(tmp_path / "adalora"), "--output", str(out)]) == 0
    assert np.abs(llama_logits(tiny_gguf_file) - expected).max() > 0.05
    assert np.abs(llama_logits(out) - expected).max() < 1e-4
