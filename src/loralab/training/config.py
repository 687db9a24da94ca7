"""The settings of a training run: ``TrainConfig``, and reading them from a YAML file.

The command line's ``loralab train`` flags are generated from these fields (their
docstrings are the help text) and a YAML file's keys are the same names, so a run's
``config.yaml`` repeats it exactly.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ..data.encoding import LONG_EXAMPLES, TRAIN_ON
from ..data.layouts import DATA_FORMATS
from ..lora.config import (
    ConfigError,
    LoraConfig,
    require_bool,
    require_choice,
    require_int,
    require_number,
    with_lora_settings,
)
from ..models.devices import check_device, check_dtype, check_quantized_base

if TYPE_CHECKING:  # the methods import torch: they load when a run is built, not to parse flags
    from ..methods import Method, MethodSettings

SCHEDULES = ("linear", "cosine", "constant")
MODEL_KINDS = ("causal-lm", "classification")
DEFAULT_STEPS = 100
REFERENCES = ("start", "base")
# objectives/__init__.py's OBJECTIVE_NAMES, here without importing torch to parse flags
OBJECTIVES = ("sft", "dpo", "ipo", "simpo", "orpo", "kto", "grpo")
GRPO_LOSS_TYPES = ("dapo", "grpo", "bnpo", "dr_grpo")  # objectives/grpo.py's LOSS_TYPES
REWARD_SCALES = ("group", "batch", "none")
# The methods whose adapter can be turned off, leaving the base (the reference policy).
REFERENCE_METHODS = ("lora", "adalora")


@dataclass
@with_lora_settings()
class TrainConfig:
    """Everything a training run needs; the CLI flags and YAML keys are these fields, and
    every ``LoraConfig`` field (``r``, ``lora_alpha``, ``target_modules``, ``use_rslora``,
    …) is one of them, added from LoraConfig itself."""

    model: str = "smollm2-135m"
    """An embedded model alias, a local model directory, a .gguf file, or a Hub id."""
    model_kind: str = "causal-lm"
    """``causal-lm`` or ``classification`` (a new classification head, trained in full)."""
    task: str | None = "e2e"
    """A built-in task (e2e, sql, nli, pydoc); ignored when ``data`` is given."""
    data: str | None = None
    """Training data: a .jsonl, .json, .csv, .parquet or .arrow file, a folder written by
    Dataset.save_to_disk, or the id of a Hub dataset already in the local Hub cache (all
    but JSONL, JSON and CSV need the data extra); records in one of the layouts of
    data_format."""
    data_format: str = "auto"
    """The records' layout: auto (told by their fields), prompt-completion, messages,
    text, classification, alpaca, sharegpt or preference; name it where a record has the
    fields of two (Alpaca's with a text column)."""
    data_split: str = "train"
    """The split of a saved DatasetDict folder that trains (its validation split, if it
    has one, gives the validation loss unless validation_data is given)."""
    validation_data: str | None = None
    """A file for validation loss; default: the data's or the task's validation split,
    else validation_split_fraction of the training records, else none."""
    validation_split_fraction: float | None = None
    """Hold out this fraction of the training records (drawn with data_seed, or seed) for
    the validation loss, where nothing else gives a validation set."""
    train_on: str = "all"
    """Which assistant turns of a chat the loss counts: all, or last-turn (the last)."""
    packing: bool = False
    """Pack several training examples into each row of up to max_length tokens (best fit,
    longest first), each example attending only to itself: fewer padding tokens computed.
    batch_size then counts rows, not examples (a causal LM's)."""
    long_examples: str = "truncate"
    """An example longer than max_length: truncate it (a chat or completion loses its end),
    or refuse the data, naming the record. Never split across rows."""
    output_dir: str = "runs/latest"
    """Where the config, metrics, loss curve, checkpoint and adapter are written."""
    train_size: int | None = None
    """Examples drawn from a built-in task's generator for training (None: its default)."""
    validation_size: int = 64
    """Validation examples used for the validation loss."""

    method: str = "lora"
    """How to adapt: lora, lora-pe, full, ft-top2, bitfit, preembed, prelayer, adapter-h,
    adapter-l, adalora (``loralab.methods``)."""
    prefix_length: int = 10
    """Prefix methods: l_p trainable tokens before the prompt."""
    infix_length: int = 0
    """Prefix methods: l_i trainable tokens between the prompt and the completion."""
    adapter_rank: int = 8
    """Adapter^H / Adapter^L: the bottleneck width r."""
    top_layers: int = 2
    """FT-Top2: how many of the last transformer blocks train."""
    target_r: int = 4
    """AdaLoRA: the average rank per matrix at the end (``r`` is the initial rank)."""
    adalora_tinit: int = 0
    """AdaLoRA: warm-up steps before any pruning."""
    adalora_tfinal: int = 0
    """AdaLoRA: final steps with the ranks fixed."""
    adalora_delta_t: int = 1
    """AdaLoRA: steps between two re-allocations of the budget."""
    adalora_beta1: float = 0.85
    """AdaLoRA: EMA coefficient of the smoothed sensitivity."""
    adalora_beta2: float = 0.85
    """AdaLoRA: EMA coefficient of the uncertainty."""
    orth_reg_weight: float = 0.5
    """AdaLoRA: weight of the orthogonality regulariser on P and Q."""

    objective: str = "sft"
    """What training minimises: sft (the completions' loss), a preference objective on
    {prompt, chosen, rejected} pairs (dpo, ipo, simpo, orpo), kto on completions marked
    desirable or not ({prompt, completion, label: true/false}, or pairs), or grpo,
    reinforcement learning from a reward on sampled completions
    (``loralab.training.objectives``)."""
    beta: float | None = None
    """The objective's β: DPO's (default 0.1), IPO's τ (0.1), SimPO's β (2.0), ORPO's λ
    (0.1), KTO's (0.1), GRPO's KL penalty (0: none, and no reference forward)."""
    simpo_gamma: float = 0.5
    """SimPO: the target margin γ between the replies' rewards."""
    desirable_weight: float = 1.0
    """KTO: the weight of a desirable completion's loss."""
    undesirable_weight: float = 1.0
    """KTO: the weight of an undesirable completion's loss."""
    start_adapter: str | None = None
    """Start from a trained adapter's folder (an SFT adapter) instead of a new one, and
    train it further: its method must be the run's, and its LoRA settings (rank, targets)
    replace the run's. A resume reads the folder again (the reference's copy)."""
    reference: str = "start"
    """A preference objective's reference policy: start (the model as training starts:
    the base for a new adapter, the start_adapter for one given), or base (the adapter
    turned off). Either runs on the same model: no second copy of it."""
    reward: str | None = None
    """GRPO: module:function or path/to/file.py:function, called as TRL calls reward
    functions (prompts=, completions=, and the prompt records' other fields); None: the
    task's own (sql: execution match, e2e: slot coverage)."""
    num_generations: int = 8
    """GRPO: completions sampled for each prompt (the group G); batch_size counts prompts."""
    max_new_tokens: int = 64
    """GRPO: tokens a completion may have at most."""
    temperature: float = 1.0
    """GRPO: the sampling temperature."""
    top_p: float = 1.0
    """GRPO: nucleus sampling's top-p (1 keeps every token)."""
    epsilon: float = 0.2
    """GRPO: the clip range of the ratio, [1 − ε, 1 + epsilon_high]."""
    epsilon_high: float | None = None
    """GRPO: the clip's upper ε (DAPO's clip-higher); None: epsilon."""
    loss_type: str = "dapo"
    """GRPO: how token losses add up: dapo (over all completion tokens of the step, TRL's
    default), grpo (per completion, then over completions), bnpo (over the micro-batch's
    tokens) or dr_grpo (over completions × max_new_tokens)."""
    scale_rewards: str = "group"
    """GRPO: divide advantages by the group's reward std (group), the batch's (batch), or
    not at all (none, as Dr. GRPO)."""
    rollout_server: str | None = None
    """GRPO: sample on this server (a loralab serve or vLLM URL, http://host:port)
    instead of here: each step's adapter is written to rollout_dir and loaded there with
    load_inplace; its API key, if any, in the environment variable LORALAB_ROLLOUT_API_KEY."""
    rollout_dir: str | None = None
    """GRPO with rollout_server: the folder each step's adapter is written to, which the
    server reads at the same path (loralab serve: inside its --adapter-dir); default
    output_dir/rollout-adapter."""

    learning_rate: float = 2e-4
    """Peak learning rate of AdamW."""
    head_learning_rate: float | None = None
    """A classifier's new head's peak learning rate (``model_kind: classification``; default:
    ``learning_rate``). The head starts from random values while an adapter starts at zero,
    so the two may want different steps."""
    loraplus_lr_ratio: float | None = None
    """LoRA+ (Hayou et al., 2024): B's learning rate is this many times A's (and the
    other parameters'); the paper suggests 16 and more. None: one rate for both."""
    weight_decay: float = 0.01
    """AdamW's decoupled weight decay."""
    schedule: str = "linear"
    """Decay after warm-up: linear, cosine or constant."""
    warmup_steps: int = 0
    """Steps of linear warm-up from 0 to the peak learning rate."""
    max_steps: int | None = None
    """Optimizer steps in the run (default: 100, or what ``epochs`` makes)."""
    epochs: float | None = None
    """Passes over the training examples kept, instead of ``max_steps``: the steps are
    counted once the data is read (``epochs × steps per epoch``, rounded up)."""
    batch_size: int = 8
    """Examples per micro-batch."""
    gradient_accumulation: int = 1
    """Micro-batches per optimizer step."""
    max_length: int = 128
    """Tokens per example at most (longer ones are cut)."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm (0 turns it off)."""
    bf16: bool = False
    """Run forward and backward under bf16 autocast."""
    chunked_loss: bool = True
    """Causal LMs: apply the output head and the loss only at the positions whose labels
    count, in chunks, so that the full (batch, length, vocab) logits are never built
    (``loss.py``; the same loss and gradient up to rounding). Off: the model's own loss."""
    lean_mlp: bool = True
    """Gated SiLU MLPs (Llama, Mistral, Qwen) keep two of their three intermediate tensors
    for the backward pass and recompute SiLU's output there (``lean_mlp.py``): a third less
    MLP activation memory, the same loss and gradients to the last bit."""
    return_freed_memory: bool = False
    """On glibc (Linux), serve blocks of 1 MiB and more from mappings of their own, so that
    the memory of a freed activation goes back to the system instead of staying resident
    as a hole in the heap (``malloc_threshold.py``; it lowers the peak RSS and changes nothing that
    is computed). The setting stays for the rest of the process. Off by default: with it
    and ``lean_mlp`` on, SmolLM2 trained at 0.88× the tokens/s for 0.93× the peak RSS
    (``benchmarks/RESULTS.md``)."""
    gradient_checkpointing: bool = False
    """Keep only each transformer block's input and recompute the rest in the backward
    pass: less activation memory for about a third more compute (non-reentrant, so it works
    on a frozen base and with DDP and FSDP)."""
    fsdp: bool = False
    """Under torchrun: shard the model (frozen base and trained parameters) across the
    processes with FSDP2, one unit per transformer block, instead of a whole copy on each
    (DDP). For bases too large for one device."""
    seed: int = 0
    """Seeds the LoRA init, dropout and data order: a CPU run repeats bit for bit."""
    data_seed: int | None = None
    """Seeds a built-in task's examples and splits (None: ``seed``); fix it to compare
    seeds of training on the same data."""

    eval_every: int = 50
    """Validation loss every N steps (0: only at the end)."""
    save_every: int = 50
    """Checkpoint every N steps (0: only at the end)."""
    log_every: int = 1
    """Write a metrics line every N steps."""
    tensorboard: bool = False
    """Also write TensorBoard event files (needs the tensorboard package)."""
    progress: bool = True
    """Show a progress bar."""
    resume: bool = False
    """Continue from the checkpoint in ``output_dir``."""
    device: str | None = None
    """Where to train: auto (the first CUDA GPU if PyTorch sees one, else the CPU), cpu,
    cuda or cuda:N. Under torchrun each process takes its local rank's GPU."""
    dtype: str | None = None
    """The frozen base's weights: fp32 (default), bf16 or fp16 (half the memory; LoRA's
    factors stay fp32). bf16 is fast only on CPUs with AVX512-BF16 or AMX, and on GPUs."""
    quantized_base: str | None = None
    """Keep the frozen base quantized: ``gguf`` trains over a GGUF file's own packed
    weights (the embedded model's, or --model FILE.gguf), unpacked inside each forward and
    backward; its linear weights take the file's memory instead of fp32's. ``nf4``,
    ``fp4`` and ``int8`` quantize a float model with bitsandbytes as it loads, as QLoRA
    does (the ``qlora`` extra)."""

    def __post_init__(self) -> None:
        self._check_length()
        self._check_numbers()
        self._check_choices()
        self._check_learning_rates()
        check_device(self.device)
        check_dtype(self.dtype, "dtype")
        check_quantized_base(self.quantized_base)
        if self.data is None and self.task is None:
            raise ConfigError("give a built-in task (task) or a data file (data)")
        self._check_method()
        self._check_objective()

    def _check_length(self) -> None:
        """One of ``max_steps`` and ``epochs`` says how long to train (neither: the default
        steps); warmup fits inside it."""
        if self.epochs is not None:
            require_number("epochs", self.epochs, above=0)
            if self.max_steps is not None:
                raise ConfigError(
                    f"max_steps={self.max_steps} and epochs={self.epochs} both say how long "
                    "to train; give one"
                )
            return  # max_steps comes from the epochs once the data is read
        if self.max_steps is None:
            self.max_steps = DEFAULT_STEPS
        require_int("max_steps", self.max_steps, minimum=1)
        require_int("warmup_steps", self.warmup_steps, minimum=0)
        if self.warmup_steps > self.max_steps:
            raise ConfigError(
                f"warmup_steps={self.warmup_steps} is longer than max_steps={self.max_steps}"
            )

    def _check_numbers(self) -> None:
        for name in ("batch_size", "gradient_accumulation", "max_length", "log_every"):
            require_int(name, getattr(self, name), minimum=1)
        for name in ("warmup_steps", "eval_every", "save_every", "seed", "validation_size"):
            require_int(name, getattr(self, name), minimum=0)
        for name, minimum in (("data_seed", 0), ("train_size", 1)):
            if getattr(self, name) is not None:
                require_int(name, getattr(self, name), minimum=minimum)
        if self.validation_split_fraction is not None:
            require_number(
                "validation_split_fraction", self.validation_split_fraction, above=0, below=1
            )
        require_number("weight_decay", self.weight_decay, at_least=0)
        require_number("max_grad_norm", self.max_grad_norm, at_least=0)

    def _check_choices(self) -> None:
        require_choice("schedule", self.schedule, SCHEDULES)
        require_choice("model_kind", self.model_kind, MODEL_KINDS)
        require_choice("train_on", self.train_on, TRAIN_ON)
        require_choice("long_examples", self.long_examples, LONG_EXAMPLES)
        require_choice("data_format", self.data_format, DATA_FORMATS)
        if self.packing and self.model_kind != "causal-lm":
            raise ConfigError(
                "packing puts several examples of a causal LM in one row; a classifier "
                f"(model_kind: {self.model_kind}) reads one example a row"
            )
        for name in _bool_fields():
            require_bool(name, getattr(self, name))

    def _check_learning_rates(self) -> None:
        require_number("learning_rate", self.learning_rate, above=0, below=1)
        if self.head_learning_rate is not None:
            require_number("head_learning_rate", self.head_learning_rate, above=0, below=1)
            if self.model_kind != "classification":
                raise ConfigError(
                    "head_learning_rate is for a classifier's new head "
                    f"(model_kind: classification); this run is model_kind: {self.model_kind}"
                )
        if self.loraplus_lr_ratio is not None:
            require_number("loraplus_lr_ratio", self.loraplus_lr_ratio, above=0)
        if self.fsdp and (self.head_learning_rate, self.loraplus_lr_ratio) != (None, None):
            raise ConfigError("fsdp trains every parameter at one learning rate")

    def _check_method(self) -> None:
        """The method's own settings, LoRA's, and what the method cannot do."""
        self.method_settings()  # l_p, l_i, adapter rank, top layers: validated there
        self.lora_config()  # LoRA's settings: validated by LoraConfig itself
        method = self.method_object  # an unknown name lists the valid ones; AdaLoRA's schedule
        if self.loraplus_lr_ratio is not None and not method.uses_lora:
            raise ConfigError(
                f"loraplus_lr_ratio sets the learning rate of LoRA's B factors; "
                f"method={self.method!r} trains none"
            )
        if self.fsdp and method.fsdp_refusal:
            raise ConfigError(f"fsdp cannot train method={self.method!r}: {method.fsdp_refusal}")
        if self.target_parameters and self.method != "lora":
            raise ConfigError(
                f"target_parameters adapts stacked expert weights with LoRA; method="
                f"{self.method!r} does not (use method lora, or drop target_parameters)"
            )

    def _check_objective(self) -> None:
        """The objective's settings, and what it cannot train with."""
        require_choice("reference", self.reference, REFERENCES)
        require_number("simpo_gamma", self.simpo_gamma, at_least=0)
        for name in ("desirable_weight", "undesirable_weight"):
            require_number(name, getattr(self, name), above=0)
        require_choice("objective", self.objective, OBJECTIVES)
        if self.beta is not None:
            require_number("beta", self.beta, **({"at_least": 0} if self.grpo else {"above": 0}))
        self._check_grpo()
        if self.objective == "sft":
            settings = ("beta", None), ("reference", "start"), ("desirable_weight", 1.0)
            for name, default in (*settings, ("undesirable_weight", 1.0)):
                if getattr(self, name) != default:
                    raise ConfigError(
                        f"{name}={getattr(self, name)!r} is a preference objective's setting; "
                        "this run's objective is sft"
                    )
            return
        if self.model_kind != "causal-lm":
            raise ConfigError(f"objective={self.objective!r} trains a causal LM, not a classifier")
        if self.packing:
            raise ConfigError(
                f"packing is for supervised fine-tuning; objective={self.objective!r} runs "
                "one reply a row"
            )
        if self.fsdp:
            raise ConfigError(f"objective={self.objective!r} does not train under torchrun yet")
        if self.objective == "kto" and self.batch_size < 2:
            raise ConfigError(
                "objective kto estimates its KL term from each prompt with another "
                "example's completion: batch_size must be at least 2"
            )
        if self.grpo and (self.validation_data or self.validation_split_fraction):
            raise ConfigError(
                "objective grpo has no validation loss (each step logs its completions' "
                "reward); drop validation_data and validation_split_fraction"
            )
        self._check_reference()

    def _check_reference(self) -> None:
        """A reference policy is the model with its adapter off: LoRA's alone, from an
        init that leaves the base as it was; a start adapter's copy: plain LoRA's."""
        from ..lora.inits import get_init

        if self.uses_reference and get_init(self.init).rewrites_base:
            raise ConfigError(
                f"init={self.init!r} rewrites the base weights, so the adapter turned off is "
                f"not the model at step 0: objective={self.objective!r} needs a reference "
                "policy; use init kaiming or gaussian"
            )
        start_copy = self.start_adapter is not None and self.reference == "start"
        if self.uses_reference and start_copy and self.method != "lora":
            raise ConfigError(
                f"reference 'start' keeps a frozen copy of the start adapter, which a "
                f"method={self.method!r} adapter cannot be beside the one that trains; use "
                "--reference base"
            )
        if self.uses_reference and self.method not in REFERENCE_METHODS:
            what = "a KL penalty to" if self.grpo else "comparing with"
            instead = "beta 0" if self.grpo else "objective simpo or orpo, which need none"
            raise ConfigError(
                f"objective={self.objective!r} with {what} a reference policy needs the model "
                "with its adapter turned off, which only LoRA adapters have; method="
                f"{self.method!r} changes the model otherwise (use method lora or adalora, "
                f"or {instead})"
            )

    def _check_grpo(self) -> None:
        """GRPO's settings, given only to a GRPO run."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        if not self.grpo:
            for name in SECTIONS["GRPO"]:
                if getattr(self, name) != defaults[name]:
                    raise ConfigError(
                        f"{name}={getattr(self, name)!r} is a GRPO setting; this run's "
                        f"objective is {self.objective}"
                    )
            return
        require_int("num_generations", self.num_generations, minimum=2)
        require_int("max_new_tokens", self.max_new_tokens, minimum=1)
        require_number("temperature", self.temperature, above=0)
        require_number("top_p", self.top_p, above=0)
        if self.top_p > 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        require_number("epsilon", self.epsilon, above=0, below=1)
        from ..engine.llama import PREFIX_METHODS

        if self.method in PREFIX_METHODS:
            raise ConfigError(
                f"objective grpo samples through loralab's engine, which does not run "
                f"method={self.method!r} (its prefix tokens); use lora or another method"
            )
        if self.method == "adalora":
            raise ConfigError(
                "objective grpo does not apply AdaLoRA's budget and regulariser yet; use "
                "method lora"
            )
        if self.epsilon_high is not None:
            require_number("epsilon_high", self.epsilon_high, above=0)
        require_choice("loss_type", self.loss_type, GRPO_LOSS_TYPES)
        require_choice("scale_rewards", self.scale_rewards, REWARD_SCALES)
        self._check_rollout_server()

    def _check_rollout_server(self) -> None:
        """A rollout server runs the adapter per row of its batches: a plain LoRA (B·A)."""
        if self.rollout_server is None:
            if self.rollout_dir is not None:
                raise ConfigError("rollout_dir is where rollout_server reads; give that too")
            return
        from ..lora.variants import variant_for
        from .objectives.rollout_server import check_url

        check_url(self.rollout_server)
        lora = self.lora_config() if self.method == "lora" else None
        what = None
        if lora is None:
            what = f"method={self.method!r} (a server runs LoRA adapters only)"
        elif not variant_for(lora).factors_class.is_product:
            what = f"{variant_for(lora).name} (its ΔW is not a product B·A)"
        elif lora.modules_to_save:
            what = "modules_to_save (whole modules are not swapped per row)"
        if what is not None:
            raise ConfigError(
                f"rollout_server samples with the adapter on another server, which cannot run "
                f"{what}; sample here (drop rollout_server) or train a plain LoRA"
            )

    @property
    def grpo(self) -> bool:
        return self.objective == "grpo"

    @property
    def uses_reference(self) -> bool:
        """Whether the objective compares with a reference policy: DPO, IPO and KTO always,
        GRPO for its KL penalty (β > 0)."""
        if self.objective == "sft":
            return False
        if self.grpo:
            return bool(self.beta)
        objective = self.objective_object
        return objective is None or objective.uses_reference  # None: KTO

    @functools.cached_property
    def objective_object(self):
        """The preference objective (None: supervised fine-tuning, or GRPO)."""
        from .objectives import preference_objective

        return preference_objective(self.objective)

    def grpo_settings(self):
        from .objectives.grpo import GrpoSettings

        return GrpoSettings(
            epsilon_low=self.epsilon,
            epsilon_high=self.epsilon if self.epsilon_high is None else self.epsilon_high,
            beta=self.beta or 0.0,
            loss_type=self.loss_type,
            scale_rewards=self.scale_rewards,
            max_completion_length=self.max_new_tokens,
        )

    def kto_settings(self):
        from .objectives.kto import KtoSettings

        return KtoSettings(
            beta=0.1 if self.beta is None else self.beta,
            desirable_weight=self.desirable_weight,
            undesirable_weight=self.undesirable_weight,
        )

    def preference_settings(self):
        from .objectives import PreferenceSettings

        objective = self.objective_object
        beta = self.beta if self.beta is not None else objective.default_beta
        return PreferenceSettings(beta=beta, simpo_gamma=self.simpo_gamma)

    @functools.cached_property
    def method_object(self) -> Method:
        """The method the run applies, built once with the run's settings where it has its
        own (AdaLoRA's initial rank and schedule)."""
        from ..methods import get_method

        return get_method(self.method).configured(self)

    def method_settings(self) -> MethodSettings:
        from ..methods import MethodSettings

        return MethodSettings(
            prefix_length=self.prefix_length,
            infix_length=self.infix_length,
            adapter_rank=self.adapter_rank,
            top_layers=self.top_layers,
        )

    def lora_config(self) -> LoraConfig:
        settings = {name: getattr(self, name) for name in LoraConfig.field_names()}
        targets = settings["target_modules"]
        # On the command line every value is a list: one "all-linear" means the keyword.
        if targets == ["all-linear"]:
            settings["target_modules"] = "all-linear"
        return LoraConfig(**settings)

    def steps_per_epoch(self, examples: int) -> int:
        """Optimizer steps that pass once over ``examples`` training examples (GRPO's step
        samples for one batch of prompts, whatever ``gradient_accumulation`` splits)."""
        return max(1, math.ceil(examples / (self.batch_size * self.batches_per_step)))

    @property
    def batches_per_step(self) -> int:
        """The batches a step draws from the data stream."""
        return 1 if self.grpo else self.gradient_accumulation

    def with_steps(self, examples: int) -> TrainConfig:
        """This run with ``epochs`` turned into ``max_steps`` for ``examples`` training
        examples (the run as it is when ``max_steps`` was given)."""
        if self.epochs is None:
            return self
        steps = math.ceil(self.epochs * self.steps_per_epoch(examples))
        if self.warmup_steps > steps:
            raise ConfigError(
                f"warmup_steps={self.warmup_steps} is longer than the run: epochs={self.epochs} "
                f"over {examples} examples is {steps} steps"
            )
        return dataclasses.replace(self, max_steps=steps, epochs=None)

    def to_dict(self) -> dict[str, Any]:
        """The settings by section, as ``loralab train --help`` lists them."""
        values = dataclasses.asdict(self)
        return {name: values[name] for names in SECTIONS.values() for name in names}


@functools.cache
def _bool_fields() -> tuple[str, ...]:
    """The settings that are true or false (a YAML ``yes`` is a string, and refused)."""
    return tuple(name for name, kind in typing.get_type_hints(TrainConfig).items() if kind is bool)


# The headings of ``loralab train --help`` and the order of a run's config.yaml; every
# field is in one section (tests/training/test_train_config.py).
SECTIONS: dict[str, tuple[str, ...]] = {
    "model and data": (
        "model",
        "model_kind",
        "task",
        "data",
        "data_format",
        "data_split",
        "validation_data",
        "validation_split_fraction",
        "train_on",
        "packing",
        "long_examples",
        "train_size",
        "validation_size",
        "data_seed",
    ),
    "method": ("method", "prefix_length", "infix_length", "adapter_rank", "top_layers"),
    "LoRA (the fields of loralab.LoraConfig)": tuple(LoraConfig.field_names()),
    "AdaLoRA": (
        "target_r",
        "adalora_tinit",
        "adalora_tfinal",
        "adalora_delta_t",
        "adalora_beta1",
        "adalora_beta2",
        "orth_reg_weight",
    ),
    "objective": (
        "objective",
        "beta",
        "simpo_gamma",
        "desirable_weight",
        "undesirable_weight",
        "start_adapter",
        "reference",
    ),
    "GRPO": (
        "reward",
        "num_generations",
        "max_new_tokens",
        "temperature",
        "top_p",
        "epsilon",
        "epsilon_high",
        "loss_type",
        "scale_rewards",
        "rollout_server",
        "rollout_dir",
    ),
    "optimisation": (
        "learning_rate",
        "head_learning_rate",
        "loraplus_lr_ratio",
        "weight_decay",
        "schedule",
        "warmup_steps",
        "max_steps",
        "epochs",
        "batch_size",
        "gradient_accumulation",
        "max_length",
        "max_grad_norm",
        "seed",
    ),
    "device, memory and speed": (
        "device",
        "dtype",
        "quantized_base",
        "bf16",
        "chunked_loss",
        "lean_mlp",
        "return_freed_memory",
        "gradient_checkpointing",
        "fsdp",
    ),
    "the run's folder and logs": (
        "output_dir",
        "resume",
        "eval_every",
        "save_every",
        "log_every",
        "tensorboard",
        "progress",
    ),
}


def config_from_file(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A ``TrainConfig`` from a YAML file, with ``overrides`` (the command line) on top."""
    path = Path(path)
    if not path.is_file():
        what = "a directory, not a config file" if path.is_dir() else "no such config file"
        raise ConfigError(f"{path}: {what}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text ({error.reason})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        # PyYAML's own message spans lines (it quotes the line); one line is enough here.
        words = [getattr(error, "context", None), getattr(error, "problem", None)]
        problem = "; ".join(w for w in words if w) or str(error).splitlines()[0]
        raise ConfigError(f"{path}{where}: malformed YAML ({problem})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in data:
        if key not in known:
            near = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"{path}: unknown setting {key!r}{hint}")
    merged = {**data, **(overrides or {})}
    try:
        return TrainConfig(**merged)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
