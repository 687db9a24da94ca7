"""One decoding step of loralab's engine, eager against ``torch.compile``d: SmolLM2-135M
with one unmerged LoRA (r = 8 on q, k, v, o), one row at position 32, the live length 64,
the greedy token out. What compiling the step would buy before the engine does it (the
compile time is printed too); the sides alternate, two rounds of 30 steps each.

    python benchmarks/bench_engine_step.py
"""

from __future__ import annotations

import time

import torch
from measure import machine_line, median, now

STEPS = 30


def main() -> None:
    from loralab import LoraConfig, inject_adapter
    from loralab.engine import llama
    from loralab.models.loading import load_model

    model, _ = load_model("smollm2-135m")
    inject_adapter(model, LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    cache = llama.new_cache(model, 1, 512)

    def step(token: torch.Tensor, position: torch.Tensor, live: int) -> torch.Tensor:
        hidden = llama.forward(model, cache, token, position, live)
        return model.lm_head(hidden[:, 0]).argmax(-1)

    compiled = torch.compile(step, dynamic=False)
    token, position = torch.tensor([[5]]), torch.tensor([[32]])
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    with torch.no_grad():
        llama.forward(model, cache, torch.arange(1, 33)[None], torch.arange(32)[None])
        start = time.perf_counter()
        compiled(token, position, 64)
        compile_s = time.perf_counter() - start
        for name, run in [("eager", step), ("compiled", compiled)] * 2:
            for i in range(3):  # warm-up
                run(token, position + i, 64)
            start = time.perf_counter()
            for i in range(STEPS):
                run(token, position + i, 64)
            times[name].append((time.perf_counter() - start) / STEPS * 1e3)
    eager, fast = median(times["eager"]), median(times["compiled"])
    print(f"{now()}; {machine_line()}")
    print(
        f"one step, one row: eager {eager:.1f} ms, compiled {fast:.1f} ms "
        f"({eager / fast:.2f}× faster); compiling took {compile_s:.0f} s"
    )


if __name__ == "__main__":
    main()
