"""A GGUF loaded with its quantized linear weights packed: the same numbers as the dense
load (q and k rows in Transformers' order), LoRA training that gives the dense run's
losses, adapters that PEFT reads both ways, and one clear line for a file it cannot take."""

from __future__ import annotations

import gguf
import numpy as np
import peft
import pytest
import torch

from conftest import assert_same_logits, randomize_lora, save_tiny_gguf
from loralab import LoraConfig, TrainConfig, inject_adapter, load_adapter, save_adapter, train
from loralab.lora.quantized import PackedLinear
from loralab.models.errors import ModelLoadError
from loralab.models.loading import load_model

TOKENS = torch.tensor([[5, 17, 99, 3, 250, 8, 61, 2]])


def _file(tmp_path, linear_type: str, embedding_type: str = "F32", hidden: int = 32):
    path = tmp_path / f"tiny-{linear_type}.gguf"
    save_tiny_gguf(path, hidden_size=hidden, linear_type=linear_type, embedding_type=embedding_type)
    return path


@pytest.mark.parametrize(
    ("linear_type", "embedding_type", "hidden"),
    [
        ("Q4_0", "F32", 32),
        ("Q4_1", "Q8_0", 32),  # the embedded SmolLM2's types
        ("Q8_0", "Q4_0", 32),
        ("Q4_K", "Q6_K", 256),  # k-quants: rows of whole 256-value super-blocks
        ("Q5_K", "F32", 256),
        ("Q6_K", "Q8_0", 256),
    ],
)
def test_packed_weights_are_the_dense_loads_and_the_logits_equal(
    tmp_path, linear_type, embedding_type, hidden
):
    path = _file(tmp_path, linear_type, embedding_type, hidden)
    dense, _ = load_model(str(path))
    packed, _ = load_model(str(path), quantized_base="gguf")
    dense_modules = dict(dense.named_modules())
    layers = {n: m for n, m in packed.named_modules() if isinstance(m, PackedLinear)}
    assert len(layers) == 15  # 14 in the blocks and the untied head
    assert all(m.block_format.name == linear_type for m in layers.values())
    for name, layer in layers.items():  # q and k included: their rows were permuted back
        assert torch.equal(layer.dequantized(), dense_modules[name].weight)
    dense_tensors = dense.state_dict()
    for name, tensor in packed.state_dict().items():  # the embedding and the norms
        assert torch.equal(tensor, dense_tensors[name]), name
    with torch.no_grad():
        assert torch.equal(packed(TOKENS).logits, dense(TOKENS).logits)


def test_training_over_the_packed_file_gives_the_dense_runs_losses(tmp_path):
    path = _file(tmp_path, "Q4_1", "Q8_0")
    losses = {}
    for quantized, checkpointing in ((None, False), ("gguf", False), ("gguf", True)):
        losses[quantized, checkpointing] = _losses(
            tmp_path,
            str(path),
            quantized,
            f"checkpointing-{checkpointing}",
            data=str(_records(tmp_path)),
            max_steps=3,
            batch_size=2,
            max_length=32,
            target_modules="all-linear",
            gradient_checkpointing=checkpointing,  # the forward runs twice, unpacking again
        )
    assert losses["gguf", False] == losses[None, False]
    assert losses["gguf", True] == losses[None, False]
    assert len(losses[None, False]) == 3


def _losses(tmp_path, model: str, quantized: str | None, name: str, **settings) -> list[float]:
    """The losses of a short run over ``model``, its base packed or dense."""
    config = TrainConfig(
        model=model,
        output_dir=str(tmp_path / f"{name}-{quantized}"),
        quantized_base=quantized,
        progress=False,
        eval_every=0,
        save_every=0,
        **settings,
    )
    return train(config).losses


