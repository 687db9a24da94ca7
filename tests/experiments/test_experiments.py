"""The experiments' machinery: every training-based experiment runs end to end on a tiny
model (its numbers mean nothing here) and writes its table, raw numbers and figure."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from loralab.cli import main
from loralab.experiments import EXPERIMENT_NAMES, get_experiment, reproduce
from loralab.experiments import settings as experiment_settings
from loralab.experiments.adalora import final_ranks_of
from loralab.experiments.report import mean_std, write_report
from loralab.experiments.runs import run_arms
from loralab.experiments.settings import Arm, Scale
from loralab.lora.config import ConfigError

TINY = Scale(steps=2, train_size=12, test_size=3, seeds=(0, 1), batch_size=4, max_length=400)


@pytest.fixture
def tiny_tasks(monkeypatch, tiny_model_dir):
    """Every task runs on the tiny causal LM (nli as label words)."""
    tiny = (str(tiny_model_dir), "causal-lm")
    monkeypatch.setattr(
        experiment_settings, "TASK_MODELS", dict.fromkeys(("nli", "e2e", "sql"), tiny)
    )


def test_every_finding_of_the_paper_has_an_experiment():
    expected = {"methods", "ranks", "low-data", "scaling", "lora-pe", "latency", "subspace"}
    assert expected | {"adalora"} <= set(EXPERIMENT_NAMES)


def test_an_unknown_experiment_lists_the_valid_ones(capsys):
    with pytest.raises(ConfigError, match="unknown experiment 'rank'; choose one of: methods"):
        get_experiment("rank")
    assert main(["reproduce", "rank", "--quick"]) == 2
    assert "choose one of: methods, ranks" in capsys.readouterr().err


def test_mean_and_sample_standard_deviation():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([4.0]) == (4.0, 0.0)


@pytest.mark.parametrize(
    "name", ["methods", "ranks", "low-data", "scaling", "lora-pe", "adalora", "dpo", "grpo"]
)
def test_training_experiments_run_end_to_end_and_write_their_outputs(
    name, tiny_tasks, monkeypatch, tmp_path
):
    module = get_experiment(name)
    # Fewer arms where an experiment has many; the machinery is the same.
    if name == "ranks":
        monkeypatch.setattr(module, "RANKS", (1, 2))
    if name == "low-data":
        monkeypatch.setattr(module, "SIZES", (6, 12))
    if name == "methods":
        monkeypatch.setattr(module, "QUICK_TASKS", ("e2e",))
    if name == "grpo":  # two GRPO steps of tiny rollouts
        settings = {**module.GRPO_SETTINGS, "batch_size": 2, "num_generations": 2}
        monkeypatch.setattr(module, "GRPO_SETTINGS", {**settings, "max_new_tokens": 4})
        monkeypatch.setattr(module, "GRPO_STEPS", {"quick": 2, "full": 2})
    if name == "scaling":
        families = {family: variants[:2] for family, variants in module.FAMILIES.items()}
        monkeypatch.setattr(module, "FAMILIES", families)
    scale = Scale(**{**TINY.__dict__, "quick": True})
    report = module.run(scale, tmp_path / "work")
    paths = write_report(report, tmp_path / "out", command=f"loralab reproduce {name} --quick")
    assert {p.suffix for p in paths.values()} == {".md", ".json", ".png"}
    raw = json.loads(paths["json"].read_text())
    assert raw["experiment"] == module.NAME and raw["scale"]["seeds"] == [0, 1]
    seeds = {run["seed"] for run in raw["runs"]}
    assert seeds == {0, 1}
    text = paths["md"].read_text()
    assert "±" in text and f"loralab reproduce {name} --quick" in text
    assert f"({len(raw['runs'])} runs: " in text and "min of training and scoring" in text
    assert paths["png"].stat().st_size > 1000


def test_reproduce_refuses_zero_seeds(tmp_path):
    with pytest.raises(ConfigError, match="--seeds must be ≥ 1"):
        reproduce("ranks", "quick", seeds=0, output_dir=tmp_path)


def test_jobs_change_the_time_not_the_numbers(tiny_tasks, tmp_path):
    """Runs in worker processes train the same adapters, bit for bit, as one after another,
    and what ``inspect`` reads in a worker comes back."""
    arms = [
        Arm("LoRA", "e2e", {"method": "lora", "r": 2}),
        Arm("AdaLoRA", "e2e", {"method": "adalora", "r": 4, "target_r": 2, "max_steps": 4}),
    ]
    results, lines = {}, []
    for jobs in (1, 2):
        workdir = tmp_path / f"jobs{jobs}"
        scale = replace(TINY, jobs=jobs)
        results[jobs] = run_arms("t", arms, scale, workdir, lines.append, final_ranks_of)
    serial, parallel = results[1], results[2]
    assert [(r.label, r.seed) for r in parallel] == [(r.label, r.seed) for r in serial]
    assert len(lines) == 8 and lines[-1].startswith("[4/4] t: ")
    for one, other in zip(serial, parallel, strict=True):
        assert one.metrics == other.metrics and one.final_trainable == other.final_trainable
        mine = load_file(f"{one.settings['output_dir']}/adapter/adapter_model.safetensors")
        theirs = load_file(f"{other.settings['output_dir']}/adapter/adapter_model.safetensors")
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), one.label
    ranks = [r.extra["final_ranks"] for r in parallel if r.label == "AdaLoRA"]
    assert len(ranks) == 2 and all(sum(r.values()) > 0 for r in ranks)
    assert ranks == [r.extra["final_ranks"] for r in serial if r.label == "AdaLoRA"]


def test_reproduce_refuses_zero_jobs(tmp_path):
    with pytest.raises(ConfigError, match="--jobs must be ≥ 1"):
        reproduce("ranks", "quick", jobs=0, output_dir=tmp_path)


def test_a_task_with_its_own_scale_keeps_the_experiments_seeds_and_jobs():
    lm = Scale(steps=40, train_size=100, test_size=8, seeds=(0,), batch_size=2)
    scale = replace(TINY, jobs=2, per_task=(("sql", lm),)).with_seeds(3)
    assert scale.for_task("nli") is scale
    sql = scale.for_task("sql")
    assert (sql.steps, sql.test_size, sql.batch_size) == (40, 8, 2)
    assert (sql.seeds, sql.jobs, sql.quick, sql.per_task) == ((0, 1, 2), 2, False, ())
    assert "; sql: 40 steps × batch 2" in scale.describe() and "2 jobs" in scale.describe()


def test_the_recipe_experiment_trains_each_change_on_a_classifier(
    monkeypatch, tiny_classifier_dir, tmp_path
):
    classifier = (str(tiny_classifier_dir), "classification")
    monkeypatch.setattr(experiment_settings, "TASK_MODELS", {"nli": classifier})
    module = get_experiment("recipe")
    monkeypatch.setattr(module, "METHOD_ARMS", module.METHOD_ARMS[:1] + module.METHOD_ARMS[-2:-1])
    scale = replace(TINY, steps=10, max_length=64, quick=True, seeds=(0, 1, 2))
    paths = write_report(module.run(scale, tmp_path / "work"), tmp_path / "out")
    runs = json.loads(paths["json"].read_text())["runs"]
    variants = module.variants(scale)
    assert len(runs) == 3 * len(variants) + 2 * 2  # FT's two heads on the first two seeds
    settings = {r["label"]: r["settings"] for r in runs if r["seed"] == 0}
    first = settings[variants[0][0]]
    assert first["warmup_steps"] == 1 and first["head_learning_rate"] is None
    for label, changes in variants[1:]:
        assert changes and all(settings[label][k] == v for k, v in changes.items()), label
    assert settings["warm-up 30 %"]["warmup_steps"] == 3
    assert settings["head at 1e-4"]["head_learning_rate"] == pytest.approx(1e-4)
    # every experiment now trains a classifier's head at HEAD_LEARNING_RATE
    assert settings["FT, head 1e-2"]["head_learning_rate"] == experiment_settings.HEAD_LEARNING_RATE
    assert settings["FT, head own"]["head_learning_rate"] is None
    assert {r["seed"] for r in runs if r["label"].startswith("FT")} == {0, 1}
    text = paths["md"].read_text()
    assert "| Recipe | accuracy by seed | mean ± std | stuck |" in text
    assert text.count(" of 3 |") == len(variants)
    assert "| Method | head at its rate | mean ± std | head at 1e-2 | mean ± std |" in text


def test_a_stored_run_keeps_the_label_of_the_plan_that_reads_it(tiny_tasks, tmp_path):
    """The key holds what a run computes, not its name: a renamed arm reuses the run and
    shows its new name; a None that is the default is the same run as the default unset."""
    scale = replace(TINY, seeds=(0,), store=str(tmp_path / "runs"))
    run_arms("t", [Arm("old", "e2e", {"method": "lora", "r": 2})], scale, tmp_path / "a")
    lines = []
    again = [Arm("new", "e2e", {"method": "lora", "r": 2, "head_learning_rate": None})]
    (run,) = run_arms("t", again, scale, tmp_path / "b", lines.append)
    assert run.label == "new" and lines == ["t: 1 of 1 runs found in " + str(tmp_path / "runs")]


@pytest.mark.parametrize("name", ["lora-pe", "adalora"])
def test_an_experiment_that_selects_rates_reports_the_selection(
    name, tiny_tasks, monkeypatch, tmp_path
):
    module = get_experiment(name)
    monkeypatch.setattr(module, "TASKS" if name == "adalora" else "QUICK_TASKS", ("e2e",))
    scale = replace(TINY, seeds=(0,), quick=True, lr_grid=(0.5, 1.0, 2.0), validation_size=3)
    paths = write_report(module.run(scale, tmp_path / "work"), tmp_path / "out")
    raw = json.loads(paths["json"].read_text())
    arms = {run["label"] for run in raw["runs"]}
    assert {s["label"] for s in raw["selection"]} == arms
    assert all(len(s["candidates"]) >= 3 for s in raw["selection"])
    assert "Learning rates, chosen on validation with the first seed" in paths["md"].read_text()
