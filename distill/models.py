"""Model registry and loading: which Hugging Face classes a model type uses, and how to load them.

Everything here is local: checkpoints are read from folders (or ``.gguf`` files) on disk and
``local_files_only=True`` is always passed, so a typo never turns into a hub download.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    BertConfig,
    BertForMaskedLM,
    DistilBertConfig,
    DistilBertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    RobertaConfig,
    RobertaForMaskedLM,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from distill.errors import UserError

MLM = "mlm"
CLM = "clm"


@dataclass(frozen=True)
class ModelType:
    """One model family: its config class, its language-modelling class and its objective.

    ``model_cls`` and ``objective`` are None only for ``auto``, where both are read from the config.
    """

    name: str
    config_cls: type
    model_cls: type | None
    objective: str | None


# Adding a family is one line here.
MODEL_TYPES: dict[str, ModelType] = {
    t.name: t
    for t in (
        ModelType("bert", BertConfig, BertForMaskedLM, MLM),
        ModelType("distilbert", DistilBertConfig, DistilBertForMaskedLM, MLM),
        ModelType("roberta", RobertaConfig, RobertaForMaskedLM, MLM),
        ModelType("gpt2", GPT2Config, GPT2LMHeadModel, CLM),
        ModelType("llama", LlamaConfig, LlamaForCausalLM, CLM),
        ModelType("auto", AutoConfig, None, None),
    )
}

_CAUSAL_ARCHS = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
_MASKED_ARCHS = set(MODEL_FOR_MASKED_LM_MAPPING_NAMES.values())
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


@dataclass
class LoadedModel:
    """A loaded language model and what loading it revealed about the checkpoint."""

    model: PreTrainedModel
    objective: str
    missing_keys: list[str] = field(default_factory=list)
    # True when the LM head was not in the checkpoint, so transformers initialised it randomly.
    lm_head_initialized: bool = False
    folder: Path | None = None
    gguf_file: str | None = None


# ---------------------------------------------------------------------------------------------
# Registry look-ups


def get_model_type(name: str) -> ModelType:
    """The registry entry for ``name``; a UserError listing the known types otherwise."""
    try:
        return MODEL_TYPES[name]
    except KeyError:
        known = ", ".join(MODEL_TYPES)
        raise UserError(f"unknown model type {name!r}; expected one of: {known}") from None


def _auto_objective(config: PreTrainedConfig) -> str:
    """Causal if the config describes a decoder or a causal-LM architecture, masked otherwise."""
    if getattr(config, "is_decoder", False):
        return CLM
    archs = config.architectures or []
    if any(a in _CAUSAL_ARCHS or a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return CLM
    if any(a in _MASKED_ARCHS or a.endswith("ForMaskedLM") for a in archs):
        return MLM
    # A bare encoder checkpoint (e.g. architectures=["BertModel"]): decide by family.
    # Masked first, because encoders such as bert also appear in the causal mapping.
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return MLM
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return CLM
    raise UserError(f"model type {config.model_type!r} has no masked or causal language-model class in transformers")


def resolve_model_class(model_type: str | ModelType, config: PreTrainedConfig) -> tuple[type, str]:
    """The LM class and objective for ``model_type``, reading them from ``config`` for ``auto``."""
    mtype = get_model_type(model_type) if isinstance(model_type, str) else model_type
    if mtype.model_cls is not None:
        return mtype.model_cls, mtype.objective
    objective = _auto_objective(config)
    auto_cls = AutoModelForCausalLM if objective == CLM else AutoModelForMaskedLM
    mapping = auto_cls._model_mapping
    if type(config) not in mapping:
        raise UserError(f"transformers has no {objective} model class for model type {config.model_type!r}")
    return mapping[type(config)], objective


def model_objective(model: nn.Module) -> str:
    """``"mlm"`` or ``"clm"`` for a loaded model, from its class."""
    for mtype in MODEL_TYPES.values():
        if mtype.model_cls is not None and type(model) is mtype.model_cls:
            return mtype.objective
    name = type(model).__name__
    if name in _CAUSAL_ARCHS or name.endswith(("ForCausalLM", "LMHeadModel")):
        return CLM
    if name in _MASKED_ARCHS or name.endswith("ForMaskedLM"):
        return MLM
    raise ValueError(f"{name} is neither a masked nor a causal language model")


# ---------------------------------------------------------------------------------------------
# Config helpers: families name the same quantity differently.


def _first_attr(config: Any, names: tuple[str, ...]) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


_LAYER_ATTRS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")


def num_layers(config: Any) -> int:
    """Number of transformer blocks (num_hidden_layers / n_layer / n_layers)."""
    value = _first_attr(config, _LAYER_ATTRS)
    if value is None:
        raise ValueError(f"{type(config).__name__} has no layer-count attribute")
    return int(value)


def set_num_layers(config: Any, n: int) -> None:
    """Set the layer count under every name the config actually has."""
    # Configs alias num_hidden_layers through attribute_map (GPT-2: n_layer, DistilBERT: n_layers),
    # so setting each present name keeps them consistent either way.
    found = False
    for name in _LAYER_ATTRS:
        if getattr(config, name, None) is not None:
            setattr(config, name, n)
            found = True
    if not found:
        raise ValueError(f"{type(config).__name__} has no layer-count attribute")


def hidden_size(config: Any) -> int:
    """Width of the hidden states (hidden_size / n_embd / dim / d_model)."""
    value = _first_attr(config, ("hidden_size", "n_embd", "dim", "d_model"))
    if value is None:
        raise ValueError(f"{type(config).__name__} has no hidden-size attribute")
    return int(value)


def max_positions(config: Any) -> int | None:
    """Longest sequence the model accepts (max_position_embeddings / n_positions / n_ctx), if known."""
    value = _first_attr(config, ("max_position_embeddings", "n_positions", "n_ctx"))
    return None if value is None else int(value)


def _embedding_named(model: nn.Module, suffixes: tuple[str, ...]) -> nn.Embedding | None:
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name.split(".")[-1] in suffixes:
            return module
    return None


def has_position_embeddings(model: nn.Module) -> bool:
    """Whether the model has a learned (or fixed) absolute position-embedding table (not rotary)."""
    return _embedding_named(model, ("position_embeddings", "wpe", "embed_positions")) is not None


def has_token_type_embeddings(model: nn.Module) -> bool:
    """Whether the model takes ``token_type_ids`` (BERT, RoBERTa)."""
    return _embedding_named(model, ("token_type_embeddings",)) is not None


# ---------------------------------------------------------------------------------------------
# Loading and building


def _resolve_checkpoint(name_or_path: str | Path, gguf_file: str | None) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) for a folder, a ``.gguf`` file, or a folder plus gguf_file."""
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise UserError(f"model path {str(path)!r} does not exist")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(f"model path {str(path)!r} is a file; give a model folder or a .gguf file")
        return path.parent, path.name
    if gguf_file is not None:
        if not (path / gguf_file).is_file():
            raise UserError(f"GGUF file {gguf_file!r} is not in {str(path)!r}")
        return path, gguf_file
    if not (path / "config.json").is_file():
        raise UserError(f"model folder {str(path)!r} has no config.json")
    if not any((path / f).is_file() for f in _WEIGHT_FILES):
        raise UserError(f"model folder {str(path)!r} has no model weights (model.safetensors or pytorch_model.bin)")
    return path, None


