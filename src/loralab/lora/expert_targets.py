"""Which stacked expert weights a config's ``target_parameters`` names, resolved against a
model into targets (``LoraExperts`` wrappers, nested as PEFT nests them)."""

from __future__ import annotations

import difflib
import warnings

from torch import nn

from .config import LoraConfig
from .experts import (
    EXPERT_WEIGHTS,
    SHORT_NAMES,
    LoraExperts,
    is_experts,
    outer_name,
    stacked_weights,
)
from .targets import Target, TargetError, name_matches


def experts_modules(modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The experts modules among the user's modules (by name)."""
    return {name: module for name, module in modules.items() if name and is_experts(module)}


def warn_if_experts_left_out(config: LoraConfig, modules: dict[str, nn.Module]) -> None:
    """``all-linear`` adapts modules; a model whose experts are stacked weights hears, in
    one line, that they are left out and how to include them."""
    if config.target_modules != "all-linear" or config.target_parameters:
        return
    found = experts_modules(modules)
    if found:
        name, module = next(iter(found.items()))
        weights = ", ".join(stacked_weights(module))
        warnings.warn(
            f"target_modules='all-linear' adapts linear modules; this model's experts are "
            f"stacked weights ({name}.{{{weights}}} and {len(found) - 1} more such modules), "
            "not modules, and are left out: add target_parameters=['experts'] "
            "(--target-parameters experts) to adapt every expert too",
            UserWarning,
            stacklevel=4,
        )


def select_weights(config: LoraConfig, modules: dict[str, nn.Module], strict: bool):
    """Experts module name -> the weights ``target_parameters`` names on it (PEFT's rule:
    a parameter's full name or a ``.name`` suffix; else a short name)."""
    found = experts_modules(modules)
    available = {f"{m}.{w}": (m, w) for m, module in found.items() for w in stacked_weights(module)}
    chosen: dict[str, set[str]] = {}
    for entry in config.target_parameters or []:
        matched = [full for full in available if name_matches(entry, full)]
        if not matched and entry in SHORT_NAMES:
            matched = [full for full, (_, w) in available.items() if w in SHORT_NAMES[entry]]
        if not matched:
            _refuse(entry, modules, available, strict)
        for full in matched:
            module, weight = available[full]
            chosen.setdefault(module, set()).add(weight)
    return chosen


def holds_stacked_factors(module: str, target_parameters: list[str]) -> bool:
    """Whether an adapter file's module holds stacked expert factors, read from the file
    alone: a ``target_parameters`` entry names one of its expert weights (the module, or
    PEFT's nested wrapper in it)."""
    name = outer_name(module.removeprefix("base_model.model."))
    if name.rsplit(".", 1)[-1] != "experts":  # Transformers' name for every experts module
        return False
    return any(
        name_matches(entry, f"{name}.{weight}") or weight in SHORT_NAMES.get(entry, ())
        for entry in target_parameters
        for weight in EXPERT_WEIGHTS
    )


def _refuse(entry: str, modules: dict[str, nn.Module], available: dict, strict: bool) -> None:
    """A ``target_parameters`` entry that names no stacked expert weight: a parameter of
    another kind is refused by name; one that names nothing, with the nearest names."""
    for name, module in modules.items():
        for local, parameter in module.named_parameters(recurse=False):
            full = f"{name}.{local}" if name else local
            if name_matches(entry, full):
                raise TargetError(
                    f"target_parameters entry {entry!r} names {full!r} (shape "
                    f"{tuple(parameter.shape)}), which is not a stacked expert weight; "
                    "loralab adapts the 3-D weights of Transformers' experts modules "
                    "(gate_up_proj, up_proj, down_proj): adapt other weights by their "
                    "module with target_modules"
                )
    if not strict:
        return
    if not available:
        raise TargetError(
            f"target_parameters entry {entry!r}: this model has no experts module with "
            "stacked weights (Transformers' mixture-of-experts classes)"
        )
    near = difflib.get_close_matches(entry, list(available), n=3, cutoff=0.3)
    shown = near or list(available)[:3]
    raise TargetError(
        f"target_parameters entry {entry!r} matches no expert weight; short names: "
        f"{', '.join(SHORT_NAMES)}; nearest: {', '.join(shown)}"
    )


def plan_expert_targets(
    model: nn.Module,
    config: LoraConfig,
    adapter_name: str,
    modules: dict[str, nn.Module],
    strict: bool,
) -> list[Target]:
    """A target per adapted weight, the outermost wrapper of each module first (the order
    they are put in place); the model is not changed."""
    targets = []
    for module_name, weights in select_weights(config, modules, strict).items():
        experts = modules[module_name]
        ordered = [w for w in stacked_weights(experts) if w in weights]
        layers = _layers(model, module_name, experts, ordered, adapter_name)
        for depth, layer in enumerate(reversed(layers)):  # outermost first
            full = f"{module_name}.{layer.weight_name}"
            r, alpha = config.rank_for(full), config.alpha_for(full)
            if r > layer.max_rank() and strict:
                raise TargetError(
                    f"rank r={r} for {full!r} is larger than each expert's matrix allows "
                    f"(at most {layer.max_rank()})"
                )
            targets.append(Target(module_name + ".base_layer" * depth, layer, r, alpha))
    return targets


def _layers(
    model: nn.Module, name: str, experts: nn.Module, weights: list[str], adapter_name: str
) -> list[LoraExperts]:
    """The wrappers of ``weights``, innermost first: the ones in place, or new ones."""
    existing = model.get_submodule(name)
    if not isinstance(existing, LoraExperts):
        layers: list[LoraExperts] = []
        base = experts
        for weight in weights:
            base = LoraExperts(base, weight)
            layers.append(base)
        return layers
    layers = list(reversed(existing.chain()))
    held = [layer.weight_name for layer in layers]
    if held != weights:
        raise TargetError(
            f"the experts of {name!r} are adapted on {held}; a second adapter on them must "
            f"adapt the same weights, not {weights} (as PEFT requires)"
        )
    if any(adapter_name in layer.lora for layer in layers):
        raise TargetError(f"module {name!r} already has an adapter named {adapter_name!r}")
    return layers


__all__ = ["plan_expert_targets", "select_weights", "warn_if_experts_left_out"]
