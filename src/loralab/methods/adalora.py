"""AdaLoRA (Zhang et al., ICLR 2023): ``ΔW = P Λ Q``, with the rank budget moved to the
weight matrices that matter.

Every adapted matrix starts with ``init_r`` singular triplets (column i of P, Λ_i, row i of
Q). While training, each triplet's importance is scored from ``|θ · ∂L/∂θ|`` and the least
important Λ_i are masked to zero on a cubic schedule, until ``target_r`` triplets per matrix
remain on average, spent wherever they count (``adalora_budget.py``). A regulariser keeps P
and Q near-orthogonal, so that Λ stays a spectrum that can be cut.

The layer computes what PEFT's ``SVDLinear`` computes, so files carry over both ways
(``adalora_files.py``): ``h = W0 x + α / (r + 1e-5) · P diag(Λ) Q x`` with r = ``init_r``
(PEFT's ``ranknum``, which stays ``init_r`` after pruning; the 1e-5 is PEFT's and the
authors' code's guard against r = 0, kept so that a file means the same number here).

Use it as a method (``AdaLora(config).apply(model, settings, None)``, or
``apply_adalora(model, config)``), then call the hooks from the training loop:
``regularizer(model)`` added to each micro-batch loss, ``after_optimizer_step(model, step,
max_steps)`` after each ``optimizer.step()`` with the gradients still there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ..config import ConfigError, LoraConfig, require_int, require_number
from ..inject import Target, TargetError, adapter_configs, apply_targets, plan_targets
from ..layers import LoraLayer
from ..merge import merge_and_unload
from ..state import has_state, model_state
from .adalora_budget import RankAllocator, check_schedule
from .lora import with_head
from .method import MethodSettings, PlainMethod, record_method
from .trained import head_parameters

ADAPTER_NAME = "default"  # AdaLoRA trains one adapter, as in PEFT
RANKNUM_EPSILON = 1e-5  # PEFT divides by ranknum + 1e-5


# -- settings -----------------------------------------------------------------------------


@dataclass
class AdaLoraConfig:
    """Settings of AdaLoRA: the SVD-form update, its importance scores and its budget.

    The names are PEFT's (``AdaLoraConfig``), so a PEFT ``adapter_config.json`` maps onto
    them one to one. The schedule has three phases over ``total_step`` optimizer steps:
    warm-up (step ≤ ``tinit``, every triplet kept), reduction (the budget falls on a cubic
    from ``init_r`` to ``target_r`` per matrix, re-allocated every ``deltaT`` steps), and
    final fine-tuning (the last ``tfinal`` steps, with the final ranks fixed).
    """

    init_r: int = 12
    """Triplets each matrix starts with (the rank before pruning)."""
    target_r: int = 8
    """Average triplets per matrix at the end: the total budget is ``target_r`` × matrices."""
    tinit: int = 0
    """Warm-up steps before any pruning."""
    tfinal: int = 0
    """Final steps with the ranks fixed."""
    deltaT: int = 1
    """Steps between two re-allocations of the budget during the reduction phase."""
    beta1: float = 0.85
    """EMA coefficient of the smoothed sensitivity Ī, in (0, 1)."""
    beta2: float = 0.85
    """EMA coefficient of the uncertainty Ū, in (0, 1)."""
    orth_reg_weight: float = 0.5
    """Weight γ of the orthogonality regulariser on P and Q (≥ 0; 0 turns it off)."""
    total_step: int | None = None
    """Optimizer steps the schedule spans; None: the training run's ``max_steps``."""
    lora_alpha: float = 8
    """α: the update is scaled by α / (``init_r`` + 1e-5), as in PEFT."""
    lora_dropout: float = 0.0
    """Dropout on the input of the low-rank path only, in [0, 1)."""
    target_modules: list[str] | str = field(default_factory=lambda: ["q", "v"])
    """Which weights to adapt, as ``LoraConfig.target_modules`` (whole Linear or GPT-2
    Conv1D matrices; a fused part such as GPT-2's ``c_attn[q,v]`` is not supported)."""
    exclude_modules: list[str] | str | None = None
    """Modules never adapted, as ``LoraConfig.exclude_modules``."""
    layers_to_transform: list[int] | int | None = None
    """Only adapt modules in these layer indices (None: every layer)."""
    layers_pattern: list[str] | str | None = None
    """Name of the module list holding the layers (``layers``, ``h``…); None: any."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases train, as ``LoraConfig.bias``."""
    modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter (a classifier's head)."""

    def __post_init__(self) -> None:
        for name in ("init_r", "target_r", "deltaT"):
            require_int(name, getattr(self, name), minimum=1)
        for name in ("tinit", "tfinal"):
            require_int(name, getattr(self, name), minimum=0)
        if self.target_r > self.init_r:
            raise ConfigError(
                f"target_r={self.target_r} is larger than init_r={self.init_r}: AdaLoRA only "
                "prunes triplets, so target_r must be ≤ init_r"
            )
        for name in ("beta1", "beta2"):
            require_number(name, getattr(self, name), above=0, below=1)
        require_number("orth_reg_weight", self.orth_reg_weight, at_least=0)
        if self.total_step is not None:
            check_schedule(self, self.total_step)
        self.targets()  # target_modules, lora_alpha, lora_dropout, bias…: LoraConfig's checks

    def targets(self) -> LoraConfig:
        """The modules to adapt and their α, dropout and biases, as the core planner reads
        them: a ``LoraConfig`` of rank ``init_r`` whose scale is AdaLoRA's."""
        return AdaLoraTargets(
            r=self.init_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=self.target_modules,
            exclude_modules=self.exclude_modules,
            layers_to_transform=self.layers_to_transform,
            layers_pattern=self.layers_pattern,
            bias=self.bias,
            modules_to_save=self.modules_to_save,
        )

    def for_steps(self, max_steps: int) -> AdaLoraConfig:
        """This config for a run of ``max_steps`` steps: ``total_step`` filled in if None.

        Raises ``ConfigError`` before training if the schedule does not fit the run.
        """
        require_int("max_steps", max_steps, minimum=1)
        if self.total_step is None:
            return dataclasses.replace(self, total_step=max_steps)
        if self.total_step > max_steps:
            raise ConfigError(
                f"total_step={self.total_step} is longer than the run (max_steps={max_steps}): "
                "the budget would never reach target_r; set total_step ≤ max_steps"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class AdaLoraTargets(LoraConfig):
    """AdaLoRA's targets for the core planner: scale α / (r + 1e-5), PEFT's ``ranknum``."""

    def scale(self, r: int, alpha: float) -> float:
        return alpha / (r + RANKNUM_EPSILON)


# -- the layer ------------------------------------------------------------------------------


class SvdFactors(nn.Module):
    """One matrix's singular triplets: P (out, r), Λ's diagonal ``E`` (r,), Q (r, in).

    ``E`` is PEFT's ``lora_E``; ``mask`` marks the triplets the last allocation kept
    (pruned ones have Λ_i = 0 right after it; they may regrow until the next one).
    """

    def __init__(
        self,
        out_features: int,
        in_features: int,
        r: int,
        alpha: float,
        scale: float,
        dropout: float,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        # P and Q random, Λ zero, so ΔW = 0 at step 0 (AdaLoRA Sec. 3.1; PEFT's N(0, 0.02)).
        self.P = nn.Parameter(torch.randn(out_features, r, device=device, dtype=dtype) * 0.02)
        self.E = nn.Parameter(torch.zeros(r, device=device, dtype=dtype))
        self.Q = nn.Parameter(torch.randn(r, in_features, device=device, dtype=dtype) * 0.02)
        self.register_buffer("mask", torch.ones(r, dtype=torch.bool, device=device), False)
        self.r = r
        self.alpha = alpha
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def rank(self) -> int:
        """Triplets kept by the last allocation."""
        return int(self.mask.sum())

    def extra_repr(self) -> str:
        return f"r={self.r}, kept={self.rank}, alpha={self.alpha:g}, scale={self.scale:g}"


class SvdLinear(LoraLayer):
    """AdaLoRA around ``nn.Linear`` (weight (out, in)) or GPT-2's ``Conv1D`` ((in, out))."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.transposed = isinstance(base_layer, Conv1D)

    def _in_out(self) -> tuple[int, int]:
        rows, columns = self.base_layer.weight.shape
        return (rows, columns) if self.transposed else (columns, rows)

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of Q and P (LoRA's A and B) at rank r."""
        in_features, out_features = self._in_out()
        return (r, in_features), (out_features, r)

    def max_rank(self) -> int:
        return min(self._in_out())

    def add_adapter(
        self, name: str, r: int, alpha: float, scale: float, dropout: float, init: str
    ) -> None:
        # ``init`` is LoRA's choice for A; AdaLoRA has one init (SvdFactors).
        if name in self.lora:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        weight = self.base_layer.weight
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        in_features, out_features = self._in_out()
        factors = SvdFactors(
            out_features, in_features, r, alpha, scale, dropout, weight.device, dtype
        )
        factors.train(self.training)
        self.lora[name] = factors
        if self.active_adapter is None:
            self.active_adapter = name

    def _lora_input(self, x: Tensor, factors: SvdFactors) -> Tensor:
        return x.to(factors.Q.dtype)

    def lora_update(self, x: Tensor, factors: SvdFactors) -> Tensor:
        hidden = F.linear(factors.dropout(x), factors.Q) * factors.E  # (…, in) -> (…, r)
        return F.linear(hidden, factors.P) * factors.scale  # (…, out)

    def delta_weight(self, adapter_name: str | None = None) -> Tensor:
        f = self._factors(adapter_name)
        delta = (f.P.float() * f.E.float()) @ f.Q.float() * f.scale  # (out, in)
        return delta.T if self.transposed else delta


def svd_factors(model: nn.Module) -> dict[str, SvdFactors]:
    """Every adapted matrix's triplets, by module name (as in the user's model)."""
    return {
        name: module.lora[ADAPTER_NAME]
        for name, module in model.named_modules()
        if isinstance(module, SvdLinear) and ADAPTER_NAME in module.lora
    }


# -- applying it ----------------------------------------------------------------------------


def plan_adalora(
    model: nn.Module, config: AdaLoraConfig, strict: bool = True
) -> tuple[LoraConfig, list[Target]]:
    """Resolve ``config`` against ``model`` without changing it (``TargetError`` if it does
    not fit): the targets as the core planner reads them, and one ``SvdLinear`` per matrix.

    ``strict=False`` reads a loaded file's targets as PEFT does (``plan_targets``).
    """
    if adapter_configs(model):
        raise ConfigError(
            f"the model already has adapters {sorted(adapter_configs(model))}; AdaLoRA must "
            "be the only one (unload them first)"
        )
    targets_config = with_head(model, config.targets())
    planned = []
    for target in plan_targets(model, targets_config, ADAPTER_NAME, strict=strict):
        base = target.layer.base_layer
        if target.parts is not None:
            leaf = target.name.rsplit(".", 1)[-1]
            raise TargetError(
                f"AdaLoRA adapts whole matrices, not the parts {list(target.parts.enabled)} "
                f"of the fused {target.name!r}; target {leaf!r} whole, as PEFT does"
            )
        if not isinstance(base, (nn.Linear, Conv1D)):
            raise TargetError(
                f"module {target.name!r} is a {type(base).__name__}; AdaLoRA adapts Linear and "
                "GPT-2's Conv1D"
            )
        planned.append(dataclasses.replace(target, layer=SvdLinear(base)))
    return targets_config, planned


def apply_adalora(model: nn.Module, config: AdaLoraConfig, strict: bool = True) -> nn.Module:
    """Wrap the chosen matrices with AdaLoRA and freeze the rest, in place; return ``model``.

    On an error (a name that matches nothing, a rank above a matrix's size) the model is
    unchanged. At step 0 the model computes what the base computed (Λ = 0).
    """
    targets_config, planned = plan_adalora(model, config, strict)
    apply_targets(model, targets_config, planned, ADAPTER_NAME)
    model_state(model).method_state = RankAllocator(config)
    return model


def adalora_state(model: nn.Module) -> RankAllocator:
    """The importance scores and schedule of the model's AdaLoRA (set by ``apply_adalora``)."""
    state = model_state(model).method_state if has_state(model) else None
    if not isinstance(state, RankAllocator):
        raise ValueError("the model carries no AdaLoRA: apply it first (apply_adalora)")
    return state


def adalora_config(model: nn.Module) -> AdaLoraConfig:
    """The ``AdaLoraConfig`` the model's AdaLoRA was applied with."""
    return adalora_state(model).config


def merge_adalora(model: nn.Module, safe: bool = False) -> nn.Module:
    """Fold every ``ΔW = P Λ Q`` into its base weight and remove the wrappers: the plain
    model with its original modules and keys, and no added latency."""
    merge_and_unload(model, safe=safe)
    model_state(model).method_state = None
    return model


def adalora_parameters(model: nn.Module, config: AdaLoraConfig) -> int:
    """Trainable parameters AdaLoRA adds: Σ init_r · (d + k + 1) over the matrices (P, Q and
    Λ), plus a classifier's new head. Pruning masks Λ entries; it does not shrink them."""
    _, planned = plan_adalora(model, config)
    total = 0
    for target in planned:
        (r, k), (d, _) = target.layer.factor_shapes(target.r)
        total += r * (d + k + 1)
    return total + head_parameters(model)


# -- the method -----------------------------------------------------------------------------


class AdaLora(PlainMethod):
    """AdaLoRA behind the ``Method`` protocol, with its training capabilities.

    The method object holds the ``AdaLoraConfig`` it applies (``AdaLora(config)``; the
    registry's instance uses the defaults). The hooks keep no state of their own: the
    importance scores live on the model, so any ``AdaLora`` instance can drive training.
    """

    name = "adalora"
    summary = "AdaLoRA: ΔW = P·Λ·Q, pruned to a rank budget by importance (Zhang et al., 2023)"
    mergeable = True
    adds_depth = False
    uses_lora = False  # its settings are an AdaLoraConfig, carried by the method object
    companion = None
    fsdp_refusal = (
        "its rank allocation ranks the importance of whole matrices after every step; "
        "train it with DDP (torchrun without --fsdp)"
    )
    peft_type = "ADALORA"

    def __init__(self, config: AdaLoraConfig | None = None) -> None:
        self.config = config if config is not None else AdaLoraConfig()

    def configured(self, run) -> AdaLora:
        """AdaLoRA as a training run applies it: ``run.r`` is the initial rank, and the
        schedule spans the run (a schedule that does not fit is refused before training)."""
        return AdaLora(
            AdaLoraConfig(
                init_r=run.r,
                target_r=run.target_r,
                tinit=run.adalora_tinit,
                tfinal=run.adalora_tfinal,
                deltaT=run.adalora_delta_t,
                beta1=run.adalora_beta1,
                beta2=run.adalora_beta2,
                orth_reg_weight=run.orth_reg_weight,
                lora_alpha=run.lora_alpha,
                lora_dropout=run.lora_dropout,
                target_modules=run.lora_config().target_modules,
            ).for_steps(run.max_steps)
        )

    def check(
        self, model: nn.Module, settings: MethodSettings, lora: LoraConfig | None, max_length: int
    ) -> None:
        plan_adalora(model, self.config)

    def apply(self, model: nn.Module, settings: MethodSettings, lora: LoraConfig | None) -> None:
        apply_adalora(model, self.config)
        record_method(model, self.name, settings, None)

    def expected_parameters(
        self, model: nn.Module, settings: MethodSettings, lora: LoraConfig | None
    ) -> int:
        return adalora_parameters(model, self.config)

    # -- what only AdaLoRA does in training ------------------------------------------------

    def regularizer(self, model: nn.Module) -> Tensor | None:
        """γ · the mean over P's and Q's of ‖PᵀP − I‖_F and ‖QQᵀ − I‖_F (see
        ``adalora_budget.orthogonality``); None when γ = 0."""
        return adalora_state(model).regularizer(svd_factors(model))

    def after_optimizer_step(self, model: nn.Module, step: int, max_steps: int) -> None:
        """Update the importance scores from this step's gradients and, on the schedule,
        mask the least important triplets (``step`` counts from 1)."""
        adalora_state(model).after_step(svd_factors(model), step, max_steps)

    # -- files (methods/files.py hands AdaLoRA's to these) ---------------------------------

    def save(self, model: nn.Module, directory, base_model_name_or_path: str | None = None):
        from .adalora_files import save_adalora

        return save_adalora(model, directory, base_model_name_or_path)

    def load(self, model: nn.Module, directory) -> nn.Module:
        from .adalora_files import load_adalora

        load_adalora(model, directory)
        record_method(model, self.name, MethodSettings(), None)
        return model

    def write_report(self, model: nn.Module, run_dir) -> dict:
        """The ranks AdaLoRA chose: a table, a JSON file and a layer × weight heatmap."""
        from .adalora_report import write_rank_report

        return write_rank_report(model, run_dir)

    def final_trainable(self, model: nn.Module) -> int:
        """The parameters left after pruning: a kept triplet holds d + k + 1 numbers."""
        return sum(f.rank * (f.P.shape[0] + f.Q.shape[1] + 1) for f in svd_factors(model).values())
