"""The packed formats: every value unpacked bit for bit as the ``gguf`` package's own
dequantizers give it, for the formats it can write and for the k-quants it only reads."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from conftest import packed_bytes
from loralab.lora.quantized import FORMATS, format_named, format_of_ggml_type


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"])
def test_unpacking_is_the_gguf_packages_bit_for_bit(name):
    rng = np.random.default_rng(0)
    values = rng.standard_normal((48, 512)).astype(np.float32)
    packed = packed_bytes(values, name, rng)
    expected = gguf.quants.dequantize(packed, gguf.GGMLQuantizationType[name])
    ours = format_named(name).dequantize(torch.from_numpy(packed.copy()), 512)
    assert ours.dtype == torch.float32
    assert np.array_equal(ours.numpy().view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("name", ["Q4_K", "Q5_K", "Q6_K"])
def test_every_byte_of_a_k_quant_block_counts(name):
    """Random bytes everywhere but the fp16 scales: each bit of the scales and the
    integers reaches the values, as in the ``gguf`` package."""
    rng = np.random.default_rng(1)
    kind = gguf.GGMLQuantizationType[name]
    block_values = gguf.GGML_QUANT_SIZES[kind][0]
    for _ in range(3):
        packed = packed_bytes(np.zeros((4, block_values * 2), np.float32), name, rng)
        expected = gguf.quants.dequantize(packed, kind)
        ours = format_named(name).dequantize(torch.from_numpy(packed.copy()), block_values * 2)
        assert np.array_equal(ours.numpy(), expected)
        assert len(np.unique(expected)) > block_values // 4  # not a degenerate block


def test_the_registry_names_llama_cpps_type_numbers():
    for name, block_format in FORMATS.items():
        kind = gguf.GGMLQuantizationType[name]
        assert block_format.ggml_type == int(kind)
        assert (block_format.block_values, block_format.block_bytes) == gguf.GGML_QUANT_SIZES[kind]
        assert format_of_ggml_type(int(kind)) is block_format
    assert format_of_ggml_type(int(gguf.GGMLQuantizationType.Q5_0)) is None


def test_an_unknown_format_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"IQ2_XS is not a packed format .*Q4_0, Q4_1"):
        format_named("IQ2_XS")


def test_a_row_that_is_not_whole_blocks_is_refused():
    assert "blocks of 256 values; a row of 96" in format_named("Q4_K").refusal(96)
    assert format_named("Q4_0").refusal(96) is None
