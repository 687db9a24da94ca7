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


def test_the_own_data_section_runs_as_written(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """Its commands, in order, on the tiny model instead of SmolLM2 (the only change):
    the files it writes are valid records, and every command runs (serve is parsed)."""
    import shlex
    import subprocess

    from loralab.cli import build_parser, main
    from loralab.data.records import read_examples

    block = _bash_blocks()[2]
    assert "loralab train --data train.jsonl" in block
    monkeypatch.chdir(tmp_path)
    lines = block.replace("\\\n", " ").splitlines()
    writes = "\n".join(line for line in lines if line.startswith("printf"))
    subprocess.run(["bash", "-euo", "pipefail", "-c", writes], check=True)
    assert len(read_examples("train.jsonl")) == 2 and len(read_examples("valid.jsonl")) == 1
    for line in lines:
        if not line.startswith("loralab "):
            continue
        argv = shlex.split(line.split("   #")[0])[1:]
        if argv[0] == "serve":
            assert build_parser().parse_args(argv).adapter[0][0] == "json"
            continue
        argv += ["--model", str(tiny_model_dir)]
        if argv[0] == "train":
            argv += ["--max-steps", "2", "--no-progress"]
        assert main(argv) == 0, line
    assert (tmp_path / "runs" / "json" / "predictions.jsonl").is_file()
    assert (tmp_path / "merged" / "json" / "config.json").is_file()


def test_the_layout_names_every_package_and_entry_point_as_it_is():
    block = README[README.index("  src/loralab/\n") :]
    block = block[: block.index("```")]
    package = ROOT / "src" / "loralab"
    names = {p.name + "/" for p in package.iterdir() if (p / "__init__.py").exists()}
    names |= {p.name for p in package.glob("*.py") if not p.name.startswith("__")}
    missing = sorted(name for name in names if name not in block)
    assert not missing, f"the README's layout lacks {missing}"
