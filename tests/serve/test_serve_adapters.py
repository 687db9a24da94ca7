"""Adapters at run time: load, swap in place, unload, evict, and what the network may open."""

from __future__ import annotations

import concurrent.futures
import os
import shutil

import httpx
import openai
import pytest

from conftest import assert_one_line_error, randomize_lora, run_cli, tiny_llama
from loralab import LoraConfig, inject_adapter, save_adapter
from serving import metric, reference, save_adapters, start


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_model_dir):
    """An adapter directory the server may read from, and a folder beside it it may not."""
    root = tmp_path_factory.mktemp("served")
    allowed = root / "allowed"
    save_adapters(tiny_model_dir, allowed, count=4)
    save_adapters(tiny_model_dir, root / "outside", count=1, seed=50)
    return root


def _load(server, name, path, inplace=None):
    body = {"lora_name": name, "lora_path": str(path)}
    if inplace is not None:
        body["load_inplace"] = inplace
    return httpx.post(server.url + "/v1/load_lora_adapter", json=body, timeout=60)


def _unload(server, name):
    return httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": name})


def _complete(server, model, prompt="Adapt:", max_tokens=12):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    return (
        client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
        .choices[0]
        .text
    )


def test_load_use_swap_in_place_and_unload(tiny_model_dir, library):
    allowed = library / "allowed"
    with start(tiny_model_dir, adapter_dir=allowed) as server:
        loaded = _load(server, "mine", "a0")  # relative to --adapter-dir
        assert loaded.status_code == 200 and "loaded" in loaded.text
        assert _complete(server, "mine") == reference(tiny_model_dir, allowed / "a0", "Adapt:", 12)
        again = _load(server, "mine", allowed / "a0")  # the same again: nothing changes
        assert again.status_code == 200 and "already loaded" in again.text
        refused = _load(server, "mine", "a2")
        assert refused.status_code == 409 and "load_inplace" in refused.json()["error"]["message"]
        # a training loop pushes new weights of the same shapes: a hot-swap
        assert _load(server, "mine", "a2", inplace=True).status_code == 200
        assert _complete(server, "mine") == reference(tiny_model_dir, allowed / "a2", "Adapt:", 12)
        # other shapes (rank 8 on other modules) replace it while it is idle
        assert _load(server, "mine", "a1", inplace=True).status_code == 200
        assert _complete(server, "mine") == reference(tiny_model_dir, allowed / "a1", "Adapt:", 12)
        assert _unload(server, "mine").status_code == 200
        gone = _unload(server, "mine")
        assert (
            gone.status_code == 404 and "no adapter named 'mine'" in gone.json()["error"]["message"]
        )
        with pytest.raises(openai.NotFoundError):
            _complete(server, "mine")
        assert metric(server, "loralab_adapters_resident") == 0


def test_paths_outside_the_adapter_dir_are_refused(tiny_model_dir, library, tmp_path):
    allowed = library / "allowed"
    link = allowed / "sneaky"
    if not link.exists():
        os.symlink(library / "outside" / "a0", link)
    with start(tiny_model_dir, adapter_dir=allowed) as server:
        for path in ("../outside/a0", str(library / "outside" / "a0"), "sneaky", "/etc"):
            refused = _load(server, "x", path)
            assert refused.status_code == 403, path
            assert "resolves outside --adapter-dir; refused" in refused.json()["error"]["message"]
        missing = _load(server, "x", "absent")
        assert missing.status_code == 404
        pickled = allowed / "pickled"
        shutil.copytree(allowed / "a0", pickled, dirs_exist_ok=True)
        (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
        refused = _load(server, "x", "pickled")
        assert refused.status_code == 400 and "only safetensors" in refused.text
        assert [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]] == [
            tiny_model_dir.name
        ]


def test_without_an_adapter_dir_loading_at_run_time_is_off(tiny_model_dir, library):
    with start(tiny_model_dir) as server:
        refused = _load(server, "x", library / "allowed" / "a0")
        assert refused.status_code == 403
        assert "loading adapters at run time is off" in refused.json()["error"]["message"]


