"""The command line, thin: it parses, then calls the library.

``loralab train`` takes every ``TrainConfig`` field as a flag (generated from the
dataclass, help text included), and ``--config run.yaml`` for a file of them; flags given
on the command line win over the file.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import itertools
import json
import os
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any

from .data.layouts import DATA_FORMATS
from .files.output_dirs import OutputDirError, check_output_dir

# Only what parsing needs is imported here: torch and Transformers load after the command
# line is read, so that `--help` and a mistyped flag answer at once.
from .lora.config import ConfigError
from .models.devices import QUANTIZED_BASES
from .training.config import SECTIONS, TrainConfig

PROGRAM = "loralab"


def _field_docs(cls) -> dict[str, str]:
    """The docstring under each dataclass field (the source is the single place for help)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, following in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
        ):
            docs[node.target.id] = " ".join(str(following.value.value).split())
    return docs


class _PatternValues(argparse.Action):
    r"""``--rank-pattern q=16 'layers\.0\..*'=4``: a dict from pattern to number."""

    def __init__(self, *args, value_type: type = float, **kwargs) -> None:
        self.value_type = value_type
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        result = {}
        for item in values:
            key, sep, value = item.rpartition("=")
            try:
                result[key] = self.value_type(value)
            except ValueError:
                sep = ""
            if not sep or not key:
                kind = self.value_type.__name__
                parser.error(f"{option_string} takes PATTERN={kind.upper()} pairs, got {item!r}")
        setattr(namespace, self.dest, result)


def _flag_options(kind: Any) -> dict[str, Any]:
    """How argparse reads a field of type ``kind``."""
    union = typing.get_origin(kind) in (typing.Union, types.UnionType)
    plain = [a for a in typing.get_args(kind) if a is not type(None)] if union else [kind]
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(kind) is typing.Literal:
        return {"choices": typing.get_args(kind)}
    for option in plain:
        if typing.get_origin(option) is dict:
            value = typing.get_args(option)[1]
            return {
                "nargs": "+",
                "action": _PatternValues,
                "value_type": value,
                "metavar": "PATTERN=VALUE",
            }
        if typing.get_origin(option) is list:
            item = typing.get_args(option)[0]
            return {"nargs": "+", "type": item, "metavar": "N" if item is int else "NAME"}
    metavars = {int: "N", float: "X"}
    return {
        "type": plain[0] if plain[0] in metavars else str,
        "metavar": metavars.get(plain[0], "TEXT"),
    }


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls, sections) -> None:
    """A flag per field of ``cls``, under the heading of its section."""
    from .lora.config import LoraConfig

    docs = {**_field_docs(LoraConfig), **_field_docs(cls)}
    hints = typing.get_type_hints(cls)
    fields = {item.name: item for item in dataclasses.fields(cls)}
    for title, names in sections.items():
        group = parser.add_argument_group(title)
        for name in names:
            if name == "resume":
                _add_resume_flags(group)
                continue
            item = fields[name]
            default = (
                item.default if item.default is not dataclasses.MISSING else item.default_factory()
            )
            help_text = docs.get(name, "").replace("``", "")
            if not (default is None and "default" in help_text):  # it says what None means
                help_text += f" (default: {default})"
            options = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
            options.update(_flag_options(hints[name]))
            if name == "target_modules":  # none at all: only --target-parameters' experts
                options["nargs"] = "*"
                options["help"] += "; given with no name, no module"
            group.add_argument("--" + name.replace("_", "-"), **options)


def _add_resume_flags(group) -> None:
    """``--resume``, or ``--resume RUN``: that run's own settings too; and ``--no-resume``."""
    group.add_argument(
        "--resume",
        dest="resume",
        nargs="?",
        const=True,
        metavar="RUN",
        default=argparse.SUPPRESS,
        help="continue from the checkpoint in --output-dir; --resume RUN alone continues the "
        "run in folder RUN with its own settings (RUN/config.yaml), flags given here winning",
    )
    group.add_argument(
        "--no-resume", dest="resume", action="store_false", default=argparse.SUPPRESS
    )


