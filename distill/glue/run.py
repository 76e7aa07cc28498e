"""Fine-tune and/or evaluate a model on a GLUE task; with a fine-tuned teacher, distil on the task.

    python scripts/run_glue.py --task_name sst-2 --data_dir glue_data/SST-2 \
        --model_name_or_path runs/my_run --output_dir runs/glue/sst-2_student --do_train --do_eval \
        [--teacher_name_or_path runs/glue/sst-2_teacher --alpha_ce 0.5 --alpha_task 0.5 --temperature 2]

Everything a user can get wrong is checked before training starts. The output folder is written
under a temporary name and renamed when complete, so a folder with that name is always finished.

In Python: ``run_glue(GlueConfig(...) or a dict of the same fields) -> eval results``;
``distill/cli/run_glue.py`` is the command line.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

from distill import models as M
from distill.data.binarize import vocab_fingerprint
from distill.errors import UserError, note
from distill.fileio import is_within, staged_folder, write_atomic
from distill.hf import has_tokenizer, quiet_transformers
from distill.glue.config import GlueConfig
from distill.glue.features import load_features
from distill.glue.modeling import (
    ARGS_FILE,
    Classifier,
    check_model_folder,
    load_classifier,
    load_teacher,
    load_tokenizer,
    set_padding,
)
from distill.glue.tasks import Task, get_task, split_path
from distill.glue.trainer import evaluate_task, fine_tune, pick_device, progress_bars
from distill.seeding import seed_everything

RESULTS_JSON = "eval_results.json"
RESULTS_TXT = "eval_results.txt"
TRAIN_LOG = "train_log.jsonl"


# ---------------------------------------------------------------------------------------------
# Checks before anything is loaded or written


def check_output_dir(cfg: GlueConfig) -> Path:
    """Refuse a non-empty output folder without --overwrite_output_dir, and any overwrite that would delete an input."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not cfg.overwrite_output_dir:
            what = "replace it" if cfg.do_train else "write the evaluation results into it"
            raise UserError(f"--output_dir {out} exists and is not empty; pass --overwrite_output_dir to {what}")
        if cfg.do_train:  # training replaces the whole folder: never when an input lives in it
            for name in ("model_name_or_path", "teacher_name_or_path", "data_dir"):
                value = getattr(cfg, name)
                if value and is_within(Path(value), out):
                    raise UserError(f"--{name} {value} lies inside --output_dir {out}; "
                                    "--overwrite_output_dir would delete it")
    return out


def check_inputs(cfg: GlueConfig, task: Task) -> None:
    if cfg.do_train:
        split_path(task, cfg.data_dir, "train")
    if cfg.do_eval:
        for split in task.dev_splits:
            split_path(task, cfg.data_dir, split)
    check_model_folder(cfg.model_name_or_path, "--model_name_or_path")
    if cfg.teacher_name_or_path is not None:
        if not cfg.do_train:
            note("--teacher_name_or_path has no effect without --do_train")
        else:
            check_model_folder(cfg.teacher_name_or_path, "--teacher_name_or_path")


def check_model_fits(clf: Classifier, tok, cfg: GlueConfig, who: str) -> None:
    rows = clf.model.get_input_embeddings().num_embeddings
    if len(tok) > rows:
        raise UserError(f"the tokenizer has {len(tok)} tokens but the {who} {clf.folder} has only {rows} embedding "
                        "rows; use the tokenizer the model was trained with")
    max_pos = M.max_positions(clf.model.config)
    if max_pos is not None and cfg.max_seq_length > max_pos:
        raise UserError(f"--max_seq_length {cfg.max_seq_length} exceeds the {max_pos} positions of the {who} "
                        f"{clf.folder}")


def check_teacher_tokenizer(cfg: GlueConfig, tok, teacher: Classifier) -> None:
    """The teacher reads the student's token ids, so both must share one vocabulary."""
    folder = teacher.folder
    if has_tokenizer(folder):
        t_tok = load_tokenizer(folder, "--teacher_name_or_path")
        if vocab_fingerprint(t_tok) != vocab_fingerprint(tok):
            raise UserError(f"the teacher {folder} uses another vocabulary than {cfg.model_name_or_path}; "
                            "teacher and student must share one tokenizer")
    else:
        note(f"the teacher {folder} has no tokenizer files, so only its vocabulary size is checked")
    rows = teacher.model.get_input_embeddings().num_embeddings
    if len(tok) > rows:
        raise UserError(f"the tokenizer has {len(tok)} tokens but the teacher {folder} has only {rows} "
                        "embedding rows")


# ---------------------------------------------------------------------------------------------
# Writing results


def results_text(results: dict) -> str:
    """The readable eval_results.txt: ``key = value`` lines, the task's metrics first."""
    lines = [f"task_name = {results['task_name']}", f"model = {results['model_name_or_path']}",
             f"score = {results['score']:.4f}"]
    lines += [f"{k} = {v:.4f}" for k, v in results["metrics"].items()]
    for split, r in results["splits"].items():
        lines.append(f"{split}: {r['num_examples']} examples, eval_loss = {r['eval_loss']:.4f}")
    return "\n".join(lines) + "\n"


def write_results(folder: Path, results: dict) -> None:
    write_atomic(folder / RESULTS_JSON, json.dumps(results, indent=2) + "\n")
    write_atomic(folder / RESULTS_TXT, results_text(results))


def save_model(model, tok, folder: Path) -> None:
    """The model (safetensors) and its tokenizer, so that from_pretrained(folder) loads both."""
    with quiet_transformers():  # a one-shard "Writing model shards" bar is noise
        model.save_pretrained(folder)
        tok.save_pretrained(folder)


