"""AdaLoRA's files: PEFT's own ``ADALORA`` format (read and written), and the export of the
pruned result as a plain LoRA adapter that any LoRA reader loads.

PEFT's ADALORA directory (checked against ``peft`` in the tests): ``adapter_config.json``
with ``peft_type: "ADALORA"``, the schedule keys (``init_r``, ``target_r``, ``tinit``,
``tfinal``, ``deltaT``, ``beta1``, ``beta2``, ``orth_reg_weight``, ``total_step``) and
``rank_pattern``: ``{"<module>.lora_E": [kept?, …]}`` (``init_r`` booleans per matrix), or
null when nothing was pruned. The tensors keep only the kept triplets, in the order of
the pattern: ``base_model.model.<module>.lora_A`` (k, in) = Q, ``.lora_B`` (out, k) = P,
``.lora_E`` (k, 1) = Λ — no ``.weight`` suffix. The scale stays α / (init_r + 1e-5).

Saving truncates to the last allocation's mask, as PEFT does: a triplet masked by it that
regrew since (between two allocations) is dropped, and a pruned triplet loads as Λ_i = 0.
The importance scores are not saved (PEFT does not either).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from ...files.adapter_dir import (
    LORALAB_FILE,
    WEIGHTS_FILE,
    check_expected_tensors,
    extra_tensors,
    read_tensors,
)
from ...files.atomic_write import json_writer, write_files_atomically
from ...files.peft_config import (
    CONFIG_FILE,
    DESCRIPTIVE_KEYS,
    FEATURE_KEYS,
    PEFT_PREFIX,
    AdapterFileError,
    check_config_keys,
    lora_config_json,
    peft_header,
    present_modules_to_save,
    read_json,
    written_pattern,
    written_targets,
)
from ...lora import frozen_base as bases
from ...lora.config import ConfigError
from ...lora.inject import adapter_configs, base_module_names, lora_layers
from .config import ADAPTER_NAME, SHARED_WITH_LORA, AdaLoraConfig
from .layers import SvdFactors, adalora_state, apply_adalora, plan_adalora, svd_factors

# PEFT's keys that map onto AdaLoraConfig fields.
_SCHEDULE_KEYS = (
    "init_r",
    "target_r",
    "tinit",
    "tfinal",
    "deltaT",
    "beta1",
    "beta2",
    "orth_reg_weight",
    "total_step",
)
_TARGET_KEYS = SHARED_WITH_LORA  # PEFT's keys, as AdaLoraConfig names them
# Keys that do not change an AdaLoRA's weights: PEFT ignores ``r`` for AdaLoRA, and the
# init is replaced by the file's tensors.
_IGNORED_KEYS = {"r", "init_lora_weights", "rank_pattern"} | DESCRIPTIVE_KEYS
# LoRA features that AdaLoRA reads only at their off value.
_OFF_KEYS = {**FEATURE_KEYS, "use_rslora": False, "use_dora": False, "alpha_pattern": {}}

_RANK_PATTERN_KEY = re.compile(r"(?P<module>.+)\.lora_E(\.[^.]+)?")


# -- reading --------------------------------------------------------------------------------


def config_from_peft(
    data: Any, source: str = CONFIG_FILE
) -> tuple[AdaLoraConfig, dict[str, list[bool]] | None]:
    """An ``AdaLoraConfig`` and the rank pattern (module -> kept flags) from PEFT's JSON."""
    if not isinstance(data, dict):
        raise AdapterFileError(f"{source}: expected a JSON object, got {type(data).__name__}")
    if data.get("peft_type") != "ADALORA":
        raise AdapterFileError(
            f"{source}: peft_type is {data.get('peft_type')!r}; this reader needs 'ADALORA'"
        )
    known = set(_SCHEDULE_KEYS) | set(_TARGET_KEYS) | _IGNORED_KEYS
    check_config_keys(data, known, _OFF_KEYS, source, "a feature loralab's AdaLoRA")
    values = {k: data[k] for k in (*_SCHEDULE_KEYS, *_TARGET_KEYS) if data.get(k) is not None}
    if "target_modules" not in values:
        raise AdapterFileError(f"{source}: target_modules is missing or null")
    try:
        config = AdaLoraConfig(**values)
    except (ConfigError, TypeError) as error:
        raise AdapterFileError(f"{source}: {error}") from None
    return config, _rank_pattern_from_peft(data.get("rank_pattern"), config.init_r, source)


