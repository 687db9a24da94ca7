"""The main job on the real embedded model (slow: a few minutes on 2 cores)."""

import json

import pytest

from loralab.demo import run_demo


@pytest.mark.slow
def test_demo_adapts_the_real_model_and_reports(tmp_path):
    report = run_demo(tmp_path, steps=20, test_size=16)
    assert report.adapted["bleu"] > report.base["bleu"] + 10
    assert report.adapted["rouge_l"] > report.base["rouge_l"] + 10
    assert report.trainable == 2 * 30 * 8 * (576 + 576) - 30 * 8 * (
        576 - 192
    )  # q: 576², v: 576→192
    assert report.adapter_bytes < report.model_bytes / 100
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["adapted"] == report.adapted
    text = (tmp_path / "report.md").read_text()
    assert "| bleu" in text and "## Examples" in text
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()
