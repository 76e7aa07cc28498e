"""Load a model folder as a sequence classifier for a GLUE task, with the tokenizer next to it.

Any folder works: a bare encoder (``BertModel``, e.g. all-MiniLM-L6-v2), a masked-LM student
written by ``train.py``, or a folder fine-tuned by ``run_glue``. transformers keeps the encoder
and initialises the head it lacks; :class:`Classifier` records which weights were new, so the
caller can say so in one line.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from distill.errors import UserError
from distill.hf import VOCAB_FILES, has_tokenizer, quiet_transformers
from distill.glue.tasks import Task

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
ARGS_FILE = "glue_args.json"  # written by run_glue next to a fine-tuned model


@dataclass
class Classifier:
    """A loaded classifier and what loading it revealed."""

    model: nn.Module
    folder: Path
    new_weights: list[str] = field(default_factory=list)  # not in the checkpoint: initialised randomly
    resized_weights: list[str] = field(default_factory=list)  # in it with another shape: re-initialised
    unused_weights: list[str] = field(default_factory=list)  # in it, but not used (e.g. an MLM head)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def takes_token_types(self) -> bool:
        return takes_token_types(self.model)

    def loading_report(self, who: str = "model") -> str | None:
        """One line naming the weights that did not come from the checkpoint, or None."""
        if not (self.new_weights or self.resized_weights):
            return None
        parts = []
        if self.new_weights:
            parts.append(f"newly initialised: {_names(self.new_weights)}")
        if self.resized_weights:
            parts.append(f"re-initialised for a different number of labels: {_names(self.resized_weights)}")
        if self.unused_weights:
            parts.append(f"unused from the checkpoint: {_names(self.unused_weights)}")
        return f"{who} {self.folder}: " + "; ".join(parts)


def _names(keys: list[str], limit: int = 6) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown if len(keys) <= limit else f"{shown} and {len(keys) - limit} more"


def takes_token_types(model: nn.Module) -> bool:
    """Whether the model's forward accepts ``token_type_ids`` (BERT does, DistilBERT does not)."""
    return "token_type_ids" in inspect.signature(model.forward).parameters


def set_padding(clf: Classifier, tok) -> int:
    """The id batches are padded with; recorded in the model's config when it has none there
    (decoder classifiers such as GPT-2's find each sequence's last token by it)."""
    pad_id = next((i for i in (tok.pad_token_id, tok.eos_token_id) if i is not None), 0)
    if getattr(clf.model.config, "pad_token_id", None) is None:
        clf.model.config.pad_token_id = pad_id
    return pad_id


def check_model_folder(path: str | Path, flag: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.exists():
        raise UserError(f"{flag} {folder} does not exist")
    if not folder.is_dir():
        raise UserError(f"{flag} {folder} is not a folder (give a model folder with config.json and weights)")
    if not (folder / "config.json").is_file():
        raise UserError(f"{flag} {folder} has no config.json")
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise UserError(f"{flag} {folder} has no model weights (model.safetensors or pytorch_model.bin)")
    return folder


def load_tokenizer(folder: str | Path, flag: str = "--model_name_or_path"):
    """The tokenizer saved in ``folder``; a UserError if it has none."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    # AutoTokenizer does not fail on a folder without tokenizer files: it returns a tiny default.
    if not has_tokenizer(folder):
        raise UserError(f"{flag} {folder} has no tokenizer files ({', '.join(VOCAB_FILES[:3])}); save the "
                        "tokenizer next to the model")
    try:
        with quiet_transformers(progress_bars=True):
            return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # transformers raises many kinds for a broken tokenizer folder
        raise UserError(f"cannot load the tokenizer in {folder}: {_first_line(e)}") from None


def read_glue_args(folder: str | Path) -> dict | None:
    """The arguments run_glue saved with a fine-tuned model, or None for any other folder."""
    path = Path(folder) / ARGS_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def load_classifier(folder: str | Path, task: Task, *, flag: str = "--model_name_or_path",
                    dtype=None) -> Classifier:
    """``folder`` as a sequence classifier with ``task``'s labels (a new head where it has none)."""
    from transformers import AutoModelForSequenceClassification

    folder = check_model_folder(folder, flag)
    id2label = {i: lab for i, lab in enumerate(task.labels)} if task.labels else {0: "score"}
    kwargs = {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()},
              "problem_type": "regression" if task.is_regression else "single_label_classification",
              # a head trained for another label count is replaced, and reported, instead of failing
              "ignore_mismatched_sizes": True}
    return _load(AutoModelForSequenceClassification, folder, flag, dtype, kwargs)


def load_teacher(folder: str | Path, task: Task, *, dtype=None) -> Classifier:
    """A teacher already fine-tuned on ``task``: refuses one without a trained head of the right size."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    flag = "--teacher_name_or_path"
    folder = check_model_folder(folder, flag)
    saved = read_glue_args(folder)
    if saved is not None and saved.get("task_name") not in (None, task.name):
        raise UserError(f"the teacher {folder} was fine-tuned on {saved['task_name']}, not {task.name}")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if config.num_labels != task.num_labels:
        raise UserError(f"the teacher {folder} has {config.num_labels} output(s) but {task.name} needs "
                        f"{task.num_labels}; give a teacher fine-tuned on {task.name}")
    loaded = _load(AutoModelForSequenceClassification, folder, flag, dtype, {})
    if loaded.new_weights:
        raise UserError(f"the teacher {folder} has no trained classification head ({_names(loaded.new_weights)} "
                        f"would be random); fine-tune it on {task.name} first with --do_train")
    return loaded


def _load(auto_cls, folder: Path, flag: str, dtype, kwargs: dict) -> Classifier:
    kwargs = {"local_files_only": True, "output_loading_info": True, **kwargs}
    if dtype is not None:
        kwargs["dtype"] = dtype
    # transformers prints a table of new weights and a progress bar; we say it in one line instead.
    try:
        with quiet_transformers():
            model, info = auto_cls.from_pretrained(folder, **kwargs)
    except (RuntimeError, ValueError, OSError, KeyError) as e:  # unknown architecture, bad weights
        raise UserError(f"cannot load {flag} {folder} as a sequence classifier: {_first_line(e)}") from None
    return Classifier(
        model=model,
        folder=folder,
        new_weights=sorted(info.get("missing_keys", ())),
        resized_weights=sorted(k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", ())),
        unused_weights=sorted(info.get("unexpected_keys", ())),
    )


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