def _rank_pattern_from_peft(pattern: Any, init_r: int, source: str) -> dict[str, list[bool]] | None:
    if pattern is None or pattern == {}:
        return None
    if not isinstance(pattern, dict):
        raise AdapterFileError(f"{source}: rank_pattern must be an object, got {pattern!r}")
    kept = {}
    for key, flags in pattern.items():
        match = _RANK_PATTERN_KEY.fullmatch(key)
        if match is None:
            raise AdapterFileError(
                f"{source}: rank_pattern key {key!r} is not '<module>.lora_E' (an AdaLoRA "
                "pattern holds the kept triplets of each matrix)"
            )
        if (
            not isinstance(flags, list)
            or len(flags) != init_r
            or not all(isinstance(f, bool) for f in flags)
        ):
            raise AdapterFileError(
                f"{source}: rank_pattern[{key!r}] must be {init_r} (init_r) true/false flags, "
                f"got {flags!r}"
            )
        kept[match["module"]] = flags
    return kept


@dataclass
class AdaLoraFiles:
    """An ADALORA directory, read and checked, not yet applied."""

    directory: Path
    config: AdaLoraConfig
    rank_pattern: dict[str, list[bool]] | None
    tensors: dict[str, Tensor]


def read_adalora(directory: str | os.PathLike) -> AdaLoraFiles:
    """Read and validate a PEFT ADALORA directory without a model."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFileError(f"{directory} is not an adapter directory")
    config_path = directory / CONFIG_FILE
    config, pattern = config_from_peft(read_json(config_path), str(config_path))
    return AdaLoraFiles(directory, config, pattern, read_tensors(directory / WEIGHTS_FILE))


def _factor_keys(name: str) -> tuple[str, str, str]:
    """The file's keys of Q, P and Λ (PEFT's lora_A, lora_B, lora_E)."""
    return tuple(f"{PEFT_PREFIX}{name}.{SvdFactors.peft_names[part]}" for part in "QPE")


def load_adalora(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Apply the AdaLoRA saved in ``directory`` (PEFT's ADALORA format) to ``model``.

    Every name and shape is checked first: on any error the model is unchanged. Pruned
    triplets load with Λ_i = 0 and ``mask`` false; their P and Q keep a fresh init.
    """
    files = read_adalora(directory)
    source = str(files.directory)
    # PEFT lists heads it may not find (a SEQ_CLS file names both classifier and score).
    present = present_modules_to_save(model, files.config.targets()).modules_to_save
    config = replace(files.config, modules_to_save=present)
    pattern = files.rank_pattern or {}
    try:
        targets_config, planned = plan_adalora(model, config, strict=False)
    except ConfigError as error:
        raise AdapterFileError(f"{source}: {error}") from None
    names = {t.name for t in planned}
    stray = sorted(set(pattern) - names)
    if stray:
        raise AdapterFileError(
            f"{source}: rank_pattern names {stray[:3]}, which the targets do not adapt"
        )
    expected: dict[str, tuple[int, ...]] = {}
    for target in planned:
        kept = sum(pattern.get(target.name, [True] * config.init_r))
        (_, in_features), (out_features, _) = target.layer.factor_shapes(config.init_r)
        shapes = ((kept, in_features), (out_features, kept), (kept, 1))
        expected.update(zip(_factor_keys(target.name), shapes, strict=True))
    extra = extra_tensors(model, targets_config, names, adapter_name="")
    expected.update({key: tuple(p.shape) for key, p in extra.items()})
    _check_tensors(expected, files.tensors, source)

    apply_adalora(model, config, strict=False)
    state = adalora_state(model)
    live_extra = extra_tensors(model, targets_config, names, ADAPTER_NAME)
    with torch.no_grad():
        for name, factors in svd_factors(model).items():
            key_a, key_b, key_e = _factor_keys(name)
            keep = torch.tensor(pattern.get(name, [True] * config.init_r), device=factors.E.device)
            factors.mask.copy_(keep)
            factors.Q[keep] = files.tensors[key_a].to(factors.Q)
            factors.P[:, keep] = files.tensors[key_b].to(factors.P)
            factors.E.zero_()
            factors.E[keep] = files.tensors[key_e][:, 0].to(factors.E)
        for key in extra:
            live_extra[key].copy_(files.tensors[key])
    state.allocations = int(any(not all(flags) for flags in pattern.values()))
    return model


