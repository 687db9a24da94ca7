"""The result store, shards and learning-rate selection of ``loralab reproduce`` (on a
tiny model: the numbers mean nothing, the bookkeeping is what is tested)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from loralab.cli import main
from loralab.experiments import settings as experiment_settings
from loralab.experiments.runs import RunsMissing, run_arms, run_settings
from loralab.experiments.settings import Arm, Scale
from loralab.experiments.store import RunStore, Shard, run_key
from loralab.lora.config import ConfigError

TINY = Scale(steps=2, train_size=12, test_size=3, seeds=(0, 1), batch_size=4, max_length=400)
ARMS = [
    Arm("LoRA", "e2e", {"method": "lora", "r": 2}),
    Arm("BitFit", "e2e", {"method": "bitfit"}),
]


@pytest.fixture
def tiny_tasks(monkeypatch, tiny_model_dir):
    tiny = (str(tiny_model_dir), "causal-lm")
    monkeypatch.setattr(
        experiment_settings, "TASK_MODELS", dict.fromkeys(("nli", "e2e", "sql"), tiny)
    )


def _trained(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("[")]


def test_a_key_is_what_determines_the_run_and_nothing_else(tmp_path):
    settings = run_settings(ARMS[0], 0, TINY, tmp_path, ("m", "causal-lm"))
    key, inputs = run_key(settings, {"test_size": 3})
    moved = {**settings, "output_dir": "/elsewhere", "progress": True}
    assert run_key(moved, {"test_size": 3})[0] == key  # where it writes: not the run
    for change in ({"seed": 1}, {"learning_rate": 2e-3}, {"r": 4}, {"model": "other"}):
        assert run_key({**settings, **change}, {"test_size": 3})[0] != key, change
    assert run_key(settings, {"test_size": 4})[0] != key
    assert "output_dir" not in inputs["settings"] and inputs["store_version"] >= 1


def test_a_second_run_reads_the_store_and_trains_nothing(tiny_tasks, tmp_path):
    scale = replace(TINY, store=str(tmp_path / "runs"))
    lines: list[str] = []
    first = run_arms("t", ARMS, scale, tmp_path / "w1", lines.append)
    assert len(_trained(lines)) == 4 and RunStore(tmp_path / "runs").count() == 4
    lines.clear()
    again = run_arms("t", ARMS, scale, tmp_path / "w2", lines.append)
    assert _trained(lines) == [] and lines == [f"t: 4 of 4 runs found in {tmp_path / 'runs'}"]
    assert [(r.label, r.seed, r.metrics) for r in again] == [
        (r.label, r.seed, r.metrics) for r in first
    ]
    # more seeds: only the new seed's runs train
    lines.clear()
    run_arms("t", ARMS, scale.with_seeds(3), tmp_path / "w3", lines.append)
    assert [line.split(": ", 1)[1].split(":")[0] for line in _trained(lines)] == [
        "LoRA on e2e, seed 2",
        "BitFit on e2e, seed 2",
    ]


def test_a_run_cut_short_is_trained_again_and_a_damaged_record_is_named(tiny_tasks, tmp_path):
    store = tmp_path / "runs"
    scale = replace(TINY, store=str(store))
    run_arms("t", ARMS, scale, tmp_path / "w1", lambda _: None)
    records = sorted(store.glob("*.json"))
    records[0].unlink()  # as if killed before it finished: nothing was written
    (store / f".{records[0].name}.abc.tmp").write_text('{"result": ')  # a write cut short
    lines: list[str] = []
    run_arms("t", ARMS, scale, tmp_path / "w2", lines.append)
    assert len(_trained(lines)) == 1 and records[0].exists()
    records[1].write_text("{not json")
    with pytest.raises(ConfigError, match=f"{records[1].name}: not a stored run result"):
        run_arms("t", ARMS, scale, tmp_path / "w3", lambda _: None)


def test_shards_cover_the_plan_once_and_the_report_waits_for_all(tiny_tasks, tmp_path):
    trained: list[str] = []
    for index in (1, 2):
        scale = replace(TINY, store=str(tmp_path / "runs"), shard=Shard(index, 2))
        lines: list[str] = []
        if index == 1:
            with pytest.raises(RunsMissing, match="2 of 4 runs are not in"):
                run_arms("t", ARMS, scale, tmp_path / f"w{index}", lines.append)
        else:
            run_arms("t", ARMS, scale, tmp_path / f"w{index}", lines.append)  # the last one
        trained += [line.split(": ", 1)[1].split(":")[0] for line in _trained(lines)]
    assert sorted(trained) == sorted(
        f"{arm.label} on e2e, seed {seed}" for arm in ARMS for seed in (0, 1)
    )
    assert RunStore(tmp_path / "runs").count() == 4


def test_shard_parses_and_refuses_in_one_line():
    assert Shard.parse("3/8") == Shard(3, 8) and str(Shard(3, 8)) == "3/8"
    assert [Shard(2, 3).owns(i) for i in range(6)] == [False, True, False, False, True, False]
    for bad in ("0/4", "5/4", "2", "a/b"):
        with pytest.raises(ConfigError, match="--shard"):
            Shard.parse(bad)


def test_the_learning_rate_is_chosen_on_validation_and_its_first_run_reused(tiny_tasks, tmp_path):
    scale = replace(TINY, lr_grid=(0.5, 1.0, 2.0), validation_size=3, store=str(tmp_path / "r"))
    lines: list[str] = []
    runs = run_arms("t", ARMS, scale, tmp_path / "w", lines.append)
    # 2 arms × 3 rates with seed 0 (scored on validation too), one more rate for an arm
    # whose best sits on the grid's edge, then 2 arms × seed 1
    tried = sum(len(s.candidates) for s in runs.selections)
    assert len(_trained(lines)) == tried + 2 and len(runs) == 4
    for selection in runs.selections:
        own = selection.candidates[1]["learning_rate"]
        rates = [c["learning_rate"] for c in selection.candidates]
        assert rates[:3] == pytest.approx([f * own for f in (0.5, 1, 2)])
        scores = [c["validation"] for c in selection.candidates[:3]]
        if len(rates) == 4:  # the best of the grid was its lowest or its highest rate
            edge = 0 if max(scores) == scores[0] and scores[0] > scores[1] else 2
            assert scores[edge] == max(scores)
            assert rates[3] == pytest.approx(rates[edge] * (0.5 if edge == 0 else 2))
        best = max(c["validation"] for c in selection.candidates)
        winners = [c for c in selection.candidates if c["validation"] == best]
        assert selection.chosen in [c["learning_rate"] for c in winners]
        final = [r for r in runs if r.label == selection.label]
        assert {r.settings["learning_rate"] for r in final} == {selection.chosen}
        assert final[0].validation and not final[1].validation  # seed 0 is the selection's


def test_the_command_takes_a_shard_and_writes_the_report_when_complete(
    tiny_tasks, tmp_path, monkeypatch, capsys
):
    from loralab.experiments import lora_pe

    monkeypatch.setattr(lora_pe, "QUICK", replace(TINY, seeds=(0,)))
    argv = ["reproduce", "lora-pe", "--quick", "--output-dir", str(tmp_path / "out")]
    assert main([*argv, "--shard", "1/2"]) == 0
    assert "runs are not in" in capsys.readouterr().out
    assert not (tmp_path / "out" / "lora-pe.md").exists()
    assert main([*argv, "--shard", "2/2"]) == 0
    assert (tmp_path / "out" / "lora-pe.md").exists()
    stored = json.loads(next((tmp_path / "out" / "runs").glob("*.json")).read_text())
    assert stored["inputs"]["settings"]["task"] == "nli" and "metrics" in stored["result"]
    assert main([*argv, "--shard", "3/2"]) == 2
    assert main(["reproduce", "lora-pe", "--quick", "--scale", "full"]) == 2
    assert main(["reproduce", "ranks", "--scale", "standard"]) == 2
    assert "ranks has no standard mode; it has quick, full" in capsys.readouterr().err


def test_every_method_repeats_bit_for_bit_at_any_number_of_jobs(tiny_tasks, tmp_path):
    """Each method of the comparison trains the same tensors, to the last bit, run after
    run and in one process or two (PreEmbed's table included: its gradient is a scatter-add
    over the prompt positions, ordered on one thread)."""
    from safetensors.torch import load_file

    from loralab.experiments.methods import METHOD_ARMS

    arms = [Arm(label, "e2e", settings) for label, settings in METHOD_ARMS]
    scale = replace(TINY, seeds=(0,), steps=3)
    trained = {}
    for attempt, jobs in enumerate((1, 2, 1)):
        runs = run_arms("t", arms, replace(scale, jobs=jobs), tmp_path / f"w{attempt}", print)
        trained[attempt] = {
            run.label: {
                f"{path.name}:{key}": tensor
                for path in sorted(Path(run.settings["output_dir"]).rglob("*.safetensors"))
                for key, tensor in load_file(path).items()
            }
            for run in runs
        }
    for label in trained[0]:
        first = trained[0][label]
        for attempt in (1, 2):
            other = trained[attempt][label]
            assert first and first.keys() == other.keys(), label
            assert all(torch.equal(first[k], other[k]) for k in first), (label, attempt)


def test_a_failing_run_keeps_the_ones_that_finished_beside_it(tiny_tasks, tmp_path):
    arms = [ARMS[0], Arm("broken", "e2e", {"method": "lora", "r": 0})]
    scale = replace(TINY, seeds=(0,), jobs=2, store=str(tmp_path / "runs"))
    with pytest.raises(ConfigError, match="r"):
        run_arms("t", arms, scale, tmp_path / "w", lambda _: None)
    assert RunStore(tmp_path / "runs").count() == 1  # LoRA's, trained beside the failure


def test_a_best_rate_on_the_grid_s_edge_is_tried_one_step_further():
    from types import SimpleNamespace

    from loralab.experiments.runs import _beyond

    scale = replace(TINY, lr_grid=(0.5, 1.0, 2.0))
    arm = Arm("LoRA", "e2e", {"method": "lora", "learning_rate": 1e-3})

    def run(rate, bleu):
        return SimpleNamespace(settings={"learning_rate": rate}, validation={"bleu": bleu})

    top = _beyond(arm, [run(5e-4, 1.0), run(1e-3, 2.0), run(2e-3, 3.0)], scale)
    assert top.settings["learning_rate"] == pytest.approx(4e-3)
    bottom = _beyond(arm, [run(5e-4, 3.0), run(1e-3, 2.0), run(2e-3, 1.0)], scale)
    assert bottom.settings["learning_rate"] == pytest.approx(2.5e-4)
    assert _beyond(arm, [run(5e-4, 1.0), run(1e-3, 3.0), run(2e-3, 2.0)], scale) is None
    assert _beyond(arm, [run(1e-3, 1.0), run(2e-3, 3.0)], replace(TINY, lr_grid=(1.0, 2.0))) is None


def test_runs_over_a_quantized_base_are_runs_of_their_own(tiny_tasks, tmp_path):
    """``reproduce --quantized-base``: every run trains over the base stored so, under a
    key of its own; a dense run's settings (and key) are those it always had."""
    dense = run_settings(ARMS[0], 0, TINY, tmp_path, ("m", "causal-lm"))
    assert "quantized_base" not in dense
    scale = replace(TINY, store=str(tmp_path / "runs"), quantized_base="nf4", seeds=(0,))
    assert scale.describe().endswith("; the base quantized: nf4")
    assert scale.for_task("e2e").quantized_base == "nf4"
    results = run_arms("t", ARMS, scale, tmp_path / "w", lambda _: None)
    assert [r.settings["quantized_base"] for r in results] == ["nf4", "nf4"]
    quantized = run_settings(ARMS[0], 0, scale, tmp_path, ("m", "causal-lm"))
    assert run_key(quantized, {})[0] != run_key(dense, {})[0]


def test_reproduce_refuses_an_unknown_quantized_base_before_training(tmp_path):
    from loralab.experiments import reproduce

    with pytest.raises(ConfigError, match="--quantized-base must be one of gguf, nf4, fp4, int8"):
        reproduce("ranks", "quick", output_dir=tmp_path / "out", quantized_base="nf5")
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written
