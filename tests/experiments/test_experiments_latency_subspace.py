"""The latency and subspace experiments' own parts, on tiny models (no downloads, no
training): the variants, the timing loop, the analysis of saved adapters, and the reports
they write."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification

from conftest import VOCAB, make_model, token_batch
from loralab.experiments import get_experiment
from loralab.experiments.latency import (
    VARIANTS,
    LatencyScale,
    latency_variants,
    report_of,
    summarize,
    time_forwards,
)
from loralab.experiments.report import write_report
from loralab.experiments.runs import RunResult
from loralab.experiments.settings import Scale
from loralab.experiments.subspace import analyse, learned_factors, site
from loralab.experiments.subspace import report_of as subspace_report
from loralab.lora.inject import lora_layers
from loralab.methods.method_files import save_method
from loralab.training.config import TrainConfig
from loralab.training.loop import prepare_model

# -- latency ------------------------------------------------------------------------------


def test_latency_variants_are_the_five_methods_with_nonzero_updates():
    base = make_model("llama")
    tokens = token_batch()
    with torch.no_grad():
        expected = base(tokens).logits
    variants = latency_variants(base)
    assert list(variants) == list(VARIANTS)
    assert variants["base"] is base
    assert not lora_layers(variants["lora-merged"])  # a plain model again
    assert lora_layers(variants["lora-unmerged"])
    with torch.no_grad():
        outputs = {name: model(tokens).logits for name, model in variants.items()}
    assert torch.equal(outputs["base"], expected)  # the base is left as it was
    assert torch.allclose(outputs["lora-merged"], outputs["lora-unmerged"], atol=1e-5)
    for name in ("lora-unmerged", "adapter-h", "adapter-l"):
        assert not torch.allclose(outputs[name], expected, atol=1e-4), name


def test_timing_loop_report_and_files(tmp_path):
    variants = latency_variants(make_model("llama"))
    shapes = [(1, 4), (2, 8)]
    logged = []
    timings = time_forwards(
        variants, shapes, repetitions=3, warmup=1, vocab_size=VOCAB, log=logged.append
    )
    assert list(timings) == ["1x4", "2x8"]
    for by_variant in timings.values():
        assert list(by_variant) == list(VARIANTS)
        assert all(len(v) == 3 and min(v) > 0 for v in by_variant.values())
    assert len(logged) == 2
    summary = summarize(timings)
    assert summary["1x4"]["base"]["ratio_median"] == 1.0
    stats = summary["2x8"]["adapter-h"]
    assert stats["ratio_q1"] <= stats["ratio_median"] <= stats["ratio_q3"]
    assert stats["min_ms"] <= stats["median_ms"] <= stats["max_ms"]

    scale = LatencyScale(seeds=(0, 1, 2), shapes=tuple(shapes), warmup=1)
    paths = write_report(report_of(timings, scale, list(variants)), tmp_path, "test")
    assert all(path.exists() and path.stat().st_size > 0 for path in paths.values())
    raw = json.loads(paths["json"].read_text())
    assert raw["timings_s"] == timings  # every raw timing
    assert raw["scale"]["shapes"] == [[1, 4], [2, 8]]
    text = paths["md"].read_text()
    assert "| Adapter^H |" in text and "(2, 8)" in text and "smaller stand-ins" in text


def test_latency_scale_keeps_its_kind_with_seeds():
    experiment = get_experiment("latency")
    scale = experiment.QUICK.with_seeds(3)
    assert isinstance(scale, LatencyScale)
    assert scale.seeds == (0, 1, 2) and scale.shapes == experiment.QUICK.shapes
    assert experiment.FULL.shapes == ((1, 128), (16, 256), (32, 512))
    assert "(32, 512)" in experiment.FULL.describe()


# -- subspace -----------------------------------------------------------------------------


def wide_bert() -> BertForSequenceClassification:
    # 64 wide, so that an r = 64 adapter fits, as the experiment's comparison needs
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=32,
        num_labels=3,
        pad_token_id=0,
    )
    return BertForSequenceClassification(config).eval()


def saved_run(base, r: int, seed: int, directory: Path, move_a: bool) -> RunResult:
    """A run as ``train_and_score`` leaves it, with 'training' faked by random updates."""
    settings = {
        "model": "tiny",
        "model_kind": "classification",
        "task": "nli",
        "method": "lora",
        "r": r,
        "target_modules": ["q", "v"],
        "lora_dropout": 0.0,
        "seed": seed,
        "output_dir": str(directory / f"r{r}-seed{seed}"),
    }
    model = prepare_model(TrainConfig(**settings), copy.deepcopy(base))
    generator = torch.Generator().manual_seed(100 + r + seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            factors = layer.lora[layer.active_adapter]
            factors.B.copy_(torch.randn(factors.B.shape, generator=generator) * 0.1)
            if move_a:
                factors.A.add_(torch.randn(factors.A.shape, generator=generator) * 0.01)
    save_method(model, Path(settings["output_dir"]) / "adapter")
    return RunResult(f"LoRA r={r}", "nli", seed, {"accuracy": 50.0}, 1, 2, 0.0, 0.0, settings)


def test_learned_factors_recover_the_initialisation(tmp_path):
    base = wide_bert()
    still = learned_factors(base, saved_run(base, 8, 1, tmp_path, move_a=False))
    moved = learned_factors(base, saved_run(base, 8, 0, tmp_path, move_a=True))
    assert len(still) == 4  # 2 layers × {q, v}
    assert all(f.moved == 0 for f in still.values())  # the init is rebuilt exactly
    assert all(0 < f.moved < 0.5 for f in moved.values())
    for factors in moved.values():
        assert factors.A.shape == (8, 64) and factors.delta.shape == factors.weight.shape
        assert factors.delta.abs().max() > 0
    assert sorted(site(n) for n in moved) == [(0, "q"), (0, "v"), (1, "q"), (1, "v")]


def test_subspace_analysis_and_report(tmp_path):
    base = wide_bert()
    ranks = (1, 8, 64)
    runs = {(r, 0): saved_run(base, r, 0, tmp_path, move_a=True) for r in ranks}
    runs[(8, 1)] = saved_run(base, 8, 1, tmp_path, move_a=True)
    factors = {key: learned_factors(base, run) for key, run in runs.items()}
    analysis = analyse(factors, 0, 1)

    first, *_ = sorted(analysis["modules"], key=site)
    entry = analysis["modules"][first]
    assert (entry["layer"], entry["weight"]) == (0, "q")
    assert torch.tensor(entry["ranks"]).shape == (8, 64)
    assert torch.tensor(entry["seeds"]).shape == (8, 8)
    # One seed: the first adapted A of r = 64 starts with the r = 8 rows, so at init the
    # r = 8 subspace lies inside the r = 64 one (the artifact the report shows).
    assert abs(entry["ranks_init"][7][63] - 1) < 1e-9
    for name, entry in analysis["modules"].items():
        for key in ("ranks", "ranks_init", "seeds", "seeds_init"):
            values = torch.tensor(entry[key])
            assert values.min() >= -1e-9 and values.max() <= 1 + 1e-9, (name, key)
    random = torch.tensor(analysis["random"]["ranks"]["mean"])
    assert random.shape == (8, 64) and 0 < random[0, 0] < 0.2
    assert set(analysis["amplification"]) == {"1", "8", "64"}
    assert all(a["factor"] > 0 for a in analysis["amplification"]["1"].values())

    scale = Scale(steps=1, train_size=1, test_size=1, seeds=(0, 1))
    paths = write_report(subspace_report(analysis, runs, scale, 0, 1), tmp_path / "out", "t")
    assert all(path.exists() and path.stat().st_size > 0 for path in paths.values())
    raw = json.loads(paths["json"].read_text())
    assert raw["modules"][first]["ranks"] == analysis["modules"][first]["ranks"]
    assert len(raw["runs"]) == 4
    text = paths["md"].read_text()
    assert "| random | Gaussian |" in text and "Amplification factor" in text

    # --seeds 1: no seed comparison, and the report says so instead of failing
    one_seed = analyse({k: v for k, v in factors.items() if k[1] == 0}, 0, None)
    assert "seeds" not in one_seed["modules"][first]
    report = subspace_report(one_seed, {(8, 0): runs[(8, 0)]}, scale, 0, None)
    paths = write_report(report, tmp_path / "one-seed", "t")
    assert "| 0 | W_q |" in paths["md"].read_text()


def test_subspace_runs_end_to_end_on_a_tiny_model(monkeypatch, tiny_model_dir, tmp_path):
    from loralab.experiments import settings as experiment_settings
    from loralab.experiments import subspace

    tiny = (str(tiny_model_dir), "causal-lm")  # nli as label words; 32 wide, so r ≤ 8
    monkeypatch.setattr(experiment_settings, "TASK_MODELS", {"nli": tiny})
    monkeypatch.setattr(subspace, "RANKS", (2, 8))
    monkeypatch.setattr(subspace, "COMPARED", (2, 8))
    scale = Scale(2, 8, 2, seeds=(0, 1), batch_size=4, max_length=400, quick=True)
    report = subspace.run(scale, tmp_path / "work")
    paths = write_report(report, tmp_path / "out", "loralab reproduce subspace --quick")
    raw = json.loads(paths["json"].read_text())
    assert [(run["r"], run["seed"]) for run in raw["runs"]] == [(2, 0), (8, 0), (2, 1)]
    assert len(raw["modules"]) == 4  # 2 layers × {q, v}
    assert set(raw["amplification"]) == {"2", "8"}
    assert paths["png"].stat().st_size > 1000


def test_torch_threads_are_set_inside_the_block_and_restored():
    from loralab.experiments.runs import torch_threads

    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before
