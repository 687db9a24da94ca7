"""The README's promises: its example is examples/quickstart.py, runs, and CI runs its tests."""

import re
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def test_readme_example_is_the_quickstart_file():
    python_blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    quickstart = (ROOT / "examples" / "quickstart.py").read_text(encoding="utf-8")
    assert python_blocks and python_blocks[0] == quickstart


def test_quickstart_runs(capsys):
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "trainable parameters: 4,096" in out and "merged vs adapted" in out


def test_readme_opens_with_the_two_commands_and_ci_runs_both():
    first, second = _bash_blocks()[:2]
    assert first.rstrip().endswith("loralab demo")
    assert "pytest" in second
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    # how it runs them is tests/test_ci.py's subject
    assert '"$helper" command 1' in ci and '"$helper" command 2' in ci
