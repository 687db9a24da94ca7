"""The verdict page: each finding's rule applied to stored results (written here by hand
as the experiments would write them, so that every verdict can be forced)."""

from __future__ import annotations

import json

import pytest

from loralab.cli import main
from loralab.experiments.verdicts import FAILS, HOLDS, PARTLY, UNMEASURED, verdicts


def _write(folder, experiment: str, arms: dict[str, list[float]], task="nli", trainable=None):
    runs = [
        {
            "label": label,
            "task": task,
            "seed": seed,
            "metrics": {"accuracy": value, "bleu": value},
            "trainable": (trainable or {}).get(label, 1000),
        }
        for label, values in arms.items()
        for seed, value in enumerate(values)
    ]
    (folder / f"{experiment}.json").write_text(json.dumps({"experiment": experiment, "runs": runs}))


def _verdict(folder, prefix: str) -> str:
    found = [v for v in verdicts(folder) if v.finding.startswith(prefix)]
    assert len(found) == 1, found
    return found[0].verdict


METHODS = {"FT": 10_000_000, "LoRA": 50_000, "BitFit": 20_000, "PreEmbed": 5_000}


@pytest.mark.parametrize(
    ("lora", "bitfit", "expected"),
    [
        ([70.0, 70.4], [68.0, 68.2], HOLDS),  # LoRA = FT, above BitFit
        ([66.0, 66.2], [68.0, 68.2], FAILS),  # below FT, and BitFit above it
        ([70.0, 70.4], [75.0, 75.2], PARTLY),  # = FT, but BitFit above it
        ([69.0, 71.0], [60.0, 90.0], HOLDS),  # BitFit higher on average, within its error
    ],
)
def test_finding_1_compares_lora_with_ft_and_every_other_method(tmp_path, lora, bitfit, expected):
    arms = {"FT": [70.1, 70.3], "LoRA": lora, "BitFit": bitfit, "PreEmbed": [40.0, 41.0]}
    _write(tmp_path, "methods", arms, trainable=METHODS)
    assert _verdict(tmp_path, "1.") == expected


def test_finding_1_asks_for_few_parameters_too(tmp_path):
    arms = {"FT": [70.1, 70.3], "LoRA": [70.0, 70.4], "BitFit": [60.0, 60.0]}
    _write(tmp_path, "methods", arms, trainable={"FT": 1000, "LoRA": 500, "BitFit": 10})
    assert _verdict(tmp_path, "1.") == PARTLY  # as good as FT, but with half its parameters


def test_findings_2_and_3_read_the_ranks_experiment(tmp_path):
    arms = {f"W_q, W_v, r={r}": [70.0 + 0.1 * i, 70.2] for i, r in enumerate((1, 2, 4, 8, 64))}
    arms |= {"W_q, r=8": [60.0, 60.5], "W_q, W_k, W_v, W_o, r=2": [71.0, 71.5]}
    _write(tmp_path, "ranks", arms)
    assert _verdict(tmp_path, "2.") == HOLDS and _verdict(tmp_path, "3.") == HOLDS
    arms["W_q, W_v, r=1"] = [40.0, 41.0]
    arms["W_q, W_v, r=2"] = [45.0, 46.0]
    arms["W_q, W_v, r=4"] = [59.0, 59.5]  # now below W_q at r=8: one win of two
    _write(tmp_path, "ranks", arms)
    assert _verdict(tmp_path, "2.") == FAILS and _verdict(tmp_path, "3.") == PARTLY


def test_finding_4_wants_lora_near_ft_and_prefixes_falling_with_less_data(tmp_path):
    arms = {
        "FT, n=100": [60.0, 61.0], "LoRA, n=100": [60.5, 61.0],
        "PreEmbed, n=100": [35.0, 36.0], "PreLayer, n=100": [40.0, 41.0],
        "FT, n=1000": [70.0, 71.0], "LoRA, n=1000": [70.5, 71.0],
        "PreEmbed, n=1000": [65.0, 66.0], "PreLayer, n=1000": [66.0, 67.0],
    }  # fmt: skip
    _write(tmp_path, "low-data", arms)
    assert _verdict(tmp_path, "4.") == HOLDS
    arms["LoRA, n=100"] = [50.0, 51.0]  # far below FT with little data
    _write(tmp_path, "low-data", arms)
    assert _verdict(tmp_path, "4.") == PARTLY


def test_findings_5_6_and_adalora(tmp_path):
    _write(
        tmp_path,
        "scaling",
        {
            "LoRA, r=1": [70.0, 70.5], "LoRA, r=8": [70.2, 70.4],
            "PreEmbed, l_p=2": [50.0, 50.5], "PreEmbed, l_p=64": [40.0, 40.5],
        },
    )  # fmt: skip
    _write(tmp_path, "lora-pe", {"LoRA": [70.0, 70.2], "LoRA+PE": [70.1, 70.3]})
    _write(tmp_path, "adalora", {"AdaLoRA r=8→2": [69.0, 69.5], "LoRA r=2": [70.0, 70.2]})
    assert _verdict(tmp_path, "5.") == HOLDS
    assert _verdict(tmp_path, "6.") == PARTLY  # higher, within the error
    assert _verdict(tmp_path, "AdaLoRA") == FAILS


def test_finding_7_reads_the_latency_ratios(tmp_path):
    def summary(merged, adapter):
        return {
            shape: {"lora-merged": {"ratio_median": m}, "adapter-h": {"ratio_median": a}}
            for shape, m, a in zip(("1x128", "8x256"), merged, adapter, strict=True)
        }

    for merged, adapter, expected in [
        ((1.01, 0.99), (1.25, 1.03), HOLDS),
        ((1.01, 0.99), (1.05, 1.03), PARTLY),
        ((1.20, 0.99), (1.25, 1.03), FAILS),
    ]:
        (tmp_path / "latency.json").write_text(json.dumps({"summary": summary(merged, adapter)}))
        assert _verdict(tmp_path, "7.") == expected


def test_an_experiment_not_run_is_not_measured_and_the_command_writes_the_page(tmp_path, capsys):
    _write(tmp_path, "lora-pe", {"LoRA": [70.0, 70.2], "LoRA+PE": [75.1, 75.3]})
    assert _verdict(tmp_path, "6.") == HOLDS
    assert _verdict(tmp_path, "8.") == UNMEASURED
    assert main(["reproduce", "report", "--output-dir", str(tmp_path)]) == 0
    page = (tmp_path / "REPORT.md").read_text()
    assert "| 6. LoRA+PE can add a little on some tasks | holds |" in page
    assert "- Rule: holds: LoRA+PE above LoRA" in page
    assert main(["reproduce", "report", "--output-dir", str(tmp_path / "none")]) == 2
    assert "is not a results folder" in capsys.readouterr().err


def test_finding_6_reads_the_methods_table_where_lora_pe_did_not_run(tmp_path):
    arms = {"FT": [56.0, 57.0], "LoRA": [55.0, 56.0], "LoRA+PE": [50.6, 50.8]}
    _write(tmp_path, "methods", arms, task="e2e")
    found = [v for v in verdicts(tmp_path) if v.finding.startswith("6.")]
    assert [v.verdict for v in found] == [FAILS]
    assert found[0].measured == "e2e (methods.json): LoRA 55.5 ± 0.7, LoRA+PE 50.7 ± 0.1"
    _write(tmp_path, "lora-pe", {"LoRA": [70.0, 70.2], "LoRA+PE": [75.1, 75.3]})
    assert _verdict(tmp_path, "6.") == HOLDS  # its own experiment, where there is one
