"""The device choice on a real GPU (issue 28): train, eval and generate go to CUDA by
themselves (serve too), say so, and give what they give on the CPU.

For the day a GPU is lent (the device tool); CI has none, and the tests check the choice
with CUDA mocked. No network is needed: a tiny Llama and a character tokenizer are built
here (``tests/conftest.py``'s), in a temporary folder.

    python benchmarks/gpu_devices.py

Prints one line per check and exits 1 if one fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import save_tiny_causal_lm  # noqa: E402

WORDS = ["cat", "dog", "bird", "fish", "lion", "bear", "wolf", "frog"]


def loralab(*argv: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "loralab", *argv]
    return subprocess.run(command, capture_output=True, text=True, check=False)


def main() -> int:
    failures = 0

    def check(name: str, ok: bool, detail: str = "") -> None:
        nonlocal failures
        failures += not ok
        print(f"{'ok ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)

    check("torch sees CUDA", torch.cuda.is_available(), torch.__version__)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        save_tiny_causal_lm(root / "base")
        data = root / "train.jsonl"
        records = [{"prompt": f"Say {w}:", "completion": f" {w}"} for w in WORDS * 4]
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
        common = ["--model", str(root / "base"), "--data", str(data), "--max-steps", "8"]
        common += ["--batch-size", "4", "--target-modules", "q", "v", "lm_head"]
        runs = {}
        for device in ("auto", "cpu"):
            output = root / f"run-{device}"
            done = loralab(
                "train", *common, "--device", device, "--output-dir", str(output), "--no-progress"
            )
            check(f"train --device {device}", done.returncode == 0, done.stderr[-300:])
            runs[device] = output
        started = loralab("train", *common, "--output-dir", str(root / "said"))  # with its bar
        check("train says cuda:0", "on cuda:0" in started.stderr, started.stderr[:200])
        adapter = runs["auto"] / "adapter"
        ask = ["generate", "--model", str(root / "base"), "--adapter", str(adapter), "Say cat:"]
        generated = loralab(*ask, "--max-new-tokens", "4")
        check("generate runs on cuda:0", "on cuda:0" in generated.stderr, generated.stderr[-300:])
        on_cpu = loralab(*ask, "--max-new-tokens", "4", "--device", "cpu")
        check(
            "generate: the same text on the CPU",
            generated.stdout == on_cpu.stdout,
            f"{generated.stdout!r} / {on_cpu.stdout!r}",
        )
        scored = loralab(
            "eval",
            "--model",
            str(root / "base"),
            "--adapter",
            str(adapter),
            "--data",
            str(data),
            "--size",
            "8",
            "--max-new-tokens",
            "4",
        )
        check("eval --data runs on cuda:0", "on cuda:0" in scored.stderr, scored.stderr[-300:])
        from loralab.serve import BackgroundServer, ServeOptions, build_state

        options = ServeOptions(model=str(root / "base"), adapters=[("mine", adapter)])
        with BackgroundServer(build_state(options)) as server:
            device = server.state.engine.device
            asked = {"model": "mine", "prompt": "Say cat:", "max_tokens": 4, "temperature": 0}
            served = httpx.post(server.url + "/v1/completions", json=asked, timeout=60).json()
        check("serve runs on cuda:0", str(device) == "cuda:0", str(device))
        text = served["choices"][0]["text"].strip()
        check(
            "serve: the text generate writes on the CPU",
            f"### Say cat:\n{text}\n" in on_cpu.stdout,
            f"{text!r} / {on_cpu.stdout!r}",
        )
        losses = [
            json.loads(line)["loss"]
            for device in ("auto", "cpu")
            for line in (runs[device] / "metrics.jsonl").read_text().splitlines()[-1:]
            if "loss" in json.loads(line)
        ]
        check(
            "the same last loss on GPU and CPU (1e-3)",
            len(losses) == 2 and abs(losses[0] - losses[1]) < 1e-3,
            str(losses),
        )
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
