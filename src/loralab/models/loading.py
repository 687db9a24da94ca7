"""Loading a model and its tokenizer: an embedded alias (``embedded.py``), a local
directory, a local GGUF file, or a Hub id already in the Hugging Face cache."""

from __future__ import annotations

import difflib
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .bnb_base import load_options, prepare_loaded, saved_quantization
from .devices import check_quantized_base
from .embedded import DEFAULT_CAUSAL_LM, EMBEDDED_MODELS, embedded_gguf, embedded_model_dir
from .errors import ModelLoadError
from .gguf_source import load_gguf
from .packed_gguf import load_packed_gguf

KINDS = {"causal-lm": AutoModelForCausalLM, "classification": AutoModelForSequenceClassification}


def load_model(
    name_or_path: str = DEFAULT_CAUSAL_LM,
    kind: str = "causal-lm",
    num_labels: int | None = None,
    dtype: torch.dtype | str = torch.float32,
    quantized_base: str | None = None,
    device: torch.device | str = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model and its tokenizer, in eval mode, without reaching the Hub.

    ``name_or_path`` is an embedded alias (see ``EMBEDDED_MODELS``), a local model
    directory, a local ``.gguf`` file, or a Hub id already in the Hugging Face cache; an
    alias wins over a directory of the same name (write ``./name`` for the directory).
    ``kind`` is ``"causal-lm"`` or ``"classification"``; a classifier gets a new head
    with ``num_labels`` outputs. ``dtype`` is the weights' torch dtype, or ``"auto"`` for
    the one the checkpoint was saved in.

    ``quantized_base="gguf"`` keeps a GGUF file's quantized linear weights packed
    (``PackedLinear``, unpacked inside each forward and backward) instead of dequantizing
    the model: a GGUF path or an embedded model shipped as one. ``"nf4"``, ``"fp4"`` and
    ``"int8"`` quantize a float checkpoint with bitsandbytes as it loads, on ``device``
    (``bnb_base.py``); a checkpoint saved quantized by bitsandbytes loads as it was saved.

    The tokenizer always has a pad token (its eos token when it has none) and pads on the
    right, which is what training and classification want. For batched generation with a
    causal LM, set ``tokenizer.padding_side = "left"``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {sorted(KINDS)}")
    if kind == "classification" and num_labels is None:
        raise ValueError("kind='classification' needs num_labels, the number of classes")
    if kind != "classification" and num_labels is not None:
        raise ValueError(f"num_labels={num_labels} applies only to kind='classification'")
    options: dict = {"dtype": dtype}
    if num_labels is not None:
        options["num_labels"] = num_labels
    auto_class = KINDS[kind]

    path = Path(name_or_path).expanduser()
    check_quantized_base(quantized_base)
    if quantized_base == "gguf":
        model, tokenizer = _load_packed_gguf(auto_class, name_or_path, path, options)
    else:
        where = (kind, quantized_base, torch.device(device))
        model, tokenizer = _load_float(auto_class, name_or_path, path, options, where)
    prepare_loaded(model)  # a bitsandbytes base, asked for or saved as one
    _give_pad_token(tokenizer, model, name_or_path)
    return model.eval(), tokenizer


# -- loading ----------------------------------------------------------------------------------


def _load_packed_gguf(auto_class, name: str, path: Path, options: dict):
    converted = None
    if name in EMBEDDED_MODELS:
        if not EMBEDDED_MODELS[name].member.endswith(".gguf"):
            raise ModelLoadError(
                f"--quantized-base gguf keeps a GGUF file's packed weights; {name} was not "
                "shipped as a GGUF file"
            )
        converted = embedded_model_dir(name)
        path = embedded_gguf(name)
    elif path.suffix != ".gguf":
        raise ModelLoadError(
            f"--quantized-base gguf keeps a GGUF file's packed weights; {name} is not a .gguf file"
        )
    elif not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist")
    return load_packed_gguf(auto_class, path, options, converted)


def _load_float(auto_class, name: str, path: Path, options: dict, where: tuple):
    """A float checkpoint (an embedded model, a directory, a GGUF file dequantized, the
    Hub cache), quantized by bitsandbytes while it loads where ``asked``."""
    kind, asked, device = where
    if name in EMBEDDED_MODELS:
        if EMBEDDED_MODELS[name].kind == "classification" and kind == "causal-lm":
            raise ValueError(
                f"{name} is an encoder, not a language model; load it with kind='classification'"
            )
        directory = embedded_model_dir(name)
    elif path.is_dir():
        directory = path
    elif path.suffix == ".gguf":
        if asked is not None:
            raise ModelLoadError(
                f"--quantized-base {asked} quantizes a float checkpoint as it loads; {name} "
                "is a GGUF file, whose own packed weights --quantized-base gguf keeps"
            )
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist")
        return load_gguf(auto_class, path, options)
    else:
        saved = _cached_quantization(name)
        options = {**options, **load_options(asked, saved, device, name)}
        return _load_hub_cache(auto_class, name, options)
    options = {**options, **load_options(asked, saved_quantization(directory), device, name)}
    return _load_directory(auto_class, directory, options)


def _cached_quantization(name: str) -> dict | None:
    """The ``quantization_config`` of a model in the Hugging Face cache (None: none, or
    not there: ``_load_hub_cache`` says so)."""
    try:
        config = AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        return None
    saved = getattr(config, "quantization_config", None)
    return saved.to_dict() if hasattr(saved, "to_dict") else saved


def _load_directory(auto_class, directory: Path, options: dict):
    try:
        model = auto_class.from_pretrained(directory, local_files_only=True, **options)
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"could not load a model from directory {directory}: {error}"
        ) from error
    return model, tokenizer


def _load_hub_cache(auto_class, name: str, options: dict):
    try:
        AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as error:
        close = difflib.get_close_matches(name, EMBEDDED_MODELS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ModelLoadError(
            f"{name!r} is not an embedded model ({', '.join(sorted(EMBEDDED_MODELS))}), "
            "not a local directory or .gguf file, and not in the Hugging Face cache; "
            "loralab reads Hub models only from that cache, as with HF_HUB_OFFLINE=1, "
            "because this machine cannot be assumed to reach the Hub. Download it where "
            f"the Hub is reachable (`hf download {name}`) and pass the directory, or use "
            f"an embedded model.{hint}"
        ) from error
    try:
        model = auto_class.from_pretrained(name, local_files_only=True, **options)
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"could not load {name!r} from the Hugging Face cache: {error}"
        ) from error
    return model, tokenizer


def _give_pad_token(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, name: str) -> None:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(
                f"the tokenizer of {name} has neither a pad token nor an eos token to pad with"
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    # A sequence classifier finds each row's last token by the pad id, and refuses
    # batches larger than one without it.
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    generation = getattr(model, "generation_config", None)
    if generation is not None and generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id


# -- the embedded models' cache -------------------------------------------------------------
