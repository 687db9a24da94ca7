"""A served tiny Llama with eight adapters, and what ``loralab generate`` says they write."""

from __future__ import annotations

from pathlib import Path

import httpx

from conftest import randomize_lora
from loralab import LoraConfig, inject_adapter, load_adapter, save_adapter
from loralab.generate import generate
from loralab.models.loading import load_model
from loralab.serve import BackgroundServer, ServeOptions, build_state

# Different targets and ranks, so that a batch mixes layers with and without each adapter.
TARGETS = (["q_proj", "v_proj"], ["q_proj", "o_proj", "down_proj"], ["v_proj", "up_proj"])


def save_adapters(base: Path, directory: Path, count: int = 8, seed: int = 0) -> list[str]:
    """``count`` random adapters on the tiny base, saved as ``directory/a<i>``."""
    names = []
    for i in range(count):
        model, _ = load_model(str(base))
        config = LoraConfig(r=4 + 4 * (i % 2), lora_alpha=8, target_modules=TARGETS[i % 3])
        inject_adapter(model, config)
        randomize_lora(model, seed=seed + i, std=0.3)
        save_adapter(model, directory / f"a{i}")
        names.append(f"a{i}")
    return names


def reference(
    base: Path,
    adapter_dir: Path | None,
    prompt,
    max_new_tokens: int,
    dtype=None,
    quantized_base: str | None = None,
    weights: str = "fp32",
) -> str:
    """What ``loralab generate`` writes for one prompt (a text or a chat), greedy, on the
    base loaded in ``dtype`` (None: fp32), or stored as ``quantized_base``, the engine's
    base weights ``weights``."""
    model, tokenizer = load_model(str(base), dtype=dtype, quantized_base=quantized_base)
    if adapter_dir is not None:
        load_adapter(model, adapter_dir)
    texts = generate(
        model, tokenizer, [prompt], max_new_tokens, stop_at_newline=False, weights=weights
    )
    return texts[0]


def start(base: Path, **options) -> BackgroundServer:
    """A server on a free local port (use as a context manager)."""
    return BackgroundServer(build_state(ServeOptions(model=str(base), **options)))


def metric(server: BackgroundServer, name: str) -> float:
    """One unlabelled figure from the server's ``/metrics``."""
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not in /metrics")