# ---------------------------------------------------------------------------------------------
# The run


def _as_config(cfg: GlueConfig | dict | argparse.Namespace) -> GlueConfig:
    if isinstance(cfg, GlueConfig):
        return cfg
    if isinstance(cfg, argparse.Namespace):
        cfg = vars(cfg)
    return GlueConfig.from_dict(dict(cfg))


def evaluate_splits(model, task: Task, cfg: GlueConfig, feats_by_split: dict, device, pad_id: int,
                    progress, log: Callable[[str], None]) -> dict:
    """The task's results on its dev file(s), with what produced them."""
    results = evaluate_task(model, task, feats_by_split, batch_size=cfg.per_device_eval_batch_size, device=device,
                            pad_id=pad_id, bf16=cfg.bf16, progress=progress, log=log)
    return {"task_name": task.name, "model_name_or_path": str(cfg.model_name_or_path), "score": results["score"],
            "metrics": results["metrics"], "splits": results["splits"], "max_seq_length": cfg.max_seq_length,
            "per_device_eval_batch_size": cfg.per_device_eval_batch_size, "bf16": cfg.bf16}


def run_glue(cfg: GlueConfig | dict | argparse.Namespace, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fine-tune and/or evaluate as ``cfg`` says; returns the evaluation results (eval_results.json).

    With --do_train the result also has a ``"train"`` entry (steps, loss, time); without --do_eval
    that is all it has. Raises UserError for anything the user can fix.
    """
    cfg = _as_config(cfg)
    cfg.validate()
    task = get_task(cfg.task_name)
    check_inputs(cfg, task)
    out = check_output_dir(cfg)
    device = pick_device(cfg.no_cuda)
    progress = progress_bars(cfg.disable_tqdm)

    tok = load_tokenizer(cfg.model_name_or_path)
    seed_everything(cfg.seed, deterministic=cfg.deterministic)  # the new head, dropout, the shuffle
    clf = load_classifier(cfg.model_name_or_path, task)
    report = clf.loading_report()
    if report is not None:
        note(report + (" (trained by --do_train)" if cfg.do_train else
                       " — evaluating without --do_train, so these stay random"))
    check_model_fits(clf, tok, cfg, "model")
    pad_id = set_padding(clf, tok)

    teacher = None
    if cfg.do_train and cfg.teacher_name_or_path is not None:
        teacher = load_teacher(cfg.teacher_name_or_path, task)
        check_teacher_tokenizer(cfg, tok, teacher)
        check_model_fits(teacher, tok, cfg, "teacher")
        set_padding(teacher, tok)

    # Tokenise every file first: a broken dev file fails before a long training, not after.
    load = functools.partial(load_features, task, cfg.data_dir, tok=tok, model_name_or_path=cfg.model_name_or_path,
                             max_seq_length=cfg.max_seq_length, overwrite_cache=cfg.overwrite_cache, log=log,
                             progress=progress)
    train_feats = load(split="train") if cfg.do_train else None
    dev_feats = {split: load(split=split) for split in task.dev_splits} if cfg.do_eval else {}

    what = "distilling from " + str(cfg.teacher_name_or_path) if teacher is not None else "fine-tuning"
    log(f"{task.name}: {type(clf.model).__name__} from {cfg.model_name_or_path} ({clf.num_parameters:,} parameters)"
        + (f", {what} on {len(train_feats):,} examples" if train_feats is not None else "") + f", on {device}")

    if not cfg.do_train:
        results = evaluate_splits(clf.model, task, cfg, dev_feats, device, pad_id, progress, log)
        out.mkdir(parents=True, exist_ok=True)
        write_results(out, results)
        log(f"{task.name} score {results['score']:.4f}; results in {out / RESULTS_JSON}")
        return results

    with staged_folder(out) as staging:
        def on_log(record: dict) -> None:
            with open(staging / TRAIN_LOG, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

        t_logits = None
        if teacher is not None:  # frozen and in eval mode: its outputs are computed once, and cached
            from distill.glue.teacher_outputs import teacher_logits
            from distill.glue.trainer import predict

            t_logits = teacher_logits(
                lambda: predict(teacher.model, train_feats, batch_size=cfg.per_device_eval_batch_size, device=device,
                                pad_id=pad_id, bf16=cfg.bf16, progress=progress, desc="teacher outputs"),
                train_feats, teacher_folder=teacher.folder, data_dir=cfg.data_dir, split="train",
                max_seq_length=cfg.max_seq_length, task=task, bf16=cfg.bf16, log=log)
        summary = fine_tune(clf.model, train_feats, task, cfg, device, pad_id=pad_id, teacher_logits=t_logits,
                            on_log=on_log, progress=progress)
        log(f"trained {summary['steps']} steps ({summary['epochs']} epochs) in {summary['seconds']:.1f}s, "
            f"last loss {summary['loss']:.4f}")
        results = {}
        if cfg.do_eval:
            results = evaluate_splits(clf.model, task, cfg, dev_feats, device, pad_id, progress, log)
            write_results(staging, results)
        save_model(clf.model, tok, staging)
        saved = {**cfg.to_dict(), "labels": list(task.labels), "num_labels": task.num_labels,
                 "model_class": type(clf.model).__name__, "parameters": clf.num_parameters,
                 "new_weights": clf.new_weights + clf.resized_weights, "device": str(device), "train": summary,
                 "versions": {"torch": torch.__version__, "transformers": _transformers_version()},
                 "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        write_atomic(staging / ARGS_FILE, json.dumps(saved, indent=2) + "\n")
    log(f"saved the fine-tuned model to {out}"
        + (f"; {task.name} score {results['score']:.4f}" if results else ""))
    return {**results, "train": summary}


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
