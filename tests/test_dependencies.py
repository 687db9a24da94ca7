"""`pip install loralab` without extras is enough for the main job.

The test environment holds more than a user's (the test extra, and what it pulls in:
peft brings accelerate, which Transformers needs to read a GGUF file). So the commands
run here in a process where every installed module that loralab's declared runtime
dependencies do not bring is hidden, as on a machine without the test extra; a module
that the main job needs and nobody declared then fails the run as it would for a user.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def runtime_closure(distribution: str = "loralab") -> set[str]:
    """``distribution`` and everything its requirements pull in without any extra."""
    closure: set[str] = set()
    pending = [canonicalize_name(distribution)]
    while pending:
        name = pending.pop()
        if name in closure:
            continue
        closure.add(name)
        for line in metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(canonicalize_name(requirement.name))
    return closure


def hidden_modules(closure: set[str]) -> list[str]:
    """Top-level modules of installed distributions that ``closure`` does not bring."""
    provided = metadata.packages_distributions()
    return sorted(
        module
        for module, distributions in provided.items()
        if not any(canonicalize_name(d) in closure for d in distributions)
    )


def test_the_closure_follows_requirements_and_skips_extras():
    closure = runtime_closure()
    assert {"loralab", "torch", "transformers", "huggingface-hub", "gguf"} <= closure
    assert "peft" not in closure and "pytest" not in closure  # the test extra
    assert "peft" in hidden_modules(closure) and "pytest" in hidden_modules(closure)


WORKLOAD = """
import json, sys
for name in json.loads(sys.argv[1]):
    sys.modules[name] = None  # import fails; importlib.util.find_spec says absent
from loralab.cli import main

gguf, out = sys.argv[2], sys.argv[3]
adapter = f"{out}/run/adapter"
commands = [
    ["train", "--model", gguf, "--task", "e2e", "--max-steps", "2", "--batch-size", "2",
     "--max-length", "400", "--train-size", "8", "--validation-size", "2",
     "--eval-every", "2", "--output-dir", f"{out}/run", "--no-progress"],
    ["eval", "--model", gguf, "--adapter", adapter, "--task", "e2e", "--size", "2"],
    ["eval", "--model", gguf, "--task", "sql", "--size", "2"],
    ["generate", "--model", gguf, "--adapter", adapter, "--chat", "--max-new-tokens", "3", "hi"],
    ["merge", "--model", gguf, "--adapter", adapter, "--output", f"{out}/merged"],
    ["merge", "--format", "gguf", "--model", gguf, "--adapter", adapter, "--outtype", "q8_0",
     "--output", f"{out}/merged.gguf"],
    ["export", "--model", gguf, "--adapter", adapter, "--output", f"{out}/adapter.gguf"],
    ["info", adapter],
]
for command in commands:
    status = main(command)
    if status != 0:
        sys.exit(f"loralab {' '.join(command)} exited with {status}")

# reproduce: the methods experiment at a tiny scale, on the GGUF model, in this process
from pathlib import Path

from loralab.experiments import get_experiment, settings
from loralab.experiments.report import write_report
from loralab.experiments.settings import Scale

settings.TASK_MODELS = {task: (gguf, "causal-lm") for task in ("nli", "e2e", "sql")}
methods = get_experiment("methods")
methods.QUICK_TASKS = ("e2e",)
scale = Scale(steps=1, train_size=4, test_size=2, seeds=(0,), batch_size=2, max_length=400,
              quick=True, jobs=1)
report = methods.run(scale, Path(out) / "work")
write_report(report, Path(out) / "results", command="reproduce")

# serve: the trained adapter over HTTP, asked with the standard library only
import urllib.request

from loralab.serve import BackgroundServer, ServeOptions, build_state

options = ServeOptions(model=gguf, adapters=[("mine", Path(adapter))], max_loras=1)
with BackgroundServer(build_state(options)) as server:
    body = json.dumps({"model": "mine", "prompt": "hi", "max_tokens": 2}).encode()
    request = urllib.request.Request(server.url + "/v1/completions", data=body)
    with urllib.request.urlopen(request) as response:
        assert json.load(response)["usage"]["completion_tokens"] == 2
    with urllib.request.urlopen(server.url + "/metrics") as response:
        assert b"loralab_generation_tokens_total 2.0" in response.read()
print(json.dumps(sorted(name for name in sys.modules if name.split(".")[0] == name)))
"""


def test_the_main_commands_run_with_only_the_declared_dependencies(tiny_gguf_file, tmp_path):
    hidden = hidden_modules(runtime_closure())
    arguments = [json.dumps(hidden), str(tiny_gguf_file), str(tmp_path)]
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(WORKLOAD), *arguments],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    imported = set(json.loads(result.stdout.strip().splitlines()[-1]))
    # The run really went through the paths that need these.
    assert {"accelerate", "gguf", "sacrebleu", "rouge_score", "matplotlib"} <= imported
    assert {"starlette", "uvicorn", "prometheus_client"} <= imported
    assert (tmp_path / "merged" / "config.json").is_file()
    assert {"merged.gguf", "merged.Modelfile", "adapter.gguf", "adapter.Modelfile"} <= {
        p.name for p in tmp_path.iterdir()
    }
    assert "jinja2" in imported  # the Modelfile's default system prompt
    assert (tmp_path / "results" / "methods.png").is_file()
