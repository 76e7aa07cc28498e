"""The fine-tuned teacher's outputs on the training set, computed once and cached next to the features.

Task distillation reads the teacher's logits for every training example. The teacher is frozen and in
eval mode (no dropout), so its logits for an example are the same at every step and in every run that
uses the same teacher, tokenisation and precision: computing them once, in example order, gives what
a forward pass per training batch would (up to the rounding of a different padding), at a fraction of
the cost. Several students distilled from one teacher, or one student over several seeds, share the file:

    <data_dir>/cached_teacher_logits_<split>_<teacher name>_<max_seq_length>_<task>.npz

It holds the (N, C) float32 logits and a JSON ``meta`` entry: the teacher's weights (file size and
SHA-256), the features' own identity (tokenizer fingerprint, source hash) and the precision. A file
whose meta differs from the current run's is recomputed and replaced (it is this command's own cache).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np

from distill.fileio import atomic_path
from distill.glue.features import Features, model_name
from distill.glue.modeling import WEIGHT_FILES
from distill.glue.tasks import Task

VERSION = 1


def weights_identity(folder: Path) -> dict:
    """Size and SHA-256 of each weight file in ``folder``."""
    out = {}
    for name in WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
            out[name] = {"bytes": path.stat().st_size, "sha256": h.hexdigest()}
    return out


def cache_path(data_dir: str | Path, split: str, teacher_folder: str | Path, max_seq_length: int,
               task: Task) -> Path:
    return (Path(data_dir) / f"cached_teacher_logits_{split}_{model_name(teacher_folder)}_{max_seq_length}_"
                              f"{task.name}.npz")


def teacher_logits(predict: Callable[[], np.ndarray], feats: Features, *, teacher_folder: str | Path,
                   data_dir: str | Path, split: str, max_seq_length: int, task: Task, bf16: bool,
                   log: Callable[[str], None] = print) -> np.ndarray:
    """The teacher's (N, C) logits on ``feats``: from the cache when it matches, else ``predict()`` and cached."""
    # the features' identity, not which model folder tokenised them: students that share the teacher's
    # tokenizer share its outputs
    features = {k: v for k, v in feats.meta.items() if k != "model_name_or_path"}
    meta = {"version": VERSION, "teacher": weights_identity(Path(teacher_folder)), "features": features,
            "num_examples": len(feats), "bf16": bool(bf16)}
    path = cache_path(data_dir, split, teacher_folder, max_seq_length, task)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                if json.loads(str(z["meta"])) == json.loads(json.dumps(meta)):
                    log(f"the teacher's logits on {split}: reusing {path}")
                    return z["logits"]
        except (OSError, ValueError, KeyError):
            pass  # unreadable or from another version: recomputed below
    logits = np.ascontiguousarray(predict(), dtype=np.float32)
    if logits.shape[0] != len(feats):
        raise RuntimeError(f"the teacher gave {logits.shape[0]} outputs for {len(feats)} examples")
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, logits=logits, meta=np.array(json.dumps(meta)))
        log(f"the teacher's logits on {split} ({len(feats):,} examples) cached in {path}")
    except OSError as e:  # a read-only data folder: the run goes on without the cache
        log(f"the teacher's logits could not be cached in {path.parent} ({e.strerror}); computed for this run only")
    return logits


def cache_teacher_outputs(teacher_folder: str | Path, data_dir: str | Path, task_name: str, *, max_seq_length: int,
                          bf16: bool, batch_size: int = 64, log: Callable[[str], None] = print) -> Path:
    """Compute (or find) the fine-tuned teacher's logits on ``data_dir/train.tsv`` ahead of the students'
    runs, so that runs started side by side do not each compute them; returns the cache's path."""
    from distill.glue.features import load_features
    from distill.glue.modeling import load_teacher, load_tokenizer, set_padding
    from distill.glue.tasks import get_task
    from distill.glue.trainer import pick_device, predict

    task = get_task(task_name)
    tok = load_tokenizer(teacher_folder, "the teacher folder")
    teacher = load_teacher(teacher_folder, task)
    pad_id = set_padding(teacher, tok)
    feats = load_features(task, data_dir, split="train", tok=tok, model_name_or_path=teacher_folder,
                          max_seq_length=max_seq_length, log=log)
    device = pick_device()
    teacher_logits(lambda: predict(teacher.model, feats, batch_size=batch_size, device=device, pad_id=pad_id,
                                   bf16=bf16), feats, teacher_folder=teacher_folder, data_dir=data_dir, split="train",
                   max_seq_length=max_seq_length, task=task, bf16=bf16, log=log)
    return cache_path(data_dir, "train", teacher_folder, max_seq_length, task)
