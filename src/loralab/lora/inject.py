"""Finding the target modules in any model, wrapping them, freezing the rest, counting.

``plan_targets`` resolves a config against a model without touching it, so every error
(a name that matches nothing, a rank too large, an unsupported module) is raised while
the model is still exactly as the user had it. ``inject_adapter`` then wraps and freezes.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from . import frozen_base as bases
from . import patterns
from .architectures import (
    FUSED_LAYOUTS,
    Architecture,
    FusedPart,
    detect_architecture,
    fused_layout,
    output_head,
)
from .config import LoraConfig
from .expert_targets import plan_expert_targets, warn_if_experts_left_out
from .experts import expert_shape
from .inits import get_init
from .layers import (
    FusedParts,
    LoraFactors,
    LoraFusedLinear,
    LoraLayer,
    TrainableCopy,
    unsupported_reason,
)
from .quantized import bnb
from .state import model_state
from .targets import Target, TargetError, name_matches
from .variants import variant_for

_FUSED_ENTRY = re.compile(r"^(?P<module>[^\[\]]+)\[(?P<parts>[^\[\]]+)\]$")


@dataclass
class _Selection:
    """Module name -> None for the whole matrix, or the set of fused parts chosen."""

    parts: dict[str, set[str] | None] = field(default_factory=dict)
    short_names: dict[str, set[str]] = field(default_factory=dict)

    def add(self, name: str, part: str | None, short_name: str | None) -> None:
        if name in self.parts and (self.parts[name] is None) != (part is None):
            raise TargetError(
                f"module {name!r} is targeted both as a whole and by its fused parts; "
                "choose one in target_modules"
            )
        if part is None:
            self.parts[name] = None
        else:
            self.parts.setdefault(name, set()).add(part)
        if short_name:
            self.short_names.setdefault(name, set()).add(short_name)


def base_module_names(model: nn.Module) -> dict[str, nn.Module]:
    """The user's module names (as without LoRA) mapped to the modules (unwrapped)."""
    names: dict[str, nn.Module] = {}

    def visit(prefix: str, module: nn.Module) -> None:
        module = _unwrap(module)
        names[prefix] = module
        for child_name, child in module.named_children():
            visit(f"{prefix}.{child_name}" if prefix else child_name, child)

    visit("", model)
    return names


def _unwrap(module: nn.Module) -> nn.Module:
    if isinstance(module, LoraLayer):
        return module.original
    if isinstance(module, TrainableCopy):
        return module.original
    return module


def is_bias(role: str, local_name: str) -> bool:
    """Whether a parameter is a bias that ``bias="all"`` / ``"lora_only"`` trains: a base
    parameter named ``bias``, PEFT's rule. gpt-oss's stacked ``gate_up_proj_bias`` is
    not one; PEFT neither trains nor saves it, and its files must load here."""
    return role == "base" and local_name == "bias"


def parameter_roles(model: nn.Module) -> Iterator[tuple[str, str, str, nn.Parameter]]:
    """Every parameter once, as (owner module's user name, role, local name, parameter).

    The role is ``lora`` (adapter factors), ``copy`` (a module trained in full for an
    adapter), ``original`` (the frozen module under such a copy) or ``base``.
    """
    seen: set[int] = set()

    def once(items):
        for item in items:
            if id(item[-1]) not in seen:
                seen.add(id(item[-1]))
                yield item

    def visit(prefix: str, module: nn.Module):
        if isinstance(module, LoraLayer):
            # an expert stack's weight is named in the local name: its wrappers nest
            weight = getattr(module, "weight_name", None)
            named = (
                (f"{weight}:{n}" if weight else n, p) for n, p in module.lora.named_parameters()
            )
            yield from once((prefix, "lora", n, p) for n, p in named)
            yield from visit(prefix, module.base_layer)  # a nested wrapper: the same prefix
            return
        if isinstance(module, TrainableCopy):
            yield from once((prefix, "copy", n, p) for n, p in module.copies.named_parameters())
            yield from once(
                (prefix, "original", n, p) for n, p in module.original.named_parameters()
            )
            return
        yield from once((prefix, "base", n, p) for n, p in module.named_parameters(recurse=False))
        for child_name, child in module.named_children():
            yield from visit(f"{prefix}.{child_name}" if prefix else child_name, child)

    yield from visit("", model)


