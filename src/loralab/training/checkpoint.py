"""Training checkpoints: everything a run needs to continue bit for bit.

A checkpoint holds the adapter, the optimizer and scheduler state, the RNG states and
the step; the data order is a pure function of the seed and the step, so that is the
data position. It is written to a temporary directory beside the old one and swapped in
by renaming, so a run killed at any moment (SIGKILL included) leaves the last complete one.

Under torchrun only rank 0 writes, after the others have sent it what it needs (FSDP's
shards gathered whole, every rank's RNG state); the layout is the single-process one, so a
checkpoint resumes with or without DDP or FSDP and at another world size.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import tempfile
from pathlib import Path

import torch

from ..lora.config import ConfigError
from ..methods.method_files import save_method

CHECKPOINT = "checkpoint"
# Settings that may differ when a run is resumed: they do not change what is computed (FSDP
# and recomputing activations change how, and the order of float additions at most).
RESUMABLE_CHANGES = {
    "resume",
    "rollout_server",  # where GRPO samples: the same policy, another sampler
    "rollout_dir",
    "tensorboard",
    "progress",
    "log_every",
    "fsdp",
    "gradient_checkpointing",
    "chunked_loss",  # the same loss and gradients, up to rounding
    "lean_mlp",  # the same loss and gradients, bit for bit
    "return_freed_memory",  # how memory is allocated, not what is computed
    "device",  # where, not what (up to the order of float additions)
}


def save_checkpoint(
    run_dir: Path,
    model,
    optimizer,
    scheduler,
    step: int,
    config,
    optimizer_state: dict | None = None,
    extra: dict | None = None,
) -> None:
    """Write a complete checkpoint beside the old one, then swap them by renaming.

    ``optimizer_state`` replaces ``optimizer.state_dict()`` (FSDP's, gathered whole);
    ``extra`` adds entries to ``state.pt`` (every rank's RNG state)."""
    for stale in run_dir.glob(".checkpoint-*.tmp"):  # left by a run killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(dir=run_dir, prefix=".checkpoint-", suffix=".tmp"))
    try:
        # as trained (a PiSSA init named, not converted): a resume runs the init again
        save_method(model, staging / "adapter", original_base=False)
        state = {
            "step": step,
            "optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state,
            "scheduler": scheduler.state_dict(),
            "rng_torch": torch.get_rng_state(),
            "rng_python": random.getstate(),
            "config": config.to_dict(),
            **(extra or {}),
        }
        torch.save(state, staging / "state.pt")
        final, previous = run_dir / CHECKPOINT, run_dir / ".checkpoint-previous"
        shutil.rmtree(previous, ignore_errors=True)
        if final.exists():
            final.rename(previous)  # until the next rename, the previous one stays findable
        staging.rename(final)
        shutil.rmtree(previous, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def find_checkpoint(run_dir: Path) -> Path | None:
    """The last complete checkpoint (also one left mid-swap by a killed run)."""
    for name in (CHECKPOINT, ".checkpoint-previous"):
        candidate = run_dir / name
        if (candidate / "state.pt").exists() and (candidate / "adapter").exists():
            return candidate
    return None


def check_resumable(saved: dict, config, where: Path) -> None:
    current = config.to_dict()
    # A setting newer than the checkpoint was, in effect, at its default there.
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    saved = {k: saved.get(k, defaults.get(k)) for k in current}
    changed = [k for k in current if k not in RESUMABLE_CHANGES and saved[k] != current[k]]
    if changed:
        details = ", ".join(f"{k}: {saved[k]!r} -> {current[k]!r}" for k in changed)
        raise ConfigError(f"cannot resume {where}: settings differ from the checkpoint ({details})")
