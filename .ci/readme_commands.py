"""What .ci/run needs from the README and the demo, in one place it can call.

    python3 .ci/readme_commands.py command N     the README's N-th set-up command
    python3 .ci/readme_commands.py copy-tree DIR  the working tree (no venv, no caches)
    python3 .ci/readme_commands.py check-demo REPORT.json

The commands are the README's first two ```bash blocks, without comments, so that CI runs
exactly what a new user is told to run.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_command(number: int) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    if len(blocks) < number:
        sys.exit(f"README.md has {len(blocks)} bash blocks; command {number} is missing")
    lines = blocks[number - 1].splitlines()
    return "\n".join(line for line in lines if line.strip() and not line.startswith("#"))


def copy_tree(destination: Path) -> None:
    """Copy what a fresh clone of this working tree holds: tracked files and untracked
    ones git does not ignore (so no .venv, no runs/, no caches)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the work tree is skipped
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def check_demo(report_path: Path) -> None:
    """Fail unless the demo's adapted scores beat the base model's (its chat-template
    baseline) on every metric: above it, or below it for those the report lists as
    ``lower_is_better`` (e2e's slot errors)."""
    if not report_path.is_file():
        sys.exit(f"the demo wrote no {report_path}")
    report = json.loads(report_path.read_text(encoding="utf-8"))
    base, raw, adapted = report["base"], report["base_raw_prompt"], report["adapted"]
    for name in base:
        print(
            f"demo {name}: base, raw prompt {raw[name]:.2f}; base, chat template "
            f"{base[name]:.2f}; with LoRA {adapted[name]:.2f}"
        )
    lower = set(report.get("lower_is_better", []))
    worse = [
        name
        for name in base
        if not (adapted[name] < base[name] if name in lower else adapted[name] > base[name])
    ]
    if worse:
        sys.exit(f"the adapted model does not beat the base model on {', '.join(worse)}")


if __name__ == "__main__":
    action, argument = sys.argv[1], sys.argv[2]
    if action == "command":
        print(readme_command(int(argument)))
    elif action == "copy-tree":
        copy_tree(Path(argument))
    elif action == "check-demo":
        check_demo(Path(argument))
    else:
        sys.exit(f"unknown action {action!r}")