class _Parser(argparse.ArgumentParser):
    """argparse, with every error on one line like loralab's own (it prints the usage
    first; ``--help`` still shows it), and no abbreviated flags: ``--learn`` silently
    meant ``--learning-rate``, and would mean something else once a flag is added."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{PROGRAM}: error: {message} (see `{self.prog} --help`)\n")


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The command line, or a one-line error from the command's own parser that names
    each flag it does not know, and the flags it may have meant."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command = parser.commands.choices[args.command]  # type: ignore[attr-defined]
        flags = [flag for action in command._actions for flag in action.option_strings]
        named = []
        for word in unknown:
            near = _near(word.split("=")[0], flags)
            hint = f" (did you mean {' or '.join(near)}?)" if word.startswith("-") and near else ""
            named.append(f"{word}{hint}")
        command.error(f"unrecognized arguments: {', '.join(named)}")
    return args


def _near(word: str, flags: list[str]) -> list[str]:
    """The flags ``word`` may have meant: those it begins (``--learn``), then look-alikes."""
    started = [flag for flag in flags if len(word) > 3 and flag.startswith(word)]
    alike = difflib.get_close_matches(word, flags, n=2, cutoff=0.6)
    return list(dict.fromkeys(started + alike))[:2]


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer ≥ 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROGRAM, description="LoRA: train, evaluate, generate and merge adapters."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.commands = commands  # type: ignore[attr-defined]  # _parse names their flags

    train = commands.add_parser(
        "train",
        help="train a LoRA adapter",
        usage=f"{PROGRAM} train [--config FILE | --resume RUN] [--overwrite] [--FLAG VALUE ...]",
        description="Train an adapter. Every setting below is a flag and a key of a --config "
        "YAML file (flags win); a run writes its settings to OUTPUT_DIR/config.yaml.",
        formatter_class=lambda prog: argparse.HelpFormatter(prog, max_help_position=30),
    )
    train.add_argument("--config", type=Path, help="a YAML file of settings (flags win)")
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run in --output-dir (its adapter, checkpoint, metrics and "
        "plots are removed first); without it, or --resume, such a folder is refused",
    )
    _add_dataclass_flags(train, TrainConfig, SECTIONS)

    evaluate = commands.add_parser("eval", help="score a model (with an adapter) on a task")
    _model_flags(evaluate, device=True)
    evaluate.add_argument(
        "--task",
        default=None,
        help="built-in task (default: the task the --adapter's run trained on)",
    )
    evaluate.add_argument(
        "--data",
        type=Path,
        default=None,
        help="score on your own data (the files and layouts train reads): loss and "
        "perplexity, and for prompt/completion records and chats, greedy completions scored "
        "by exact match, BLEU and ROUGE-L",
    )
    evaluate.add_argument(
        "--data-format",
        choices=DATA_FORMATS,
        default="auto",
        help="with --data: the records' layout, where their fields fit two (default: auto)",
    )
    evaluate.add_argument(
        "--predictions",
        type=Path,
        default=None,
        help="with --data, write each prompt, reference and prediction to this JSONL file",
    )
    evaluate.add_argument(
        "--max-new-tokens", type=_at_least_one, default=128, help="with --data (default: 128)"
    )
    evaluate.add_argument("--split", default="test", choices=("train", "validation", "test"))
    evaluate.add_argument("--size", type=_at_least_one, default=None, help="examples to score")
    evaluate.add_argument("--seed", type=int, default=0, help="the task generator's seed")
    evaluate.add_argument("--batch-size", type=_at_least_one, default=16)
    evaluate.add_argument(
        "--chat-shots",
        type=int,
        default=None,
        metavar="N",
        help="prompt through the model's chat template with the task's instruction and N "
        "worked examples from the training split (e2e; default: the raw prompt, as an "
        "adapter trains on)",
    )

    generate = commands.add_parser("generate", help="greedy completions of prompts")
    _model_flags(generate, device=True)
    generate.add_argument("prompts", nargs="+", help="prompt texts")
    generate.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn")
    generate.add_argument("--max-new-tokens", type=_at_least_one, default=64)
    for generating in (evaluate, generate):
        _engine_flag(generating)

    merge = commands.add_parser(
        "merge", help="merge an adapter into the base: a Transformers directory or one GGUF file"
    )
    _model_flags(merge, dtype="auto")  # written in the dtype the base was saved in
    merge.add_argument(
        "--quantized-base",
        choices=QUANTIZED_BASES,
        help="the base as the adapter was trained over it (see loralab train --help): the "
        "adapter is merged into its unpacked weights, and a float model is written",
    )
    merge.add_argument(
        "--requantize",
        action="store_true",
        help="with --quantized-base nf4, fp4 or int8: store the merged weights in that "
        "format again (a directory that loads quantized); rounding loses part of the "
        "adapter's update, and the merge says how much",
    )
    merge.add_argument(
        "--format",
        choices=("transformers", "gguf"),
        default="transformers",
        help="transformers: a model directory (default); gguf: one llama.cpp file, for a "
        "base that came from a GGUF (without --adapter: the base itself in --outtype)",
    )
    merge.add_argument(
        "--output",
        type=Path,
        required=True,
        help="the merged model directory (new or empty), or the .gguf file to write",
    )
    _outtype_flag(merge, "the merged tensors (and without --adapter, every tensor)")

    export = commands.add_parser(
        "export", help="write an adapter in another runtime's format (llama.cpp's GGUF)"
    )
    _model_flags(export, adapter_required=True)
    export.add_argument("--format", choices=("gguf",), default="gguf", help="(default: gguf)")
    export.add_argument("--output", type=Path, required=True, help="the .gguf file to write")
    _outtype_flag(export, "the factors")

    info = commands.add_parser("info", help="describe an adapter directory")
    info.add_argument("adapter", type=Path)

    demo = commands.add_parser("demo", help="the main job: before/after LoRA on the e2e task")
    demo.add_argument("--output-dir", type=Path, default=Path("runs/demo"))
    demo.add_argument(
        "--steps", type=_at_least_one, default=None, help="training steps (default: 60)"
    )
    demo.add_argument(
        "--test-size", type=_at_least_one, default=None, help="scored examples (default: 64)"
    )
    _engine_flag(demo)
    _serve_flags(commands)
    from .experiments import EXPERIMENT_NAMES, MODES

    reproduce = commands.add_parser(
        "reproduce",
        help="run one of the paper's experiments, or write the verdict report",
        description="Run one of the paper's experiments and write NAME.md, NAME.json and "
        f"NAME.png. Experiments: {', '.join(EXPERIMENT_NAMES)}. `reproduce report` reads "
        "what the experiments wrote and writes REPORT.md: a verdict per finding.",
    )
    reproduce.add_argument("name", help=f"one of: {', '.join(EXPERIMENT_NAMES)}, report")
    reproduce.add_argument(
        "--quick", action="store_true", help="the short mode (up to about 20 min): --scale quick"
    )
    reproduce.add_argument(
        "--scale",
        choices=MODES,
        default=None,
        help="quick, standard (the methods on e2e with SmolLM2, about 2 h) or full "
        "(default: full, or quick with --quick)",
    )
    reproduce.add_argument(
        "--seeds", type=_at_least_one, default=None, help="seeds (default: the mode's)"
    )
    reproduce.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="runs trained side by side, one thread each (default: one per core); "
        "changes the time, not the numbers",
    )
    reproduce.add_argument(
        "--shard",
        default=None,
        metavar="K/N",
        help="train only every N-th run of the plan, from the K-th (a job array of N over "
        "one shared --output-dir covers the plan once); the report waits for all of them",
    )
    reproduce.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="where the tables and the stored runs (OUTPUT_DIR/runs) go (default: results/MODE)",
    )
    reproduce.add_argument(
        "--quantized-base",
        choices=QUANTIZED_BASES,
        help="train every run over its base stored so (see loralab train --help); methods "
        "that train the base's own weights refuse it",
    )
    _engine_flag(reproduce)
    return parser


_GENERATE_ENGINES = (
    "what generates: auto (loralab's engine for the Llama family, else Transformers' "
    "generate, saying why once), engine (refuse where it cannot run), or hf "
    "(Transformers' generate always, for comparison; default: auto)"
)


def _engine_flag(parser: argparse.ArgumentParser, text: str = _GENERATE_ENGINES) -> None:
    parser.add_argument(
        "--engine",
        choices=("auto", "engine", "hf"),  # generate.ENGINES; that module imports torch
        default="auto",
        help=text,
    )
    parser.add_argument(
        "--engine-weights",
        choices=("fp32", "bf16", "int8", "auto"),  # engine/weights.WEIGHTS
        default="fp32",
        help="the base weights loralab's engine multiplies by: fp32 (the model's own, exact; "
        "default), bf16 (a bf16 copy: faster where the CPU has AVX512-BF16 or AMX, refused "
        "where it has neither; the tokens may differ from fp32's), int8 (an int8 copy, one "
        "scale a row: a quarter of the bytes, faster at a few rows, slower at a server's "
        "32; the tokens drift as a Q8_0 file's) or auto (bf16 where the CPU has them, else "
        "fp32); the choice is printed",
    )


def _serve_flags(commands) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve the base and its adapters over an OpenAI-compatible HTTP API",
        description="One base, many adapters, one continuously batched engine. The request's "
        "`model` field picks the adapter (the base's name: none).",
    )
    serve.add_argument("--model", default="smollm2-135m", help="model alias, directory or id")
    _device_flags(serve, "fp32")
    serve.add_argument(
        "--adapter",
        action="append",
        default=[],
        type=_named_dir,
        metavar="[NAME=]DIR",
        help="an adapter loaded at start-up and never evicted (repeatable); NAME defaults "
        "to the folder's name (the run's, for a run's adapter folder)",
    )
    serve.add_argument(
        "--served-model-name",
        default=None,
        help="the base model's id for clients (default: --model as given, or the last "
        "component of a local path)",
    )
    serve.add_argument(
        "--adapter-dir",
        type=Path,
        default=None,
        help="allow POST /v1/load_lora_adapter for adapters inside this directory only "
        "(without it, loading at run time is off)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: local only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--max-batch", type=_at_least_one, default=32, help="rows decoded together (default: 32)"
    )
    _engine_flag(
        serve,
        "the rows' engine: auto (the default), loralab's engine where it runs the model "
        "(the Llama family: rows at their own positions, prompts in chunks between the "
        "steps, so a long prompt never stalls the other streams), else Transformers' "
        "forward and cache, saying why; engine, loralab's or refused; hf, Transformers' "
        "always",
    )
    serve.add_argument(
        "--max-loras", type=_at_least_one, default=8, help="adapters resident at once (default: 8)"
    )
    serve.add_argument(
        "--max-cpu-loras",
        type=_at_least_one,
        default=None,
        help="run-time adapters kept in memory, as read and checked, to be put back on the "
        "model after an eviction; loading more answers 409 (default: max(--max-loras, 64))",
    )
    serve.add_argument(
        "--max-adapter-bytes",
        type=_at_least_one,
        default=None,
        help="the largest weights file read from --adapter-dir (default: 4 GiB)",
    )
    serve.add_argument(
        "--max-waiting",
        type=_at_least_one,
        default=256,
        help="requests queued for a row before the server answers 429 (default: 256)",
    )
    serve.add_argument(
        "--api-key",
        default=None,
        help="require Authorization: Bearer KEY on every route but /health "
        "(default: $LORALAB_API_KEY if set)",
    )


def _make_room(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Never train over an earlier run unasked: refuse, naming the three ways on."""
    from .training.run_dir import clear_previous_run, previous_run

    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 alone owns the folder
        return
    found = None if resume else previous_run(run_dir)
    if found is None:
        return
    if not overwrite:
        raise OutputDirError(
            f"--output-dir {run_dir} holds {found}; add --resume to continue it, "
            "--overwrite to replace it, or name a new --output-dir (nothing was touched)"
        )
    clear_previous_run(run_dir)
    print(f"{PROGRAM}: --overwrite: removed {found.split(' (')[0]} from {run_dir}", file=sys.stderr)


