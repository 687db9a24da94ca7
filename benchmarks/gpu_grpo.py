"""A GRPO step on a GPU beside the CPU (issue 33): the same step runs unchanged on CUDA;
this gives a step's time and the rollout throughput (sampled tokens per second) on each.

For the day a GPU is lent (the device tool); CI has none. No network is needed: a Llama of
SmolLM2-135M's shape with random weights and a character tokenizer are built here
(``tests/conftest.py``'s tokenizer), in a temporary folder. Each device trains 4 GRPO
steps (8 prompts × G = 8, up to 32 new tokens, LoRA r = 8 on W_q, W_v) with a reward that
counts one letter; the figures are medians of the steps after the first. At most about
5 minutes on a 2-core CPU and one GPU.

    python benchmarks/gpu_grpo.py
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import char_tokenizer  # noqa: E402

REWARD = """
def share_of_e(prompts, completions, **_):
    return [c.count("e") / max(len(c), 1) for c in completions]
"""


def smollm2_shaped(directory: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=2048,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)


def run_on(device: str, root: Path) -> dict:
    from loralab.training.config import TrainConfig
    from loralab.training.loop import train

    records = [{"prompt": f"Write a word with the letter e, number {i}:"} for i in range(32)]
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    output = root / f"run-{device}"
    config = TrainConfig(
        model=str(root / "model"),
        data=str(data),
        objective="grpo",
        reward=f"{root / 'reward.py'}:share_of_e",
        batch_size=8,
        num_generations=8,
        max_new_tokens=32,
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        max_steps=4,
        max_length=64,
        save_every=0,
        eval_every=0,
        progress=False,
        device=device,
        output_dir=str(output),
    )
    train(config)
    lines = [json.loads(x) for x in (output / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "reward" in x][1:]
    return {
        "step_seconds": statistics.median(x["seconds"] for x in steps),
        "rollout_seconds": statistics.median(x["rollout_seconds"] for x in steps),
        "rollout_tokens_per_s": statistics.median(x["rollout_tokens_per_s"] for x in steps),
        "completion_length": statistics.median(x["completion_length"] for x in steps),
    }


def main() -> int:
    if not torch.cuda.is_available():
        print("FAIL torch sees no CUDA device", flush=True)
        return 1
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        smollm2_shaped(root / "model")
        (root / "reward.py").write_text(REWARD)
        results = {device: run_on(device, root) for device in ("cuda", "cpu")}
    print(f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    print("| device | step (s) | rollouts (s) | rollout tokens/s | tokens a completion |")
    print("|---|---:|---:|---:|---:|")
    for device, r in results.items():
        print(
            f"| {device} | {r['step_seconds']:.2f} | {r['rollout_seconds']:.2f} | "
            f"{r['rollout_tokens_per_s']:.0f} | {r['completion_length']:.1f} |"
        )
    ratio = results["cpu"]["step_seconds"] / results["cuda"]["step_seconds"]
    print(f"a step on the GPU: {ratio:.1f}× faster than on this machine's CPU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
