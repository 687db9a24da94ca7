"""Saving and loading what a method trained, as a small directory.

LoRA writes PEFT's adapter files (``io.save_adapter``), so the ecosystem reads them. Every
other method writes ``method.json`` (the method's name and settings) and
``method.safetensors`` (its trained parameters, by their names in the model); LoRA+PE
writes both. A method with a format of its own (AdaLoRA: PEFT's ADALORA files) declares
``save`` and ``load`` (``Method``), and those are used. The files of one save are replaced
together or not at all, and a load checks every name and shape on a weightless twin of
the model before touching it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor, nn

from ..files.adapter_dir import load_adapter_tensors, read_adapter, read_tensors, save_adapter
from ..files.atomic_write import json_writer, write_files_atomically
from ..files.peft_config import CONFIG_FILE, AdapterFileError
from ..lora.config import ConfigError
from ..lora.inject import parameter_roles
from .method import MethodSettings, applied_method
from .trained_weights import load_trained_state, shape_twin, trained_state

METHOD_FILE = "method.json"
METHOD_WEIGHTS = "method.safetensors"


def method_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The trained parameters outside LoRA's factors and copies (those go to PEFT files)."""
    in_lora = {id(p) for _, role, _, p in parameter_roles(model) if role in ("lora", "copy")}
    return {n: p.contiguous() for n, p in trained_state(model).items() if id(p) not in in_lora}


def save_method(
    model: nn.Module,
    directory: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    original_base: bool = True,
) -> Path:
    """Write what the model's method trained to ``directory`` and return it (an init that
    rewrote the base: for the original base, or as trained, ``save_adapter``'s choice)."""
    from . import get_method

    record = applied_method(model)
    if record is None:
        raise ValueError("the model carries no method: apply one first (methods.get_method)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    method = get_method(record.name)
    if method.save is not None:  # a format of its own (AdaLoRA: PEFT's ADALORA files)
        (directory / METHOD_FILE).unlink(missing_ok=True)
        (directory / METHOD_WEIGHTS).unlink(missing_ok=True)
        return method.save(model, directory, base_model_name_or_path)
    if record.lora is not None:
        save_adapter(
            model,
            directory,
            base_model_name_or_path=base_model_name_or_path,
            original_base=original_base,
        )
    if record.name == "lora":
        (directory / METHOD_FILE).unlink(missing_ok=True)  # a pure PEFT adapter
        (directory / METHOD_WEIGHTS).unlink(missing_ok=True)
        return directory
    tensors = method_tensors(model)
    description = {
        "method": record.name,
        "settings": record.settings.to_dict(),
        "base_model_name_or_path": base_model_name_or_path,
        "format": 1,
    }
    write_files_atomically(
        directory,
        {
            METHOD_WEIGHTS: lambda path: save_file(tensors, path, metadata={"format": "pt"}),
            METHOD_FILE: json_writer(description),
        },
    )
    return directory


def _peft_type(directory: Path) -> str | None:
    try:
        data = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # the adapter reader reports it, with the line
    return data.get("peft_type") if isinstance(data, dict) else None


def _method_of_peft_type(peft_type: str | None) -> str:
    """The method that reads a PEFT adapter of ``peft_type`` as a whole; a plain PEFT LoRA
    (or an unknown type, which the LoRA reader then names) reads as ``lora``."""
    from . import METHODS

    owners = {m.peft_type: m.name for m in METHODS.values() if m.peft_type is not None}
    return owners.get(peft_type, "lora")


def read_method_description(directory: str | os.PathLike) -> dict:
    """``method.json`` of a saved method, checked; a PEFT adapter alone reads as LoRA."""
    directory = Path(directory)
    path = directory / METHOD_FILE
    if not path.exists():
        if (directory / CONFIG_FILE).exists():
            return {"method": _method_of_peft_type(_peft_type(directory)), "settings": {}}
        raise AdapterFileError(f"{directory}: neither {METHOD_FILE} nor {CONFIG_FILE} is there")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise AdapterFileError(
            f"{path}, line {error.lineno}: malformed JSON ({error.msg})"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("method"), str):
        raise AdapterFileError(f"{path}: expected an object with a 'method' name")
    settings = data.get("settings", {})
    known = set(MethodSettings.__dataclass_fields__)
    unknown = sorted(set(settings) - known) if isinstance(settings, dict) else ["(not an object)"]
    if unknown:
        raise AdapterFileError(f"{path}: unknown settings {unknown}; known: {sorted(known)}")
    return data


def load_method(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Apply the saved method to ``model`` and load its trained parameters, all or nothing."""
    from . import get_method

    directory = Path(directory)
    description = read_method_description(directory)
    try:
        method = get_method(description["method"])
        settings = MethodSettings(**description.get("settings", {}))
    except ConfigError as error:
        raise AdapterFileError(f"{directory / METHOD_FILE}: {error}") from None
    if method.load is not None:
        return method.load(model, directory)
    adapter = read_adapter(directory) if method.uses_lora else None
    tensors = read_tensors(directory / METHOD_WEIGHTS) if method.name != "lora" else {}
    source = str(directory / METHOD_WEIGHTS)
    try:
        # Rehearse on a twin without weights: a mismatch raises before the model changes.
        twin = shape_twin(model)
        # LoRA's targets are checked by the PEFT loader, which (like PEFT) skips entries
        # that match nothing; only the rest of the method is checked here.
        rest = method.companion if method.uses_lora else method
        if rest is not None:
            rest.check(twin, settings, None, 0)
        _apply_and_load(method, twin, settings, adapter, tensors, source)
    except ConfigError as error:
        raise AdapterFileError(f"{directory}: {error}") from None
    _apply_and_load(method, model, settings, adapter, tensors, source)
    return model


def _apply_and_load(method, model, settings, adapter, tensors, source) -> None:
    from .method import record_method

    if adapter is not None:
        # LoRA's part comes from the PEFT files (checked and injected by the core loader);
        # the method's companion (LoRA+PE's prefix) is added around it.
        load_adapter_tensors(model, adapter.config, adapter.tensors, source=str(adapter.directory))
    rest = method.companion if method.uses_lora else method
    if rest is not None:
        rest.apply(model, settings, None)
        load_trained_state(model, method_tensors(model), tensors, source)
    record_method(model, method.name, settings, adapter.config if adapter else None)