def test_an_adapter_for_another_base_names_the_tensor_and_loads_nothing(tiny_model_dir, library):
    allowed = library / "allowed"
    other = tiny_llama(hidden_size=48)
    inject_adapter(other, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_lora(other)
    save_adapter(other, allowed / "other-base")
    with start(tiny_model_dir, adapter_dir=allowed) as server:
        before = _complete(server, tiny_model_dir.name)
        refused = _load(server, "other", "other-base")
        assert refused.status_code == 400
        message = refused.json()["error"]["message"]
        assert "tensor 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'" in message
        assert "the adapter was made for another base" in message
        assert metric(server, "loralab_adapters_resident") == 0
        assert len(httpx.get(server.url + "/v1/models").json()["data"]) == 1
        assert _complete(server, tiny_model_dir.name) == before


def test_least_recently_used_adapters_are_evicted_and_read_again(tiny_model_dir, library):
    allowed = library / "allowed"
    pinned = [("kept", allowed / "a3")]
    with start(tiny_model_dir, adapters=pinned, adapter_dir=allowed, max_loras=2) as server:
        for name in ("a0", "a1", "a2"):
            assert _load(server, name, name).status_code == 200
        assert metric(server, "loralab_adapters_resident") == 2  # kept + the newest
        for name in ("a0", "a1", "a2", "a0", "kept"):
            assert _complete(server, name) == reference(
                tiny_model_dir, allowed / (name if name != "kept" else "a3"), "Adapt:", 12
            )
        assert metric(server, "loralab_adapter_evictions_total") >= 4
        assert metric(server, "loralab_adapters_resident") == 2
        listed = {m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]}
        assert listed == {tiny_model_dir.name, "kept", "a0", "a1", "a2"}  # evicted, still known


def test_adapters_kept_in_memory_are_bounded_by_max_cpu_loras(tiny_model_dir, library):
    allowed = library / "allowed"
    with start(tiny_model_dir, adapter_dir=allowed, max_loras=1, max_cpu_loras=2) as server:
        assert _load(server, "a0", "a0").status_code == 200
        assert _load(server, "a1", "a1").status_code == 200
        refused = _load(server, "a2", "a2")
        assert refused.status_code == 409 and "--max-cpu-loras 2" in refused.text
        assert _unload(server, "a0").status_code == 200
        assert _load(server, "a2", "a2").status_code == 200


def test_concurrent_loads_and_unloads_of_one_name_stay_consistent(tiny_model_dir, library):
    allowed = library / "allowed"
    with start(tiny_model_dir, adapter_dir=allowed) as server:

        def churn(i):
            return (_load(server, "x", "a1") if i % 2 == 0 else _unload(server, "x")).status_code

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(churn, range(40)))
        assert set(statuses) <= {200, 404}
        names = {m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]}
        resident = metric(server, "loralab_adapters_resident")
        assert resident == (1 if "x" in names else 0)
        _load(server, "x", "a1")
        assert _complete(server, "x") == reference(tiny_model_dir, allowed / "a1", "Adapt:", 12)


def test_start_up_refusals_are_one_line(tiny_model_dir, library, capsys):
    allowed = library / "allowed"
    cases = [
        (["--adapter", f"a={allowed / 'absent'}"], "not an adapter directory"),
        (["--adapter", "=x"], "expected DIR or NAME=DIR"),
        (["--adapter", str(allowed / "absent")], "--adapter absent="),
        (
            [
                "--adapter",
                f"a={allowed / 'a0'}",
                "--adapter",
                f"b={allowed / 'a1'}",
                "--max-loras",
                "1",
            ],
            "more adapters named at start-up than --max-loras 1",
        ),
        (["--adapter-dir", str(allowed / "absent")], "is not a directory"),
        (["--max-batch", "0"], "must be an integer ≥ 1"),
        (["--port", "70000"], "--port must be in 0-65535"),
        (["--max-adapter-bytes", "0"], "must be an integer ≥ 1"),
        (["--max-loras", "8", "--max-cpu-loras", "4"], "--max-cpu-loras 4 must be ≥ --max-loras 8"),
    ]
    for extra, words in cases:
        status, lines = run_cli(["serve", "--model", str(tiny_model_dir), *extra], capsys)
        assert_one_line_error(status, lines, words)


