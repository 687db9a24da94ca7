"""Training on several processes: DDP and FSDP2 on the CPU with gloo, 2 ranks.

The ranks are real processes: ``torchrun`` running the command line, or processes spawned
here that set the launcher's variables and call ``train()``. Every comparison is fp32 with
``lora_dropout=0`` unless it is against the same computation (resume)."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import loralab.training.loop as train_module
from loralab.cli import main as cli_main
from loralab.lora.config import ConfigError
from loralab.training.config import TrainConfig
from loralab.training.loop import train

WORDS = ["cat", "dog", "bird", "fish", "lion", "bear", "wolf", "frog", "duck", "goat"]
TOLERANCE = 1e-5


@pytest.fixture(autouse=True)
def _one_thread():
    # The ranks run one thread each; the single process compared with them does the same
    # (on a tiny model more threads only contend for the cores the ranks share).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _data_file(directory: Path, count: int, name: str) -> Path:
    # Completions of 1 to 3 words: the ranks' rows count different numbers of tokens, so
    # the loss must be weighted by them. 13 examples in batches of 4: every epoch ends in a
    # batch of one row, which leaves one rank without a row (it runs a stand-in weighted 0).
    records = [
        {"prompt": f"Reverse {w}:", "completion": " " + " ".join([w[::-1]] * (1 + i % 3))}
        for i, w in enumerate(WORDS * (count // len(WORDS) + 1))
    ][:count]
    path = directory / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _settings(tmp_path: Path, name: str, **overrides) -> dict:
    settings = dict(
        model="unused",
        data=str(_data_file(tmp_path, 13, "train.jsonl")),
        validation_data=str(_data_file(tmp_path, 13, "validation.jsonl")),
        output_dir=str(tmp_path / name),
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q", "v", "o"],
        learning_rate=1e-2,
        max_steps=8,
        batch_size=4,
        gradient_accumulation=2,
        max_length=32,
        eval_every=4,
        save_every=4,
        progress=False,
        seed=1,
    )
    settings.update(overrides)
    return settings


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / "adapter" / "adapter_model.safetensors"))


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _tiny(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (
        AutoModelForCausalLM.from_pretrained(model_dir),
        AutoTokenizer.from_pretrained(model_dir),
    )


def _one_process(model_dir, settings: dict):
    model, tokenizer = _tiny(model_dir)
    return train(TrainConfig(**settings), model=model, tokenizer=tokenizer)


# -- spawned ranks ------------------------------------------------------------------------------


def _worker(rank: int, world_size: int, jobs: list[dict], model_dir: str, results: str) -> None:
    """One rank: run each job's ``train()`` in turn and record how it ended."""
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank)
    )
    outcomes = []
    for job in jobs:
        os.environ["MASTER_PORT"] = str(job["port"])
        restore = _inject_fault(rank, job.get("fault"))
        try:
            model, tokenizer = _tiny(model_dir)
            if job.get("starve_rank") == rank:
                _starve_expert(model, expert=3)
            result = train(TrainConfig(**job["settings"]), model=model, tokenizer=tokenizer)
            outcomes.append({"ok": True, **_describe(result.model)})
        except BaseException as error:
            outcomes.append(
                {"ok": False, "error": type(error).__name__, "message": str(error)}
                | {"traceback": traceback.format_exc()}
            )
        finally:
            restore()
        Path(results, f"{rank}.json").write_text(json.dumps(outcomes))


def _describe(model) -> dict:
    from torch.distributed.tensor import DTensor

    parameters = list(model.parameters())
    sharded = [p for p in parameters if isinstance(p, DTensor)]
    frozen = [p for p in sharded if not p.requires_grad]
    return {
        "sharded": len(sharded),
        "parameters": len(parameters),
        "frozen_sharded": len(frozen),
        "frozen_local_smaller": all(p.to_local().numel() < p.numel() for p in frozen if p.dim()),
        "checkpointing": any(getattr(m, "gradient_checkpointing", False) for m in model.modules()),
    }


def _starve_expert(model, expert: int) -> None:
    """No token of this rank reaches ``expert`` in any block: its choices go to the next
    expert down, so its factors get no gradient here while the other rank's do."""

    def hook(router, args, output):  # on the router, which LoRA leaves unwrapped here
        logits, weights, index = output
        return logits, weights, index.masked_fill(index == expert, expert - 1)

    for block in model.model.layers:
        block.mlp.gate.register_forward_hook(hook)


