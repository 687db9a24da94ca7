"""A GGUF file read through Transformers (``models/gguf_source.py``): a file whose weights
Transformers cannot all place is refused, not loaded with random ones; a new task head is
the one weight that may be missing."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from conftest import add_tiny_tokenizer
from loralab.models.errors import ModelLoadError
from loralab.models.loading import load_model


def _save_mixtral_in_llama_layout(path) -> None:
    """A tiny Mixtral as llama.cpp's converter writes one: the ``llama`` architecture with
    an expert count, its experts as ``ffn_{gate,up,down}_exps`` and its router as
    ``ffn_gate_inp``."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-mixtral")
    writer.add_context_length(256)
    writer.add_embedding_length(32)
    writer.add_block_count(2)
    writer.add_feed_forward_length(12)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_dimension_count(8)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_expert_count(4)
    writer.add_expert_used_count(2)
    tokens = add_tiny_tokenizer(writer)
    rng = np.random.default_rng(0)

    def add(name: str, *shape: int) -> None:
        writer.add_tensor(name, (0.02 * rng.standard_normal(shape)).astype(np.float32))

    add("token_embd.weight", len(tokens), 32)
    add("output.weight", len(tokens), 32)
    writer.add_tensor("output_norm.weight", np.ones(32, np.float32))
    for block in range(2):
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{block}.{norm}.weight", np.ones(32, np.float32))
        for name, rows in (("attn_q", 32), ("attn_k", 16), ("attn_v", 16), ("attn_output", 32)):
            add(f"blk.{block}.{name}.weight", rows, 32)
        add(f"blk.{block}.ffn_gate_inp.weight", 4, 32)
        add(f"blk.{block}.ffn_gate_exps.weight", 4, 12, 32)
        add(f"blk.{block}.ffn_up_exps.weight", 4, 12, 32)
        add(f"blk.{block}.ffn_down_exps.weight", 4, 32, 12)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_file_whose_weights_transformers_cannot_all_place_is_refused(tmp_path):
    path = tmp_path / "tiny-mixtral.gguf"
    _save_mixtral_in_llama_layout(path)
    with pytest.raises(ModelLoadError, match=r"no tensor for 6 of its weights") as caught:
        load_model(str(path))
    assert "model.layers.0.mlp.down_proj.weight" in str(caught.value)
    assert str(path) in str(caught.value) and "Mixtral" in str(caught.value)


def test_a_classifier_head_that_is_new_is_not_refused(tiny_gguf_file):
    model, _ = load_model(str(tiny_gguf_file), kind="classification", num_labels=3)
    assert model.score.out_features == 3


def test_a_file_whose_tensors_do_not_fit_its_metadata_is_refused_in_one_error(tmp_path):
    """Transformers raises a RuntimeError (after its load report) when a tensor's shape is
    not the config's; the user gets loralab's error naming the file."""
    from gguf_models import save_qwen3_gguf, tiny_qwen3_for_gguf

    model = tiny_qwen3_for_gguf(moe=True)
    model.config.moe_intermediate_size = 8  # the metadata says 8, the expert tensors hold 12
    path = tmp_path / "mismatched.gguf"
    save_qwen3_gguf(path, model)
    with pytest.raises(ModelLoadError, match=f"could not load GGUF file {path}"):
        load_model(str(path))