def test_an_unknown_engine_is_refused_by_name_before_the_model_loads(tiny_model_dir):
    from loralab.serve.server import ServeError, ServeOptions, build_state

    with pytest.raises(ServeError, match="--engine must be auto, engine or hf, got 'vllm'"):
        build_state(ServeOptions(model=str(tiny_model_dir), engine="vllm"))


def test_engine_weights_are_refused_by_name_before_the_model_loads(tiny_model_dir, monkeypatch):
    from loralab.engine import weights
    from loralab.serve.server import ServeError, ServeOptions, build_state

    options = ServeOptions(model=str(tiny_model_dir), engine="hf", engine_weights="bf16")
    with pytest.raises(ServeError, match="--engine-weights bf16 is loralab's engine's: it needs"):
        build_state(options)
    options = ServeOptions(model=str(tiny_model_dir), engine="engine", engine_weights="int4")
    with pytest.raises(
        ServeError, match="--engine-weights must be fp32, bf16, int8 or auto, got 'int4'"
    ):
        build_state(options)
    monkeypatch.setattr(weights, "_native_bf16", lambda device: None)
    monkeypatch.setattr("loralab.serve.server.load_model", None)  # never reached
    options = ServeOptions(model=str(tiny_model_dir), engine="engine", engine_weights="bf16")
    with pytest.raises(ServeError, match="bf16: engine weights bf16: this CPU has neither"):
        build_state(options)


def test_unreadable_or_linked_files_are_refused_and_nothing_is_kept(tiny_model_dir, library):
    allowed = library / "allowed"
    broken = allowed / "broken"
    shutil.copytree(allowed / "a0", broken, dirs_exist_ok=True)
    (broken / "adapter_config.json").write_bytes(b"\xff\xfe not utf-8")
    linked = allowed / "linked"
    linked.mkdir(exist_ok=True)
    shutil.copy(allowed / "a0" / "adapter_config.json", linked)
    target = library / "outside" / "a0" / "adapter_model.safetensors"
    if not (linked / "adapter_model.safetensors").exists():
        os.symlink(target, linked / "adapter_model.safetensors")
    with start(tiny_model_dir, adapter_dir=allowed) as server:
        refused = _load(server, "broken", "broken")
        assert refused.status_code == 400
        assert "broken/adapter_config.json: not UTF-8" in refused.text
        refused = _load(server, "linked", "linked")
        assert refused.status_code == 403
        assert "linked/adapter_model.safetensors' resolves outside --adapter-dir" in refused.text
        models = [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]]
        assert models == [tiny_model_dir.name]
        assert _load(server, "fine", "a0").status_code == 200  # the engine goes on
        assert _complete(server, "fine") == reference(tiny_model_dir, allowed / "a0", "Adapt:", 12)


def test_an_adapter_on_stacked_expert_weights_is_refused_with_the_reason(tmp_path):
    """Expert adapters cannot run per row of a batch: the server says so when one is
    loaded, and serves the base as before."""
    from conftest import char_tokenizer
    from moe_models import tiny_moe

    tokenizer = char_tokenizer()
    base = tiny_moe("qwen3_moe")
    base.resize_token_embeddings(len(tokenizer))
    base.save_pretrained(tmp_path / "moe")
    tokenizer.save_pretrained(tmp_path / "moe")
    config = LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=["experts"])
    save_adapter(inject_adapter(base, config), tmp_path / "adapters" / "experts")
    with start(tmp_path / "moe", adapter_dir=tmp_path / "adapters") as server:
        refused = _load(server, "experts", "experts")
        assert refused.status_code == 400
        assert "stacked expert weights" in refused.json()["error"]["message"]
        assert _complete(server, "moe", max_tokens=3) is not None