def _inject_fault(rank: int, fault: dict | None):
    """Make one rank misbehave: Ctrl-C, an exception in a step, or a failing save."""
    if not fault or fault["rank"] != rank:
        return lambda: None
    import loralab.training.checkpoint as checkpoint_module

    real_step, real_save, calls = train_module._optimizer_step, checkpoint_module.save_method, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == fault["call"]:
            if fault["kind"] == "sigint":
                os.kill(os.getpid(), signal.SIGINT)  # arrives in the middle of the step
            elif fault["kind"] == "raise":
                raise RuntimeError("rank 1 ran out of disk")
        return real_step(*args, **kwargs)

    def save(*args, **kwargs):
        calls.append(1)
        if len(calls) == fault["call"]:
            real_save(*args, **kwargs)  # the adapter is written, the state is not yet
            raise OSError("No space left on device")
        return real_save(*args, **kwargs)

    if fault["kind"] == "save":
        checkpoint_module.save_method = save
    else:
        train_module._optimizer_step = step

    def restore():
        train_module._optimizer_step = real_step
        checkpoint_module.save_method = real_save

    return restore


def _spawn(tmp_path: Path, model_dir, jobs: list[dict], world_size: int = 2) -> list[list[dict]]:
    """Run ``jobs`` on ``world_size`` spawned ranks; each rank's outcome of each job."""
    results = tmp_path / "results"
    results.mkdir(exist_ok=True)
    for job, port in zip(jobs, _free_ports(len(jobs)), strict=True):
        job["port"] = port
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_worker, args=(rank, world_size, jobs, str(model_dir), results))
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=240)
    for process in processes:
        if process.is_alive():
            process.kill()
            pytest.fail("a rank hung")
    outcomes = []
    for rank in range(world_size):
        path = results / f"{rank}.json"
        assert path.exists(), f"rank {rank} recorded nothing (exit code {processes[rank].exitcode})"
        outcomes.append(json.loads(path.read_text()))
    return [[outcomes[rank][i] for rank in range(world_size)] for i in range(len(jobs))]


def _succeeded(outcome: list[dict]) -> list[dict]:
    for rank, result in enumerate(outcome):
        assert result["ok"], f"rank {rank}: {result.get('traceback')}"
    return outcome


# -- the tests ------------------------------------------------------------------------------------


