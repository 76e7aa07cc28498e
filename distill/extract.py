"""Initialise a smaller student from a teacher's layers (DistilBERT-style layer selection).

Two kinds of extraction:

* BERT -> DistilBERT: embeddings, the selected encoder layers and the MLM head are renamed
  into DistilBERT's layout.
* same family (bert, roberta, gpt2, llama, ... anything with a ``layer``/``layers``/``h``
  ModuleList): every non-layer weight is copied and the selected layers are renumbered 0..K-1.

The result is written to a temporary folder next to the destination, loaded back and checked
weight by weight, and only then renamed into place. ``distill/cli/extract.py`` (``scripts/extract.py``)
is the command line.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer, DistilBertConfig, DistilBertForMaskedLM

from distill.errors import UserError
from distill.fileio import publish_folder, temp_name
from distill.hf import has_tokenizer, quiet_transformers
from distill.seeding import seed_everything
from distill.models import (
    MLM,
    LoadedModel,
    get_model_type,
    load_model,
    num_layers,
    set_num_layers,
)

StateDict = dict[str, torch.Tensor]

_LAYER_LIST_NAMES = ("layer", "layers", "h", "block", "blocks")
@dataclass
class Student:
    """A student model and what each of its weights should equal."""

    model: nn.Module
    objective: str
    expected: StateDict  # student key -> tensor taken from the teacher
    random_keys: set[str] = field(default_factory=set)  # left randomly initialised on purpose
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Layer selection


def default_layers(n_teacher: int, n_student: int | None = None) -> list[int]:
    """``n_student`` evenly spaced teacher layers, always keeping the first and the last.

    Index i of the student takes teacher layer i * (n_teacher - 1) / (n_student - 1), rounded
    with ties going down. For 12 -> 6 the exact positions are 0, 2.2, 4.4, 6.6, 8.8, 11, which
    round to DistilBERT's 0,2,4,7,9,11. Keeping the last layer matters because the LM head (and
    any hidden-state loss on the last layer) expects its output. Consequences: 6 -> 3 gives
    0,2,5 (the tie 2.5 goes down), 4 -> 2 gives 0,3. No endpoint-keeping rule can give 0,2,4
    for 6 -> 3: that selection drops the last layer. ``n_student`` defaults to ceil(n_teacher/2).
    """
    if n_student is None:
        n_student = (n_teacher + 1) // 2
    if not 1 <= n_student <= n_teacher:
        raise UserError(f"--num_layers must be between 1 and {n_teacher} for a {n_teacher}-layer teacher")
    if n_student == 1:
        return [0]  # cannot keep both ends; the bottom layer stays closest to the embeddings
    span, steps = n_teacher - 1, n_student - 1
    # ceil(x - 1/2) with x = i * span / steps, in integers: rounds half down, exactly.
    return [-((steps - 2 * i * span) // (2 * steps)) for i in range(n_student)]


def parse_layers(text: str, n_teacher: int) -> list[int]:
    """Parse ``--layers`` ("0,2,4") and check the indices against the teacher's depth."""
    try:
        layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--layers must be comma-separated layer indices, got {text!r}") from None
    if not layers:
        raise UserError("--layers is empty")
    for index in layers:
        if not 0 <= index < n_teacher:
            raise UserError(f"layer {index} is out of range for a {n_teacher}-layer teacher (valid: 0 to {n_teacher - 1})")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise UserError(f"--layers must be strictly increasing, got {text!r}")
    return layers


def select_layers(layers_arg: str | None, num_layers_arg: int | None, n_teacher: int) -> list[int]:
    if layers_arg is None:
        return default_layers(n_teacher, num_layers_arg)
    layers = parse_layers(layers_arg, n_teacher)
    if num_layers_arg is not None and num_layers_arg != len(layers):
        raise UserError(f"--num_layers {num_layers_arg} disagrees with the {len(layers)} indices in --layers")
    return layers


# ---------------------------------------------------------------------------------------------
# BERT -> DistilBERT

