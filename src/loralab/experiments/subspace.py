"""``loralab reproduce subspace``: what LoRA learns (Sec. 7, finding 8).

LoRA on W_q and W_v of the embedded MiniLM-L6 classifier, trained on ``nli`` at
r = 1, 2, 4, 8, 64 with the first seed, and at r = 8 again with the second seed. Then,
per layer and weight (``analysis.py`` holds the math):

- the normalised subspace similarity φ(A1, A2, i, j) between the right-singular
  directions of the A factors of r = 8 and r = 64 (Figure 3 of the paper; i ≤ 8, j ≤ 64)
  and of the two seeds at r = 8 (Figure 4), as heatmaps over i, j ≤ 8;
- the same φ for the A factors at initialisation, and for Gaussian matrices of the same
  shapes (mean of ``RANDOM_DRAWS``), so that the reader can tell learned overlap from
  overlap by chance. The init matters: A starts random and a short run moves it only so
  far, and with one seed the first adapted matrix of r = 64 starts with the r = 8 rows
  (the generator draws them first), which makes its φ high before any training;
- how far training moved each A from its initialisation, ‖A − A₀‖_F / ‖A₀‖_F;
- the amplification factor ‖ΔW‖_F / ‖Uᵀ W Vᵀ‖_F of W_q for every rank (Table 7), with U, V
  the top-r singular vectors of ΔW, beside the projections onto W's own top-r directions
  and onto random ones, and ‖W‖_F.

Seeds: ``--seeds 1`` skips the seed comparison; seeds after the second are not used.

Threads: every run trains on one thread, ``--jobs`` of them side by side (``runs.py``). On
the 2-core build machine, shared with other jobs, the quick mode took 21 min with PyTorch's
two threads (they wait on each other at every operation while other jobs hold a core) and
3.8 min with one, the runs one after another.

Expected time: 6 training runs plus half a minute of analysis. Quick mode: 400 steps of
batch 8 per run (at 150 steps, learning rate 1e-3, most runs had not yet left the starting
plateau: 41.7% accuracy, and an A that is mostly its initialisation), two runs at a time
on one thread each. Full mode: 1500 steps, 10,000 examples, 500 test examples: about 4×
the quick mode's training, some 20 minutes.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from ..lora import frozen_base as bases
from ..lora.analysis import amplification, random_subspace_similarity, subspace_similarity
from . import settings as experiment_settings
from .report import Report, markdown_table
from .runs import RunResult, run_plan
from .settings import NLI_FULL, Arm, Scale

NAME = "subspace"
SUMMARY = "subspace similarity of LoRA's A across ranks and seeds; amplification of ΔW"
TASK = "nli"
RANKS = (1, 2, 4, 8, 64)
COMPARED = (8, 64)  # the paper's Figure 3: A of r = 8 against A of r = 64
TARGETS = ["q", "v"]
AMPLIFIED = "q"  # the weight of the amplification table, as the paper's Table 7
SHOWN = 8  # heatmaps show i, j ≤ 8, as the paper's zoomed panels
MAX_LAYERS_SHOWN = 6  # a deeper model shows this many layers, evenly spread
RANDOM_DRAWS = 20
QUICK = Scale(steps=400, train_size=1200, test_size=300, seeds=(0, 1), max_length=64, quick=True)
FULL = replace(NLI_FULL, test_size=500, seeds=(0, 1), max_length=64)
FULL_HOURS = 0.35  # about 4× the quick mode's training; see the module docstring


@dataclass
class LayerFactors:
    """One adapted weight of one trained run: its A (now and at init), ΔW and W."""

    A: Tensor  # (r, k)
    A_init: Tensor  # (r, k)
    delta: Tensor  # (d, k): ΔW = (α/r) B A, from the layer's delta_weight()
    weight: Tensor  # (d, k): the frozen W0

    @property
    def moved(self) -> float:
        """‖A − A₀‖_F / ‖A₀‖_F: how far training took A from its initialisation."""
        return (
            torch.linalg.matrix_norm(self.A - self.A_init) / torch.linalg.matrix_norm(self.A_init)
        ).item()


def learned_factors(base: nn.Module, run: RunResult) -> dict[str, LayerFactors]:
    """A, its initialisation, ΔW and W of every adapted weight of ``run``, by module name.

    The trained factors come from the adapter the run saved; the initial A from applying
    the run's settings to a fresh copy of ``base`` exactly as training did.
    """
    from ..lora.inject import lora_layers
    from ..methods.method_files import load_method
    from ..training.config import TrainConfig
    from ..training.loop import prepare_model

    trained = load_method(copy.deepcopy(base), Path(run.settings["output_dir"]) / "adapter")
    initial = prepare_model(TrainConfig(**run.settings), copy.deepcopy(base))
    initial_layers = lora_layers(initial)
    factors = {}
    with torch.no_grad():
        for name, layer in lora_layers(trained).items():
            adapter = layer.active_adapter
            factors[name] = LayerFactors(
                A=layer.lora[adapter].A.detach().clone(),
                A_init=initial_layers[name].lora[adapter].A.detach().clone(),
                delta=layer.delta_weight(adapter),
                weight=bases.weight_copy(layer.base_layer),
            )
    return factors


_SHORT = {"query": "q", "q_proj": "q", "value": "v", "v_proj": "v", "key": "k", "k_proj": "k"}


def site(module_name: str) -> tuple[int, str]:
    """(layer index, weight type) of an adapted module: ``…layer.3.attention.self.query``
    is (3, "q")."""
    index = re.search(r"\.(\d+)\.", module_name)
    last = module_name.rsplit(".", 1)[-1]
    return (int(index.group(1)) if index else -1), _SHORT.get(last, last)


def shown_layers(layers: list[int]) -> list[int]:
    """All layers, or ``MAX_LAYERS_SHOWN`` of them evenly spread (first and last kept)."""
    if len(layers) <= MAX_LAYERS_SHOWN:
        return layers
    picks = {round(i * (len(layers) - 1) / (MAX_LAYERS_SHOWN - 1)) for i in range(MAX_LAYERS_SHOWN)}
    return [layers[i] for i in sorted(picks)]


def analyse(
    factors: dict[tuple[int, int], dict[str, LayerFactors]],
    first_seed: int,
    second_seed: int | None,
) -> dict:
    """Every number of the experiment from the runs' factors, keyed by (r, seed).

    Returns plain lists (for the JSON file): per module, φ matrices trained and at init,
    A's movement per run, and the amplification at every rank trained with the first seed.
    """
    low, high = COMPARED
    modules = sorted(factors[(low, first_seed)], key=site)
    k = factors[(low, first_seed)][modules[0]].A.shape[1]
    result: dict = {"modules": {}, "random": {}, "moved": {}, "amplification": {}}
    for name in modules:
        layer, weight = site(name)
        entry: dict = {"layer": layer, "weight": weight}
        a_low, a_high = factors[(low, first_seed)][name], factors[(high, first_seed)][name]
        entry["ranks"] = subspace_similarity(a_low.A, a_high.A).tolist()
        entry["ranks_init"] = subspace_similarity(a_low.A_init, a_high.A_init).tolist()
        if second_seed is not None:
            other = factors[(low, second_seed)][name]
            entry["seeds"] = subspace_similarity(a_low.A, other.A).tolist()
            entry["seeds_init"] = subspace_similarity(a_low.A_init, other.A_init).tolist()
        result["modules"][name] = entry
    for label, (r1, r2) in {"ranks": (low, high), "seeds": (low, low)}.items():
        mean, std = random_subspace_similarity(r1, r2, k, draws=RANDOM_DRAWS, seed=0)
        result["random"][label] = {"mean": mean.tolist(), "std": std.tolist()}
    for (r, seed), by_module in factors.items():
        result["moved"][f"r={r},seed={seed}"] = {n: f.moved for n, f in by_module.items()}
    for r in sorted(r for r, seed in factors if seed == first_seed):
        by_module = factors[(r, first_seed)]
        result["amplification"][str(r)] = {
            name: {**vars(a), "factor": a.factor}
            for name in modules
            for a in [amplification(by_module[name].delta, by_module[name].weight, r)]
        }
    return result


def arm(r: int) -> Arm:
    return Arm(f"LoRA r={r}", TASK, {"method": "lora", "r": r, "target_modules": TARGETS})


def run(scale: Scale, workdir: Path) -> Report:
    from ..models.loading import load_model
    from ..tasks import get_task

    first = scale.seeds[0]
    second = scale.seeds[1] if len(scale.seeds) > 1 else None
    plan = [(r, first) for r in RANKS] + ([(COMPARED[0], second)] if second is not None else [])
    results = run_plan(NAME, [(arm(r), seed) for r, seed in plan], scale, workdir)
    runs: dict[tuple[int, int], RunResult] = dict(zip(plan, results, strict=True))
    # the same model the runs trained (looked up now: tests point the tasks elsewhere)
    model_name, kind = experiment_settings.TASK_MODELS[TASK]
    labels = {"num_labels": len(get_task(TASK).labels)} if kind == "classification" else {}
    base, _ = load_model(model_name, kind=kind, **labels)
    factors = {key: learned_factors(base, result) for key, result in runs.items()}
    analysis = analyse(factors, first, second)
    return report_of(analysis, runs, scale, first, second)


# -- the report ------------------------------------------------------------------------


def _phi(matrix: list[list[float]], i: int, j: int) -> float:
    return matrix[i - 1][j - 1]


def report_of(
    analysis: dict,
    runs: dict[tuple[int, int], RunResult],
    scale: Scale,
    first_seed: int,
    second_seed: int | None,
) -> Report:
    """Tables, JSON and figure from ``analyse``'s numbers."""
    high = COMPARED[1]
    modules = analysis["modules"]
    amplified = {name: entry for name, entry in modules.items() if entry["weight"] == AMPLIFIED}
    all_layers = sorted({e["layer"] for e in modules.values()})
    heatmap_layers = shown_layers(all_layers)
    selection = (
        "every layer"
        if len(heatmap_layers) == len(all_layers)
        else f"layers {heatmap_layers} of {len(all_layers)}"
    )
    body = (
        f"LoRA on W_q and W_v of the embedded MiniLM-L6 classifier, trained on `{TASK}` "
        "(one thread a run). "
        "φ(A1, A2, i, j) = ‖U1_iᵀ U2_j‖²_F / min(i, j), U_i the top-i right-singular "
        "vectors of A: 1 = the smaller subspace lies in the other, 0 = orthogonal. Each "
        "cell is *trained (at initialisation)*; the last row is the same φ between "
        f"Gaussian matrices of the same shapes (mean ± std of {RANDOM_DRAWS} draws), which "
        "is what overlap by chance looks like.\n\n"
        + _similarity_table(analysis, first_seed, second_seed)
        + "\n\nThe runs: test accuracy, and how far training moved A from its "
        "initialisation, ‖A − A₀‖_F / ‖A₀‖_F (mean [min–max] over the adapted matrices):\n\n"
        + _runs_table(analysis, runs)
        + "\n\n"
        + _amplification_tables(analysis, amplified, first_seed)
        + f"\n\nThe figure shows φ for i, j ≤ {SHOWN}, {selection} (all numbers, up to "
        f"j = {high}, are in the JSON file)."
    )
    raw = {
        "task": TASK,
        "model": experiment_settings.TASK_MODELS[TASK][0],
        "ranks": list(RANKS),
        "compared": list(COMPARED),
        "target_modules": TARGETS,
        "random_draws": RANDOM_DRAWS,
        "runs": [
            {
                "r": r,
                "seed": seed,
                "metrics": res.metrics,
                "trainable": res.trainable,
                "train_seconds": res.train_seconds,
                "settings": res.settings,
            }
            for (r, seed), res in runs.items()
        ],
        **analysis,
    }

    def draw(figure) -> None:
        _draw(figure, analysis, amplified, heatmap_layers, first_seed, second_seed)

    return Report(NAME, "What LoRA learns: subspaces and amplification", body, raw, draw, scale)


