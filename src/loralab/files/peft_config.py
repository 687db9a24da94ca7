"""PEFT's ``adapter_config.json``, both ways: which keys PEFT writes and what each means
for loralab, a ``LoraConfig`` from a PEFT config, and the config that makes PEFT build
exactly a loralab adapter (targets, ranks and alphas written so that PEFT's own matching
rules select the same modules with the same scale). AdaLoRA's files use the same tables.
"""

from __future__ import annotations

import difflib
import json
import re
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from ..lora.config import ConfigError, LoraConfig, pattern_value
from ..lora.experts import LoraExperts, outer_name
from ..lora.inits import get_init, init_of_peft
from ..lora.inject import (
    base_module_names,
    in_saved_module,
    layer_index,
    lora_layers,
    name_matches,
    require_adapter,
    saved_module_names,
)
from ..lora.layers import LoraFusedLinear, LoraLayer

PEFT_PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"


class AdapterFileError(ValueError):
    """An adapter file is missing, corrupted, or does not fit the model."""


# -- PEFT's config keys -------------------------------------------------------------------

# Keys that map onto LoraConfig fields.
MAPPED_KEYS = {
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "exclude_modules",
    "rank_pattern",
    "alpha_pattern",
    "layers_to_transform",
    "layers_pattern",
    "bias",
    "use_rslora",
    "modules_to_save",
    "init_lora_weights",
    "use_dora",
    "target_parameters",
}
# Keys that describe the adapter but do not change its weights.
DESCRIPTIVE_KEYS = {
    "peft_type",
    "base_model_name_or_path",
    "revision",
    "task_type",
    "inference_mode",
    "peft_version",
    "auto_mapping",
    "fan_in_fan_out",
    "megatron_core",
    "qalora_group_size",
    "loftq_config",
    "eva_config",
    "corda_config",
    "ensure_weight_tying",
    "lora_ga_config",
}
# PEFT features that change the computation; loralab reads them only at their off value.
FEATURE_KEYS = {
    "lora_bias": False,
    "layer_replication": None,
    "trainable_token_indices": None,
    "use_qalora": False,
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "use_bdlora": None,
    "megatron_config": None,
    "kasa_config": None,
    "monteclora_config": None,
    "velora_config": None,
}
# init_lora_weights values of inits loralab does not have that rewrite the base weights
# themselves: such an adapter fits only the base its init rewrote, so it is refused rather
# than silently wrong. (A registered init that rewrites the base, PiSSA's say, is run again
# on the given base as PEFT runs it on load.)
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "eva", "lora_ga")

# What loralab writes: keys every PEFT release since rsLoRA (0.7) knows.
WRITTEN_KEYS = (
    "alpha_pattern",
    "base_model_name_or_path",
    "bias",
    "fan_in_fan_out",
    "inference_mode",
    "init_lora_weights",
    "layers_pattern",
    "layers_to_transform",
    "lora_alpha",
    "lora_dropout",
    "modules_to_save",
    "peft_type",
    "r",
    "rank_pattern",
    "revision",
    "target_modules",
    "task_type",
    "use_rslora",
)

TASK_TYPES = {
    "ForCausalLM": "CAUSAL_LM",
    "LMHeadModel": "CAUSAL_LM",
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
    "ForConditionalGeneration": "SEQ_2_SEQ_LM",
}
# Heads that PEFT adds to modules_to_save by itself for these task types (matching
# module names by their ending), and then expects to find in the adapter file.
TASK_SAVED_HEADS = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


def _inert(value: Any) -> bool:
    return value is None or value is False or value in ({}, [], "")