def _nearest(entry: str, names: list[str], count: int = 5) -> str:
    leaves = sorted({name.rsplit(".", 1)[-1] for name in names if name})
    close = difflib.get_close_matches(entry, leaves, n=count, cutoff=0.4)
    close += difflib.get_close_matches(entry, [n for n in names if n], n=count, cutoff=0.6)
    if not close:
        close = leaves[:count]
    return ", ".join(dict.fromkeys(close))


def _select(
    model: nn.Module, config: LoraConfig, modules: dict[str, nn.Module], strict: bool
) -> _Selection:
    names = [name for name in modules if name]  # the root itself is never a target
    selection = _Selection()
    spec = config.target_modules
    if spec == "all-linear":
        head = output_head(model)
        for name in names:
            module = modules[name]
            if bases.is_linear_map(module) and module is not head:
                selection.add(name, None, None)
        return selection
    if isinstance(spec, str):  # a regex over the whole name, as PEFT reads a string
        for name in names:
            if patterns.fullmatch("target_modules", spec, name):
                selection.add(name, None, None)
        return selection
    architecture = detect_architecture(names)
    for entry in spec:
        found = _select_entry(entry, names, architecture, selection)
        if not found and strict:
            family = f" (this model looks {architecture.name})" if architecture else ""
            raise TargetError(
                f"target_modules entry {entry!r} matches no module{family}; "
                f"nearest module names: {_nearest(entry, names)}"
            )
    return selection


def _select_entry(
    entry: str, names: list[str], architecture: Architecture | None, selection: _Selection
) -> bool:
    fused = _FUSED_ENTRY.match(entry)
    if fused:
        module_name = fused["module"]
        parts = [p.strip() for p in fused["parts"].split(",")]
        matched = [n for n in names if name_matches(module_name, n)]
        for name in matched:
            layout = fused_layout(name)
            if layout is None:
                known = ", ".join(f"{rx} {parts}" for rx, parts in FUSED_LAYOUTS.items())
                raise TargetError(f"{entry!r}: module {name!r} has no known fused layout ({known})")
            for part in parts:
                if part not in layout:
                    raise TargetError(f"{entry!r}: {name!r} has parts {layout}, not {part!r}")
                selection.add(name, part, None)
        return bool(matched)
    literal = [n for n in names if name_matches(entry, n)]
    for name in literal:
        selection.add(name, None, None)
    if literal or architecture is None or entry not in architecture.short_names:
        return bool(literal)
    meaning = architecture.short_names[entry]
    if isinstance(meaning, FusedPart):
        matched = [n for n in names if re.fullmatch(meaning.module_pattern, n)]
        for name in matched:
            selection.add(name, meaning.part, entry)
    else:
        matched = [n for n in names if re.fullmatch(meaning, n)]
        for name in matched:
            selection.add(name, None, entry)
    return bool(matched)


def layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    """The layer number in a module name: the first numbered segment, as PEFT reads it."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        sources = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for source in sources:
            match = patterns.match("layers_pattern", source, name, patterns.LAYERS)
            if match:
                break
    return int(match["idx"]) if match else None


def _excluded(config: LoraConfig, name: str) -> bool:
    spec = config.exclude_modules
    if spec is None:
        return False
    if isinstance(spec, str):
        return patterns.fullmatch("exclude_modules", spec, name) is not None
    return any(name_matches(entry, name) for entry in spec)


def in_saved_module(config: LoraConfig, name: str) -> bool:
    """Whether ``name`` is (inside) a module that ``modules_to_save`` trains in full."""
    return any(
        name_matches(m, name) or f".{m}." in f".{name}" for m in config.modules_to_save or []
    )


def plan_targets(
    model: nn.Module, config: LoraConfig, adapter_name: str = "default", strict: bool = True
) -> list[Target]:
    """Resolve ``config`` against ``model`` without changing it.

    Raises ``TargetError`` naming the entry, module or rank at fault. With ``strict``
    every entry of a target list must match something and no rank may exceed
    ``min(d, k)``. A loaded PEFT file is read with ``strict=False``: it may list names a
    model lacks, and PEFT itself writes ranks above a small head's size (wasteful but
    exact), which loading must reproduce rather than refuse.
    """
    try:
        return _plan(model, config, adapter_name, strict)
    except patterns.PatternError as error:  # a regex that backtracks without end
        raise TargetError(str(error)) from None


def _plan(model: nn.Module, config: LoraConfig, adapter_name: str, strict: bool) -> list[Target]:
    modules = base_module_names(model)
    warn_if_experts_left_out(config, modules)
    selection = _select(model, config, modules, strict)
    layers_apply = config.layers_to_transform is not None and not isinstance(
        config.target_modules, str
    )
    targets = []
    for name, parts in selection.parts.items():
        if _excluded(config, name) or in_saved_module(config, name):
            continue  # a module trained in full never also gets LoRA: they would fight
        if layers_apply and layer_index(name, config.layers_pattern) not in set(
            config.layers_to_transform
        ):
            continue
        short_names = tuple(sorted(selection.short_names.get(name, ())))
        targets.append(
            _target(model, config, adapter_name, name, modules[name], parts, short_names, strict)
        )
    if config.target_parameters:
        for target in plan_expert_targets(model, config, adapter_name, modules, strict):
            _check_init(config.init, target.name, target.layer)
            targets.append(target)
    if not targets:
        raise TargetError(
            f"target_modules={config.target_modules!r} selects no module after "
            f"exclude_modules={config.exclude_modules!r} and "
            f"layers_to_transform={config.layers_to_transform!r}; module names include: "
            f"{_nearest(str(config.target_modules), list(modules))}"
        )
    return targets


def _target(
    model: nn.Module,
    config: LoraConfig,
    adapter_name: str,
    name: str,
    base: nn.Module,
    parts: set[str] | None,
    short_names: tuple[str, ...],
    strict: bool,
) -> Target:
    fused = _fused_parts(name, base, parts)
    layer = _layer(model, config, adapter_name, name, base, fused)
    _check_init(config.init, name, layer)
    part_names = tuple(short_names) + (fused.enabled if fused else ())
    r = config.rank_for(name, part_names)
    if fused is not None:
        ranks = {config.rank_for(name, (p,)) for p in fused.enabled}
        if len(ranks) > 1:
            raise TargetError(f"fused parts {fused.enabled} of {name!r} need one rank, got {ranks}")
    limit = layer.max_rank()
    if r > limit and strict:
        raise TargetError(
            f"rank r={r} for {name!r} is larger than its matrix allows "
            f"(weight {bases.weight_shape(base)}: at most {limit})"
        )
    return Target(name, layer, r, config.alpha_for(name, part_names), short_names, fused)


def _fused_parts(name: str, base: nn.Module, parts: set[str] | None) -> FusedParts | None:
    """The parts of a fused projection a target names (``c_attn[q,v]``), or None."""
    if parts is None:
        return None
    layout = fused_layout(name)
    size = bases.in_out(base)[1] // len(layout)
    return FusedParts(layout, (size,) * len(layout), tuple(p for p in layout if p in parts))


def _layer(
    model: nn.Module,
    config: LoraConfig,
    adapter_name: str,
    name: str,
    base: nn.Module,
    fused: FusedParts | None,
) -> LoraLayer:
    """The layer the adapter goes into: the one already there, or a new one of the config's
    variant; an adapter of another kind or on other parts than the layer holds is refused."""
    variant = variant_for(config)
    layer_class = variant.layer_class_for(base)
    reason = unsupported_reason(base)
    if layer_class is None or reason:
        raise TargetError(
            f"module {name!r} is a {type(base).__name__}, which {variant.name} cannot adapt"
            + (f": {reason}" if reason else f" (supported: {variant.supported})")
        )
    if fused is not None and not variant.takes_fused_parts:
        raise TargetError(
            f"{variant.name} adapts whole matrices, not the parts {list(fused.enabled)} of "
            f"the fused {name!r}: target it whole"
        )
    existing = model.get_submodule(name)
    if not isinstance(existing, LoraLayer):
        return LoraFusedLinear(base, fused) if fused is not None else layer_class(base)
    if adapter_name in existing.lora:
        raise TargetError(f"module {name!r} already has an adapter named {adapter_name!r}")
    if getattr(existing, "parts", None) != fused:
        raise TargetError(
            f"module {name!r} is already adapted as {existing.extra_repr()}; a second "
            "adapter on it must use the same fused parts"
        )
    if fused is None and type(existing) is not layer_class:
        raise TargetError(
            f"module {name!r} already holds {type(existing).__name__} adapters; a second "
            f"adapter on it must be of the same kind ({variant.name} asks for "
            f"{layer_class.__name__})"
        )
    return existing


def _check_init(init_name: str, name: str, layer: LoraLayer) -> None:
    """Refuse, while the model is untouched, an init that cannot start on ``layer``."""
    init = get_init(init_name)
    reason = init.refusal(layer)
    if reason is None and init.rewrites_base:
        fixed = bases.fixed_reason(layer.base_layer)
        reason = fixed and f"it rewrites W0, but {fixed}"
    if reason is None and init.rewrites_base and len(layer.lora):
        reason = (
            f"it already holds the adapters {list(layer.lora)}, whose base weight "
            "rewriting it would change"
        )
    if reason is not None:
        raise TargetError(f"init={init_name!r} cannot start an adapter on {name!r}: {reason}")


# -- injection --------------------------------------------------------------------------


def saved_module_names(model: nn.Module, config: LoraConfig) -> list[str]:
    """The modules that ``config.modules_to_save`` names (trained in full)."""
    modules = base_module_names(model)
    names = []
    for entry in config.modules_to_save or []:
        matched = [n for n in modules if n and name_matches(entry, n)]
        if not matched:
            raise TargetError(
                f"modules_to_save entry {entry!r} matches no module; "
                f"nearest module names: {_nearest(entry, list(modules))}"
            )
        names += matched
    return names


def inject_adapter(
    model: nn.Module, config: LoraConfig, adapter_name: str = "default", strict: bool = True
) -> nn.Module:
    """Apply ``config`` to ``model`` in place and return it.

    The chosen weights are wrapped with LoRA layers; every base parameter is frozen
    except the biases that ``config.bias`` names and the ``modules_to_save``. If the
    config does not fit the model, an error is raised and the model is unchanged.
    """
    # A model quantized by bitsandbytes outside loralab's loader is guarded here, before a
    # forward in eval mode can rewrite its 4-bit weights into a layout that does not train.
    bnb.keep_training_layout(model)
    targets = plan_targets(model, config, adapter_name, strict=strict)
    return apply_targets(model, config, targets, adapter_name)


def apply_targets(
    model: nn.Module, config: LoraConfig, targets: list[Target], adapter_name: str
) -> nn.Module:
    """Wrap the planned targets and freeze the rest (``plan_targets`` checked them)."""
    if adapter_name in adapter_configs(model):
        raise TargetError(f"the model already has an adapter named {adapter_name!r}")
    saved = saved_module_names(model, config)
    _remember_requires_grad(model)
    for target in targets:
        target.layer.add_adapter(
            adapter_name,
            target.r,
            target.alpha,
            config.scale(target.r, target.alpha),
            config.lora_dropout,
            config.init,
        )
        if target.layer is not model.get_submodule(target.name):
            replace_module(model, target.name, target.layer)
    for name in saved:
        holder = model.get_submodule(name)
        if not isinstance(holder, TrainableCopy):
            holder = TrainableCopy(holder)
            replace_module(model, name, holder)
        holder.add_adapter(adapter_name)
    # The first adapter becomes the model's active one; a later one waits to be chosen,
    # also in layers that only it adapts (they would otherwise run it alongside).
    state = model_state(model)
    if not state.active_chosen:
        state.active, state.active_chosen = adapter_name, True
    active = state.active
    for target in targets:
        target.layer.active_adapter = active if active in target.layer.lora else None
    for name in saved:
        holder = model.get_submodule(name)
        holder.active_adapter = active if active in holder.copies else None
    adapter_configs(model)[adapter_name] = config
    _freeze(model, config, {t.name for t in targets})
    keep_head_input_foldable(model)
    return model


def keep_head_input_foldable(model: nn.Module) -> None:
    """Make the output head's input contiguous, so a frozen head stays one matrix product.

    Transformers slices the hidden states to the kept positions (``logits_to_keep``, as in
    every ``generate`` prefill), which leaves a (batch, 1, d) view with the batch stride of
    the full sequence. ``torch.matmul`` folds such a view into one (batch, d) × (d, vocab)
    product only when the weight requires grad; for a frozen weight it runs a batched
    product over ``batch`` broadcast copies of the head instead, which on SmolLM2 (vocab
    49,152) at batch 32 took 280 ms of a 1.4 s prefill. Copying the small view first
    costs microseconds and gives the frozen head the fast path back.
    """
    head = output_head(model)
    state = model_state(model)
    if not isinstance(head, nn.Module) or state.hooked_head is head:
        return  # hooked already; a head replaced since (resized, say) gets its own
    head.register_forward_pre_hook(_contiguous_input)
    state.hooked_head = head


def plain_head(head: nn.Module) -> bool:
    """Whether ``head`` is a bare ``nn.Linear`` whose only hook is the one above (which
    changes no number), so its product may run by other means."""
    pre = list(head._forward_pre_hooks.values())
    return (
        type(head) is nn.Linear
        and not head._forward_hooks
        and all(hook is _contiguous_input for hook in pre)
    )


def _contiguous_input(module: nn.Module, args: tuple) -> tuple | None:
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule called ``name`` is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """The configs of the adapters on ``model``, by adapter name (kept on the model)."""
    return model_state(model).adapters


def _remember_requires_grad(model: nn.Module) -> None:
    # Kept once, before the first adapter freezes anything, so unloading gives the user
    # back the model with the trainability it had.
    state = model_state(model)
    if state.requires_grad is None:
        state.requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}


def restore_requires_grad(model: nn.Module) -> None:
    """Give every parameter back the ``requires_grad`` it had before the first adapter."""
    state = model_state(model)
    saved, state.requires_grad = state.requires_grad or {}, None
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(saved.get(name, True))


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """Every LoRA-wrapped module, by the name the module has in the user's model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def require_adapter(
    model: nn.Module, adapter_name: str, needs_factors: str | None = None
) -> LoraConfig:
    """The config of ``adapter_name`` on ``model`` (``KeyError`` naming the loaded ones if
    there is none); with ``needs_factors`` (what is done with it), the adapter must also be
    LoRA's ``B A``, not AdaLoRA's ``P Λ Q``."""
    configs = adapter_configs(model)
    if adapter_name not in configs:
        loaded = sorted(configs) or "none"
        raise KeyError(f"no adapter named {adapter_name!r}; loaded adapters: {loaded}")
    if needs_factors:
        require_lora_factors(model, adapter_name, needs_factors)
    return configs[adapter_name]