def _check_tensors(
    expected: dict[str, tuple[int, ...]], tensors: dict[str, Tensor], source: str
) -> None:
    check_expected_tensors(expected, tensors, source, expects="the model and rank_pattern expect")


# -- writing PEFT's ADALORA -------------------------------------------------------------------


def _layers_and_targets(model: nn.Module):
    factors = svd_factors(model)
    if not factors:
        raise ValueError("the model carries no AdaLoRA: apply it first (apply_adalora)")
    return factors, adapter_configs(model)[ADAPTER_NAME]


def adalora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The tensors of PEFT's ADALORA file: the kept triplets, under PEFT's names."""
    factors, targets_config = _layers_and_targets(model)
    tensors: dict[str, Tensor] = {}
    pruned = _rank_pattern(factors) is not None
    for name, f in factors.items():
        keep = f.mask if pruned else torch.ones_like(f.mask)
        key_a, key_b, key_e = _factor_keys(name)
        tensors[key_a] = f.Q.detach()[keep]  # (k, in)
        tensors[key_b] = f.P.detach()[:, keep]  # (out, k)
        tensors[key_e] = f.E.detach()[keep].unsqueeze(1)  # (k, 1)
    for key, parameter in extra_tensors(model, targets_config, set(factors), ADAPTER_NAME).items():
        tensors[key] = parameter.detach()
    return {key: t.contiguous().cpu() for key, t in tensors.items()}


def _rank_pattern(factors: dict[str, SvdFactors]) -> dict[str, list[bool]] | None:
    if all(bool(f.mask.all()) for f in factors.values()):
        return None  # nothing pruned, as PEFT writes it
    return {f"{name}.lora_E": f.mask.tolist() for name, f in factors.items()}


def adalora_config_dict(model: nn.Module, base_model_name_or_path: str | None = None) -> dict:
    """The ``adapter_config.json`` with which PEFT builds exactly this AdaLoRA."""
    factors, targets_config = _layers_and_targets(model)
    state = adalora_state(model)
    config = state.config
    total_step = config.total_step or state.schedule_length
    # PEFT refuses a config without total_step; a model never trained has no run length,
    # so the shortest schedule that PEFT accepts is written (it only matters for training).
    total_step = total_step or config.tinit + config.tfinal + 1
    target_modules, layers_to_transform, layers_pattern = written_targets(
        targets_config, set(factors), base_module_names(model)
    )
    return {
        **peft_header("ADALORA", model, targets_config, base_model_name_or_path),
        **{key: getattr(config, key) for key in _SCHEDULE_KEYS},
        "total_step": total_step,
        "rank_pattern": _rank_pattern(factors),
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": target_modules,
        "layers_to_transform": layers_to_transform,
        "layers_pattern": layers_pattern,
        "bias": config.bias,
        "modules_to_save": targets_config.modules_to_save,
        "fan_in_fan_out": _any_conv1d(model, factors),
        "init_lora_weights": True,
    }


def _any_conv1d(model: nn.Module, names) -> bool:
    layers = lora_layers(model)
    return any(bases.fan_in_fan_out(layers[name].base_layer) for name in names)


def save_adalora(
    model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None
) -> Path:
    """Write the model's AdaLoRA in PEFT's ADALORA format; the files are replaced together."""
    directory = Path(directory)
    tensors = adalora_state_dict(model)
    peft_config = adalora_config_dict(model, base_model_name_or_path)
    _write(directory, tensors, peft_config)
    return directory


def _write(directory: Path, tensors: dict[str, Tensor], peft_config: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    write_files_atomically(
        directory,
        {
            WEIGHTS_FILE: lambda path: save_file(tensors, path, metadata={"format": "pt"}),
            CONFIG_FILE: json_writer(peft_config),
        },
    )
    # A stale loralab.json from an earlier LoRA save would override the new config.
    (directory / LORALAB_FILE).unlink(missing_ok=True)


# -- the pruned result as a plain LoRA ----------------------------------------------------------


def lora_factors(model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """Each matrix's kept triplets as LoRA's (A, B) at its final rank k, with scale α / k.

    ``A = Q`` restricted to the kept rows (k, in) and ``B = P diag(Λ) · s k / α`` restricted
    to the kept columns (out, k), where s = α / (init_r + 1e-5): then ``(α / k) B A`` is
    exactly ``s P Λ Q`` over the kept triplets. Matrices with nothing kept are left out.
    """
    factors, _ = _layers_and_targets(model)
    exported = {}
    for name, f in factors.items():
        keep, rank = f.mask, f.rank
        if rank == 0:
            continue
        A = f.Q.detach().float()[keep]
        B = f.P.detach().float()[:, keep] * f.E.detach().float()[keep] * (f.scale * rank / f.alpha)
        exported[name] = (A, B)
    return exported


def lora_config_dict(
    model: nn.Module, ranks: dict[str, int], base_model_name_or_path: str | None = None
) -> dict:
    """A PEFT LORA ``adapter_config.json`` for the exported factors (rank per module)."""
    _, targets_config = _layers_and_targets(model)
    config = adalora_state(model).config
    default_r = Counter(ranks.values()).most_common(1)[0][0]
    target_modules, layers_to_transform, layers_pattern = written_targets(
        targets_config, set(ranks), base_module_names(model)
    )
    return lora_config_json(
        peft_header("LORA", model, targets_config, base_model_name_or_path),
        r=default_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=target_modules,
        layers_to_transform=layers_to_transform,
        layers_pattern=layers_pattern,
        rank_pattern=written_pattern(ranks, default_r),
        alpha_pattern={},
        bias=config.bias,
        use_rslora=False,
        modules_to_save=targets_config.modules_to_save,
        fan_in_fan_out=_any_conv1d(model, ranks),
        init_lora_weights=True,
    )


def export_lora(
    model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None
) -> Path:
    """Write the pruned AdaLoRA as a plain LoRA adapter in PEFT's LORA format.

    Each matrix gets its final rank (``rank_pattern``); loaded by ``loralab.load_adapter``
    or ``peft.PeftModel.from_pretrained`` it computes what the AdaLoRA model computes
    (masked triplets contribute nothing, so this holds after every allocation and through
    the final phase; it holds exactly after training).
    """
    directory = Path(directory)
    factors, targets_config = _layers_and_targets(model)
    exported = lora_factors(model)
    if not exported:
        raise ValueError("every triplet is pruned: ΔW = 0 everywhere, there is no LoRA to export")
    dropped = sorted(set(factors) - set(exported))
    if dropped and targets_config.bias == "lora_only":
        raise ConfigError(
            f"bias='lora_only' trains the biases of {dropped[:3]}, which end with rank 0 and so "
            "have no place in a LoRA export; use bias='all' or 'none'"
        )
    tensors: dict[str, Tensor] = {}
    for name, (A, B) in exported.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B
    extra = extra_tensors(model, targets_config, set(exported), ADAPTER_NAME)
    for key, parameter in extra.items():
        # A matrix left out is a plain module in the export: its bias has no base_layer.
        for name in dropped:
            key = key.replace(f"{PEFT_PREFIX}{name}.base_layer.", f"{PEFT_PREFIX}{name}.")
        tensors[key] = parameter.detach()
    tensors = {key: t.contiguous().cpu() for key, t in tensors.items()}
    ranks = {name: A.shape[0] for name, (A, _) in exported.items()}
    _write(directory, tensors, lora_config_dict(model, ranks, base_model_name_or_path))
    return directory
