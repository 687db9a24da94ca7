"""GRPO's rollouts on a separate ``loralab serve`` (``--rollout-server``): the server
samples with the adapter as it is at each step (sent with ``load_inplace``), gives back
the tokens it sampled, and a run trains on them; a server that does not answer or goes
away mid-run is one line, and the steps already taken are kept."""

from __future__ import annotations

import http.server
import json
import re
import socket
import threading

import httpx
import pytest

import loralab.training.loop as train_module
from conftest import randomize_lora
from loralab import LoraConfig, inject_adapter
from loralab.lora.config import ConfigError
from loralab.training.loop import train
from loralab.training.objectives.grpo_step import Sampling, engine_rollouts
from loralab.training.objectives.rollout_server import (
    API_KEY_VARIABLE,
    RolloutServer,
    RolloutServerError,
)
from serving import start
from tiny_runs import grpo_config, run_config, tiny_pair


def _policy(tiny_model_dir, seed):
    model, tokenizer = tiny_pair(tiny_model_dir)
    inject_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_lora(model, seed=seed, std=0.5)
    return model.eval(), tokenizer


def test_the_server_samples_with_each_steps_adapter_what_the_engine_samples(
    tmp_path, tiny_model_dir
):
    """The server draws as the engine does (a row's seed, its uniform number on the
    nucleus): its tokens, stop token included, are the engine's here, sampled at
    temperature 1 with and without a nucleus, with the first adapter and again after the
    adapter changed in place."""
    model, _ = _policy(tiny_model_dir, seed=1)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]] * 2
    seeds = list(range(100, 108))
    free = Sampling(4, 12, 1.0, 1.0, stop_ids=())
    local = engine_rollouts(model, prompts, free, seeds)
    # a token the first row samples mid-way, and one never sampled: both stop a row
    stop = next(t for k, t in enumerate(local[0]) if k >= 3 and t not in local[0][:k])
    never = next(t for t in range(100) if all(t not in row for row in local))
    with start(tiny_model_dir, adapter_dir=tmp_path) as server:
        rollouts = RolloutServer(server.url, tmp_path / "policy", "grpo-test", vocab_size=100)
        rollouts.check()
        for seed, top_p in ((1, 1.0), (2, 1.0), (2, 0.8)):  # a new adapter, then a nucleus
            sampling = Sampling(4, 12, 1.0, top_p, stop_ids=(never, stop))
            model, _ = _policy(tiny_model_dir, seed=seed)
            expected = engine_rollouts(model, prompts, sampling, seeds)
            assert rollouts(model, prompts, sampling, seeds) == expected
            if seed == 1:
                assert expected[0][-1] == stop and len(expected[0]) < 12
                first = expected
        assert expected != first  # the server sampled with the new weights
        assert len(set(map(tuple, expected))) == len(expected)  # each row its own draws
        names = [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]]
        assert "grpo-test" in names
        rollouts.close()  # the run's adapter leaves the server with the run
        names = [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]]
        assert "grpo-test" not in names


def _steps(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "reward" in line]


def test_grpo_raises_the_reward_on_a_rollout_server(tmp_path, tiny_model_dir):
    """As the run that samples here does (test_grpo_training): the reward can only rise if
    the server samples with each step's new weights."""
    with start(tiny_model_dir, adapter_dir=tmp_path) as server:
        config = grpo_config(tmp_path, rollout_server=server.url, max_steps=20, save_every=0)
        model, tokenizer = tiny_pair(tiny_model_dir)
        train(config, model=model, tokenizer=tokenizer)
        names = [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]]
    steps = _steps(tmp_path / "run")
    assert [s["step"] for s in steps] == list(range(1, 21))
    first = sum(s["reward"] for s in steps[:3]) / 3
    last = sum(s["reward"] for s in steps[-3:]) / 3
    assert first < 0.3 and last > 0.8, (first, last)
    assert all(s["rollout_sync_seconds"] > 0 and s["completion_length"] > 0 for s in steps)
    assert (tmp_path / "run" / "rollout-adapter" / "adapter_model.safetensors").exists()
    assert not any(name.startswith("grpo-") for name in names)  # unloaded at the end


