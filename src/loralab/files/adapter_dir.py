"""An adapter directory in PEFT's format, read and written (the paper's ``loralib`` dicts:
``loralib.py``).

A saved adapter is a directory with ``adapter_config.json`` (PEFT's keys only, so every
PEFT version and server reads it) and ``adapter_model.safetensors``. Settings that PEFT
cannot express (a LoRA on the q and v parts of GPT-2's fused ``c_attn``) go in a third
file, ``loralab.json``, and the tensors are written in the exactly equivalent PEFT form.

Loading checks everything first (config keys and values, tensor names and shapes) and
only then touches the model, so a failed load leaves the model as it was.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..lora.config import ConfigError, LoraConfig
from ..lora.inject import (
    Target,
    apply_targets,
    is_bias,
    lora_layers,
    parameter_roles,
    plan_targets,
    saved_module_names,
)
from ..lora.layers import (
    FACTOR_CLASSES,
    LoraEmbedding,
    LoraFactors,
    LoraFusedLinear,
    LoraLayer,
    TrainableCopy,
    factors_class_with,
)
from ..lora.state import model_state
from .atomic_write import json_writer, text_writer, write_files_atomically
from .model_card import CARD_FILE, is_ours, model_card
from .peft_config import (
    CONFIG_FILE,
    PEFT_PREFIX,
    AdapterFileError,
    config_from_peft,
    peft_config_dict,
    present_modules_to_save,
    read_json,
    require_lora_adapter,
)

WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"
LORALAB_FILE = "loralab.json"


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


def read_adapter(directory: str | os.PathLike, safetensors_only: bool = False) -> AdapterFiles:
    """Read and validate an adapter directory (PEFT layout) without a model.

    ``safetensors_only`` refuses a directory whose weights are a pickle (a server reads
    only files that cannot carry code)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFileError(f"{directory} is not an adapter directory")
    config_path = directory / CONFIG_FILE
    peft_config = read_json(config_path)
    extra_path = directory / LORALAB_FILE
    extra = read_json(extra_path) if extra_path.exists() else None
    weights = directory / WEIGHTS_FILE
    if not weights.exists() and safetensors_only:
        raise AdapterFileError(f"{directory} has no {WEIGHTS_FILE} (only safetensors are read)")
    if not weights.exists() and (directory / PICKLE_WEIGHTS_FILE).exists():
        weights = directory / PICKLE_WEIGHTS_FILE
    if not weights.exists():
        raise AdapterFileError(f"{directory} has neither {WEIGHTS_FILE} nor {PICKLE_WEIGHTS_FILE}")
    return adapter_files(directory, peft_config, extra, read_tensors(weights), str(weights))


def adapter_files(
    directory: Path,
    peft_config: Any,
    extra: Any | None,
    tensors: dict[str, Tensor],
    weights_source: str,
) -> AdapterFiles:
    """An adapter's three files, already read and parsed, checked as one adapter: the
    config from ``adapter_config.json`` (``peft_config``), overridden by ``loralab.json``
    (``extra``) where PEFT cannot express a setting, and finite tensors."""
    config = config_from_peft(peft_config, str(directory / CONFIG_FILE))
    if extra is not None:  # settings PEFT cannot express (fused parts) take precedence
        try:
            config = LoraConfig(**extra["config"])
        except (KeyError, TypeError, ConfigError) as error:
            raise AdapterFileError(f"{directory / LORALAB_FILE}: {error}") from None
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise AdapterFileError(
                f"{weights_source}: tensor {key!r} holds NaN or infinite values; "
                "the adapter was saved from a run that diverged"
            )
    return AdapterFiles(directory, peft_config, config, tensors)


# -- the mapping between loralab's layers and PEFT's tensor names -------------------------


def factor_keys(module_name: str, layer: LoraLayer) -> dict[str, str]:
    """Each factors tensor of ``layer`` (by attribute) -> its full key in a PEFT file."""
    return {attr: f"{PEFT_PREFIX}{module_name}.{name}" for attr, name in layer.peft_names().items()}


# An embedding's factors carry names of their own in PEFT's files.
_EMBEDDING_NAMES = {name: attr for attr, name in LoraEmbedding.peft_renames.items()}


@dataclass
class ModuleFactors:
    """One module's factor tensors in a PEFT file, as the factors class they belong to."""

    embedding: bool  # its tensors carry an embedding's names (lora_embedding_A…)
    factors_class: type[LoraFactors] | None  # None: no known factors have these names
    tensors: dict[str, Tensor]  # by attribute (A, B, …); by PEFT name where unknown