_BERT_TO_DISTILBERT_LAYER = {
    "attention.self.query": "attention.q_lin",
    "attention.self.key": "attention.k_lin",
    "attention.self.value": "attention.v_lin",
    "attention.output.dense": "attention.out_lin",
    "attention.output.LayerNorm": "sa_layer_norm",
    "intermediate.dense": "ffn.lin1",
    "output.dense": "ffn.lin2",
    "output.LayerNorm": "output_layer_norm",
}
_BERT_TO_DISTILBERT_HEAD = {
    "cls.predictions.transform.dense": "vocab_transform",
    "cls.predictions.transform.LayerNorm": "vocab_layer_norm",
}


def distilbert_config(bert_config, n_layers: int) -> DistilBertConfig:
    """DistilBERT config with the teacher's widths, vocabulary and activation."""
    return DistilBertConfig(
        vocab_size=bert_config.vocab_size,
        max_position_embeddings=bert_config.max_position_embeddings,
        n_layers=n_layers,
        n_heads=bert_config.num_attention_heads,
        dim=bert_config.hidden_size,
        hidden_dim=bert_config.intermediate_size,
        activation=bert_config.hidden_act,
        dropout=bert_config.hidden_dropout_prob,
        attention_dropout=bert_config.attention_probs_dropout_prob,
        initializer_range=bert_config.initializer_range,
        pad_token_id=bert_config.pad_token_id,
        tie_word_embeddings=True,
    )


def bert_to_distilbert(teacher: LoadedModel, layers: list[int]) -> Student:
    if teacher.objective != MLM:
        raise UserError("a causal (decoder) BERT cannot become a DistilBERT student; use --student_type bert")
    config = teacher.model.config
    t = teacher.model.state_dict()
    notes: list[str] = []

    words = t["bert.embeddings.word_embeddings.weight"]
    # DistilBERT has no token-type embeddings. BERT adds token_type_embeddings[0] to every token of
    # a single-segment input, so folding that row into the position table keeps the student's
    # embedding output identical to the teacher's there. (The original DistilBERT just dropped it.)
    positions = t["bert.embeddings.position_embeddings.weight"] + t["bert.embeddings.token_type_embeddings.weight"][0]
    s: StateDict = {
        "distilbert.embeddings.word_embeddings.weight": words,
        "distilbert.embeddings.position_embeddings.weight": positions,
        "distilbert.embeddings.LayerNorm.weight": t["bert.embeddings.LayerNorm.weight"],
        "distilbert.embeddings.LayerNorm.bias": t["bert.embeddings.LayerNorm.bias"],
        "vocab_projector.weight": words,  # tied to the word embeddings, as in BERT
    }
    for new, old in enumerate(layers):
        for bert_name, distil_name in _BERT_TO_DISTILBERT_LAYER.items():
            for p in ("weight", "bias"):
                s[f"distilbert.transformer.layer.{new}.{distil_name}.{p}"] = t[f"bert.encoder.layer.{old}.{bert_name}.{p}"]

    random_keys: set[str] = set()
    head_keys = [f"{m}.{p}" for m in _BERT_TO_DISTILBERT_HEAD.values() for p in ("weight", "bias")] + ["vocab_projector.bias"]
    if teacher.lm_head_initialized:
        random_keys.update(head_keys)
        notes.append("the teacher has no MLM head, so the student's MLM head is randomly initialised")
    else:
        for bert_name, distil_name in _BERT_TO_DISTILBERT_HEAD.items():
            for p in ("weight", "bias"):
                s[f"{distil_name}.{p}"] = t[f"{bert_name}.{p}"]
        s["vocab_projector.bias"] = t["cls.predictions.bias"]
        decoder = t.get("cls.predictions.decoder.weight")
        if decoder is not None and not torch.equal(decoder, words):
            notes.append("the teacher's decoder is not tied to its embeddings; the student ties it to the embeddings")

    if config.layer_norm_eps != 1e-12:
        notes.append(f"DistilBERT fixes LayerNorm eps at 1e-12 (teacher: {config.layer_norm_eps}), so outputs differ slightly")

    model = DistilBertForMaskedLM(distilbert_config(config, len(layers)))
    return Student(model=model, objective=MLM, expected=s, random_keys=random_keys, notes=notes)