def _named_dir(text: str) -> tuple[str, Path]:
    """``NAME=DIR``, or ``DIR`` alone as every other command takes it: the name is then
    the folder's, or its parent's for a run's ``adapter`` folder (``runs/e2e/adapter``
    is ``e2e``)."""
    name, sep, directory = text.partition("=")
    if not sep:
        path = Path(text)
        name = path.resolve().parent.name if path.name == "adapter" else path.name
        directory = text
    if not name or not directory:
        raise argparse.ArgumentTypeError(f"expected DIR or NAME=DIR, got {text!r}")
    return name, Path(directory)


def _outtype_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--outtype",
        default="f32",
        help=f"f32, f16, bf16 or q8_0 for {what} (default: f32; q8_0 keeps in f16 the "
        "tensors whose rows are not a multiple of 32, and vectors stay f32)",
    )


def _model_flags(
    parser: argparse.ArgumentParser,
    adapter_required: bool = False,
    device: bool = False,
    dtype: str = "fp32",
) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="model alias, directory or id")
    parser.add_argument(
        "--model-kind", default="causal-lm", choices=("causal-lm", "classification")
    )
    parser.add_argument("--adapter", type=Path, required=adapter_required, help="adapter directory")
    _device_flags(parser, dtype, device)


def _device_flags(parser: argparse.ArgumentParser, dtype: str, device: bool = True) -> None:
    parser.add_argument(
        "--dtype",
        default=dtype,
        help=f"the base's weights: fp32, bf16, fp16, or auto (as the checkpoint was saved; "
        f"default: {dtype})",
    )
    if device:  # merge and export write files: they read the weights on the CPU
        parser.add_argument(
            "--device",
            default="auto",
            help="auto (the first CUDA GPU if PyTorch sees one, else the CPU), cpu, cuda or cuda:N",
        )
        parser.add_argument(
            "--quantized-base",
            choices=QUANTIZED_BASES,
            help="keep the base quantized: gguf runs on a GGUF file's own packed weights "
            "(the embedded model's, or --model FILE.gguf) instead of dequantizing them; nf4, "
            "fp4 and int8 quantize a float model with bitsandbytes as it loads, as QLoRA does "
            "(pip install 'loralab[qlora]')",
        )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = _parse(parser, argv)
    from transformers.utils import logging as transformers_logging

    from .data.records import DataError
    from .files.peft_config import AdapterFileError
    from .lora.layers import MergeError
    from .models.errors import ModelLoadError
    from .training.distributed import DistributedError
    from .training.loop import TrainingInterrupted
    from .training.objectives.rollout_server import RolloutServerError

    # Our own progress bar and messages are enough; Transformers' per-load bars are noise.
    transformers_logging.disable_progress_bar()
    if getattr(args, "engine", None) is not None:
        from .generate import use_engine

        use_engine(args.engine, args.engine_weights)
    try:
        return COMMANDS[args.command](args)
    except TrainingInterrupted as stopped:
        message = str(stopped)
        if args.command == "demo":  # the demo has no --resume: it starts over
            message = "the demo was interrupted; run `loralab demo` again to start over"
        print(f"{PROGRAM}: {message}", file=sys.stderr)
        return 130
    except DistributedError as error:  # the processes could not meet, or another one failed
        print(f"{PROGRAM}: error: {error}", file=sys.stderr)
        return 1
    except (
        ConfigError,
        DataError,
        AdapterFileError,
        ModelLoadError,
        MergeError,
        RolloutServerError,
        ValueError,  # TaskError and OutputDirError are ValueErrors too
        OSError,  # a file the user named could not be read or written
    ) as error:
        # Every error a user can cause is one line, exit code 2.
        print(f"{PROGRAM}: error: {error}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace) -> int:
    from .training.config import config_from_file
    from .training.loop import train

    skipped = ("command", "config", "overwrite")
    overrides = {k: v for k, v in vars(args).items() if k not in skipped}
    settings = args.config
    if isinstance(overrides.get("resume"), str):  # --resume RUN
        run = Path(overrides["resume"])
        if args.config is not None:
            raise ConfigError(f"--resume {run} takes the run's own settings; drop --config")
        settings = run / "config.yaml"
        if not settings.is_file():
            raise ConfigError(
                f"--resume {run}: no config.yaml there; name the folder of a run of "
                "loralab train (its --output-dir)"
            )
        overrides.update(resume=True, output_dir=str(run))
    if settings is not None:
        config = config_from_file(settings, overrides)
    else:
        config = TrainConfig(**overrides)
    _make_room(Path(config.output_dir), config.resume, args.overwrite)
    result = train(config)
    if result.rank != 0:  # under torchrun, rank 0 speaks for all
        return 0
    if result.validation:  # the figure that says how the adapter does
        step, loss = result.validation[-1]
        final = f"validation loss {loss:.4f} at step {step}"
    else:
        final = f"last training loss {result.losses[-1]:.4f} (no validation set)"
    print(
        f"trained {result.steps} steps in {result.seconds:.0f} s; {final}; "
        f"adapter: {result.adapter_dir}"
    )
    return 0


def _load(args: argparse.Namespace, num_labels: int | None = None):
    from .methods.method_files import load_method
    from .models.devices import base_dtype, choose_device, place
    from .models.loading import load_model

    if args.adapter is not None:  # a mistyped path is told before the model's slow load
        _check_adapter_dir(args.adapter)
    device = choose_device(getattr(args, "device", "cpu"))  # a missing GPU, before loading
    dtype = base_dtype(args.dtype)
    extra = {"num_labels": num_labels} if args.model_kind == "classification" else {}
    model, tokenizer = load_model(
        args.model,
        kind=args.model_kind,
        dtype=dtype,
        quantized_base=getattr(args, "quantized_base", None),
        device=device,
        **extra,
    )
    if args.adapter is not None:
        load_method(model, args.adapter)  # a PEFT adapter, or any method's saved files
    place(model, device)
    if args.command in ("eval", "generate"):
        print(f"{PROGRAM}: {args.model} on {device}", file=sys.stderr)
    return model, tokenizer


def _eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_task
    from .tasks import get_task

    if args.adapter is not None:
        _check_adapter_dir(args.adapter)
    if args.data is not None:
        return _eval_data(args)
    if args.predictions is not None:
        raise ConfigError("--predictions is written with --data (a task prints its metrics)")
    task = get_task(args.task or _run_task(args.adapter))
    if args.model_kind == "classification" and task.kind != "classification":
        raise ConfigError(
            f"--model-kind classification scores a classification task (nli); {task.name} "
            f"is a {task.kind} task"
        )
    sizes = {f"{args.split}_size": args.size} if args.size else {}
    examples = task.splits(seed=args.seed, **sizes)[args.split]  # bad sizes fail before loading
    shots = None
    if args.chat_shots is not None:
        if args.chat_shots < 0:
            raise ConfigError(f"--chat-shots must be ≥ 0, got {args.chat_shots}")
        shots = task.splits(seed=args.seed, train_size=args.chat_shots)["train"]
    model, tokenizer = _load(args, len(task.labels) if task.labels else None)
    result = evaluate_task(
        model, tokenizer, task, examples, args.batch_size, shots, progress="generate"
    )
    print(
        json.dumps(
            {"task": task.name, "split": args.split, "examples": len(examples), **result.metrics},
            indent=2,
        )
    )
    return 0


def _run_task(adapter: Path | None) -> str:
    """The built-in task the adapter's run trained on (its config.yaml), or an error that
    names the ways to say what to score."""
    from .tasks import TASK_NAMES
    from .training.config import config_from_file

    ways = f"name --task ({', '.join(TASK_NAMES)}) or --data FILE (your own records)"
    settings = adapter.parent / "config.yaml" if adapter is not None else None
    if settings is None or not settings.is_file():
        raise ConfigError(f"what to score? {ways}")
    config = config_from_file(settings)
    if config.data is not None or config.task is None:
        raise ConfigError(
            f"the adapter was trained on {config.data or 'your own data'}, not a built-in "
            f"task: {ways}"
        )
    return config.task


def _eval_data(args: argparse.Namespace) -> int:
    from .data.records import read_examples
    from .evaluate import evaluate_records
    from .files.atomic_write import text_writer, write_files_atomically

    if args.task is not None:
        raise ConfigError("--task and --data name two things to score; give one")
    records = read_examples(args.data, args.data_format)  # bad data fails before the model
    if args.size:
        records = records[: args.size]
    if args.predictions is not None:
        check_output_dir(args.predictions.parent, "--predictions")
    model, tokenizer = _load(args)
    result = evaluate_records(model, tokenizer, records, args.max_new_tokens, args.batch_size)
    if args.predictions is not None:
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in result.predictions)
        args.predictions.parent.mkdir(parents=True, exist_ok=True)
        write_files_atomically(args.predictions.parent, {args.predictions.name: text_writer(text)})
    summary = {"data": str(args.data), "examples": len(records), **result.metrics}
    print(json.dumps(summary, indent=2))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from .generate import generate

    model, tokenizer = _load(args)
    prompts = args.prompts
    if args.chat:
        prompts = [[{"role": "user", "content": prompt}] for prompt in prompts]
    texts = generate(model, tokenizer, prompts, args.max_new_tokens, stop_at_newline=False)
    for prompt, text in zip(args.prompts, texts, strict=True):
        print(f"### {prompt}\n{text.strip()}\n")
    if not args.chat and not any(text.strip() for text in texts):
        # a chat-trained adapter ends a bare prompt at once: its end token comes first
        print(
            f"{PROGRAM}: no text was generated; a model or adapter trained on chats "
            "answers prompts wrapped as a user turn: add --chat",
            file=sys.stderr,
        )
    return 0


