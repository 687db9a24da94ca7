"""AdaLoRA (Zhang et al., ICLR 2023): ``ΔW = P Λ Q``, with the rank budget moved to the
weight matrices that matter.

Every adapted matrix starts with ``init_r`` singular triplets (column i of P, Λ_i, row i of
Q). While training, each triplet's importance is scored from ``|θ · ∂L/∂θ|`` and the least
important Λ_i are masked to zero on a cubic schedule, until ``target_r`` triplets per matrix
remain on average, spent wherever they count (``budget.py``). A regulariser keeps P
and Q near-orthogonal, so that Λ stays a spectrum that can be cut.

The layer computes what PEFT's ``SVDLinear`` computes, so files carry over both ways
(``files.py``): ``h = W0 x + α / (r + 1e-5) · P diag(Λ) Q x`` with r = ``init_r``
(PEFT's ``ranknum``, which stays ``init_r`` after pruning; the 1e-5 is PEFT's and the
authors' code's guard against r = 0, kept so that a file means the same number here).

Use it as a method (``AdaLora(config).apply(model, settings, None)``, or
``apply_adalora(model, config)``), then call the hooks from the training loop:
``regularizer(model)`` added to each micro-batch loss, ``after_optimizer_step(model, step,
max_steps)`` after each ``optimizer.step()`` with the gradients still there.
"""

from __future__ import annotations

from torch import Tensor, nn

from ...lora.config import ConfigError, LoraConfig
from ..method import MethodSettings, PlainMethod, record_method
from .config import AdaLoraConfig
from .files import load_adalora, save_adalora
from .layers import (
    adalora_parameters,
    adalora_state,
    apply_adalora,
    plan_adalora,
    svd_factors,
)
from .report import write_rank_report

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
        if run.max_steps is None:  # epochs: counted after the model is adapted, too late
            raise ConfigError(
                f"method=adalora fixes its rank schedule over max_steps before the data is "
                f"read; give max_steps instead of epochs={run.epochs}"
            )
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

    # -- files (methods/method_files.py hands AdaLoRA's to these) ---------------------------------

    def save(self, model: nn.Module, directory, base_model_name_or_path: str | None = None):
        return save_adalora(model, directory, base_model_name_or_path)

    def load(self, model: nn.Module, directory) -> nn.Module:
        load_adalora(model, directory)
        record_method(model, self.name, MethodSettings(), None)
        return model

    def write_report(self, model: nn.Module, run_dir) -> dict:
        """The ranks AdaLoRA chose: a table, a JSON file and a layer × weight heatmap."""
        return write_rank_report(model, run_dir)

    def final_trainable(self, model: nn.Module) -> int:
        """The parameters left after pruning: a kept triplet holds d + k + 1 numbers."""
        return sum(f.rank * (f.P.shape[0] + f.Q.shape[1] + 1) for f in svd_factors(model).values())
