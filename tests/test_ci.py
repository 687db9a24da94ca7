""".ci/run runs the README's two commands as written: the first as a new user would (a
new venv without the test extra, in a copy of the tree, with empty model caches), failing
unless the demo finishes above the base model; then the tests and the linters.

Each test runs the real .ci/run on a small repository whose README's commands are stand-ins
that record what they were given, so what is checked is CI's own logic.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Command 1's stand-in: say what it finds, then write the demo's report (or fail).
FIRST = """
import json, os, pathlib, sys
cache, hf = pathlib.Path(os.environ["LORALAB_CACHE"]), pathlib.Path(os.environ["HF_HOME"])
facts = {
    "cwd": os.getcwd(),
    "venv_existed": pathlib.Path(".venv").exists(),
    "caches_empty": cache.is_dir() and hf.is_dir() and not any(cache.iterdir())
    and not any(hf.iterdir()),
    "virtual_env": os.environ.get("VIRTUAL_ENV"),
    "has_tree": pathlib.Path("src/marker.py").is_file(),
}
pathlib.Path(os.environ["FACTS"]).write_text(json.dumps(facts))
scores = json.loads(pathlib.Path("scores.json").read_text())
if scores is None:
    sys.exit("the demo crashed")
pathlib.Path("runs/demo").mkdir(parents=True)
pathlib.Path("runs/demo/report.json").write_text(json.dumps(scores))
"""

# Command 2's stand-in: a venv whose ruff records its arguments.
SECOND = """
import os, pathlib, stat
bin = pathlib.Path(".venv/bin")
bin.mkdir(parents=True)
(bin / "activate").write_text(f'export PATH="{bin.absolute()}:$PATH"\\n')
ruff = bin / "ruff"
ruff.write_text('#!/bin/sh\\necho "$@" >> "$RUFF_LOG"\\n')
ruff.chmod(ruff.stat().st_mode | stat.S_IEXEC)
pathlib.Path(os.environ["TESTS_RAN"]).write_text("yes")
"""

README = """# a project

```bash
# 1. the main job
{first}
```

```bash
# 2. the tests
{second}
```
"""


def fake_repository(directory: Path, scores) -> Path:
    (directory / ".ci").mkdir(parents=True)
    for name in ("run", "readme_commands.py"):
        shutil.copy2(ROOT / ".ci" / name, directory / ".ci" / name)
    (directory / "first.py").write_text(FIRST)
    (directory / "second.py").write_text(SECOND)
    (directory / "scores.json").write_text(json.dumps(scores))
    (directory / ".gitignore").write_text(".venv/\nruns/\n")
    (directory / "src").mkdir()
    (directory / "src" / "marker.py").write_text("")
    (directory / "README.md").write_text(
        README.format(first="python3 first.py", second="python3 second.py")
    )
    subprocess.run(["git", "init", "-q"], cwd=directory, check=True)
    subprocess.run(["git", "add", "-A"], cwd=directory, check=True)
    return directory


def run_ci(repository: Path, tmp_path: Path) -> tuple[subprocess.CompletedProcess, dict]:
    logs = {name: tmp_path / f"{name}.log" for name in ("facts", "tests_ran", "ruff")}
    environment = {**os.environ, **{name.upper(): str(path) for name, path in logs.items()}}
    environment["RUFF_LOG"] = environment.pop("RUFF")
    environment["VIRTUAL_ENV"] = "/somewhere/else"  # the developer's venv must not leak in
    result = subprocess.run(
        ["bash", str(repository / ".ci" / "run")],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
        check=False,
    )
    return result, {
        name: path.read_text() if path.exists() else None for name, path in logs.items()
    }


def scores(base: float, raw: float, adapted: float, errors: float = 20.0) -> dict:
    """A demo report; slot errors, of which less is better, at 60 for the base."""
    return {
        "base": {"bleu": base, "rouge_l": base, "slot_errors": 60.0},
        "base_raw_prompt": {"bleu": raw, "rouge_l": raw, "slot_errors": 90.0},
        "adapted": {"bleu": adapted, "rouge_l": adapted + 1, "slot_errors": errors},
        "lower_is_better": ["slot_errors"],
    }


def test_command_1_runs_as_a_new_user_then_the_tests_and_linters(tmp_path):
    repository = fake_repository(tmp_path / "repo", scores(30.0, 4.0, 55.0))
    (repository / ".venv").mkdir()  # the developer's own venv, not a new user's
    (repository / ".venv" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    result, logs = run_ci(repository, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    facts = json.loads(logs["facts"])
    assert facts["has_tree"] and not facts["venv_existed"]  # a copy of the tree, no venv
    assert Path(facts["cwd"]) != repository
    assert facts["caches_empty"] and facts["virtual_env"] is None
    assert "demo bleu: base, raw prompt 4.00; base, chat template 30.00; with LoRA 55.00" in (
        result.stdout
    )
    assert "README command 1 took" in result.stdout and "README command 2 took" in result.stdout
    assert logs["tests_ran"] == "yes"
    lines = logs["ruff"].splitlines()
    assert lines[0].startswith("check src tests") and lines[1].startswith("format --check src")
    assert not (repository / "runs").exists()  # the demo wrote into the copy


@pytest.mark.parametrize(
    ("report", "message"),
    [
        (scores(30.0, 4.0, 30.0), "the adapted model does not beat the base model on bleu"),
        (scores(30.0, 4.0, 55.0, 70.0), "does not beat the base model on slot_errors"),
        (None, "the demo crashed"),
    ],
)
def test_ci_fails_when_the_demo_fails_or_does_not_beat_the_base(tmp_path, report, message):
    repository = fake_repository(tmp_path / "repo", report)
    result, logs = run_ci(repository, tmp_path)
    assert result.returncode != 0
    assert message in result.stderr
    assert logs["tests_ran"] is None  # it stopped there


def test_the_commands_are_the_readmes_first_two_bash_blocks_without_comments():
    def command(number: int) -> str:
        return subprocess.run(
            ["python3", str(ROOT / ".ci" / "readme_commands.py"), "command", str(number)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    first, second = command(1), command(2)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme.index(first) < readme.index(second)
    assert first.endswith("loralab demo") and "[test]" not in first
    assert "'.[test]'" in second and second.endswith("python -m pytest -q")
    assert textwrap.dedent(first) == first and "#" not in first