def _similarity_table(analysis: dict, first_seed: int, second_seed: int | None) -> str:
    """φ across ranks and across seeds per adapted matrix, and between random matrices."""
    low, high = COMPARED
    random = analysis["random"]

    def cell(entry: dict, key: str, i: int, j: int) -> str:
        if key not in entry:
            return "—"
        return f"{_phi(entry[key], i, j):.2f} ({_phi(entry[f'{key}_init'], i, j):.2f})"

    def random_cell(label: str, i: int, j: int) -> str:
        return f"{_phi(random[label]['mean'], i, j):.2f} ± {_phi(random[label]['std'], i, j):.2f}"

    header = [
        "Layer",
        "W",
        f"r={low} vs {high}: φ(1,1)",
        f"φ({low},{low})",
        f"φ({low},{high})",
        f"seed {first_seed} vs {second_seed}: φ(1,1)" if second_seed is not None else "seeds",
        f"φ({low},{low})",
    ]
    cells = [("ranks", 1, 1), ("ranks", low, low), ("ranks", low, high), ("seeds", 1, 1)]
    cells.append(("seeds", low, low))
    rows = [
        [str(entry["layer"]), f"W_{entry['weight']}", *(cell(entry, *c) for c in cells)]
        for entry in analysis["modules"].values()
    ]
    rows.append(["random", "Gaussian", *(random_cell(*c) for c in cells)])
    return markdown_table(header, rows)


