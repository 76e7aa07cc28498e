"""The one training config: every field documented, defaults < --config file < command line.

Flag names and defaults follow DistilBERT's original ``train.py`` (they are public API); the
fields added here say so. A TrainConfig validates itself when built (``__post_init__``): everything
that needs no model is checked once, however the config was made.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from distill.errors import ArgumentParser, UserError


# The built-in losses, in the order they are logged (distill.losses.terms registers them; plug-ins
# add theirs after these).
LOSS_NAMES = ("ce", "mlm", "clm", "mse", "cos", "hidden_mse")


def _f(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    # -- run -------------------------------------------------------------------------------------
    dump_path: str = _f(None, "folder for the run's outputs (required)")
    force: bool = _f(False, "start over in a non-empty --dump_path, deleting what is there")
    data_file: str = _f(None, "dataset folder written by scripts/binarized_data.py (required)")
    config: str = _f(None, "YAML or JSON file of flag values; the command line overrides it")
    # -- models ----------------------------------------------------------------------------------
    student_type: str = _f(None, "student family: bert, distilbert, roberta, gpt2, llama or auto (required)")
    student_config: str = _f(None, "student config.json (optional with --student_pretrained_weights)")
    student_pretrained_weights: str = _f(None, "initial student: a folder written by scripts/extract.py")
    teacher_type: str = _f(None, "teacher family: bert, distilbert, roberta, gpt2, llama or auto (required)")
    teacher_name: str = _f(None, "teacher: a local model folder or a .gguf file (required without --teacher_cache); "
                                 "repeat it (a list in a config file) for several teachers, whose soft targets are "
                                 "combined (--teacher_weights, --teacher_combine); the first one's hidden states "
                                 "serve the hidden-state losses")
    teacher_weights: str = _f(None, "with several --teacher_name: their weights, comma-separated in the same order "
                                    "(a list in a config file), normalised to sum to 1 (default: equal; added here)")
    teacher_combine: str = _f("probs", "with several teachers: probs averages their softmax(logits / T) with the "
                                       "weights, logits averages their logits (added here)",
                              choices=["probs", "logits"])
    teacher_dtype: str = _f(None, "the dtype every teacher is loaded and kept in: fp32, bf16 or fp16 (default: bf16 on "
                                  "a GPU that supports it, else fp16 with --fp16; on the CPU bf16 with --bf16, "
                                  "else fp32; added here)", choices=["fp32", "bf16", "fp16"])
    teacher_cache: str = _f(None, "a teacher cache written by scripts/cache_teacher.py: the soft targets come from "
                                  "its top-k log-probabilities and the teacher is not loaded (causal LM; added here)")
    teacher_cache_k: int = _f(None, "refuse a --teacher_cache that does not hold this many tokens a position "
                                    "(added here)")
    # -- losses ----------------------------------------------------------------------------------
    temperature: float = _f(2.0, "softmax temperature of the soft-target loss")
    divergence: str = _f("kl", "the soft-target loss's divergence between teacher and student: kl (forward, as "
                               "DistilBERT), reverse_kl, jsd, tvd or skew_kl (added here)",
                         choices=["kl", "reverse_kl", "jsd", "tvd", "skew_kl"])
    divergence_beta: float = _f(0.5, "jsd's beta, in (0, 1): beta KL(teacher || m) + (1 - beta) KL(student || m), "
                                     "m = beta teacher + (1 - beta) student (added here)")
    divergence_alpha: float = _f(0.1, "skew_kl's alpha, in [0, 1): KL(teacher || alpha teacher + (1 - alpha) "
                                      "student) (added here)")
    alpha_ce: float = _f(0.5, "weight of the soft-target (KL) loss on logits")
    alpha_mlm: float = _f(0.0, "weight of the MLM loss (with --mlm)")
    alpha_clm: float = _f(0.5, "weight of the causal LM loss (without --mlm)")
    alpha_mse: float = _f(0.0, "weight of the MSE between student and teacher logits")
    alpha_cos: float = _f(0.0, "weight of the cosine loss between hidden states")
    alpha_hidden_mse: float = _f(0.0, "weight of the MSE between hidden states (added here)")
    layer_map: str = _f(None, "hidden-state pairs 'student:teacher,...': 0 is the embeddings, k the output of "
                              "layer k (default: evenly spaced; added here)")
    hidden_projection: str = _f("auto", "auto: a learned linear map when widths differ; none: refuse "
                                        "different widths (added here)", choices=["auto", "none"])
    plugins: str = _f(None, "Python files or modules that register loss terms (distill.losses.terms.register), "
                            "comma-separated or repeated; each term's weight is then --alpha_<name> (added here)")
    losses: dict = _f(None, "weights of plug-in loss terms by name (the config file's losses: section, which "
                            "takes the built-in ones too, or --alpha_<name>; added here)")
    restrict_ce_to_mask: bool = _f(False, "soft-target and logit MSE losses only on masked positions")
    loss_on: str = _f(None, "data with a completion mask (chat, prompt/completion): completion puts the CLM, "
                            "soft-target and logit losses on completion tokens only, all on every token "
                            "(default: completion when the data has a mask; added here)",
                      choices=["completion", "all"])
    # -- MLM -------------------------------------------------------------------------------------
    mlm: bool = _f(False, "masked LM objective (else causal LM)")
    mlm_mask_prop: float = _f(0.15, "share of tokens chosen for MLM")
    word_mask: float = _f(0.8, "share of chosen tokens replaced by the mask token")
    word_keep: float = _f(0.1, "share of chosen tokens kept")
    word_rand: float = _f(0.1, "share of chosen tokens replaced by a random token")
    mlm_smoothing: float = _f(0.7, "chosen with probability proportional to count ** -mlm_smoothing")
    token_counts: str = _f(None, "token counts .npy from scripts/token_counts.py (MLM; default: uniform)")
    # -- student initialisation ------------------------------------------------------------------
    freeze_pos_embs: bool = _f(False, "freeze the student's position embeddings")
    freeze_token_type_embds: bool = _f(False, "freeze the student's token type embeddings")
    initializer_range: float = _f(0.02, "std of the student's random initialisation (without pretrained weights)")
    # -- optimisation ----------------------------------------------------------------------------
    n_epoch: int = _f(3, "epochs")
    max_steps: int = _f(None, "stop after this many optimizer steps (added here)")
    batch_size: int = _f(5, "sequences per micro-batch (per process)")
    group_by_size: bool = _f(True, "batches of similar lengths (on by default; --no_group_by_size turns it off)")
    gradient_accumulation_steps: int = _f(50, "micro-batches per optimizer step")
    warmup_prop: float = _f(0.05, "share of the steps with a linear learning-rate warm-up")
    weight_decay: float = _f(0.0, "AdamW weight decay (not on biases and LayerNorm weights)")
    learning_rate: float = _f(5e-4, "peak learning rate")
    adam_epsilon: float = _f(1e-6, "AdamW epsilon")
    max_grad_norm: float = _f(5.0, "gradient clipping norm (0: no clipping)")
    max_model_input_size: int = _f(512, "longest input; longer sequences are cut into chunks (added here)")
    gradient_checkpointing: bool = _f(False, "recompute the student's layer activations in the backward pass "
                                             "instead of keeping them (the model's activation_checkpointing_enable); "
                                             "the same results up to float rounding, less memory, one more forward of "
                                             "the student's layers (added here)")
    max_bad_steps: int = _f(10, "stop after this many consecutive steps with a NaN/Inf loss (added here)")
    # -- precision and devices -------------------------------------------------------------------
    fp16: bool = _f(False, "fp16 autocast with a gradient scaler (GPU)")
    fp16_opt_level: str = _f("O1", "apex's level; accepted for compatibility, torch.amp is used instead")
    bf16: bool = _f(False, "bf16 autocast (CPU and GPU; added here)")
    n_gpu: int = _f(1, "GPUs to use (0: CPU)")
    fsdp: bool = _f(False, "under torchrun: shard the student (per transformer layer, then as a whole) and the "
                           "teachers over the processes with PyTorch FSDP2 (fully_shard) instead of replicating them "
                           "(added here)")
    local_rank: int = _f(-1, "set by the launcher; accepted for compatibility")
    seed: int = _f(56, "random seed of every generator the run draws from (initialisation, dropout, "
                       "masking, batch order)")
    deterministic: bool = _f(False, "deterministic GPU kernels (torch.use_deterministic_algorithms; slower); "
                                    "CPU runs are reproducible without it (added here)")
    # -- logging ---------------------------------------------------------------------------------
    log_interval: int = _f(500, "optimizer steps between logs")
    report_to: str = _f("tensorboard", "where the logged scalars go besides metrics.jsonl: tensorboard, wandb "
                                       "(offline unless WANDB_MODE says otherwise) or none; repeatable or "
                                       "comma-separated (added here)")
    checkpoint_interval: int = _f(4000, "optimizer steps between checkpoints")
    keep_checkpoints: int = _f(3, "checkpoints kept in --dump_path/checkpoints (added here)")
    resume: str = _f(None, "resume from the latest checkpoint in --dump_path, or from the checkpoint folder "
                           "given (added here)")
    num_workers: int = _f(0, "DataLoader worker processes (added here)")

    def __post_init__(self) -> None:
        self.validate()  # a config built in Python is checked as one parsed from the command line

    def validate(self) -> None:
        """Everything that can be checked before loading a model; one sentence per problem."""
        required = ["dump_path", "data_file", "student_type"]
        if self.teacher_cache is None:
            required += ["teacher_type", "teacher_name"]
        for name in required:
            if getattr(self, name) in (None, ""):
                alternative = " (or --teacher_cache)" if name.startswith("teacher") else ""
                raise UserError(f"--{name} is required{alternative}")
        self._validate_teachers()
        self._validate_cache()
        if self.student_config is None and self.student_pretrained_weights is None:
            raise UserError("give --student_config or --student_pretrained_weights")
        for f in fields(self):  # NaN passes every comparison below: refuse it (and infinities) first
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"--{f.name} must be a finite number, got {value}")
        for name in ("alpha_ce", "alpha_mlm", "alpha_clm", "alpha_mse", "alpha_cos", "alpha_hidden_mse"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name} must not be negative")
        self._validate_plugin_terms()
        if self.objective_alphas_sum() == 0:
            raise UserError("all loss weights are zero; set at least one of --alpha_ce, --alpha_mlm (with --mlm), "
                            "--alpha_clm, --alpha_mse, --alpha_cos")
        if self.temperature <= 0:
            raise UserError("--temperature must be positive")
        try:
            self.soft_divergence()
        except ValueError as e:
            raise UserError(str(e)) from None
        if self.mlm:
            if abs(self.word_mask + self.word_keep + self.word_rand - 1.0) > 1e-6:
                raise UserError("--word_mask + --word_keep + --word_rand must add up to 1")
            if not 0 < self.mlm_mask_prop <= 1:
                raise UserError("--mlm_mask_prop must be in (0, 1]")
            if self.mlm_smoothing < 0:
                raise UserError("--mlm_smoothing must not be negative")
        elif self.restrict_ce_to_mask:
            raise UserError("--restrict_ce_to_mask needs --mlm (there is no mask in causal LM)")
        if self.mlm and self.loss_on == "completion":
            raise UserError("--loss_on completion is for causal LM on chat or prompt/completion data, not --mlm")
        for name in ("n_epoch", "batch_size", "gradient_accumulation_steps", "log_interval", "checkpoint_interval",
                     "max_bad_steps", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError("--max_steps must be at least 1")
        if not 0 <= self.warmup_prop < 1:
            raise UserError("--warmup_prop must be in [0, 1)")
        if self.learning_rate <= 0:
            raise UserError("--learning_rate must be positive")
        if self.fp16 and self.bf16:
            raise UserError("choose one of --fp16 and --bf16")
        if self.max_model_input_size < 12:
            raise UserError("--max_model_input_size must be at least 12 (shorter examples are dropped)")
        for name in ("num_workers", "adam_epsilon", "initializer_range", "weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name} must not be negative")
        if not 0 <= self.seed < 2**32:
            raise UserError("--seed must be in [0, 2**32)")
        self.trackers()

    def trackers(self) -> list[str]:
        """The trackers of --report_to, checked (W&B is an optional extra: refused when not installed)."""
        import importlib.util

        from distill.trackers import parse_report_to

        names = parse_report_to(self.report_to)
        if "wandb" in names and importlib.util.find_spec("wandb") is None:
            raise UserError("--report_to wandb needs the wandb package, which is not installed: pip install "
                            "'distill[wandb]' (or pip install wandb)")
        return names

    def teacher_torch_dtype(self, cuda: bool):
        """The dtype the teachers are held in (``--teacher_dtype``, or its default for the device)."""
        import torch

        name = self.teacher_dtype
        if name is None:
            if cuda:
                name = "bf16" if torch.cuda.is_bf16_supported() else "fp16" if self.fp16 else "fp32"
            else:
                name = "bf16" if self.bf16 else "fp32"
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]

    def teacher_names(self) -> list[str]:
        """The --teacher_name teachers in their order ([] with a teacher cache and none given)."""
        if self.teacher_name is None:
            return []
        return [self.teacher_name] if isinstance(self.teacher_name, str) else list(self.teacher_name)

    def teacher_weight_list(self) -> tuple[float, ...]:
        """The teachers' weights, normalised to sum to 1 (equal by default)."""
        from distill.losses.ensemble import normalised_weights

        return normalised_weights(self._given_teacher_weights(), max(len(self.teacher_names()), 1))

    def _given_teacher_weights(self) -> list[float] | None:
        if self.teacher_weights is None:
            return None
        try:
            return [float(w) for w in str(self.teacher_weights).split(",")]
        except ValueError:
            raise UserError(f"--teacher_weights must be comma-separated numbers, got {self.teacher_weights!r}") \
                from None

    def _validate_teachers(self) -> None:
        names = self.teacher_names()
        if isinstance(self.teacher_name, (list, tuple)):
            if not names or any(not isinstance(n, str) or not n for n in names):
                raise UserError("--teacher_name must name a model folder or a .gguf file")
            if len(set(names)) < len(names):
                raise UserError(f"--teacher_name {next(n for n in names if names.count(n) > 1)} is given twice")
            self.teacher_name = names[0] if len(names) == 1 else names
        weights = self._given_teacher_weights()
        if weights is not None:
            if len(weights) != max(len(names), 1):
                raise UserError(f"--teacher_weights gives {len(weights)} weights for {len(names)} teacher(s); give one "
                                "per --teacher_name")
            if any(not (math.isfinite(w) and w > 0) for w in weights):
                raise UserError(f"--teacher_weights must be finite positive numbers, got {self.teacher_weights}")
        if len(names) > 1:
            if self.teacher_cache is not None:
                raise UserError("--teacher_cache holds one teacher's top-k: it cannot be combined with several "
                                "--teacher_name; train with the teachers themselves")
            if self.alpha_mse > 0 and self.teacher_combine == "probs":
                raise UserError("--alpha_mse compares logits, and --teacher_combine probs averages the teachers' "
                                "probabilities; use --teacher_combine logits with it")

    def _validate_cache(self) -> None:
        """What a teacher cache cannot give: MLM targets, hidden states, full logits."""
        if self.teacher_cache is None:
            if self.teacher_cache_k is not None:
                raise UserError("--teacher_cache_k needs --teacher_cache")
            return
        if self.mlm:
            raise UserError("--teacher_cache cannot be used with --mlm: a masked LM teacher's outputs depend on each "
                            "epoch's random masks, so they cannot be computed once (a cache is for causal LM)")
        for name in ("alpha_cos", "alpha_hidden_mse"):
            if getattr(self, name) > 0:
                raise UserError(f"--{name} needs the teacher's hidden states, which a teacher cache does not hold; set "
                                "it to 0, or give --teacher_name without --teacher_cache")
        if self.alpha_mse > 0:
            raise UserError("--alpha_mse needs the teacher's full logits, which a teacher cache does not hold (only "
                            "its top k); set it to 0, or give --teacher_name without --teacher_cache")
        if self.teacher_cache_k is not None and self.teacher_cache_k < 1:
            raise UserError("--teacher_cache_k must be at least 1")

    def _validate_plugin_terms(self) -> None:
        from distill.losses.terms import TERMS, check_weight, load_plugins

        if self.plugins:
            load_plugins(plugin_list(self.plugins))
        for name, weight in (self.losses or {}).items():
            if name in LOSS_NAMES:
                raise UserError(f"the built-in loss {name} is weighted by --alpha_{name}, not in losses")
            if name not in TERMS:
                known = ", ".join(k for k in TERMS if k not in LOSS_NAMES) or "none"
                raise UserError(f"unknown loss term {name!r} (plug-in terms registered: {known}; load yours with "
                                "--plugins)")
            check_weight(name, weight)

    def loss_weights(self, mlm: bool | None = None) -> dict[str, float]:
        """The weight of each loss: the built-ins in LOSS_NAMES order, then the plug-in terms. The LM
        loss is MLM with ``--mlm`` and CLM without (the other's alpha does not apply); ``mlm``
        overrides the flag. A plug-in term restricted to one objective weighs 0 under the other."""
        from distill.losses.terms import TERMS

        mlm = self.mlm if mlm is None else mlm
        weights = {"ce": self.alpha_ce, "mlm": self.alpha_mlm if mlm else 0.0, "clm": 0.0 if mlm else self.alpha_clm,
                   "mse": self.alpha_mse, "cos": self.alpha_cos, "hidden_mse": self.alpha_hidden_mse}
        for name, weight in (self.losses or {}).items():
            objective = TERMS[name].objective
            weights[name] = float(weight) if objective is None or objective == ("mlm" if mlm else "clm") else 0.0
        return weights

    def soft_divergence(self):
        """The soft-target loss's :class:`~distill.losses.divergences.Divergence`, checked."""
        from distill.losses.divergences import Divergence

        return Divergence(self.divergence, self.divergence_beta, self.divergence_alpha).check()

    def objective_alphas_sum(self) -> float:
        return sum(self.loss_weights().values())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------
