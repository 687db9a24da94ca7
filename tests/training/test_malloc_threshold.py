"""glibc's mmap threshold, fixed for training (``allocator.py``): freed large blocks leave
the resident set instead of staying as holes in the heap."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from loralab.training.malloc_threshold import map_large_blocks

# 100 blocks of 4 MB, each followed by a small block that stays, then the large ones freed
# (after one 4 MB block was freed, as in a training step):
# from the heap they leave holes the kept blocks pin; from their own mappings they go back.
RETAINED = """
import sys, torch
from loralab.training.malloc_threshold import map_large_blocks
if sys.argv[1] == "mapped":
    assert map_large_blocks()
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
first = torch.ones(1 << 20)
del first  # glibc's first freed mapped block raises its threshold above that size
large, kept = [], []
for _ in range(100):
    large.append(torch.ones(1 << 20))  # 4 MB, written so that it is resident
    kept.append(torch.ones(1 << 12))  # 16 kB
before = rss_mb()
del large
print(before - rss_mb())
"""


def _released_mb(mode: str) -> float:
    done = subprocess.run(
        [sys.executable, "-c", RETAINED, mode], capture_output=True, text=True, check=True
    )
    return float(done.stdout.strip())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc setting")
def test_freed_large_blocks_leave_the_resident_set():
    assert map_large_blocks()
    assert _released_mb("mapped") > 350  # of the 400 MB freed
    assert _released_mb("default") < 100  # glibc's adaptive threshold keeps them


def test_training_fixes_the_threshold_only_when_asked(tmp_path, tiny_model_dir, monkeypatch):
    from loralab.training.loop import train
    from tiny_runs import run_config, tiny_pair

    calls = []
    monkeypatch.setattr("loralab.training.loop.map_large_blocks", lambda: calls.append(1) or True)
    for name, asked in (("default", None), ("asked", True)):
        model, tokenizer = tiny_pair(tiny_model_dir)
        extra = {} if asked is None else {"return_freed_memory": asked}
        config = run_config(tmp_path, name, max_steps=1, save_every=0, eval_every=0, **extra)
        train(config, model=model, tokenizer=tokenizer)
    assert calls == [1]  # off by default, on when set


def test_the_memory_settings_refuse_what_is_not_a_bool():
    from loralab.lora.config import ConfigError
    from loralab.training.config import TrainConfig

    for name in ("lean_mlp", "return_freed_memory"):
        with pytest.raises(ConfigError, match=f"{name} must be true or false, got 'yes'"):
            TrainConfig(**{name: "yes"})