def _runs_table(analysis: dict, runs: dict[tuple[int, int], RunResult]) -> str:
    rows = []
    for (r, seed), result in runs.items():
        moved = analysis["moved"][f"r={r},seed={seed}"].values()
        rows.append(
            [
                str(r),
                str(seed),
                f"{result.metrics['accuracy']:.1f}",
                f"{result.trainable:,}",
                f"{sum(moved) / len(moved):.2f} [{min(moved):.2f}–{max(moved):.2f}]",
            ]
        )
    return markdown_table(["r", "seed", "accuracy", "trainable", "A moved"], rows)


def _amplification_tables(analysis: dict, amplified: dict, first_seed: int) -> str:
    """The amplification of one middle layer in detail, then the factor in every layer."""
    layers = sorted(entry["layer"] for entry in amplified.values())
    middle = layers[len(layers) // 2]
    middle_name = next(n for n, e in amplified.items() if e["layer"] == middle)
    rows = []
    for r, by_module in analysis["amplification"].items():
        a = by_module[middle_name]
        rows.append(
            [
                r,
                f"{a['delta_norm']:.3f}",
                f"{a['projected']:.3f}",
                f"{a['projected_own']:.2f}",
                f"{a['projected_random']:.3f}",
                f"{a['weight_norm']:.2f}",
                f"{a['factor']:.1f}",
            ]
        )
    header = ["r", "‖ΔW‖_F", "‖UᵀWVᵀ‖_F, ΔW's", "W's own top-r", "random", "‖W‖_F", "factor"]
    factor_rows = [
        [
            str(entry["layer"]),
            *(
                f"{analysis['amplification'][r][name]['factor']:.1f}"
                for r in analysis["amplification"]
            ),
        ]
        for name, entry in amplified.items()
    ]
    return (
        f"Amplification of W_{AMPLIFIED} in layer {middle} (of {len(layers)}), seed "
        f"{first_seed}: U, V are the top-r singular vectors of ΔW (or of W itself, or "
        "random orthonormal ones); factor = ‖ΔW‖_F / ‖Uᵀ W Vᵀ‖_F with ΔW's U, V:\n\n"
        + markdown_table(header, rows)
        + f"\n\nAmplification factor of W_{AMPLIFIED} in every layer:\n\n"
        + markdown_table(["Layer", *(f"r={r}" for r in analysis["amplification"])], factor_rows)
    )


def _draw(
    figure,
    analysis: dict,
    amplified: dict,
    heatmap_layers: list[int],
    first_seed: int,
    second_seed: int | None,
) -> None:
    """φ heatmaps per layer (and for random matrices), then the amplification factors."""
    low, high = COMPARED
    modules, random = analysis["modules"], analysis["random"]
    comparisons = [("ranks", w, f"W_{w}: r={low} vs {high}") for w in ("q", "v")]
    if second_seed is not None:
        comparisons += [
            ("seeds", w, f"W_{w}: seed {first_seed} vs {second_seed}") for w in ("q", "v")
        ]
    columns = len(heatmap_layers) + 1
    figure.set_size_inches(1.7 * columns + 1, 1.7 * (len(comparisons) + 1) + 0.5)
    grid = figure.add_gridspec(len(comparisons) + 1, columns)
    by_site = {(e["layer"], e["weight"]): e for e in modules.values()}
    image = None
    for row, (key, weight, title) in enumerate(comparisons):
        panels = [(f"layer {layer}", by_site[(layer, weight)][key]) for layer in heatmap_layers]
        panels.append(("random", random[key]["mean"]))
        for column, (label, matrix) in enumerate(panels):
            axis = figure.add_subplot(grid[row, column])
            shown = [line[:SHOWN] for line in matrix[:SHOWN]]
            image = axis.imshow(shown, vmin=0, vmax=1, cmap="viridis", origin="upper")
            ticks = range(0, len(shown[0]), max(1, len(shown[0]) // 4))
            axis.set_xticks(list(ticks), [str(t + 1) for t in ticks], fontsize=5)
            ticks = range(0, len(shown), max(1, len(shown) // 4))
            axis.set_yticks(list(ticks), [str(t + 1) for t in ticks], fontsize=5)
            axis.set_title(label, fontsize=6)
            if column == 0:
                axis.set_ylabel(f"{title}\ni", fontsize=6)
            if row == len(comparisons) - 1:
                axis.set_xlabel("j", fontsize=6)
    if image is not None:
        bar_axis = figure.add_subplot(grid[len(comparisons), columns - 1])
        figure.colorbar(image, cax=bar_axis, orientation="horizontal").set_label("φ", size=7)
        bar_axis.tick_params(labelsize=6)
        bar_axis.set_box_aspect(0.15)
    axis = figure.add_subplot(grid[len(comparisons), : columns - 1])
    ranks = [int(r) for r in analysis["amplification"]]
    for name, entry in amplified.items():
        factors = [analysis["amplification"][str(r)][name]["factor"] for r in ranks]
        axis.plot(ranks, factors, marker="o", markersize=3, label=f"layer {entry['layer']}")
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xticks(ranks, [str(r) for r in ranks])
    axis.set_xlabel("r", fontsize=7)
    axis.set_ylabel(f"amplification, W_{AMPLIFIED}", fontsize=7)
    axis.tick_params(labelsize=6)
    axis.legend(fontsize=5, ncol=2)
