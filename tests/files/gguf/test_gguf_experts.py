"""A mixture of experts in llama.cpp's GGUF (Qwen3-MoE, its ``qwen3moe``): the file loads
as the model it was written from, dense and with its weights packed; an adapter on the
stacked experts runs in llama.cpp as a LoRA file and merged into the base, with loralab's
logits; an architecture whose layout is not known here is refused by name."""

from __future__ import annotations

import copy

import gguf
import numpy as np
import pytest
import torch

from conftest import randomize_lora
from gguf_models import save_qwen3_gguf, tiny_qwen3_for_gguf
from llama_cpp_runs import llama_logits, loralab_logits
from loralab import LoraConfig, inject_adapter, save_adapter
from loralab.cli import main
from loralab.files.gguf.adapter import export_adapter_gguf
from loralab.files.gguf.layout import ExportError
from loralab.files.gguf.merged import write_merged_gguf
from loralab.lora.merge import merge_and_unload
from loralab.lora.quantized import PackedLinear
from loralab.models.loading import load_model
from moe_models import tiny_moe

EXPERTS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


@pytest.fixture(scope="module")
def moe_gguf(tmp_path_factory):
    model = tiny_qwen3_for_gguf(moe=True)
    path = tmp_path_factory.mktemp("moe-gguf") / "tiny-qwen3moe.gguf"
    save_qwen3_gguf(path, model)
    return model, path


def _assert_close(theirs: np.ndarray, ours: np.ndarray, what: str) -> None:
    """Within 1e-4 (llama.cpp's f32 arithmetic); the gap is printed for the closing note."""
    gap = np.abs(theirs - ours).max()
    print(f"{what}: max |Δlogits| {gap:.1e}")
    assert gap < 1e-4, gap


def _tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def test_the_file_loads_as_the_model_it_was_written_from_here_and_in_llama_cpp(moe_gguf):
    model, path = moe_gguf
    expected = loralab_logits(model)
    loaded, _ = load_model(str(path))
    # the expert width is a field Transformers' GGUF reader leaves out (its default is 768)
    assert loaded.config.moe_intermediate_size == model.config.moe_intermediate_size == 12
    assert (loralab_logits(loaded) == expected).all()
    _assert_close(llama_logits(path), expected, "the base in llama.cpp")


def test_a_packed_base_keeps_attention_packed_and_reads_the_experts_as_the_dense_load(tmp_path):
    path = tmp_path / "q8_0.gguf"
    save_qwen3_gguf(path, tiny_qwen3_for_gguf(moe=True), "Q8_0")
    kinds = {name: t.tensor_type.name for name, t in _tensors(path).items()}
    assert kinds["blk.0.ffn_gate_exps.weight"] == "Q8_0" and kinds["blk.0.attn_q.weight"] == "Q8_0"
    dense, _ = load_model(str(path))
    packed, _ = load_model(str(path), quantized_base="gguf")
    assert isinstance(packed.model.layers[0].self_attn.q_proj, PackedLinear)
    for ours, theirs in zip(packed.model.layers, dense.model.layers, strict=True):
        for weight in ("gate_up_proj", "down_proj"):  # gate and up, each from its own tensor
            mine, dense_one = (getattr(x.mlp.experts, weight) for x in (ours, theirs))
            assert torch.equal(mine, dense_one)
    assert (loralab_logits(packed) == loralab_logits(dense)).all()


def test_an_expert_adapter_runs_in_llama_cpp_as_a_lora_file_and_merged(moe_gguf, tmp_path, capsys):
    _, path = moe_gguf
    model, _ = load_model(str(path))
    config = LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["q_proj", "v_proj"],
        target_parameters=["experts"],
        rank_pattern={"down_proj": 3},
        alpha_pattern={"down_proj": 2},  # its own scale: folded into its lora_b
    )
    inject_adapter(model, config)
    randomize_lora(model, std=0.3)
    save_adapter(model, tmp_path / "adapter")
    expected = loralab_logits(model)
    assert np.abs(llama_logits(path) - expected).max() > 0.05  # the adapter matters

    lora_file = tmp_path / "adapter.gguf"
    assert main(["export", "--model", str(path), "--adapter", str(tmp_path / "adapter"),
                 "--output", str(lora_file)]) == 0  # fmt: skip
    assert "modules have another scale" in capsys.readouterr().out
    shapes = {name: tuple(t.data.shape) for name, t in _tensors(lora_file).items()}
    assert shapes["blk.1.ffn_gate_exps.weight.lora_a"] == (4, 2, 32)  # experts × r × in
    assert shapes["blk.1.ffn_up_exps.weight.lora_b"] == (4, 12, 2)  # up's half of B
    assert shapes["blk.1.ffn_down_exps.weight.lora_b"] == (4, 32, 3)
    _assert_close(llama_logits(path, lora_file), expected, "the LoRA file in llama.cpp")

    merged_file = tmp_path / "merged.gguf"
    assert main(["merge", "--model", str(path), "--adapter", str(tmp_path / "adapter"),
                 "--format", "gguf", "--output", str(merged_file)]) == 0  # fmt: skip
    source, written = _tensors(path), _tensors(merged_file)
    changed = {name for name in source if bytes(source[name].data) != bytes(written[name].data)}
    assert changed == {
        f"blk.{b}.{t}.weight" for b in (0, 1) for t in ("attn_q", "attn_v", *EXPERTS)
    }
    _assert_close(llama_logits(merged_file), expected, "the merged file in llama.cpp")


def test_expert_factors_without_their_layers_are_refused_with_what_to_pass(moe_gguf, tmp_path):
    model, _ = moe_gguf
    config = LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=["experts"])
    save_adapter(inject_adapter(copy.deepcopy(model), config), tmp_path / "a")
    with pytest.raises(ExportError, match=r"holds stacked expert factors.*`experts`"):
        export_adapter_gguf(tmp_path / "a", model.config, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


def test_an_moe_architecture_whose_layout_is_not_known_is_refused_by_name(tiny_gguf_file, tmp_path):
    base = tiny_moe("olmoe")
    config = LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=["experts"])
    save_adapter(inject_adapter(copy.deepcopy(base), config), tmp_path / "a")
    with pytest.raises(ExportError, match="the base is 'olmoe'"):
        export_adapter_gguf(tmp_path / "a", base.config, tmp_path / "a.gguf")
    merged = merge_and_unload(inject_adapter(copy.deepcopy(base), config))
    with pytest.raises(ExportError, match="the base is 'olmoe'"):
        write_merged_gguf(tiny_gguf_file, tmp_path / "m.gguf", "f32", merged)
    assert not (tmp_path / "a.gguf").exists() and not (tmp_path / "m.gguf").exists()