def check_config_keys(
    data: dict,
    known: set[str],
    features: dict[str, Any],
    source: str,
    feature_of: str = "a PEFT feature loralab",
) -> None:
    """Classify every key of an adapter config: a feature left at its off value or an
    unknown key with an inert value passes (the latter with a warning); a feature that is
    on, or an unknown key with a value, is an ``AdapterFileError`` naming it."""
    known = known | set(features)
    for key, value in data.items():
        if key in features and not _inert(value) and value != features[key]:
            raise AdapterFileError(
                f"{source}: {key}={value!r} is {feature_of} does not implement; "
                "this adapter cannot be loaded exactly"
            )
        if key not in known:
            if _inert(value):
                warnings.warn(f"{source}: skipping unknown key {key!r} ({value!r})", stacklevel=3)
                continue
            near = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise AdapterFileError(f"{source}: unknown key {key!r} = {value!r}{hint}")


def config_from_peft(data: Any, source: str = "adapter_config.json") -> LoraConfig:
    """A ``LoraConfig`` from the dict in a PEFT ``adapter_config.json``.

    Unknown keys with a value are an error that names the key (a typo, or a PEFT feature
    loralab lacks); unknown keys left at an off value (None, false, empty) are skipped
    with a warning, so a newer PEFT's extra keys do not break loading.
    """
    if not isinstance(data, dict):
        raise AdapterFileError(f"{source}: expected a JSON object, got {type(data).__name__}")
    peft_type = data.get("peft_type")
    if peft_type != "LORA":
        raise AdapterFileError(f"{source}: peft_type is {peft_type!r}; loralab reads 'LORA' here")
    check_config_keys(data, MAPPED_KEYS | DESCRIPTIVE_KEYS, FEATURE_KEYS, source)
    try:
        init = init_of_peft(data.get("init_lora_weights", True))
    except ValueError:
        init = data.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
            raise AdapterFileError(
                f"{source}: init_lora_weights={init!r} changes the base weights themselves; "
                "convert the adapter to a plain LoRA with PEFT first"
            ) from None
        init = "kaiming"  # another random start: the saved tensors are what counts
    values = {key: data[key] for key in MAPPED_KEYS - {"init_lora_weights"} if key in data}
    if values.get("target_modules") is None:
        raise AdapterFileError(f"{source}: target_modules is missing or null")
    values["use_dora"] = values.get("use_dora") or False  # older files write no key
    values["rank_pattern"] = values.get("rank_pattern") or {}
    values["alpha_pattern"] = values.get("alpha_pattern") or {}
    values["init"] = init
    try:
        return LoraConfig(**values)
    except (ConfigError, TypeError) as error:
        raise AdapterFileError(f"{source}: {error}") from None


def read_json(path: Path) -> Any:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise AdapterFileError(f"{path} does not exist") from None
    return parse_json(data, str(path))


def parse_json(data: bytes, source: str) -> Any:
    """The JSON value in a file's bytes; an ``AdapterFileError`` naming ``source`` (and the
    line and column) for anything a hostile file can make ``json`` raise."""
    try:
        return json.loads(data.decode("utf-8"))
    except json.JSONDecodeError as error:
        raise AdapterFileError(
            f"{source}, line {error.lineno}, column {error.colno}: malformed JSON ({error.msg})"
        ) from None
    except UnicodeDecodeError as error:
        raise AdapterFileError(
            f"{source}: not UTF-8 ({error.reason} at byte {error.start})"
        ) from None
    except RecursionError:
        raise AdapterFileError(f"{source}: JSON nested too deeply to be a config") from None
    except ValueError as error:  # a number of more digits than Python converts
        raise AdapterFileError(f"{source}: cannot be read as JSON: {error}") from None


