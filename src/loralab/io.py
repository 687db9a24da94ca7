"""Adapter files: PEFT's format (read and written), and the paper's ``loralib`` dicts.

A saved adapter is a directory with ``adapter_config.json`` (PEFT's keys only, so every
PEFT version and server reads it) and ``adapter_model.safetensors``. Settings that PEFT
cannot express (a LoRA on the q and v parts of GPT-2's fused ``c_attn``) go in a third
file, ``loralab.json``, and the tensors are written in the exactly equivalent PEFT form.

Loading checks everything first (config keys and values, tensor names and shapes) and
only then touches the model, so a failed load leaves the model as it was.
"""

from __future__ import annotations

import difflib
import json
import os
import pickle
import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from .atomic_write import json_writer, write_files_atomically
from .config import ConfigError, LoraConfig, pattern_value
from .inject import (
    Target,
    apply_targets,
    base_module_names,
    in_saved_module,
    layer_index,
    lora_layers,
    name_matches,
    parameter_roles,
    plan_targets,
    require_adapter,
    saved_module_names,
)
from .layers import LoraEmbedding, LoraFusedLinear, LoraLayer, TrainableCopy

PEFT_PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"
LORALAB_FILE = "loralab.json"


class AdapterFileError(ValueError):
    """An adapter file is missing, corrupted, or does not fit the model."""


# -- PEFT's config keys -------------------------------------------------------------------