def factor_tensors_by_module(
    adapter_tensors: dict[str, Tensor],
) -> tuple[dict[str, ModuleFactors], dict[str, Tensor]]:
    """A PEFT file's factor tensors grouped by module (an embedding's names read as the
    others', ``lora_A.weight``…), and the rest (trained biases, modules trained in full),
    by key."""
    known = {n for c in FACTOR_CLASSES for n in c.peft_names.values()} | set(_EMBEDDING_NAMES)
    modules: dict[str, tuple[bool, dict[str, Tensor]]] = {}
    rest = {}
    for key, tensor in adapter_tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        suffix = next((s for s in known if name.endswith("." + s)), None)
        if suffix is None:
            rest[key] = tensor
            continue
        module = name.removesuffix("." + suffix)
        embedding, found = modules.get(module, (False, {}))
        found[_EMBEDDING_NAMES.get(suffix, suffix)] = tensor
        modules[module] = (embedding or suffix in _EMBEDDING_NAMES, found)
    grouped = {}
    for module, (embedding, found) in modules.items():
        factors_class = factors_class_with(set(found))
        if factors_class is not None:
            found = {attr: found[name] for attr, name in factors_class.peft_names.items()}
        grouped[module] = ModuleFactors(embedding, factors_class, found)
    return grouped, rest


def expected_factor_shapes(target: Target) -> dict[str, tuple[int, ...]]:
    """The PEFT keys and shapes of a planned target's factors."""
    shapes = target.layer.peft_shapes(target.r)
    return {f"{PEFT_PREFIX}{target.name}.{name}": shape for name, shape in shapes.items()}


def extra_tensors(
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
        if is_bias(role, local_name) and trained:
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


def adapter_state_dict(
    model: nn.Module, adapter_name: str = "default", original_base: bool = True
) -> dict[str, Tensor]:
    """The adapter's tensors under PEFT's names (``base_model.model.<module>.lora_A.weight``);
    for an init that rewrote the base, by default as a plain LoRA on the original base
    (``LoraLayer.peft_tensors``)."""
    config = require_lora_adapter(model, adapter_name)
    tensors: dict[str, Tensor] = {}
    layers = {n: layer for n, layer in lora_layers(model).items() if adapter_name in layer.lora}
    for name, layer in layers.items():
        for suffix, tensor in layer.peft_tensors(adapter_name, original_base).items():
            tensors[f"{PEFT_PREFIX}{name}.{suffix}"] = tensor
    for key, parameter in extra_tensors(model, config, set(layers), adapter_name).items():
        tensors[key] = parameter.detach()
    return {key: t.contiguous().cpu() for key, t in tensors.items()}


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter_name: str = "default",
    base_model_name_or_path: str | None = None,
    original_base: bool = True,
) -> Path:
    """Write the adapter in PEFT's format; the files are replaced together or not at all.

    An adapter whose init rewrote the base (PiSSA, OLoRA) is written by default for the
    original base, as PEFT's conversion writes it: a plain LoRA of rank 2r that PEFT,
    vLLM and llama.cpp run with no knowledge of the init. ``original_base=False`` writes
    it as trained, with its init named: loading it runs the init again on the original
    base (as PEFT does), which is how a checkpoint resumes."""
    directory = Path(directory)
    config = require_lora_adapter(model, adapter_name)
    tensors = adapter_state_dict(model, adapter_name, original_base)
    peft_config = peft_config_dict(model, adapter_name, base_model_name_or_path, original_base)
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
    card = model_card(
        model_state(model).base_quantization, peft_config.get("base_model_name_or_path")
    )
    if card is not None:
        writers[CARD_FILE] = text_writer(card)
    write_files_atomically(directory, writers)
    if not fused:
        # A stale one from an earlier save would override the new config.
        (directory / LORALAB_FILE).unlink(missing_ok=True)
    if card is None and is_ours(directory / CARD_FILE):  # it described an earlier base
        (directory / CARD_FILE).unlink()
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
        config = present_modules_to_save(model, config)
        targets = plan_targets(model, config, adapter_name, strict=False)
        extra_keys = _check_tensors(model, config, targets, tensors, source)
        factors = {t.name: factors_from_file(t, tensors) for t in targets}
    except ConfigError as error:
        raise AdapterFileError(f"{source}: {error}") from None
    apply_targets(model, config, targets, adapter_name)
    layers = lora_layers(model)
    live = extra_tensors(model, config, set(factors), adapter_name)
    with torch.no_grad():
        for module_name, values in factors.items():
            held = layers[module_name].lora[adapter_name].tensors()
            for attr, value in values.items():
                held[attr].copy_(value)
        for key in extra_keys:
            live[key].copy_(tensors[key])
    return model


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
        expected.update(expected_factor_shapes(target))
    extra = extra_tensors(model, config, {t.name for t in targets}, adapter_name="")
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


def factors_from_file(target: Target, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The factors tensors (by attribute) a planned target gets from PEFT-named tensors."""
    keys = factor_keys(target.name, target.layer)
    try:
        return target.layer.from_peft({attr: tensors[key] for attr, key in keys.items()}, keys["B"])
    except ValueError as error:
        raise AdapterFileError(str(error)) from None


# -- the paper's reference code (loralib) -------------------------------------------------