def test_a_server_that_goes_away_mid_run_keeps_the_steps_taken(
    tmp_path, tiny_model_dir, monkeypatch
):
    """The server stops before step 3: the run ends in one line with a checkpoint of
    step 2, and resumes on a new server."""
    real_step, calls = train_module._grpo_optimizer_step, []
    server = start(tiny_model_dir, adapter_dir=tmp_path)

    def step(run):
        calls.append(1)
        if len(calls) == 3:
            server.__exit__(None, None, None)
        return real_step(run)

    monkeypatch.setattr(train_module, "_grpo_optimizer_step", step)
    monkeypatch.setattr("loralab.training.objectives.rollout_server.time.sleep", lambda s: None)
    with server:
        config = grpo_config(
            tmp_path, rollout_server=server.url, target_modules=["q", "v"], max_steps=4
        )
        model, tokenizer = tiny_pair(tiny_model_dir)
        with pytest.raises(RolloutServerError) as caught:
            train(config, model=model, tokenizer=tokenizer)
    message = str(caught.value)
    assert "cannot reach the rollout server" in message
    assert "a checkpoint of step 2" in message and "loralab train --resume" in message
    monkeypatch.setattr(train_module, "_grpo_optimizer_step", real_step)
    with start(tiny_model_dir, adapter_dir=tmp_path) as again:
        resumed = grpo_config(
            tmp_path,
            rollout_server=again.url,
            target_modules=["q", "v"],
            max_steps=4,
            resume=True,
        )
        model, tokenizer = tiny_pair(tiny_model_dir)
        train(resumed, model=model, tokenizer=tokenizer)
    assert [s["step"] for s in _steps(tmp_path / "run")] == [1, 2, 3, 4]


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_server_that_does_not_answer_is_refused_before_the_model_loads(tmp_path, tiny_model_dir):
    config = grpo_config(tmp_path, rollout_server=f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(RolloutServerError, match="cannot reach the rollout server at http"):
        train(config)  # no model given: it would load "unused" after the check


def test_a_server_without_adapter_dir_says_how_to_start_it(tmp_path, tiny_model_dir):
    with start(tiny_model_dir) as server:
        config = grpo_config(tmp_path, rollout_server=server.url, target_modules=["q", "v"])
        model, tokenizer = tiny_pair(tiny_model_dir)
        with pytest.raises(RolloutServerError) as caught:
            train(config, model=model, tokenizer=tokenizer)
    message = str(caught.value)
    assert "refused POST /v1/load_lora_adapter (403)" in message
    assert "start the server with --adapter-dir" in message and "no step was taken" in message


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"rollout_server": "localhost:8000"}, "must be an http:// or https:// URL"),
        ({"rollout_dir": "somewhere"}, "rollout_dir is where rollout_server reads"),
        (
            {"rollout_server": "http://h:1", "use_dora": True},
            "cannot run DoRA (its ΔW is not a product B·A)",
        ),
        ({"rollout_server": "http://h:1", "method": "bitfit"}, "cannot run method='bitfit'"),
    ],
)
def test_settings_a_rollout_server_cannot_take_are_refused(tmp_path, overrides, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        grpo_config(tmp_path, **overrides)
    with pytest.raises(ConfigError, match="rollout_server='http://h:1' is a GRPO setting"):
        run_config(tmp_path, rollout_server="http://h:1")  # supervised fine-tuning


def test_token_ids_outside_the_vocabulary_name_the_likely_cause(tmp_path, tiny_model_dir):
    """A server on another base answers with ids this model does not have."""
    model, _ = _policy(tiny_model_dir, seed=1)
    with start(tiny_model_dir, adapter_dir=tmp_path) as server:
        rollouts = RolloutServer(server.url, tmp_path / "policy", "grpo-v", vocab_size=3)
        sampling = Sampling(1, 8, 1.0, 1.0, stop_ids=())
        with pytest.raises(RolloutServerError, match="is it serving another base"):
            rollouts(model, [[5, 6]], sampling, [0])
        rollouts.close()


def test_the_api_key_comes_from_the_environment(tmp_path, tiny_model_dir, monkeypatch):
    """A server started with --api-key refuses the run without LORALAB_ROLLOUT_API_KEY,
    and answers with it (the key never goes into config.yaml)."""
    with start(tiny_model_dir, adapter_dir=tmp_path, api_key="secret") as server:
        monkeypatch.delenv(API_KEY_VARIABLE, raising=False)
        bare = RolloutServer(server.url, tmp_path / "policy", "grpo-k")
        with pytest.raises(RolloutServerError, match=r"refused GET /v1/models \(401\)"):
            bare.check()
        monkeypatch.setenv(API_KEY_VARIABLE, "secret")
        RolloutServer(server.url, tmp_path / "policy", "grpo-k").check()


class _NoTokenIds(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible server that ignores return_token_ids (only text back)."""

    def do_POST(self):  # http.server calls it by this name
        self.rfile.read(int(self.headers["Content-Length"]))
        body = (
            b"Success"
            if self.path.endswith("load_lora_adapter")
            else json.dumps(
                {"choices": [{"index": 0, "text": "hi", "finish_reason": "stop"}]}
            ).encode()
        )
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_server_that_gives_no_token_ids_is_named_with_what_it_lacks(tmp_path, tiny_model_dir):
    model, _ = _policy(tiny_model_dir, seed=1)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NoTokenIds)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        rollouts = RolloutServer(url, tmp_path / "policy", "grpo-t", vocab_size=100)
        with pytest.raises(RolloutServerError, match="must support vLLM's return_token_ids"):
            rollouts(model, [[5, 6]], Sampling(1, 4, 1.0, 1.0, stop_ids=()), [0])
    finally:
        server.shutdown()