# Keys that map onto LoraConfig fields.
_MAPPED_KEYS = {
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
}
# Keys that describe the adapter but do not change its weights.
_DESCRIPTIVE_KEYS = {
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
_FEATURE_KEYS = {
    "use_dora": False,
    "lora_bias": False,
    "layer_replication": None,
    "target_parameters": None,
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
# init_lora_weights values that rewrite the base weights themselves: such an adapter only
# fits a base that PEFT converted, so it is refused rather than silently wrong.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")

# What loralab writes: keys every PEFT release since rsLoRA (0.7) knows.
_WRITTEN_KEYS = (
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

_TASK_TYPES = {
    "ForCausalLM": "CAUSAL_LM",
    "LMHeadModel": "CAUSAL_LM",
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
    "ForConditionalGeneration": "SEQ_2_SEQ_LM",
}
# Heads that PEFT adds to modules_to_save by itself for these task types (matching
# module names by their ending), and then expects to find in the adapter file.
_TASK_SAVED_HEADS = {
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
    check_config_keys(data, _MAPPED_KEYS | _DESCRIPTIVE_KEYS, _FEATURE_KEYS, source)
    init = data.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise AdapterFileError(
            f"{source}: init_lora_weights={init!r} changes the base weights themselves; "
            "convert the adapter to a plain LoRA with PEFT first"
        )
    values = {key: data[key] for key in _MAPPED_KEYS - {"init_lora_weights"} if key in data}
    if values.get("target_modules") is None:
        raise AdapterFileError(f"{source}: target_modules is missing or null")
    values["rank_pattern"] = values.get("rank_pattern") or {}
    values["alpha_pattern"] = values.get("alpha_pattern") or {}
    values["init"] = "gaussian" if init == "gaussian" else "kaiming"
    try:
        return LoraConfig(**values)
    except (ConfigError, TypeError) as error:
        raise AdapterFileError(f"{source}: {error}") from None


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AdapterFileError(f"{path} does not exist") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise AdapterFileError(
            f"{path}, line {error.lineno}, column {error.colno}: malformed JSON ({error.msg})"
        ) from None


# -- reading tensors ----------------------------------------------------------------------


def read_tensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """Tensors from a safetensors file, or from a pickle loaded with ``weights_only``.

    A pickle is never unpickled in full: only plain tensors and containers are allowed,
    so a malicious ``.bin`` cannot run code.
    """
    path = Path(path)
    if not path.exists():
        raise AdapterFileError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise AdapterFileError(f"{path} is truncated or corrupted: {error}") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise AdapterFileError(
            f"{path}: refused to unpickle: it is not a plain dict of tensors, or it is "
            f"corrupted ({str(error).splitlines()[0]})"
        ) from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in data.items()
    ):
        raise AdapterFileError(f"{path}: expected a dict from names to tensors")
    return data


@dataclass
class AdapterFiles:
    """What an adapter directory holds, read and checked, not yet applied."""

    directory: Path
    peft_config: dict
    config: LoraConfig
    tensors: dict[str, Tensor]


def read_adapter(directory: str | os.PathLike) -> AdapterFiles:
    """Read and validate an adapter directory (PEFT layout) without a model."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFileError(f"{directory} is not an adapter directory")
    config_path = directory / CONFIG_FILE
    peft_config = _read_json(config_path)
    config = config_from_peft(peft_config, str(config_path))
    extra_path = directory / LORALAB_FILE
    if extra_path.exists():  # settings PEFT cannot express (fused parts) take precedence
        extra = _read_json(extra_path)
        try:
            config = LoraConfig(**extra["config"])
        except (KeyError, TypeError, ConfigError) as error:
            raise AdapterFileError(f"{extra_path}: {error}") from None
    weights = directory / WEIGHTS_FILE
    if not weights.exists() and (directory / PICKLE_WEIGHTS_FILE).exists():
        weights = directory / PICKLE_WEIGHTS_FILE
    if not weights.exists():
        raise AdapterFileError(f"{directory} has neither {WEIGHTS_FILE} nor {PICKLE_WEIGHTS_FILE}")
    return AdapterFiles(directory, peft_config, config, read_tensors(weights))


# -- the mapping between loralab's layers and PEFT's tensor names -------------------------


def _factor_keys(name: str, layer: LoraLayer) -> tuple[str, str]:
    if isinstance(layer, LoraEmbedding):
        return f"{PEFT_PREFIX}{name}.lora_embedding_A", f"{PEFT_PREFIX}{name}.lora_embedding_B"
    return f"{PEFT_PREFIX}{name}.lora_A.weight", f"{PEFT_PREFIX}{name}.lora_B.weight"


def _fused_to_peft(layer: LoraFusedLinear, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """Stacked per-part factors -> one rank-(p·r) pair for the whole fused matrix.

    A (p, r, in) -> (p·r, in); B (p, o, r) -> a block matrix (out, p·r) whose rows of
    the frozen parts are zero, so ``B A`` is exactly ``[B_q A_q; 0; B_v A_v]``.
    """
    p, r, in_features = A.shape
    spans = layer.parts.offsets()
    out_features = sum(layer.parts.sizes)
    block = B.new_zeros(out_features, p * r)
    for index, part in enumerate(layer.parts.enabled):
        start, end = spans[part]
        block[start:end, index * r : (index + 1) * r] = B[index]
    return A.reshape(p * r, in_features), block


def _fused_from_peft(layer: LoraFusedLinear, A: Tensor, B: Tensor, key: str):
    """The inverse of ``_fused_to_peft``; the off-diagonal blocks must be exactly zero."""
    p = len(layer.parts.enabled)
    r = A.shape[0] // p
    spans = layer.parts.offsets()
    stacked_b = []
    mask = torch.ones_like(B, dtype=torch.bool)
    for index, part in enumerate(layer.parts.enabled):
        start, end = spans[part]
        stacked_b.append(B[start:end, index * r : (index + 1) * r])
        mask[start:end, index * r : (index + 1) * r] = False
    if B[mask].count_nonzero():
        raise AdapterFileError(
            f"{key}: the blocks outside the parts {layer.parts.enabled} are not zero, so "
            "this is not a fused-subset adapter"
        )
    return A.reshape(p, r, A.shape[1]), torch.stack(stacked_b)


def _expected_factor_shapes(target: Target) -> tuple[tuple[int, ...], tuple[int, ...]]:
    a_shape, b_shape = target.layer.factor_shapes(target.r)
    if target.parts is not None:  # the PEFT form of stacked parts: (p·r, in), (out, p·r)
        p, r, in_features = a_shape
        return (p * r, in_features), (sum(target.parts.sizes), p * r)
    return a_shape, b_shape


def _extra_tensors(
    model: nn.Module, config: LoraConfig, targets: set[str], adapter_name: str
) -> dict[str, Tensor]:
    """Trained biases and ``modules_to_save`` parameters, under PEFT's names.

    Before the adapter is applied these are the base model's own tensors (same names and
    shapes); after, the adapter's.
    """
    tensors = {}
    wrapped = set(lora_layers(model)) | targets
    for owner, role, local_name, parameter in parameter_roles(model):
        trained = config.bias == "all" or (config.bias == "lora_only" and owner in targets)
        if role == "base" and local_name.endswith("bias") and trained:
            inner = ".base_layer" if owner in wrapped else ""
            tensors[f"{PEFT_PREFIX}{owner}{inner}.{local_name}"] = parameter
    for name in saved_module_names(model, config):
        module = model.get_submodule(name)
        if isinstance(module, TrainableCopy):
            has_copy = adapter_name in module.copies
            module = module.copies[adapter_name] if has_copy else module.original
        for local_name, parameter in module.named_parameters():
            tensors[f"{PEFT_PREFIX}{name}.{local_name}"] = parameter
    return tensors


# -- saving -------------------------------------------------------------------------------


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, Tensor]:
    """The adapter's tensors under PEFT's names (``base_model.model.<module>.lora_A.weight``)."""
    config = _config_of(model, adapter_name)
    tensors: dict[str, Tensor] = {}
    layers = {n: layer for n, layer in lora_layers(model).items() if adapter_name in layer.lora}
    for name, layer in layers.items():
        factors = layer.lora[adapter_name]
        A, B = factors.A.detach(), factors.B.detach()
        if isinstance(layer, LoraFusedLinear):
            A, B = _fused_to_peft(layer, A, B)
        key_a, key_b = _factor_keys(name, layer)
        tensors[key_a], tensors[key_b] = A, B
    for key, parameter in _extra_tensors(model, config, set(layers), adapter_name).items():
        tensors[key] = parameter.detach()
    return {key: t.contiguous().cpu() for key, t in tensors.items()}


def _config_of(model: nn.Module, adapter_name: str) -> LoraConfig:
    return require_adapter(model, adapter_name, "written in PEFT's LoRA format")


def peft_config_dict(
    model: nn.Module, adapter_name: str = "default", base_model_name_or_path: str | None = None
) -> dict:
    """The ``adapter_config.json`` that makes PEFT build exactly this adapter.

    Targets, ranks and alphas are written so that PEFT's own matching rules select the
    same modules with the same scale; the written form is checked against them.
    """
    config = _config_of(model, adapter_name)
    layers = {n: layer for n, layer in lora_layers(model).items() if adapter_name in layer.lora}
    effective = {}  # module -> (r, alpha) as PEFT must see them
    for name, layer in layers.items():
        factors = layer.lora[adapter_name]
        r, alpha = factors.r, factors.alpha
        if isinstance(layer, LoraFusedLinear):
            # p parts of rank r become one rank-p·r pair with the same scale.
            p = len(layer.parts.enabled)
            alpha = alpha * (p**0.5 if config.use_rslora else p)
            r = r * p
        effective[name] = (r, alpha)
    candidates = base_module_names(model)
    target_modules, layers_to_transform, layers_pattern = _written_targets(
        config, set(layers), candidates
    )
    default_r = config.r
    default_alpha = config.lora_alpha
    data = {
        "peft_type": "LORA",
        "task_type": _task_type(model, config),
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": default_r,
        "lora_alpha": default_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": target_modules,
        "layers_to_transform": layers_to_transform,
        "layers_pattern": layers_pattern,
        "rank_pattern": _written_pattern({n: v[0] for n, v in effective.items()}, default_r),
        "alpha_pattern": _written_pattern({n: v[1] for n, v in effective.items()}, default_alpha),
        "bias": config.bias,
        "use_rslora": config.use_rslora,
        "modules_to_save": config.modules_to_save,
        "fan_in_fan_out": any(isinstance(layer.base_layer, Conv1D) for layer in layers.values()),
        "init_lora_weights": "gaussian" if config.init == "gaussian" else True,
    }
    assert set(data) == set(_WRITTEN_KEYS)
    return data


def _task_type(model: nn.Module, config: LoraConfig) -> str | None:
    name = type(model).__name__
    task = next((task for suffix, task in _TASK_TYPES.items() if name.endswith(suffix)), None)
    # For a classification task PEFT trains the head in full and loads it from the file;
    # if this adapter left the head frozen, no task type keeps PEFT's model equal to ours.
    saved = set(saved_module_names(model, config))
    heads = _TASK_SAVED_HEADS.get(task, ())
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


def _written_targets(config: LoraConfig, chosen: set[str], modules: dict[str, nn.Module]):
    """The shortest target list PEFT reads as exactly ``chosen``; full names at worst."""
    names = [n for n in modules if n and not in_saved_module(config, n)]
    for depth in (1, 2, 3):
        entries = sorted({".".join(n.split(".")[-depth:]) for n in chosen})
        for layers, pattern in ((None, None), (config.layers_to_transform, config.layers_pattern)):
            if _peft_selects(entries, layers, pattern, names) == chosen:
                return entries, layers, pattern
    return sorted(chosen), None, None


def _written_pattern(values: dict[str, float], default: float) -> dict[str, float]:
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


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter_name: str = "default",
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write the adapter in PEFT's format; the files are replaced together or not at all."""
    directory = Path(directory)
    config = _config_of(model, adapter_name)
    tensors = adapter_state_dict(model, adapter_name)
    peft_config = peft_config_dict(model, adapter_name, base_model_name_or_path)
    fused = {
        name: {"parts": list(layer.parts.enabled), "r": layer.lora[adapter_name].r}
        for name, layer in lora_layers(model).items()
        if isinstance(layer, LoraFusedLinear) and adapter_name in layer.lora
    }
    directory.mkdir(parents=True, exist_ok=True)
    writers = {
        WEIGHTS_FILE: lambda path: save_file(tensors, path, metadata={"format": "pt"}),
        CONFIG_FILE: json_writer(peft_config),
    }
    if fused:
        writers[LORALAB_FILE] = json_writer(
            {"format": 1, "config": config.to_dict(), "fused": fused}
        )
    write_files_atomically(directory, writers)
    if not fused:
        # A stale one from an earlier save would override the new config.
        (directory / LORALAB_FILE).unlink(missing_ok=True)
    return directory


# -- loading ------------------------------------------------------------------------------


def load_adapter(
    model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default"
) -> nn.Module:
    """Load a PEFT-format adapter directory onto ``model`` (in place) and return it.

    Every check runs before the model is touched: on any error it is unchanged.
    """
    files = read_adapter(directory)
    return load_adapter_tensors(
        model, files.config, files.tensors, adapter_name, source=str(files.directory)
    )


def load_adapter_tensors(
    model: nn.Module,
    config: LoraConfig,
    tensors: dict[str, Tensor],
    adapter_name: str = "default",
    source: str = "adapter",
) -> nn.Module:
    """Apply ``config`` and set its tensors (PEFT names) on ``model``, all or nothing."""
    try:
        config = _saved_modules_present(model, config)
        targets = plan_targets(model, config, adapter_name, strict=False)
        extra_keys = _check_tensors(model, config, targets, tensors, source)
        factors = {t.name: factors_from_file(t, tensors) for t in targets}
    except ConfigError as error:
        raise AdapterFileError(f"{source}: {error}") from None
    apply_targets(model, config, targets, adapter_name)
    layers = lora_layers(model)
    live = _extra_tensors(model, config, set(factors), adapter_name)
    with torch.no_grad():
        for module_name, (A, B) in factors.items():
            layers[module_name].lora[adapter_name].A.copy_(A)
            layers[module_name].lora[adapter_name].B.copy_(B)
        for key in extra_keys:
            live[key].copy_(tensors[key])
    return model


def _saved_modules_present(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """``config`` with only the ``modules_to_save`` entries that name a module of ``model``.

    PEFT skips entries that match nothing, and writes some itself: a ``SEQ_CLS`` adapter
    lists ``["classifier", "score"]`` whatever the model's head is called.
    """
    if not config.modules_to_save:
        return config
    names = [n for n in base_module_names(model) if n]
    present = [m for m in config.modules_to_save if any(name_matches(m, n) for n in names)]
    return replace(config, modules_to_save=list(dict.fromkeys(present)) or None)


def _check_tensors(
    model: nn.Module,
    config: LoraConfig,
    targets: list[Target],
    tensors: dict[str, Tensor],
    source: str,
) -> list[str]:
    """Check that the file holds exactly the tensors the model expects, in their shapes.

    Returns the keys that are not LoRA factors (trained biases, full copies).
    """
    expected: dict[str, tuple[int, ...]] = {}
    for target in targets:
        keys = _factor_keys(target.name, target.layer)
        expected.update(zip(keys, _expected_factor_shapes(target), strict=True))
    extra = _extra_tensors(model, config, {t.name for t in targets}, adapter_name="")
    expected.update({key: tuple(p.shape) for key, p in extra.items()})
    check_expected_tensors(expected, tensors, source)
    return list(extra)


def check_expected_tensors(
    expected: dict[str, tuple[int, ...]],
    tensors: dict[str, Tensor],
    source: str,
    expects: str = "the model expects",
) -> None:
    """The file holds exactly the ``expected`` tensor names, in their shapes; the first
    difference is raised as an ``AdapterFileError`` naming the tensor and both shapes."""
    for key, shape in expected.items():
        if key not in tensors:
            raise AdapterFileError(
                f"{source}: tensor {key!r} is missing from the file (the model expects "
                f"shape {shape}); the adapter was made for another model or config"
            )
        if tuple(tensors[key].shape) != shape:
            raise AdapterFileError(
                f"{source}: tensor {key!r} has shape {tuple(tensors[key].shape)} in the "
                f"file but {expects} {shape}; the adapter was made for another base"
            )
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise AdapterFileError(
            f"{source}: tensor {unexpected[0]!r} has no place in the model "
            f"({len(unexpected)} unexpected tensors); the adapter was made for another base"
        )


def factors_from_file(target: Target, tensors: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """The ``A`` and ``B`` a planned target gets from PEFT-named file tensors."""
    key_a, key_b = _factor_keys(target.name, target.layer)
    A, B = tensors[key_a], tensors[key_b]
    if target.parts is not None:
        A, B = _fused_from_peft(target.layer, A, B, key_b)
    return A, B


# -- the paper's reference code (loralib) -------------------------------------------------


def import_loralib(
    model: nn.Module,
    source: str | os.PathLike | dict[str, Tensor],
    lora_alpha: float,
    adapter_name: str = "default",
    fused_parts: tuple[str, ...] | None = None,
) -> nn.Module:
    """Load a ``loralib`` state dict (``torch.save(lora.lora_state_dict(model))``).

    Keys are ``<module>.lora_A`` / ``<module>.lora_B``, with no prefix and no config, so
    the rank is read from the shapes and ``lora_alpha`` must be given (the paper's GPT-2
    runs used r=4, α=32). GPT-2's fused ``c_attn`` is loralib's ``MergedLinear``: its
    ``lora_A`` stacks the enabled parts' A row-wise (p·r, in) and its ``lora_B`` their B
    (p·d, r), by default the q and v parts (``enable_lora=[True, False, True]``).
    """
    label = str(source) if not isinstance(source, dict) else "loralib state dict"
    tensors = source if isinstance(source, dict) else read_tensors(source)
    modules = base_module_names(model)
    targets, ranks, factors = [], {}, {}
    for key in sorted(tensors):
        if not key.endswith(".lora_A"):
            continue
        name = key.removesuffix(".lora_A")
        if name not in modules:
            raise AdapterFileError(f"{label}: {key!r} names no module of the model")
        if f"{name}.lora_B" not in tensors:
            raise AdapterFileError(f"{label}: {key!r} has no matching {name}.lora_B")
        A, B = tensors[key], tensors[f"{name}.lora_B"]
        base = modules[name]
        out_features = base.weight.shape[1] if isinstance(base, Conv1D) else base.weight.shape[0]
        if A.dim() != 2 or B.dim() != 2:
            raise AdapterFileError(
                f"{label}: {key!r} has shape {tuple(A.shape)}; loralib's ConvLoRA layout "
                "(rank r·k) has no exact LoRA equivalent and is not imported"
            )
        if isinstance(base, nn.Embedding) or B.shape[0] == out_features:
            targets.append(name)
            ranks[name] = A.shape[0]
            factors[name] = (A, B)
            continue
        parts = _loralib_parts(base, B, fused_parts, key, label)
        targets.append(f"{name}[{','.join(parts)}]")
        r = A.shape[0] // len(parts)
        ranks[name] = r
        size = B.shape[0] // len(parts)
        factors[name] = (A.reshape(len(parts), r, A.shape[1]), B.reshape(len(parts), size, r))
    leftover = [k for k in tensors if not k.endswith((".lora_A", ".lora_B"))]
    if leftover or not targets:
        raise AdapterFileError(
            f"{label}: no loralib LoRA tensors, or unexpected keys {leftover[:3]}"
        )
    r_default = max(set(ranks.values()), key=list(ranks.values()).count)
    config = LoraConfig(
        r=r_default,
        lora_alpha=lora_alpha,
        target_modules=targets,
        rank_pattern={re.escape(n): r for n, r in ranks.items() if r != r_default},
    )
    try:
        planned = plan_targets(model, config, adapter_name)
    except ConfigError as error:
        raise AdapterFileError(f"{label}: {error}") from None
    for target in planned:
        A, B = factors[target.name]
        layer_a, layer_b = target.layer.factor_shapes(target.r)
        if tuple(A.shape) != layer_a or tuple(B.shape) != layer_b:
            raise AdapterFileError(
                f"{label}: {target.name}: factors {tuple(A.shape)}, {tuple(B.shape)} do not "
                f"fit the model's {layer_a}, {layer_b}"
            )
    apply_targets(model, config, planned, adapter_name)
    layers = lora_layers(model)
    with torch.no_grad():
        for name, (A, B) in factors.items():
            layers[name].lora[adapter_name].A.copy_(A)
            layers[name].lora[adapter_name].B.copy_(B)
    return model


def _loralib_parts(
    base: nn.Module, B: Tensor, parts: tuple[str, ...] | None, key: str, label: str
) -> tuple[str, ...]:
    layout = ("q", "k", "v")
    out_features = base.weight.shape[1] if isinstance(base, Conv1D) else base.weight.shape[0]
    part_size = out_features // len(layout)
    count = B.shape[0] // part_size
    if B.shape[0] % part_size:
        raise AdapterFileError(
            f"{label}: {key!r}: lora_B has {B.shape[0]} rows, not a multiple of the part size "
            f"{part_size} of a fused ({out_features} outputs) projection"
        )
    if parts is None:
        defaults = {1: None, 2: ("q", "v"), 3: ("q", "k", "v")}
        parts = defaults.get(count)
        if parts is None:
            raise AdapterFileError(
                f"{label}: {key!r} covers {count} part(s) of the fused projection; pass "
                "fused_parts=(...) to say which"
            )
    if len(parts) != count:
        raise AdapterFileError(f"{label}: {key!r} covers {count} parts, fused_parts={parts}")
    return tuple(parts)
