"""The main job on the real embedded model (slow: a few minutes on 2 cores)."""

import json

import pytest

from loralab.demo import run_demo


@pytest.mark.slow
def test_demo_adapts_the_real_model_and_reports(tmp_path):
    report = run_demo(tmp_path, steps=20, test_size=16)
    print({"raw": report.base_raw_prompt, "chat": report.base, "lora": report.adapted})
    # The baseline is the base model asked through its chat template; LoRA beats it, and
    # the raw prompt, which the base model was never trained to complete, is far below.
    for metric in ("bleu", "rouge_l"):
        assert report.adapted[metric] > report.base[metric] > report.base_raw_prompt[metric]
    assert [m["role"] for m in report.baseline_chat] == ["user", "assistant", "user"]
    assert report.trainable == 2 * 30 * 8 * (576 + 576) - 30 * 8 * (
        576 - 192
    )  # q: 576², v: 576→192
    assert report.adapter_bytes < report.model_bytes / 100
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["adapted"] == report.adapted and saved["base"] == report.base
    assert saved["base_raw_prompt"] == report.base_raw_prompt
    text = (tmp_path / "report.md").read_text()
    assert "| bleu" in text and "## Examples" in text
    assert "base, chat template + instruction + 1 example" in text and "base, raw prompt" in text
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()