def _read_config(mtype: ModelType, folder: Path) -> PreTrainedConfig:
    """The folder's config, refusing one of a different family than the type asked for."""
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if mtype.name != "auto" and config.model_type != mtype.name:
        raise UserError(
            f"{str(folder)!r} holds a {config.model_type!r} model, not {mtype.name!r}; "
            f"use --model_type {config.model_type if config.model_type in MODEL_TYPES else 'auto'}"
        )
    return config


def _require_gguf_support() -> None:
    # transformers needs both packages to read GGUF; say so in one line instead of a traceback.
    missing = [p for p in ("gguf", "accelerate") if importlib.util.find_spec(p) is None]
    if missing:
        raise UserError(f"loading a .gguf file needs the {' and '.join(missing)} package(s): pip install {' '.join(missing)}")


def _head_keys(model: PreTrainedModel, keys: set[str]) -> list[str]:
    """Keys outside the base model (``bert.``, ``transformer.``, ``model.`` …), i.e. the LM head."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    if not prefix or not hasattr(model, prefix):
        return sorted(keys)  # the model is its own base: nothing to tell apart
    return sorted(k for k in keys if not k.startswith(prefix + "."))


def load_model(
    model_type: str,
    name_or_path: str | Path,
    *,
    gguf_file: str | None = None,
    torch_dtype: torch.dtype | str | None = None,
) -> LoadedModel:
    """Load a language model of ``model_type`` from a local folder or ``.gguf`` file.

    ``lm_head_initialized`` is True when the checkpoint lacked the LM head (e.g. a ``BertModel``
    checkpoint loaded as ``BertForMaskedLM``): transformers reports those weights as missing.
    The decoder weight is tied to the word embeddings and so never shows up as missing; the head's
    bias and transform weights do.
    """
    mtype = get_model_type(model_type)
    folder, gguf_name = _resolve_checkpoint(name_or_path, gguf_file)
    kwargs: dict[str, Any] = {"local_files_only": True, "output_loading_info": True}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype  # transformers 5 renamed torch_dtype to dtype

    if gguf_name is not None:
        if mtype.objective == MLM:
            raise UserError(f"GGUF files hold causal language models; {mtype.name!r} is a masked LM type")
        _require_gguf_support()
        # transformers dequantises the GGUF tensors into a regular PyTorch model.
        model, info = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_name, **kwargs)
        objective = CLM
        if mtype.name != "auto" and model.config.model_type != mtype.name:
            raise UserError(f"{gguf_name!r} holds a {model.config.model_type!r} model, not {mtype.name!r}; use --model_type auto")
    else:
        config = _read_config(mtype, folder)
        model_cls, objective = resolve_model_class(mtype, config)
        try:
            model, info = model_cls.from_pretrained(folder, config=config, **kwargs)
        except RuntimeError as e:  # transformers raises this for weights whose shapes disagree with config.json
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot load the weights in {str(folder)!r}: {first_line}") from None

    missing = set(info.get("missing_keys", ()))
    return LoadedModel(
        model=model,
        objective=objective,
        missing_keys=sorted(missing),
        lm_head_initialized=bool(_head_keys(model, missing)),
        folder=folder,
        gguf_file=gguf_name,
    )


def _config_from(mtype: ModelType, source: str | Path | dict[str, Any]) -> PreTrainedConfig:
    """A config object from a dict, a config.json file, or a folder holding one."""
    if isinstance(source, dict):
        values = dict(source)
    else:
        path = Path(source)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise UserError(f"config file {str(path)!r} does not exist")
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"config file {str(path)!r} is not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(values, dict):
            raise UserError(f"config file {str(path)!r} must hold a JSON object")
    family = values.pop("model_type", None)
    if mtype.name == "auto":
        if family is None:
            raise UserError("an auto config needs a 'model_type' entry")
        return AutoConfig.for_model(family, **values)
    if family is not None and family != mtype.name:
        raise UserError(f"the config is for a {family!r} model, not {mtype.name!r}")
    return mtype.config_cls(**values)


def build_model(
    model_type: str,
    config_path_or_dict: str | Path | dict[str, Any],
    vocab_size: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> PreTrainedModel:
    """A randomly initialised LM of ``model_type`` from a config (json file, folder or dict),
    with ``overrides`` applied to the config values before the weights are initialised."""
    mtype = get_model_type(model_type)
    if overrides:
        if not isinstance(config_path_or_dict, dict):
            config_path_or_dict = _config_from(mtype, config_path_or_dict).to_dict()
        config_path_or_dict = {**config_path_or_dict, **overrides}
    config = _config_from(mtype, config_path_or_dict)
    if vocab_size is not None:
        config.vocab_size = vocab_size
    model_cls, _ = resolve_model_class(mtype, config)
    return model_cls(config)