# Parsing: defaults < file < command line


def plugin_list(value: str | list | None) -> list[str]:
    if not value:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    return [s.strip() for item in items for s in str(item).split(",") if s.strip()]


def build_parser(plugin_terms: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """train.py's flags: one per TrainConfig field, and ``--alpha_<name>`` for each plug-in term."""
    p = ArgumentParser(
        prog="train.py",
        description="Distil a teacher language model into a student (flags follow DistilBERT's train.py).",
        argument_default=argparse.SUPPRESS,  # only what was typed reaches the namespace
    )
    for f in fields(TrainConfig):
        flag = f"--{f.name}"
        help_ = f.metadata["help"]
        if f.type == "bool" or isinstance(f.default, bool):
            if f.name == "group_by_size":
                p.add_argument(flag, action="store_true", help=help_)
                p.add_argument("--no_group_by_size", dest="group_by_size", action="store_false",
                               help="batches of random lengths")
            else:
                p.add_argument(flag, action="store_true", help=help_)
            continue
        if f.name == "resume":
            p.add_argument(flag, nargs="?", const="latest", metavar="CHECKPOINT", help=help_)
            continue
        if f.name in ("report_to", "plugins", "teacher_name"):
            p.add_argument(flag, action="append", metavar=f.name.upper(), help=f"{help_} (default: {f.default})")
            continue
        if f.name == "losses":  # the config file's section, and the plug-in terms' own flags below
            continue
        kind = {"int": int, "float": float}.get(str(f.type).replace(" | None", ""), str)
        # torch.distributed.launch passes --local-rank (hyphen) to the script
        aliases = ["--local-rank"] if f.name == "local_rank" else []
        p.add_argument(flag, *aliases, type=kind, metavar=f.name.upper(), help=f"{help_} (default: {f.default})",
                       choices=f.metadata.get("choices"))
    from distill.losses.terms import TERMS

    for name in plugin_terms:
        p.add_argument(f"--alpha_{name}", dest=f"losses.{name}", type=float, metavar="ALPHA_" + name.upper(),
                       help=f"weight of the plug-in loss term {name}: {TERMS[name].help} (default: 0)")
    return p


def _read_config_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {p} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # yaml and json raise their own error types
        raise UserError(f"could not parse config file {p}: {type(e).__name__}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {p} must hold a mapping of flag names to values")
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(f"config file {p} has unknown keys: {', '.join(unknown)}")
    return data


def _coerce(key: str, kind: str, v: Any) -> Any:
    if v is None:
        return None
    if key in ("report_to", "plugins", "teacher_weights") and isinstance(v, (list, tuple)):  # repeated, or a list
        return ",".join(str(x) for x in v)
    if key == "teacher_name" and isinstance(v, (list, tuple)):  # repeated, or a list: several teachers
        if not all(isinstance(x, str) for x in v):
            raise UserError("config key teacher_name must be a string or a list of strings")
        return v[0] if len(v) == 1 else list(v)
    if key == "losses":
        if not isinstance(v, dict):
            raise UserError("config key losses must be a mapping of loss term names to weights")
        return {name: _coerce(f"losses.{name}", "float", w) for name, w in v.items()}
    if kind == "bool":
        if not isinstance(v, bool):
            raise UserError(f"config key {key} must be true or false")
        return v
    if kind == "int":
        if isinstance(v, bool) or not isinstance(v, int):
            raise UserError(f"config key {key} must be an integer")
        return v
    if kind == "float":
        if isinstance(v, bool):
            raise UserError(f"config key {key} must be a number")
        try:
            return float(v)  # YAML reads 5e-4 as a string
        except (TypeError, ValueError):
            raise UserError(f"config key {key} must be a number") from None
    if not isinstance(v, str):
        raise UserError(f"config key {key} must be a string")
    return v


def _plugins_first(argv) -> None:
    """Load the plug-ins of the command line and of its --config file before the full parser is
    built (their terms' --alpha_<name> flags are part of it)."""
    from distill.losses.terms import load_plugins

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--plugins", action="append", default=[])
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    specs = plugin_list(known.plugins)
    if known.config is not None and Path(known.config).is_file():
        specs = plugin_list(_read_config_file(known.config).get("plugins")) + specs
    load_plugins(specs)


def parse_config(argv=None) -> tuple[TrainConfig, set[str]]:
    """Return the resolved config and the names the user set (in the file or on the command line)."""
    from distill.losses.terms import TERMS

    _plugins_first(argv)
    plugin_terms = tuple(name for name in TERMS if name not in LOSS_NAMES)
    ns = vars(build_parser(plugin_terms).parse_args(argv))
    flag_losses = {k.split(".", 1)[1]: ns.pop(k) for k in list(ns) if k.startswith("losses.")}
    values: dict[str, Any] = {}
    if "config" in ns:
        values.update(_read_config_file(ns["config"]))
    file_losses = values.pop("losses", None) or {}
    if not isinstance(file_losses, dict):
        raise UserError("config key losses must be a mapping of loss term names to weights")
    for name, weight in file_losses.items():  # built-in weights in the section are their alpha fields
        if name in LOSS_NAMES:
            values[f"alpha_{name}"] = weight
    values.update(ns)
    losses = {**{k: v for k, v in file_losses.items() if k not in LOSS_NAMES}, **flag_losses}
    if losses:
        values["losses"] = losses
    types = {f.name: str(f.type).replace(" | None", "") for f in fields(TrainConfig)}
    for k, v in list(values.items()):  # file values get the same types as flags
        values[k] = _coerce(k, types[k], v)
    cfg = TrainConfig(**values)
    return cfg, set(values)