def require_lora_factors(
    model: nn.Module,
    adapter_name: str,
    action: str,
    layers: dict[str, LoraLayer] | None = None,
) -> None:
    """Raise ``TypeError`` if the adapter's factors are not LoRA's (``B A``, or DoRA's on
    top of them), as AdaLoRA's ``P Λ Q`` in the same wrappers: ``action`` says what cannot
    be done with it. ``layers``: the model's ``lora_layers``, when the caller has them."""
    for name, layer in (lora_layers(model) if layers is None else layers).items():
        factors = layer.lora[adapter_name] if adapter_name in layer.lora else None  # noqa: SIM401
        if factors is not None and not isinstance(factors, LoraFactors):
            raise TypeError(
                f"adapter {adapter_name!r} is not LoRA's B·A (module {name!r} holds "
                f"{type(factors).__name__}): it cannot be {action}. An AdaLoRA adapter is "
                "saved with loralab.methods.method_files.save_method, or exported as a plain LoRA "
                "adapter with loralab.methods.adalora.files.export_lora"
            )


def _freeze(model: nn.Module, config: LoraConfig, adapted: set[str]) -> None:
    for owner, role, local_name, parameter in parameter_roles(model):
        if role in ("lora", "copy"):
            continue  # adapter parameters (of any adapter) stay as they are
        train = is_bias(role, local_name) and (
            config.bias == "all" or (config.bias == "lora_only" and owner in adapted)
        )
        parameter.requires_grad_(train)