def _records(tmp_path):
    path = tmp_path / "records.jsonl"
    lines = [f'{{"prompt": "the {i} ", "completion": "the the {i}"}}' for i in range(8)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_an_adapter_trained_over_the_packed_base_runs_in_peft_on_the_dense_one(tmp_path):
    path = _file(tmp_path, "Q4_1")
    packed, _ = load_model(str(path), quantized_base="gguf")
    inject_adapter(packed, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_lora(packed, seed=2)
    save_adapter(packed, tmp_path / "adapter")
    dense, _ = load_model(str(path))
    theirs = peft.PeftModel.from_pretrained(dense, tmp_path / "adapter")
    assert_same_logits(packed, theirs, TOKENS, "packed base's adapter in PEFT on the dense base")


def test_a_peft_adapter_loads_into_the_packed_base(tmp_path):
    path = _file(tmp_path, "Q8_0")
    dense, _ = load_model(str(path))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    theirs = peft.get_peft_model(dense, config)
    randomize_lora(theirs, seed=4)
    theirs.save_pretrained(tmp_path / "peft")
    packed, _ = load_model(str(path), quantized_base="gguf")
    load_adapter(packed, tmp_path / "peft")
    assert_same_logits(packed, theirs, TOKENS, "PEFT's adapter on the packed base")


def test_a_type_it_cannot_keep_packed_is_one_line(tmp_path):
    path = _file(tmp_path, "Q5_0")
    with pytest.raises(
        ModelLoadError,
        match=r"blk\.0\.\w+\.weight is Q5_0, which loralab cannot "
        r"keep packed \(it computes with Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K\)",
    ):
        load_model(str(path), quantized_base="gguf")
    dense, _ = load_model(str(path))  # the dense load takes it, as before
    assert not any(isinstance(m, PackedLinear) for m in dense.modules())


def test_a_damaged_block_is_refused_at_load(tmp_path):
    path = _file(tmp_path, "Q4_0")
    reader = gguf.GGUFReader(path)
    tensor = next(t for t in reader.tensors if t.name == "blk.1.ffn_up.weight")
    offset = tensor.data_offset + 18 * 3  # the fourth block's scale
    data = bytearray(path.read_bytes())
    data[offset : offset + 2] = np.float16(np.inf).tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=r"blk\.1\.ffn_up\.weight holds a non-finite value"):
        load_model(str(path), quantized_base="gguf")


def test_a_cut_file_is_one_line(tmp_path):
    path = _file(tmp_path, "Q4_0")
    path.write_bytes(path.read_bytes()[:-300])
    with pytest.raises(
        ModelLoadError, match=rf"{path.name} (is not a whole GGUF file|ends inside)"
    ):
        load_model(str(path), quantized_base="gguf")


def test_a_base_that_is_not_a_gguf_is_refused(tiny_model_dir):
    with pytest.raises(ModelLoadError, match=r"packed weights; .* not a \.gguf"):
        load_model(str(tiny_model_dir), quantized_base="gguf")
    with pytest.raises(
        ValueError, match="quantized_base must be one of gguf, nf4, fp4, int8, got 'nf5'"
    ):
        load_model(str(tiny_model_dir), quantized_base="nf5")


@pytest.mark.parametrize("method", ["adalora", "bitfit", "adapter-h", "prelayer"])
def test_methods_over_a_frozen_base_train_over_a_packed_one_as_over_the_dense(tmp_path, method):
    path = _file(tmp_path, "Q8_0")
    settings = {"data": str(_records(tmp_path)), "method": method, "target_modules": ["q", "v"]}
    settings |= {"max_steps": 2, "batch_size": 2, "max_length": 32}
    dense = _losses(tmp_path, str(path), None, method, **settings)
    assert _losses(tmp_path, str(path), "gguf", method, **settings) == dense


def test_full_fine_tuning_of_a_packed_base_is_refused(tmp_path):
    path = _file(tmp_path, "Q4_1")
    config = TrainConfig(
        model=str(path),
        data=str(_records(tmp_path)),
        method="full",
        max_steps=1,
        output_dir=str(tmp_path / "run"),
        quantized_base="gguf",
        progress=False,
    )
    with pytest.raises(ValueError, match=r"method='full' trains the base's weights, but .*packed"):
        train(config)


@pytest.mark.slow
def test_the_embedded_smollm2_packed_is_its_dense_load_and_trains_alike(tmp_path):
    dense, tokenizer = load_model("smollm2-135m")
    packed, _ = load_model("smollm2-135m", quantized_base="gguf")
    dense_modules = dict(dense.named_modules())
    layers = {n: m for n, m in packed.named_modules() if isinstance(m, PackedLinear)}
    assert len(layers) == 210
    assert all(torch.equal(m.dequantized(), dense_modules[n].weight) for n, m in layers.items())
    packed_bytes = sum(m.packed.numel() for m in layers.values())
    dense_bytes = sum(dense_modules[n].weight.numel() * 4 for n in layers)
    print(f"linear weights: {packed_bytes / 1e6:.1f} MB packed, {dense_bytes / 1e6:.1f} MB fp32")
    assert packed_bytes < dense_bytes / 6
    ids = tokenizer("The quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(packed(ids).logits, dense(ids).logits)
    del dense, packed
    settings = {"task": "e2e", "max_steps": 3, "batch_size": 2, "train_size": 16}
    dense_losses = _losses(tmp_path, "smollm2-135m", None, "run", validation_size=4, **settings)
    packed_losses = _losses(tmp_path, "smollm2-135m", "gguf", "run", validation_size=4, **settings)
    assert packed_losses == dense_losses
