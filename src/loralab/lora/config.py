"""The typed settings of a LoRA adapter, and the validators every settings class uses.

One dataclass, validated once at construction. Every error names the field, the bad
value and what is allowed, so a mistyped config never reaches a model.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from . import patterns

BIAS_CHOICES = ("none", "all", "lora_only")


class ConfigError(ValueError):
    """A setting has a value that is not allowed; the message names the field."""


@dataclass
class LoraConfig:
    """Settings of one LoRA adapter: ``ΔW = (α / r) · B A`` on the chosen weights."""

    r: int = 8
    """Rank of the update. The paper finds r = 1…8 already enough (Sec. 7.2)."""

    lora_alpha: float = 8
    """The constant α; the update is scaled by α / r (or α / √r with ``use_rslora``)."""

    lora_dropout: float = 0.0
    """Dropout on the input of the low-rank path only, in [0, 1)."""

    target_modules: list[str] | str = field(default_factory=lambda: ["q", "v"])
    """Which weights to adapt.

    - a list: each entry is a module name, a ``.name`` suffix of one, or a short name
      (``q``, ``k``, ``v``, ``o``, ``gate``, ``up``, ``down``) resolved per architecture;
      ``NAME[q,v]`` adapts only those parts of a fused projection (GPT-2's ``c_attn``);
    - a string: a regular expression that must match the whole module name;
    - ``"all-linear"``: every linear layer except the output head.
    The default, ``["q", "v"]``, is the paper's choice (Sec. 7.1).
    """

    target_parameters: list[str] | None = None
    """Stacked weights of a mixture of experts to adapt, each expert with its own update
    (PEFT's ``target_parameters``): a parameter's full name or a ``.name`` suffix of one
    (``mlp.experts.gate_up_proj``), or a short name: ``experts`` (every expert weight),
    ``experts.gate_up``, ``experts.down``. With it ``target_modules`` may be empty."""

    exclude_modules: list[str] | str | None = None
    """Modules never adapted: names/suffixes (a list) or a whole-name regex (a string)."""

    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank: key is a regex matched against the end of the module name
    (``(.*\\.)?(KEY)$``) or a short name; the first matching key wins."""

    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module α, matched like ``rank_pattern``."""

    layers_to_transform: list[int] | int | None = None
    """Only adapt modules in these layer indices (None: every layer)."""

    layers_pattern: list[str] | str | None = None
    """Name of the module list holding the layers (``layers``, ``h``…); None: any."""

    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases train: none, every bias in the model, or those of adapted modules."""

    init: str = "kaiming"
    """How the factors start (``inits/``): ``kaiming`` (A Kaiming-uniform as the paper's
    code, B = 0) or ``gaussian`` (A ~ N(0, 1/r), B = 0)."""

    use_rslora: bool = False
    """Scale by α / √r (rank-stabilised LoRA) instead of α / r."""

    modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter (a new classifier head, say)."""

    use_dora: bool = False
    """DoRA: each adapted weight is a learned length per output row times the direction
    of ``W0 + (α/r)·B A`` (``dora.py``); Linear and Conv1D weights only."""

    def __post_init__(self) -> None:
        require_int("r", self.r, minimum=1)
        require_number("lora_alpha", self.lora_alpha, above=0)
        require_number("lora_dropout", self.lora_dropout, at_least=0, below=1)
        self._check_targets()
        self._check_patterns()
        self._check_layers()
        require_choice("bias", self.bias, BIAS_CHOICES)
        from .inits import get_init  # (they import torch: not with the settings, for --help)

        try:
            get_init(self.init)  # the registered inits (``inits/``)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        require_bool("use_rslora", self.use_rslora)
        require_bool("use_dora", self.use_dora)

    def _check_targets(self) -> None:
        self.target_modules = _name_spec("target_modules", self.target_modules, allow_none=False)
        self.exclude_modules = _name_spec("exclude_modules", self.exclude_modules, allow_none=True)
        if self.target_parameters is not None:
            spec = _name_spec("target_parameters", self.target_parameters, allow_none=False)
            if not isinstance(spec, list):  # as PEFT: names, never a regex
                raise ConfigError(
                    f"target_parameters must be a list of parameter names, got "
                    f"{self.target_parameters!r}"
                )
            self.target_parameters = spec or None
        if self.target_modules == [] and not self.target_parameters:
            raise ConfigError("target_modules is an empty list; name at least one module")
        if self.target_parameters and self.lora_dropout:
            raise ConfigError(
                f"lora_dropout={self.lora_dropout} with target_parameters: PEFT refuses "
                "dropout on expert weights and could not load the adapter; use 0"
            )
        if self.target_parameters and self.use_dora:
            raise ConfigError("use_dora with target_parameters: DoRA adapts whole matrices only")
        if self.modules_to_save is not None:
            spec = _name_spec("modules_to_save", self.modules_to_save, allow_none=False)
            if not isinstance(spec, list):
                raise ConfigError(
                    f"modules_to_save must be a list of module names, got {self.modules_to_save!r}"
                )
            self.modules_to_save = spec

    def _check_patterns(self) -> None:
        self.rank_pattern = _pattern_dict("rank_pattern", self.rank_pattern)
        for key, value in self.rank_pattern.items():
            require_int(f"rank_pattern[{key!r}]", value, minimum=1)
        self.alpha_pattern = _pattern_dict("alpha_pattern", self.alpha_pattern)
        for key, value in self.alpha_pattern.items():
            require_number(f"alpha_pattern[{key!r}]", value, above=0)

    def _check_layers(self) -> None:
        layers = self.layers_to_transform
        if layers is not None:
            layer_list = [layers] if isinstance(layers, int) else layers
            if not isinstance(layer_list, (list, tuple)):
                raise ConfigError(
                    f"layers_to_transform must be an int, a list of ints or None, got {layers!r}"
                )
            for index in layer_list:
                require_int("layers_to_transform entry", index, minimum=0)
            self.layers_to_transform = list(layer_list)
        if self.layers_pattern is not None:
            self.layers_pattern = _name_spec(
                "layers_pattern", self.layers_pattern, False, patterns.LAYERS
            )
            if self.layers_to_transform is None:
                raise ConfigError("layers_pattern is set but layers_to_transform is None")

    # -- per-module values -------------------------------------------------------------

    def rank_for(self, module_name: str, short_names: tuple[str, ...] = ()) -> int:
        """The rank of the module called ``module_name`` (``rank_pattern`` first)."""
        return int(
            pattern_value(self.rank_pattern, module_name, self.r, short_names, "rank_pattern")
        )

    def alpha_for(self, module_name: str, short_names: tuple[str, ...] = ()) -> float:
        """The α of the module called ``module_name`` (``alpha_pattern`` first)."""
        alpha = pattern_value(
            self.alpha_pattern, module_name, self.lora_alpha, short_names, "alpha_pattern"
        )
        return float(alpha)

    def match_patterns(self, module_names: list[str]) -> None:
        """Match each of this config's regexes against every name once. A server does
        this off its engine's thread, under ``patterns.matching_deadline``, so that a
        pattern that backtracks without end is refused before it reaches the model."""
        for name in module_names:
            for field_name in ("target_modules", "exclude_modules"):
                spec = getattr(self, field_name)
                if isinstance(spec, str) and spec != "all-linear":
                    patterns.fullmatch(field_name, spec, name)
            self.rank_for(name)
            self.alpha_for(name)
            layers = self.layers_pattern
            for source in [layers] if isinstance(layers, str) else layers or []:
                patterns.match("layers_pattern", source, name, patterns.LAYERS)

    def scale(self, r: int, alpha: float) -> float:
        """The factor in front of ``B A``: α / r, or α / √r with rsLoRA."""
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def with_lora_settings(*names: str) -> Callable[[type], type]:
    """A class decorator: give the dataclass-to-be the ``LoraConfig`` fields ``names`` (all
    of them if none) as LoraConfig declares them: type, default, and the docstring that is
    their help. Settings that other configs share with LoRA are then declared once, here,
    with one set of defaults (PEFT's)."""

    def add(cls: type) -> type:
        types = typing.get_type_hints(LoraConfig)  # real types: the CLI reads them
        for item in fields(LoraConfig):
            if names and item.name not in names:
                continue
            cls.__annotations__[item.name] = types[item.name]
            setattr(
                cls, item.name, field(default=item.default, default_factory=item.default_factory)
            )
        return cls

    return add


def pattern_matches(key: str, module_name: str, field: str = "rank_pattern") -> bool:
    """PEFT's rule for ``rank_pattern`` keys: a regex matching the end of the name."""
    return patterns.match(f"{field} key", key, module_name, patterns.NAME_END) is not None


def pattern_value(
    values: dict[str, Any],
    module_name: str,
    default: Any,
    short_names: tuple[str, ...] = (),
    field: str = "rank_pattern",
) -> Any:
    """The value of the first key that names the module (PEFT's rule, or a short name)."""
    for key, value in values.items():
        if key in short_names or pattern_matches(key, module_name, field):
            return value
    return default


# -- the validators every settings class uses ----------------------------------------------


def is_int(value: Any) -> bool:
    """An ``int`` that is not a ``bool`` (``True`` is an int to Python, not to a user)."""
    return isinstance(value, int) and not isinstance(value, bool)


def require_int(name: str, value: Any, minimum: int) -> None:
    """Refuse ``value`` unless it is an integer ≥ ``minimum``, naming ``name``."""
    if not is_int(value) or value < minimum:
        raise ConfigError(f"{name} must be an integer ≥ {minimum}, got {value!r}")


def require_number(
    name: str,
    value: Any,
    above: float | None = None,
    at_least: float | None = None,
    below: float | None = None,
) -> None:
    """Refuse ``value`` unless it is a finite number in the range the bounds give:
    ``> above`` or ``≥ at_least``, and ``< below``."""
    low = f"{above}" if above is not None else f"{at_least}" if at_least is not None else None
    if below is not None:
        allowed = f"a number in {'(' if above is not None else '['}{low}, {below})"
    else:
        allowed = f"a finite number {'>' if above is not None else '≥'} {low}"
    fine = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (above is None or value > above)
        and (at_least is None or value >= at_least)
        and (below is None or value < below)
    )
    if not fine:
        raise ConfigError(f"{name} must be {allowed}, got {value!r}")


def require_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Refuse ``value`` unless it is one of ``choices``."""
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ConfigError(f"{name} must be one of {allowed}, got {value!r}")


def require_bool(name: str, value: Any) -> None:
    """Refuse anything but ``True`` and ``False`` (a YAML ``yes`` is a string here)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")


def _name_spec(
    name: str, value: Any, allow_none: bool, template: str = patterns.WHOLE_NAME
) -> list[str] | str | None:
    """A list of names, or a single string (a regex or ``"all-linear"``), whose regex is
    valid where PEFT places it (``template``)."""
    if value is None:
        if allow_none:
            return None
        raise ConfigError(f"{name} must be a list of names or a regex string, got None")
    if isinstance(value, str):
        if not value:
            raise ConfigError(f"{name} is an empty string")
        if value != "all-linear":
            _check_pattern(name, value, template)
        return value
    if isinstance(value, (list, tuple, set)):
        items = sorted(value) if isinstance(value, set) else list(value)
        for item in items:
            if not isinstance(item, str) or not item:
                raise ConfigError(f"{name} entries must be non-empty strings, got {item!r}")
            if template != patterns.WHOLE_NAME:  # list entries are regexes here too
                _check_pattern(name, item, template)
        return items
    raise ConfigError(f"{name} must be a list of names or a regex string, got {value!r}")


def _pattern_dict(name: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be a dict from module-name pattern to value, got {value!r}")
    for key in value:
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{name} keys must be non-empty strings, got {key!r}")
        _check_pattern(f"{name} key", key, patterns.NAME_END)
    return dict(value)


def _check_pattern(name: str, source: str, template: str) -> None:
    try:
        patterns.compile_pattern(name, source, template)
    except patterns.PatternError as error:
        raise ConfigError(str(error)) from None
