"""Where AdaLoRA spent its budget: the final rank of every adapted matrix, as a dict, a
text table and a heatmap of layer × weight type."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from torch import nn

from .layers import adalora_config, svd_factors

RANKS_TABLE = "adalora_ranks.txt"
RANKS_JSON = "adalora_ranks.json"
RANKS_HEATMAP = "adalora_ranks.png"


def final_ranks(model: nn.Module) -> dict[str, int]:
    """Triplets kept per adapted matrix, by module name (the last allocation's mask)."""
    return {name: f.rank for name, f in svd_factors(model).items()}


def layer_and_type(name: str) -> tuple[int | None, str]:
    """``model.layers.3.self_attn.q_proj`` -> (3, ``self_attn.q_proj``)."""
    match = re.match(r"(?:.*?\.)?(?P<index>\d+)\.(?P<rest>.+)", name)
    if match is None:
        return None, name
    return int(match["index"]), match["rest"]


def rank_grid(ranks: dict[str, int]) -> tuple[list[int | None], list[str], dict]:
    """Rows (layer indices), columns (weight types) and {(layer, type): rank}."""
    cells = {layer_and_type(name): rank for name, rank in ranks.items()}
    layers = sorted({layer for layer, _ in cells}, key=lambda v: (v is None, v or 0))
    types = list(dict.fromkeys(kind for _, kind in sorted(cells, key=lambda c: c[1])))
    return layers, types, cells


def rank_table(ranks: dict[str, int], init_r: int | None = None) -> str:
    """A text table: one row per layer, one column per weight type, totals at the bottom."""
    layers, types, cells = rank_grid(ranks)
    total = sum(ranks.values())
    head = f"final rank per adapted matrix: {total} triplets kept in {len(ranks)} matrices"
    if init_r is not None:
        head += f" (of {init_r * len(ranks)}, init_r={init_r})"
    width = max([5, *(len(t) for t in types)])
    lines = [head, "layer  " + "  ".join(f"{t:>{width}}" for t in types)]
    for layer in layers:
        row = [cells.get((layer, t)) for t in types]
        text = "  ".join(f"{'-' if r is None else r:>{width}}" for r in row)
        lines.append(f"{'-' if layer is None else layer:>5}  {text}")
    sums = [sum(r for (_, t), r in cells.items() if t == kind) for kind in types]
    lines.append("total  " + "  ".join(f"{s:>{width}}" for s in sums))
    return "\n".join(lines)


def save_rank_heatmap(
    ranks: dict[str, int], path: str | os.PathLike, init_r: int | None = None
) -> Path:
    """A PNG heatmap of final ranks, layers down and weight types across."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, types, cells = rank_grid(ranks)
    grid = [[cells.get((layer, t), float("nan")) for t in types] for layer in layers]
    figure, axis = plt.subplots(
        figsize=(1.2 + 0.9 * len(types), 1.2 + 0.35 * len(layers)), squeeze=True
    )
    image = axis.imshow(grid, cmap="viridis", vmin=0, vmax=init_r, aspect="auto")
    for row, layer in enumerate(layers):
        for column, kind in enumerate(types):
            if (layer, kind) in cells:
                axis.text(
                    column,
                    row,
                    str(cells[layer, kind]),
                    ha="center",
                    va="center",
                    color="white",
                    fontsize=8,
                )
    axis.set_xticks(range(len(types)), types, rotation=45, ha="right")
    axis.set_yticks(range(len(layers)), ["-" if v is None else str(v) for v in layers])
    axis.set_xlabel("weight type")
    axis.set_ylabel("layer")
    axis.set_title("AdaLoRA final rank")
    figure.colorbar(image, ax=axis, label="rank")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_rank_report(model: nn.Module, directory: str | os.PathLike) -> dict[str, Path]:
    """Write the table, the ranks as JSON and the heatmap into ``directory``; print nothing.

    Returns the paths by kind (``table``, ``json``, ``heatmap``).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ranks = final_ranks(model)
    init_r = adalora_config(model).init_r
    table = directory / RANKS_TABLE
    table.write_text(rank_table(ranks, init_r) + "\n", encoding="utf-8")
    data = directory / RANKS_JSON
    data.write_text(json.dumps(ranks, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    heatmap = save_rank_heatmap(ranks, directory / RANKS_HEATMAP, init_r)
    return {"table": table, "json": data, "heatmap": heatmap}