def present_modules_to_save(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """``config`` with only the ``modules_to_save`` entries that name a module of ``model``.

    PEFT skips entries that match nothing, and writes some itself: a ``SEQ_CLS`` adapter
    lists ``["classifier", "score"]`` whatever the model's head is called.
    """
    if not config.modules_to_save:
        return config
    names = [n for n in base_module_names(model) if n]
    present = [m for m in config.modules_to_save if any(name_matches(m, n) for n in names)]
    return replace(config, modules_to_save=list(dict.fromkeys(present)) or None)


def task_type(model: nn.Module, config: LoraConfig) -> str | None:
    name = type(model).__name__
    task = next((task for suffix, task in TASK_TYPES.items() if name.endswith(suffix)), None)
    # For a classification task PEFT trains the head in full and loads it from the file;
    # if this adapter left the head frozen, no task type keeps PEFT's model equal to ours.
    saved = set(saved_module_names(model, config))
    heads = TASK_SAVED_HEADS.get(task, ())
    if any(n.endswith(heads) and n not in saved for n in base_module_names(model) if n):
        return None
    return task


def _peft_selects(entries: list[str], layers: list[int] | None, pattern, names) -> set[str]:
    chosen = set()
    for name in names:
        if not any(name_matches(entry, name) for entry in entries):
            continue
        if layers is not None and name not in entries and layer_index(name, pattern) not in layers:
            continue
        chosen.add(name)
    return chosen


def written_targets(config: LoraConfig, chosen: set[str], modules: dict[str, nn.Module]):
    """The shortest target list PEFT reads as exactly ``chosen``; full names at worst."""
    names = [n for n in modules if n and not in_saved_module(config, n)]
    for depth in (1, 2, 3):
        entries = sorted({".".join(n.split(".")[-depth:]) for n in chosen})
        for layers, pattern in ((None, None), (config.layers_to_transform, config.layers_pattern)):
            if _peft_selects(entries, layers, pattern, names) == chosen:
                return entries, layers, pattern
    return sorted(chosen), None, None


def is_stacked(layer: LoraLayer) -> bool:
    """Whether ``layer`` adapts a stacked expert weight (PEFT's ``target_parameters``)."""
    return isinstance(layer, LoraExperts)


def expert_weight_name(layer_name: str, layer: LoraExperts) -> str:
    """The full name of the weight a (possibly nested) expert wrapper adapts, as the
    model has it: ``model.layers.0.mlp.experts.gate_up_proj``."""
    return f"{outer_name(layer_name)}.{layer.weight_name}"


def written_parameters(chosen: set[str], model: nn.Module) -> list[str]:
    """The shortest ``target_parameters`` that PEFT's rule (the full name, or a ``.entry``
    suffix, over every parameter of the model) reads as exactly ``chosen``."""
    names = [
        f"{module}.{local}" if module else local
        for module, owner in base_module_names(model).items()
        for local, _ in owner.named_parameters(recurse=False)
    ]
    for depth in (1, 2, 3):
        entries = sorted({".".join(n.split(".")[-depth:]) for n in chosen})
        if {n for n in names if any(name_matches(e, n) for e in entries)} == chosen:
            return entries
    return sorted(chosen)


def written_pattern(values: dict[str, float], default: float) -> dict[str, float]:
    """rank_pattern/alpha_pattern entries for the modules whose value is not the default.

    A leaf name is used when every module with that leaf shares the value, the full name
    otherwise; PEFT's suffix-regex rule then gives back exactly ``values``.
    """
    by_leaf: dict[str, set] = {}
    for name, value in values.items():
        by_leaf.setdefault(name.rsplit(".", 1)[-1], set()).add(value)
    pattern: dict[str, float] = {}
    for name, value in sorted(values.items()):
        if value != default:
            leaf = name.rsplit(".", 1)[-1]
            pattern[re.escape(leaf if by_leaf[leaf] == {value} else name)] = value
    assert all(pattern_value(pattern, n, default) == v for n, v in values.items())
    return pattern


def require_lora_adapter(model: nn.Module, adapter_name: str) -> LoraConfig:
    """The config of ``adapter_name``, whose factors must be LoRA's (``B A``, or DoRA's) to
    be written as PEFT's LORA (an AdaLoRA adapter has its own format)."""
    return require_adapter(model, adapter_name, "written in PEFT's LoRA format")


def peft_config_dict(
    model: nn.Module,
    adapter_name: str = "default",
    base_model_name_or_path: str | None = None,
    original_base: bool = True,
) -> dict:
    """The ``adapter_config.json`` that makes PEFT build exactly this adapter.

    Targets, ranks and alphas are written so that PEFT's own matching rules select the
    same modules with the same scale; the written form is checked against them.
    """
    config = require_lora_adapter(model, adapter_name)
    layers = {n: layer for n, layer in lora_layers(model).items() if adapter_name in layer.lora}
    # an init that rewrote the base, written for the original base: rank 2r at the same
    # scale (α doubled, or times √2 with rsLoRA), as PEFT's conversion writes it
    converted = original_base and any(adapter_name in layer.rewrote for layer in layers.values())
    widen = 2 if converted else 1
    widen_alpha = widen**0.5 if config.use_rslora else widen  # the same scale at rank 2r
    experts = {
        expert_weight_name(n, layer): layer for n, layer in layers.items() if is_stacked(layer)
    }
    layers = {n: layer for n, layer in layers.items() if not is_stacked(layer)}
    effective = {}  # module (or expert weight) -> (r, alpha) as PEFT must see them
    for name, layer in [*layers.items(), *experts.items()]:
        factors = layer.lora[adapter_name]
        r, alpha = factors.r, factors.alpha
        if isinstance(layer, LoraFusedLinear):
            # p parts of rank r become one rank-p·r pair with the same scale.
            p = len(layer.parts.enabled)
            alpha = alpha * (p**0.5 if config.use_rslora else p)
            r = r * p
        effective[name] = (r * widen, alpha * widen_alpha)
    candidates = base_module_names(model)
    target_modules, layers_to_transform, layers_pattern = written_targets(
        config, set(layers), candidates
    )
    default_r = config.r * widen
    default_alpha = config.lora_alpha * widen_alpha
    return lora_config_json(
        peft_header("LORA", model, config, base_model_name_or_path),
        r=default_r,
        lora_alpha=default_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=target_modules,
        layers_to_transform=layers_to_transform,
        layers_pattern=layers_pattern,
        rank_pattern=written_pattern({n: v[0] for n, v in effective.items()}, default_r),
        alpha_pattern=written_pattern({n: v[1] for n, v in effective.items()}, default_alpha),
        bias=config.bias,
        use_rslora=config.use_rslora,
        modules_to_save=config.modules_to_save,
        fan_in_fan_out=any(layer.fan_in_fan_out for layer in layers.values()),
        init_lora_weights=True if converted else get_init(config.init).peft_value(),
        use_dora=config.use_dora,
        target_parameters=written_parameters(set(experts), model) if experts else None,
    )


def peft_header(
    peft_type: str, model: nn.Module, config: LoraConfig, base_model_name_or_path: str | None
) -> dict:
    """The keys every PEFT config of ours starts with: the type, the task, the base."""
    return {
        "peft_type": peft_type,
        "task_type": task_type(model, config),
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
    }


def lora_config_json(
    header: dict,
    use_dora: bool = False,
    target_parameters: list[str] | None = None,
    **values: Any,
) -> dict:
    """A PEFT LORA ``adapter_config.json``: ``header`` and exactly the ``WRITTEN_KEYS``,
    which every PEFT release since rsLoRA (0.7) reads, and ``use_dora`` (PEFT 0.9) and
    ``target_parameters`` (0.17) only where they are used, so that older releases still
    read a plain LoRA."""
    extra = {"use_dora": True} if use_dora else {}
    if target_parameters:
        extra["target_parameters"] = target_parameters
    data = {**header, **values, **extra}
    written = set(WRITTEN_KEYS) | set(extra)
    missing, unknown = written - set(data), set(data) - written
    if missing or unknown:
        raise ValueError(f"a LORA config needs {sorted(missing)}; not {sorted(unknown)}")
    return data