def _merge(args: argparse.Namespace) -> int:
    _check_requantize(args)
    if args.format == "gguf":
        return _merge_gguf(args)
    from .files.atomic_write import write_directory_atomically

    if args.adapter is None:
        raise ConfigError("--adapter is required (only --format gguf writes the base alone)")
    check_output_dir(args.output, "--output", empty=True)  # before the model loads
    model, tokenizer = _load(args)
    merged = _merged(model, args.adapter, args.requantize)

    def save(directory: Path) -> None:
        merged.save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    write_directory_atomically(args.output, save)
    print(f"merged model written to {args.output} (loads with AutoModelForCausalLM)")
    return 0


def _check_adapter_dir(adapter: Path) -> None:
    from .files.peft_config import CONFIG_FILE, AdapterFileError
    from .methods.method_files import METHOD_FILE

    if not adapter.is_dir():
        raise AdapterFileError(f"--adapter {adapter}: no such directory")
    if not any((adapter / name).is_file() for name in (CONFIG_FILE, METHOD_FILE)):
        raise AdapterFileError(
            f"--adapter {adapter} holds neither {CONFIG_FILE} nor {METHOD_FILE}: not an "
            "adapter directory (a run's adapter is in its adapter/ folder)"
        )


def _check_requantize(args: argparse.Namespace) -> None:
    if not args.requantize:
        return
    if args.format == "gguf":
        raise ConfigError(
            "--requantize re-quantizes a Transformers directory; --format gguf writes the "
            "merged tensors in --outtype (q8_0 quantizes them) and the rest as they were"
        )
    if args.quantized_base in (None, "gguf"):
        raise ConfigError(
            "--requantize stores the merged weights in bitsandbytes' format: give "
            "--quantized-base nf4, fp4 or int8 (a GGUF base's merged tensors are written in "
            "--outtype by --format gguf)"
        )