def test_torchrun_two_ranks_give_the_adapter_of_one_process_on_the_same_batch(
    tmp_path, tiny_model_dir
):
    # batch_size is the global micro-batch: 2 ranks × 2 rows see what 1 process × 4 rows sees.
    settings = _settings(tmp_path, "one")
    single = _one_process(tiny_model_dir, settings)
    flags = [
        *("--model", str(tiny_model_dir), "--data", settings["data"]),
        *("--validation-data", settings["validation_data"]),
        *("--output-dir", str(tmp_path / "two"), "--target-modules", "q", "v", "o"),
        *("--r", "4", "--lora-alpha", "8", "--lora-dropout", "0", "--learning-rate", "0.01"),
        *("--max-steps", "8", "--batch-size", "4", "--gradient-accumulation", "2"),
        *("--max-length", "32", "--eval-every", "4", "--save-every", "4", "--seed", "1"),
        "--no-progress",
    ]
    port = _free_ports(1)[0]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command = [*launcher, "--master_port", str(port), "-m", "loralab", "--", "train", *flags]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained 8 steps") == 1  # rank 0 speaks for all

    assert _max_difference(_adapter(tmp_path / "one"), _adapter(tmp_path / "two")) <= TOLERANCE
    lines = _metrics(tmp_path / "two")
    steps = [line["step"] for line in lines if "loss" in line]
    assert steps == list(range(1, 9))  # written once, by rank 0
    losses = [line["loss"] for line in lines if "loss" in line]
    assert losses == pytest.approx(single.losses, abs=TOLERANCE)  # the whole batch's loss
    validation = [
        (line["step"], line["validation_loss"]) for line in lines if "validation_loss" in line
    ]
    assert [s for s, _ in validation] == [s for s, _ in single.validation]
    assert [v for _, v in validation] == pytest.approx(
        [v for _, v in single.validation], abs=TOLERANCE
    )
    # the checkpoint is the single-process one's: same step, same optimizer layout
    a = torch.load(tmp_path / "one" / "checkpoint" / "state.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "checkpoint" / "state.pt", weights_only=True)
    assert a["step"] == b["step"] == 4 and len(b["rng_ranks"]) == 2
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    # so it resumes at another world size: here in one process, to the same adapter
    resumed = {**settings, "output_dir": str(tmp_path / "two"), "resume": True}
    _one_process(tiny_model_dir, {**resumed, "model": str(tiny_model_dir)})
    assert _max_difference(_adapter(tmp_path / "one"), _adapter(tmp_path / "two")) <= TOLERANCE


ADALORA = dict(method="adalora", r=4, target_r=2, adalora_tinit=1, adalora_tfinal=1, max_steps=6)


def test_fsdp_and_gradient_checkpointing_give_the_ddp_adapter(tmp_path, tiny_model_dir):
    jobs = [
        {"settings": _settings(tmp_path, "ddp")},
        {"settings": _settings(tmp_path, "fsdp", fsdp=True)},
        {"settings": _settings(tmp_path, "fsdp-gc", fsdp=True, gradient_checkpointing=True)},
        {"settings": _settings(tmp_path, "ddp-gc", gradient_checkpointing=True)},
        # AdaLoRA's regulariser and pruning after each step see the reduced gradients
        {"settings": _settings(tmp_path, "adalora-ddp", **ADALORA)},
    ]
    outcomes = _spawn(tmp_path, tiny_model_dir, jobs)
    ddp, fsdp, fsdp_gc, ddp_gc, _ = map(_succeeded, outcomes)
    assert ddp[0]["sharded"] == 0
    # FSDP shards everything, the frozen base included; only the adapter is gathered to save.
    for rank in fsdp + fsdp_gc:
        assert rank["sharded"] == rank["parameters"] and rank["frozen_sharded"] > 0
        assert rank["frozen_local_smaller"]
    assert fsdp_gc[0]["checkpointing"] and ddp_gc[0]["checkpointing"]
    reference = _adapter(tmp_path / "ddp")
    for name in ("fsdp", "fsdp-gc", "ddp-gc"):
        assert _max_difference(reference, _adapter(tmp_path / name)) <= TOLERANCE, name
        assert not (tmp_path / name / "adapter" / "method.json").exists()  # a plain PEFT adapter
    for name in ("ddp", "fsdp"):
        assert [line["step"] for line in _metrics(tmp_path / name) if "loss" in line] == list(
            range(1, 9)
        )
    _one_process(tiny_model_dir, _settings(tmp_path, "adalora-one", **ADALORA))
    one, two = _adapter(tmp_path / "adalora-one"), _adapter(tmp_path / "adalora-ddp")
    assert _max_difference(one, two) <= TOLERANCE


def test_gradient_checkpointing_in_one_process_changes_nothing(tmp_path, tiny_model_dir):
    plain = _one_process(tiny_model_dir, _settings(tmp_path, "plain", max_steps=4))
    recomputed = _one_process(
        tiny_model_dir, _settings(tmp_path, "gc", max_steps=4, gradient_checkpointing=True)
    )
    assert recomputed.model.model.gradient_checkpointing
    assert _max_difference(_adapter(tmp_path / "plain"), _adapter(tmp_path / "gc")) <= 1e-6
    assert recomputed.losses == pytest.approx(plain.losses, abs=1e-6)


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_interrupted_on_two_ranks_resumes_to_the_same_adapter(tmp_path, tiny_model_dir, fsdp):
    # Dropout on: each rank's random stream must be saved and restored too.
    common = dict(lora_dropout=0.1, save_every=0, fsdp=fsdp)
    jobs = [
        {"settings": _settings(tmp_path, "straight", **common)},
        # Ctrl-C reaches rank 1 alone, in step 4: both ranks stop after it, and rank 0 saves.
        {
            "settings": _settings(tmp_path, "stopped", **common),
            "fault": {"rank": 1, "call": 4, "kind": "sigint"},
        },
        {"settings": _settings(tmp_path, "stopped", resume=True, **common)},
    ]
    straight, stopped, resumed = _spawn(tmp_path, tiny_model_dir, jobs)
    _succeeded(straight)
    for rank in stopped:
        assert rank["error"] == "TrainingInterrupted", rank
        assert "interrupted at step 4 of 8" in rank["message"]
    _succeeded(resumed)
    a, b = _adapter(tmp_path / "straight"), _adapter(tmp_path / "stopped")
    assert all(torch.equal(a[k], b[k]) for k in a), _max_difference(a, b)
    steps = [line["step"] for line in _metrics(tmp_path / "stopped") if "loss" in line]
    assert steps == list(range(1, 9))


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_world_size_that_does_not_divide_the_batch_is_refused_on_every_rank(
    tmp_path, monkeypatch, rank
):
    environment = {"WORLD_SIZE": "2", "RANK": rank, "MASTER_ADDR": "127.0.0.1"}
    for name, value in {**environment, "MASTER_PORT": "1", "LOCAL_RANK": rank}.items():
        monkeypatch.setenv(name, value)
    message = r"batch_size=3 is the global micro-batch and must be divisible by the world size 2"
    with pytest.raises(ConfigError, match=message):  # before any process waits on another
        train(TrainConfig(**_settings(tmp_path, "run", batch_size=3)))
    assert not (tmp_path / "run").exists()


def test_torchrun_with_a_bad_batch_size_says_so_on_every_rank(tmp_path, tiny_model_dir):
    data = _data_file(tmp_path, 13, "train.jsonl")
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"),
        *("--master_port", str(_free_ports(1)[0]), "-m", "loralab", "--", "train"),
        *("--model", str(tiny_model_dir), "--data", str(data), "--batch-size", "3"),
        *("--output-dir", str(tmp_path / "run")),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode != 0
    assert done.stderr.count("must be divisible by the world size 2") == 2, done.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def test_a_launch_without_a_rendezvous_address_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match=r"MASTER_ADDR, MASTER_PORT are not set: launch with"):
        train(TrainConfig(**_settings(tmp_path, "run")))
    # the command line: one line, exit code 2
    argv = ["train", "--data", _settings(tmp_path, "run")["data"], "--output-dir", "x"]
    assert cli_main(argv) == 2
    assert "MASTER_ADDR" in capsys.readouterr().err
    for name in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name)
    with pytest.raises(ConfigError, match=r"--fsdp shards the model across processes"):
        train(TrainConfig(**_settings(tmp_path, "run", fsdp=True)))
    with pytest.raises(ConfigError, match=r"fsdp cannot train method='adalora'"):
        TrainConfig(task="e2e", method="adalora", fsdp=True)


