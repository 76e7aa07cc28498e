"""The one config of a GLUE run, field by field; the command line is built from it.

Flag names follow the original ``run_glue.py`` (``--task_name``, ``--per_device_train_batch_size``,
...) and DistilBERT's (``--warmup_prop``, ``--alpha_ce``, ``--temperature``).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from distill.errors import ArgumentParser, UserError
from distill.glue.tasks import TASKS, get_task


def _f(default: Any = MISSING, help: str = "", **meta) -> Any:
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class GlueConfig:
    task_name: str = _f(help=f"the GLUE task: {', '.join(TASKS)}")
    data_dir: str = _f(help="folder holding the task's TSV files (train.tsv, dev.tsv; MNLI: dev_matched.tsv, "
                            "dev_mismatched.tsv); feature caches are written here")
    model_name_or_path: str = _f(help="model folder: a bare encoder, a student written by train.py, or a folder "
                                      "fine-tuned by this command; its tokenizer must be saved in it")
    output_dir: str = _f(help="where the fine-tuned model, its tokenizer, the arguments and the results go")
    do_train: bool = _f(False, "fine-tune on train.tsv")
    do_eval: bool = _f(False, "evaluate on the dev file(s)")
    overwrite_output_dir: bool = _f(False, "replace a non-empty --output_dir (training), or write the results "
                                           "into it (evaluation only; nothing else in it is touched)")
    overwrite_cache: bool = _f(False, "tokenise again even when a cached copy exists")
    max_seq_length: int = _f(128, "longest input in tokens after tokenisation; longer pairs are truncated")
    per_device_train_batch_size: int = _f(32, "training batch size")
    per_device_eval_batch_size: int = _f(64, "evaluation batch size")
    learning_rate: float = _f(5e-5, "peak learning rate of AdamW")
    weight_decay: float = _f(0.0, "AdamW weight decay (not applied to biases and LayerNorm weights)")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 turns clipping off)")
    num_train_epochs: float = _f(3.0, "passes over train.tsv (fractions allowed)")
    max_steps: int = _f(-1, "if > 0: train for exactly this many optimizer steps instead of --num_train_epochs")
    warmup_prop: float = _f(0.1, "fraction of the steps over which the learning rate rises linearly from 0; "
                                 "it then decays linearly to 0")
    seed: int = _f(42, "seed of the new head's initialisation, dropout and the shuffling")
    deterministic: bool = _f(False, "deterministic GPU kernels (torch.use_deterministic_algorithms; slower)")
    bf16: bool = _f(False, "bf16 autocast (CPU or GPU)")
    no_cuda: bool = _f(False, "stay on the CPU even when a GPU is available")
    logging_steps: int = _f(50, "log the training loss every this many steps")
    disable_tqdm: bool = _f(False, "no progress bars")
    teacher_name_or_path: str | None = _f(None, "a teacher already fine-tuned on the task (a run_glue output "
                                                "folder): adds the soft-target loss on the task's outputs")
    temperature: float = _f(2.0, "softmax temperature of the soft-target loss")
    alpha_ce: float = _f(0.5, "weight of the soft-target loss (with --teacher_name_or_path)")
    alpha_task: float = _f(0.5, "weight of the task's own loss (with --teacher_name_or_path; 1 without one)")

    ACTIONS = ("do_train", "do_eval")  # at least one must be asked for (a class constant, not a field)

    def validate(self) -> None:
        """Refuse impossible values with one sentence; canonicalise the task name."""
        self.task_name = get_task(self.task_name).name
        if not any(getattr(self, a) for a in self.ACTIONS):
            raise UserError("nothing to do: pass " + " and/or ".join(f"--{a}" for a in self.ACTIONS))
        for f in fields(self):  # NaN passes every comparison below: refuse it (and infinities) first
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"--{f.name} must be a finite number, got {value}")
        for name in ("max_seq_length", "per_device_train_batch_size", "per_device_eval_batch_size",
                     "logging_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.max_seq_length < 4:
            raise UserError(f"--max_seq_length {self.max_seq_length} leaves no room for text")
        if not self.learning_rate > 0:
            raise UserError(f"--learning_rate must be positive, got {self.learning_rate}")
        if self.max_steps <= 0 and not self.num_train_epochs > 0:
            raise UserError(f"--num_train_epochs must be positive, got {self.num_train_epochs}")
        if not 0 <= self.warmup_prop < 1:
            raise UserError(f"--warmup_prop must be in [0, 1), got {self.warmup_prop}")
        for name in ("weight_decay", "max_grad_norm", "alpha_ce", "alpha_task"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name} must not be negative, got {getattr(self, name)}")
        if not self.adam_epsilon > 0:
            raise UserError(f"--adam_epsilon must be positive, got {self.adam_epsilon}")
        if self.teacher_name_or_path is not None:
            if not self.temperature > 0:
                raise UserError(f"--temperature must be positive, got {self.temperature}")
            if self.alpha_ce + self.alpha_task <= 0:
                raise UserError("--alpha_ce and --alpha_task are both 0: the student would learn nothing")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "GlueConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise UserError(f"unknown GLUE setting(s): {', '.join(unknown)}")
        missing = [f.name for f in fields(cls) if f.default is MISSING and values.get(f.name) is None]
        if missing:
            raise UserError(f"GLUE setting(s) required: {', '.join(missing)}")
        return cls(**values)


def build_parser(prog: str = "run_glue.py", config_cls: type = GlueConfig,
                 description: str = "Fine-tune and/or evaluate a model on a GLUE task, optionally distilling from a "
                                    "fine-tuned teacher.") -> argparse.ArgumentParser:
    """One flag per field of ``config_cls`` (a GlueConfig or a subclass), with its help and default."""
    p = ArgumentParser(prog=prog, description=description)
    for f in fields(config_cls):
        flag, help_ = f"--{f.name}", f.metadata["help"]
        if isinstance(f.default, bool):
            p.add_argument(flag, action="store_true", help=help_)
            continue
        kind = {"int": int, "float": float}.get(str(f.type).replace(" | None", ""), str)
        required = f.default is MISSING
        p.add_argument(flag, type=kind, required=required, metavar=f.name.upper(),
                       default=None if required else f.default,
                       help=help_ if required else f"{help_} (default: {f.default})")
    return p


def parse_config(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None,
                 config_cls: type = GlueConfig) -> GlueConfig:
    """The validated config from a command line (``sys.argv[1:]`` when None)."""
    args = (parser or build_parser()).parse_args(argv)
    cfg = config_cls(**vars(args))
    cfg.validate()
    return cfg