# -- counting ---------------------------------------------------------------------------


@dataclass
class ParameterReport:
    """How many parameters train, against the total (works on the meta device too)."""

    total: int
    trainable: int
    by_type: dict[str, tuple[int, int]]  # module pattern -> (modules, trainable parameters)
    frozen_bytes: int = 0
    """Memory of the frozen parameters and packed weights: what the base takes."""
    packed_bytes: int = 0
    """Of which packed weights (a quantized base), counted in ``total`` as their values."""

    @property
    def share(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        lines = [
            f"trainable parameters: {self.trainable:,} of {self.total:,} ({100 * self.share:.4f}%)"
        ]
        if self.frozen_bytes:
            packed = (
                f" ({self.packed_bytes / 1e6:.1f} MB of it packed)" if self.packed_bytes else ""
            )
            lines.append(f"frozen base: {self.frozen_bytes / 1e6:.1f} MB{packed}")
        width = max((len(k) for k in self.by_type), default=0)
        lines.append(f"  {'module type':<{width}}  {'modules':>7}  {'trainable':>14}")
        for key, (count, params) in self.by_type.items():
            lines.append(f"  {key:<{width}}  {count:>7}  {params:>14,}")
        return "\n".join(lines)


def trainable_parameters(model: nn.Module) -> ParameterReport:
    """Count trainable and total parameters, grouped by module type (layers as ``*``).

    Only shapes are read, so a model built on the meta device can be counted.
    """
    total = trainable = frozen_bytes = packed_bytes = 0
    for module in model.modules():
        values_and_bytes = bases.packed_size(module)
        if values_and_bytes is not None:
            total += values_and_bytes[0]
            packed_bytes += values_and_bytes[1]
    counts: Counter = Counter()
    owners: dict[str, set[str]] = {}
    for owner, role, local_name, parameter in parameter_roles(model):
        total += parameter.numel()
        if not parameter.requires_grad:
            frozen_bytes += parameter.numel() * parameter.element_size()
            continue
        trainable += parameter.numel()
        kind = {"lora": "lora", "copy": "full copy"}.get(role)
        kind = kind or ("bias" if is_bias(role, local_name) else "full")
        pattern = re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", owner) or "<root>"
        module = model.get_submodule(owner)
        if isinstance(module, LoraFusedLinear):
            pattern += f"[{','.join(module.parts.enabled)}]"
        if kind == "lora" and ":" in local_name:  # a stacked expert weight: per expert
            weight = local_name.split(":", 1)[0]
            experts = expert_shape(module.original, weight)[0]
            pattern, kind = f"{pattern}.{weight}", f"lora, {experts} experts"
        key = f"{pattern} ({kind})"
        counts[key] += parameter.numel()
        owners.setdefault(key, set()).add(owner)
    by_type = {key: (len(owners[key]), counts[key]) for key in sorted(counts)}
    return ParameterReport(total, trainable, by_type, frozen_bytes + packed_bytes, packed_bytes)
