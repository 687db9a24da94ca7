"""``loralab serve`` as a user starts it, and serving the real embedded model (slow)."""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace

import openai
import pytest

from loralab.serve import BackgroundServer, ServeOptions, build_state
from serving import reference, save_adapters


def test_the_command_serves_until_interrupted(tiny_model_dir, tmp_path):
    save_adapters(tiny_model_dir, tmp_path, count=1)
    command = [sys.executable, "-m", "loralab", "serve", "--model", str(tiny_model_dir)]
    command += ["--adapter", f"mine={tmp_path / 'a0'}", "--port", "0"]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        url = _wait_for_url(server)
        assert url.startswith("http://127.0.0.1:")  # local only unless told otherwise
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        messages = [{"role": "user", "content": "hello there"}]
        reply = client.chat.completions.create(
            model="mine", messages=messages, max_tokens=10, temperature=0
        )
        assert reply.choices[0].message.content == reference(
            tiny_model_dir, tmp_path / "a0", messages, 10
        )
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 0


def test_a_bf16_base_serves_what_generate_writes_on_it(tiny_model_dir, tmp_path):
    import torch

    save_adapters(tiny_model_dir, tmp_path, count=1)
    options = ServeOptions(model=str(tiny_model_dir), adapters=[("a0", tmp_path / "a0")])
    with BackgroundServer(build_state(replace(options, dtype="bf16"))) as server:
        assert server.state.engine.model.dtype == torch.bfloat16
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        reply = client.completions.create(model="a0", prompt="hello", max_tokens=12, temperature=0)
    expected = reference(tiny_model_dir, tmp_path / "a0", "hello", 12, dtype=torch.bfloat16)
    assert reply.choices[0].text == expected


def _two_adapters_in_one_batch(base, tmp_path, quantized_base: str) -> list[str]:
    """Greedy replies of two adapters served in one batch over ``base`` stored as
    ``quantized_base``."""
    save_adapters(base, tmp_path, count=2)
    adapters = [(name, tmp_path / name) for name in ("a0", "a1")]
    options = ServeOptions(model=str(base), adapters=adapters, quantized_base=quantized_base)
    with BackgroundServer(build_state(options)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            replies = pool.map(
                lambda name: client.completions.create(
                    model=name, prompt="the", max_tokens=8, temperature=0
                ),
                ["a0", "a1"],
            )
            return [reply.choices[0].text for reply in replies]


def test_a_packed_gguf_base_serves_mixed_adapters_as_the_dense_one(tmp_path):
    from conftest import save_tiny_gguf

    base = tmp_path / "base.gguf"
    save_tiny_gguf(base, linear_type="Q4_1")
    texts = _two_adapters_in_one_batch(base, tmp_path, "gguf")
    assert texts == [reference(base, tmp_path / name, "the", 8) for name in ("a0", "a1")]


def test_an_nf4_base_serves_mixed_adapters_as_generate_does_on_it(tiny_model_dir, tmp_path):
    texts = _two_adapters_in_one_batch(tiny_model_dir, tmp_path, "nf4")
    expected = [
        reference(tiny_model_dir, tmp_path / name, "the", 8, quantized_base="nf4")
        for name in ("a0", "a1")
    ]
    assert texts == expected


def test_serve_refuses_a_gpu_that_is_not_there_before_loading(capsys, monkeypatch):
    import torch

    from loralab.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["serve", "--model", "no-such-model", "--device", "cuda"]) == 2
    assert "PyTorch sees no CUDA GPU" in capsys.readouterr().err  # not the missing model


def test_the_state_is_built_on_a_thread_that_ends_and_its_error_comes_back(monkeypatch):
    """``serve`` loads off the main thread (a live OpenMP pool there slowed every step of
    the engine's thread 1.4×), and what the load raises still reaches the caller."""
    import threading

    import loralab.serve.server as server
    from loralab.serve.server import ServeError

    seen = []

    def build_state(options):
        seen.append(threading.current_thread())
        raise ServeError("--adapter x=y: not an adapter directory")

    monkeypatch.setattr(server, "build_state", build_state)
    with pytest.raises(ServeError, match="not an adapter directory"):
        server.serve(ServeOptions())
    assert seen[0] is not threading.main_thread() and seen[0].name == "loralab-load"
    assert not seen[0].is_alive()  # ended, and its OpenMP pool with it


def _wait_for_url(server: subprocess.Popen, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = server.stderr.readline()
        seen.append(line)
        if found := re.search(r"running on (http://\S+)", line):
            os.set_blocking(server.stderr.fileno(), False)  # the access log may go on
            return found.group(1)
        if server.poll() is not None:
            break
    raise AssertionError("the server did not start:\n" + "".join(seen))


@pytest.mark.slow
def test_serving_smollm2_with_two_trained_adapters(tmp_path):
    """Two adapters trained on the real model, served side by side, equal to generate."""
    from loralab.tasks import get_task
    from loralab.training.config import TrainConfig
    from loralab.training.loop import train

    adapters = {}
    for task in ("e2e", "sql"):
        config = TrainConfig(
            task=task,
            output_dir=str(tmp_path / task),
            learning_rate=2e-3,
            max_steps=12,
            batch_size=8,
            max_length=96,
            eval_every=0,
            save_every=0,
        )
        adapters[task] = train(config).adapter_dir
    prompts = {
        task: [e["prompt"] for e in get_task(task).splits(test_size=3)["test"]] for task in adapters
    }
    options = ServeOptions(adapters=list(adapters.items()), max_loras=2)
    with BackgroundServer(build_state(options)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        cases = [(task, p) for task, texts in prompts.items() for p in texts]
        cases += [("smollm2-135m", prompts["e2e"][0])]

        def ask(case):
            model, prompt = case
            return (
                client.completions.create(model=model, prompt=prompt, max_tokens=32, temperature=0)
                .choices[0]
                .text
            )

        with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
            answers = list(pool.map(ask, cases))
    for (model, prompt), answer in zip(cases, answers, strict=True):
        adapter = adapters.get(model)
        assert answer == reference("smollm2-135m", adapter, prompt, 32), (model, prompt)
    assert answers[0] != answers[-1]  # the e2e adapter writes otherwise than the base
