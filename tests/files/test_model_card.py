"""The model card of an adapter trained over a packed base: the GGUF file, its sha256 and
its packed types, beside a PEFT ``adapter_config.json`` that has no extra key; none over a
dense base, and an earlier card of ours removed when the base is dense again."""

from __future__ import annotations

import hashlib
import json

from conftest import save_tiny_gguf
from loralab import LoraConfig, inject_adapter, save_adapter, trainable_parameters
from loralab.files.model_card import CARD_FILE, MARKER
from loralab.files.peft_config import CONFIG_FILE
from loralab.models.loading import load_model

CONFIG = LoraConfig(r=2, target_modules=["q", "v"])


def test_the_card_names_the_packed_file_and_types_and_the_config_stays_peft(tmp_path):
    path = tmp_path / "base.gguf"
    save_tiny_gguf(path, linear_type="Q4_1")
    model, _ = load_model(str(path), quantized_base="gguf")
    inject_adapter(model, CONFIG)
    save_adapter(model, tmp_path / "adapter")
    card = (tmp_path / "adapter" / CARD_FILE).read_text()
    assert card.startswith(MARKER)
    assert "- file: `base.gguf`" in card
    assert f"- sha256: `{hashlib.sha256(path.read_bytes()).hexdigest()}`" in card
    assert "- packed linear weights: 15 × Q4_1" in card
    dense, _ = load_model(str(path))
    inject_adapter(dense, CONFIG)
    save_adapter(dense, tmp_path / "dense")
    config = json.loads((tmp_path / "adapter" / CONFIG_FILE).read_text())
    assert config == json.loads((tmp_path / "dense" / CONFIG_FILE).read_text())
    assert not (tmp_path / "dense" / CARD_FILE).exists()
    save_adapter(dense, tmp_path / "adapter")  # the same folder, now from a dense base
    assert not (tmp_path / "adapter" / CARD_FILE).exists()


def test_a_card_of_the_users_own_is_left_alone(tmp_path):
    path = tmp_path / "base.gguf"
    save_tiny_gguf(path)
    dense, _ = load_model(str(path))
    inject_adapter(dense, CONFIG)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / CARD_FILE).write_text("# my notes\n")
    save_adapter(dense, tmp_path / "adapter")
    assert (tmp_path / "adapter" / CARD_FILE).read_text() == "# my notes\n"


def test_the_parameter_report_counts_packed_weights_and_the_base_bytes(tmp_path):
    path = tmp_path / "base.gguf"
    save_tiny_gguf(path, linear_type="Q8_0")
    reports = {}
    for quantized in (None, "gguf"):
        model, _ = load_model(str(path), quantized_base=quantized)
        inject_adapter(model, CONFIG)
        reports[quantized] = trainable_parameters(model)
    dense, packed = reports[None], reports["gguf"]
    assert (packed.total, packed.trainable) == (dense.total, dense.trainable)
    assert dense.packed_bytes == 0 and packed.packed_bytes > 0
    # Q8_0 keeps 34 bytes for 32 values, fp32 128: the linear weights take 34/128 of theirs.
    linear_values = packed.packed_bytes // 34 * 32
    assert dense.frozen_bytes - packed.frozen_bytes == linear_values * 4 - packed.packed_bytes
    assert "MB of it packed" in str(packed)