def _merged(model, adapter: Path, requantize: bool = False):
    """The model with its adapter merged in: a plain model (refused for a method that adds
    layers or tokens); a quantized base comes back dense unless ``requantize``."""
    import warnings

    from .lora.merge import QuantizationLossWarning, merge_and_unload
    from .methods import applied_method, get_method

    method = get_method(applied_method(model).name)
    if not method.mergeable:
        raise ConfigError(
            f"{adapter}: a {method.name} model cannot be merged into the base weights "
            "(it adds layers or tokens); use it as it is"
        )
    # every mergeable method's layers (LoRA's, AdaLoRA's) fold in; a model trained in full
    # or by BitFit has none, and is unwrapped as it is
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", QuantizationLossWarning)
        merged = merge_and_unload(model, safe=True, requantize=requantize)
    for warning in caught:
        if issubclass(warning.category, QuantizationLossWarning):
            print(f"{PROGRAM}: warning: {warning.message}", file=sys.stderr)
        else:  # not ours to reword
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )
    return merged


def _merge_gguf(args: argparse.Namespace) -> int:
    from .files.atomic_write import text_writer
    from .files.gguf.layout import check_export_target
    from .files.gguf.merged import read_gguf, source_gguf, write_merged_gguf
    from .files.gguf.ollama import modelfile, modelfile_name

    check_export_target(args.output, args.outtype)  # before the model loads
    source = read_gguf(source_gguf(args.model))  # once: the Modelfile's template and the copy
    merged = None
    if args.adapter is not None:
        model, _ = _load(args)  # the adapter is checked against the base here
        merged = _merged(model, args.adapter)
    text = modelfile(args.output, None, source.chat_template)
    written = write_merged_gguf(
        source,
        args.output,
        args.outtype,
        merged,
        {modelfile_name(args.output): text_writer(text)},
    )
    what = f"{len(written.replaced)} merged tensors in {args.outtype}, the rest as in {source.path}"
    if merged is None:
        what = f"the base, every tensor in {args.outtype}"
    print(f"wrote {written.path}: {written.architecture} GGUF, {written.tensors} tensors ({what})")
    _say_how_to_run(written.path, written.kept_f16, f"llama-cli -m {written.path}")
    return 0