# ---------------------------------------------------------------------------------------------
# Same family: keep the selected layers, renumbered


def find_layer_list(model: nn.Module, n_layers: int) -> str:
    """The state-dict prefix of the model's block list, e.g. ``model.layers.`` or ``transformer.h.``."""
    found = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] in _LAYER_LIST_NAMES and len(module) == n_layers
    ]
    if len(found) != 1:
        what = "no" if not found else "more than one"
        raise UserError(f"{type(model).__name__} has {what} list of {n_layers} layers, so its layers cannot be selected")
    return found[0] + "."


def select_state_dict(state: StateDict, prefix: str, layers: list[int]) -> StateDict:
    """Copy every non-layer entry; keep the selected layers under their new indices 0..K-1."""
    renumber = {str(old): str(new) for new, old in enumerate(layers)}
    out: StateDict = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            out[key] = value
            continue
        index, rest = key[len(prefix) :].split(".", 1)
        if index in renumber:
            out[f"{prefix}{renumber[index]}.{rest}"] = value
    return out


def shrink_config(config, layers: list[int]):
    """A copy of ``config`` with the new depth; per-layer lists (e.g. layer_types) are subset too."""
    n_teacher = num_layers(config)
    student = copy.deepcopy(config)
    set_num_layers(student, len(layers))
    for name, value in vars(config).items():
        if "layer" in name and isinstance(value, list) and len(value) == n_teacher:
            setattr(student, name, [value[i] for i in layers])
    # A teacher loaded from GGUF is dequantised; its student is a plain model, not a GGUF one.
    if getattr(student, "quantization_config", None) is not None:
        del student.quantization_config
    return student


def same_family(teacher: LoadedModel, layers: list[int]) -> Student:
    model = teacher.model
    prefix = find_layer_list(model, num_layers(model.config))
    expected = select_state_dict(model.state_dict(), prefix, layers)
    notes = []
    if teacher.lm_head_initialized:
        notes.append("the teacher has no LM head, so the student's LM head is randomly initialised")
    if getattr(model.config, "scale_attn_by_inverse_layer_idx", False) and layers != list(range(len(layers))):
        notes.append("scale_attn_by_inverse_layer_idx depends on layer position, so renumbered layers behave differently")
    student = type(model)(shrink_config(model.config, layers))
    return Student(model=student, objective=teacher.objective, expected=expected, notes=notes)


# ---------------------------------------------------------------------------------------------
# Building, checking and writing


def default_student_type(teacher_family: str, teacher_type: str) -> str:
    return "distilbert" if teacher_family == "bert" else teacher_type


def plan_extraction(teacher_family: str, student_type: str) -> Callable[[LoadedModel, list[int]], Student]:
    """The extraction for a (teacher family, student type) pair; UserError when unsupported."""
    get_model_type(student_type)
    if student_type in (teacher_family, "auto"):
        return same_family
    if teacher_family == "bert" and student_type == "distilbert":
        return bert_to_distilbert
    raise UserError(
        f"cannot extract a {student_type} student from a {teacher_family} teacher; "
        f"supported: bert -> distilbert, or the teacher's own type ({teacher_family})"
    )


def load_student_weights(student: Student, dtype: torch.dtype) -> None:
    student.model.to(dtype)
    result = student.model.load_state_dict(student.expected, strict=False)
    unset = set(result.missing_keys) - student.random_keys
    if result.unexpected_keys or unset:
        raise RuntimeError(f"internal error: student keys not set {sorted(unset)}, unexpected {result.unexpected_keys}")
    student.model.eval()


def verify(folder: Path, student: Student) -> None:
    """Load the written student back and check each weight against the teacher's."""
    auto_cls = AutoModelForMaskedLM if student.objective == MLM else AutoModelForCausalLM
    model, info = auto_cls.from_pretrained(folder, local_files_only=True, output_loading_info=True)
    problems = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if problems:
        raise RuntimeError(f"internal error: the student does not load cleanly: {problems}")
    for key, value in model.state_dict().items():
        if key in student.random_keys:
            continue
        if key not in student.expected:
            raise RuntimeError(f"internal error: student weight {key} was not taken from the teacher")
        if not torch.equal(value, student.expected[key].to(value.dtype)):
            raise RuntimeError(f"internal error: student weight {key} differs from the teacher's")


