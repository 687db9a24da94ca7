"""The server most users write first, for ``bench_serve.py`` to compare against.

FastAPI and PEFT: every adapter loaded into one ``PeftModel``; each request, one at a
time, calls ``set_adapter`` and then ``generate``. It answers ``POST /v1/completions``
(not streamed) with OpenAI's shape, enough for the benchmark's clients.

    python benchmarks/naive_server.py --adapter-dir DIR --port 8001
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI
from peft import PeftModel

from loralab.models.loading import load_model


def build(model_name: str, adapter_dir: Path) -> FastAPI:
    base, tokenizer = load_model(model_name)
    directories = sorted(p for p in adapter_dir.iterdir() if (p / "adapter_config.json").exists())
    model = PeftModel.from_pretrained(base, directories[0], adapter_name=directories[0].name)
    for directory in directories[1:]:
        model.load_adapter(directory, adapter_name=directory.name)
    model.eval()
    one_at_a_time = threading.Lock()
    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.post("/v1/completions")
    def completions(body: dict) -> dict:  # FastAPI runs it on its thread pool
        ids = tokenizer(body["prompt"], return_tensors="pt")
        max_tokens = int(body.get("max_tokens", 16))
        fixed = {"min_new_tokens": max_tokens} if body.get("ignore_eos") else {}
        with one_at_a_time, torch.no_grad():
            if body["model"] == model_name:
                with model.disable_adapter():
                    out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, **fixed)
            else:
                model.set_adapter(body["model"])
                out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, **fixed)
        new = out[0, ids["input_ids"].shape[1] :]
        text = tokenizer.decode(new, skip_special_tokens=True)
        prompt_tokens, completion_tokens = ids["input_ids"].shape[1], new.numel()
        return {
            "id": f"cmpl-{time.monotonic_ns()}",
            "object": "text_completion",
            "model": body["model"],
            "choices": [{"index": 0, "text": text, "finish_reason": "length", "logprobs": None}],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--adapter-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    uvicorn.run(build(args.model, args.adapter_dir), host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