def _say_how_to_run(path: Path, kept_f16: list[str], run: str) -> None:
    """The lines after an export: what stayed f16, and how llama.cpp and Ollama run it."""
    from .files.gguf.ollama import modelfile_name

    if kept_f16:
        print(f"  kept in f16 (rows not a multiple of 32): {len(kept_f16)} tensors")
    print(f"  run it: {run}")
    print(f"  Ollama: ollama create NAME -f {path.with_name(modelfile_name(path))}")


def _export(args: argparse.Namespace) -> int:
    from .files.atomic_write import link_writer, text_writer
    from .files.gguf.adapter import export_adapter_gguf
    from .files.gguf.layout import ExportError, check_export_target
    from .files.gguf.merged import source_gguf
    from .files.gguf.ollama import modelfile, modelfile_name
    from .lora.experts import LoraExperts
    from .lora.inject import lora_layers
    from .models.embedded import cache_dir

    check_export_target(args.output, args.outtype)  # before the model loads
    model, tokenizer = _load(args)  # the adapter is checked against the base here
    try:
        base = source_gguf(args.model)
    except ExportError:  # a Transformers directory: Ollama converts it itself
        base = Path(model.name_or_path)
    files = {}
    if base.is_file() and base.resolve().is_relative_to(cache_dir().resolve()):
        # The Modelfile's FROM must not point into loralab's cache, which is ours to
        # clear: the base goes beside the adapter (a hard link where it can), and the
        # folder works wherever it is moved.
        files[base.name] = link_writer(base)
        base = args.output.with_name(base.name)
        if base == args.output:
            raise ConfigError(f"--output {args.output} is the base's own file name; pick another")
    text = modelfile(base, args.output, getattr(tokenizer, "chat_template", None))
    files[modelfile_name(args.output)] = text_writer(text)
    layers = lora_layers(model)
    experts = {n: layer for n, layer in layers.items() if isinstance(layer, LoraExperts)}
    exported = export_adapter_gguf(
        args.adapter, model.config, args.output, args.outtype, files, experts
    )
    print(
        f"wrote {exported.path}: llama.cpp LoRA adapter for {exported.architecture}, "
        f"{exported.tensors} tensors, adapter.lora.alpha = {exported.alpha:g}"
    )
    if exported.rescaled:
        print(
            f"  {len(exported.rescaled)} modules have another scale than alpha / r "
            f"(rsLoRA or a pattern): it is folded into their lora_b: {exported.rescaled}"
        )
    _say_how_to_run(exported.path, exported.kept_f16, f"llama-cli -m {base} --lora {exported.path}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from .files.adapter_dir import WEIGHTS_FILE, factor_tensors_by_module, read_adapter
    from .files.model_card import CARD_FILE, base_quantization_lines
    from .lora.expert_targets import holds_stacked_factors

    files = read_adapter(args.adapter)
    config = files.config
    parameters = sum(t.numel() for t in files.tensors.values())
    by_module, _ = factor_tensors_by_module(files.tensors)
    ranks, kinds = {}, set()
    for module, factors in by_module.items():
        if factors.factors_class is not None:  # the PEFT form's rank (a fused subset's: p·r)
            ranks[module] = factors.factors_class.rank_of(factors.tensors)
            kinds.add(factors.factors_class.__name__)
    weights = args.adapter / WEIGHTS_FILE
    size = weights.stat().st_size if weights.exists() else 0
    print(f"adapter: {args.adapter}")
    print(f"base model: {files.peft_config.get('base_model_name_or_path')}")
    print(
        f"r = {config.r}, lora_alpha = {config.lora_alpha:g}, use_rslora = {config.use_rslora}"
        f", use_dora = {config.use_dora}"
    )
    print(f"target_modules: {config.target_modules}")
    stacked = set()
    if config.target_parameters:  # PEFT's A (E·r, in): its rows are every expert's ranks
        print(f"target_parameters: {config.target_parameters} (each expert its own update)")
        stacked = {m for m in by_module if holds_stacked_factors(m, config.target_parameters)}
    print(
        f"adapted modules: {len(by_module)}; ranks: "
        f"{sorted({r for m, r in ranks.items() if m not in stacked})}; "
        f"factors: {', '.join(sorted(kinds))}"
    )
    for module in sorted(by_module):
        rank = f"r·experts={ranks.get(module)}" if module in stacked else f"r={ranks.get(module)}"
        print(f"  {module}  {rank}")
    print(f"parameters: {parameters:,}; file size: {size / 1e6:.2f} MB")
    for line in base_quantization_lines(args.adapter / CARD_FILE):
        print(f"trained over a quantized base: {line}")
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from .experiments import Shard, reproduce

    if args.quick and args.scale not in (None, "quick"):
        raise ConfigError(f"--quick and --scale {args.scale} ask for two modes; give one")
    mode = "quick" if args.quick else args.scale or "full"
    if args.name == "report":
        from .experiments.verdicts import write_verdicts

        written = write_verdicts(args.output_dir or Path("results") / mode)
        print(written.read_text())
        print(f"written: {written}")
        return 0
    shard = Shard.parse(args.shard) if args.shard else None
    words = [PROGRAM, "reproduce", args.name, *(["--quick"] if args.quick else [])]
    if args.scale and not args.quick:
        words.append(f"--scale {args.scale}")
    flags = ("seeds", "jobs", "quantized_base")
    words += [
        f"--{key.replace('_', '-')} {value}" for key in flags if (value := getattr(args, key))
    ]
    paths = reproduce(
        args.name,
        mode,
        args.seeds,
        args.output_dir,
        " ".join(words),
        args.jobs,
        shard,
        args.quantized_base,
    )
    if not paths:  # this shard's runs are done; the others' are not
        return 0
    print(paths["md"].read_text())
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .serve import ServeOptions, serve

    options = ServeOptions(
        model=args.model,
        served_model_name=args.served_model_name,
        adapters=args.adapter,
        adapter_dir=args.adapter_dir,
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        max_loras=args.max_loras,
        max_cpu_loras=args.max_cpu_loras,
        **({"max_adapter_bytes": args.max_adapter_bytes} if args.max_adapter_bytes else {}),
        max_waiting=args.max_waiting,
        api_key=args.api_key or os.environ.get("LORALAB_API_KEY") or None,
        device=args.device,
        dtype=args.dtype,
        quantized_base=args.quantized_base,
        engine=args.engine,
        engine_weights=args.engine_weights,
    )
    serve(options)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    options = {k: v for k, v in (("steps", args.steps), ("test_size", args.test_size)) if v}
    run_demo(args.output_dir, **options)
    return 0


COMMANDS = {
    "train": _train,
    "eval": _eval,
    "generate": _generate,
    "merge": _merge,
    "export": _export,
    "info": _info,
    "demo": _demo,
    "reproduce": _reproduce,
    "serve": _serve,
}


if __name__ == "__main__":
    raise SystemExit(main())