def save_tokenizer(teacher: LoadedModel, dest: Path) -> bool:
    """Copy the teacher's tokenizer into ``dest``; False when the teacher folder has none."""
    if teacher.gguf_file is None and not has_tokenizer(teacher.folder):
        return False
    kwargs = {"local_files_only": True}
    if teacher.gguf_file is not None:
        kwargs["gguf_file"] = teacher.gguf_file
    AutoTokenizer.from_pretrained(teacher.folder, **kwargs).save_pretrained(dest)
    return True


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() counts tied weights once


def check_destination(dump: Path, teacher_path: Path, force: bool) -> None:
    if dump.exists() and not dump.is_dir():
        raise UserError(f"--dump_checkpoint {str(dump)!r} is a file, not a folder")
    teacher_folder = teacher_path if teacher_path.is_dir() else teacher_path.parent
    if dump.exists() and dump.resolve() == teacher_folder.resolve():
        raise UserError("--dump_checkpoint must not be the teacher's folder")
    if dump.is_dir() and any(dump.iterdir()) and not force:
        raise UserError(f"--dump_checkpoint {str(dump)!r} is not empty; pass --force to overwrite it")


def write_student(dump: Path, teacher: LoadedModel, student: Student, record: dict) -> bool:
    """Write into a temp folder next to ``dump``, verify, then swap it into place."""
    dump.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(dump)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        student.model.save_pretrained(tmp)
        tokenizer_saved = save_tokenizer(teacher, tmp)
        (tmp / "extraction.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        verify(tmp, student)
        publish_folder(tmp, dump)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tokenizer_saved


@dataclass
class Extraction:
    """What extract_student wrote: the record saved as extraction.json, and notes for the user."""

    record: dict
    notes: list[str]
    tokenizer_saved: bool


def extract_student(model_type: str, model_name: str | Path, dump: str | Path, *, student_type: str | None = None,
                    layers: str | None = None, n_layers: int | None = None, force: bool = False,
                    seed: int = 56) -> Extraction:
    """Build a student from the teacher ``model_name``'s ``layers`` (default: ``n_layers`` evenly spaced,
    half the depth unless given), verify every copied weight, and write it to ``dump`` with the teacher's tokenizer."""
    get_model_type(model_type)
    if student_type is not None:
        get_model_type(student_type)
    dump, teacher_path = Path(dump), Path(model_name)
    check_destination(dump, teacher_path, force)

    seed_everything(seed)  # a head the teacher lacks is initialised at random: the same one each time
    with quiet_transformers():  # a missing head is detected and said in one line
        teacher = load_model(model_type, teacher_path)
        family = teacher.model.config.model_type
        student_type = student_type or default_student_type(family, model_type)
        build = plan_extraction(family, student_type)
        n_teacher = num_layers(teacher.model.config)
        chosen = select_layers(layers, n_layers, n_teacher)
        student = build(teacher, chosen)
        load_student_weights(student, next(teacher.model.parameters()).dtype)
        record = {
            "teacher": {"path": str(teacher_path.resolve()), "type": model_type, "family": family,
                        "num_layers": n_teacher, "lm_head_initialized": teacher.lm_head_initialized},
            "student_type": student_type,
            "student_family": student.model.config.model_type,
            "layers": chosen,
            "seed": seed,
            "parameters": {"teacher": count_parameters(teacher.model), "student": count_parameters(student.model)},
        }
        tokenizer_saved = write_student(dump, teacher, student, record)
    notes = list(student.notes)
    if not tokenizer_saved:
        notes.append(f"no tokenizer files in {str(teacher.folder)!r}, so the student folder has no tokenizer")
    return Extraction(record, notes, tokenizer_saved)