def test_one_rank_failing_stops_every_rank_and_leaves_no_half_checkpoint(tmp_path, tiny_model_dir):
    jobs = [
        # rank 1 fails in step 5, after the checkpoint of step 4
        {
            "settings": _settings(tmp_path, "step", save_every=2),
            "fault": {"rank": 1, "call": 5, "kind": "raise"},
        },
        # rank 0 fails while it writes the checkpoint of step 4 (the one of step 2 is there)
        {
            "settings": _settings(tmp_path, "save", save_every=2, fsdp=True),
            "fault": {"rank": 0, "call": 2, "kind": "save"},
        },
    ]
    step_fails, save_fails = _spawn(tmp_path, tiny_model_dir, jobs)
    assert step_fails[1]["message"] == "rank 1 ran out of disk"
    assert step_fails[0]["error"] == "DistributedError", step_fails[0]
    assert "rank 0 of 2: another rank stopped" in step_fails[0]["message"]
    assert save_fails[0]["message"] == "No space left on device"
    assert save_fails[1]["error"] == "DistributedError", save_fails[1]
    assert "rank 1 of 2: another rank stopped" in save_fails[1]["message"]
    for name, step in (("step", 4), ("save", 2)):
        run = tmp_path / name
        assert not (run / "adapter").exists()
        assert not list(run.glob(".checkpoint-*")), list(run.iterdir())
        saved = torch.load(run / "checkpoint" / "state.pt", weights_only=True)
        assert saved["step"] == step
        assert (run / "checkpoint" / "adapter" / "adapter_model.safetensors").exists()


def test_expert_adapters_train_alike_in_one_process_under_ddp_and_fsdp(tmp_path):
    """LoRA on an MoE's stacked experts (``target_parameters``) across ranks, with one
    rank routing no token to an expert, as small micro-batches over many experts do: that
    expert's factors get a gradient from the other rank only, and every rank steps alike."""
    from conftest import char_tokenizer
    from moe_models import tiny_moe

    model_dir = tmp_path / "moe"
    tokenizer = char_tokenizer()
    model = tiny_moe("qwen3_moe")
    model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = 0
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    experts = dict(target_modules=["q_proj"], target_parameters=["experts"], max_steps=4)
    jobs = [
        {"settings": _settings(tmp_path, "ddp", **experts)},
        {"settings": _settings(tmp_path, "fsdp", fsdp=True, **experts)},
        {"settings": _settings(tmp_path, "ddp-starved", **experts), "starve_rank": 1},
        {"settings": _settings(tmp_path, "fsdp-starved", fsdp=True, **experts), "starve_rank": 1},
    ]
    for outcome in _spawn(tmp_path, model_dir, jobs):
        _succeeded(outcome)
    _one_process(model_dir, _settings(tmp_path, "one", **experts))
    one = _adapter(tmp_path / "one")
    assert any(".experts." in key for key in one)
    for name in ("ddp", "fsdp"):
        assert _max_difference(one, _adapter(tmp_path / name)) <= TOLERANCE, name
    starved = _adapter(tmp_path / "ddp-starved")
    assert _max_difference(starved, _adapter(tmp_path / "fsdp-starved")) <= TOLERANCE
    assert _max_difference(one, starved) > TOLERANCE  # the routing did change
