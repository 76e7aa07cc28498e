"""Compare a fine-tuned teacher with one or more fine-tuned students on a GLUE task.

    python scripts/compare.py --teacher_dir runs/glue/sst-2_teacher \
        --student_dir distilled=runs/glue/sst-2_student --student_dir runs/glue/sst-2_scratch \
        --output runs/glue/sst-2_comparison

Prints and writes (``comparison.md``, ``comparison.json`` in ``--output``) one row per model:
parameters, inference speed in sentences/s, each of the task's metrics, the task score and the
score as a percentage of the teacher's. Speed is measured side by side in this one process: the
same dev sentences, the same batch size and padding, a warm-up, then timed passes that take
turns between the models so that a busy machine slows them all alike. Metrics come from each
folder's ``eval_results.json`` (written by run_glue --do_eval) or, when it has none for this task
or ``--evaluate`` is given, from evaluating on the dev file(s) here.

In Python: ``compare(teacher_dir, student_dirs, data_dir, task, output=...) -> rows``.
"""

from __future__ import annotations

import functools
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from distill import optim as O
from distill.errors import UserError
from distill.fileio import write_atomic
from distill.glue.features import Features, batch_indices, collate, load_features
from distill.glue.modeling import check_model_folder, load_classifier, load_tokenizer, read_glue_args, set_padding
from distill.glue.tasks import Task, get_task
from distill.glue.trainer import evaluate_task, forward_logits, pick_device, progress_bars

REPORT_MD = "comparison.md"
REPORT_JSON = "comparison.json"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except json.JSONDecodeError:
        return None


def _named(teacher_dir, student_dirs) -> list[tuple[str, str, Path]]:
    """(name, role, folder) for the teacher then each student; names from dict keys or folder names."""
    if isinstance(student_dirs, (str, Path)):
        student_dirs = [student_dirs]
    if isinstance(student_dirs, dict):
        students = [(str(k), Path(v)) for k, v in student_dirs.items()]
    else:
        students = [(Path(p).name, Path(p)) for p in student_dirs]
    if not students:
        raise UserError("give at least one student folder to compare with the teacher")
    entries = [("teacher", "teacher", Path(teacher_dir))] + [(n, "student", p) for n, p in students]
    seen: dict[str, int] = {}
    out = []
    for name, role, path in entries:
        seen[name] = seen.get(name, 0) + 1
        out.append((name if seen[name] == 1 else f"{name}#{seen[name]}", role, path))
    return out


def subset(feats: Features, n: int) -> Features:
    """The first ``n`` examples."""
    n = min(n, len(feats))
    end = int(feats.offsets[n])
    return Features(input_ids=feats.input_ids[:end], offsets=feats.offsets[:n + 1], labels=feats.labels[:n],
                    token_type_ids=None if feats.token_type_ids is None else feats.token_type_ids[:end],
                    meta=feats.meta)


def _metrics_from_folder(folder: Path, task: Task) -> dict | None:
    saved = _read_json(folder / "eval_results.json")
    if saved is None or saved.get("task_name") != task.name or "metrics" not in saved:
        return None
    return saved


def measure_speed(models: list[tuple[torch.nn.Module, list[dict]]], n_sentences: int, *, repeats: int,
                  warmup_batches: int, device: torch.device, bf16: bool) -> list[dict]:
    """Sentences/s of each model over its pre-collated batches, timed in interleaved rounds.

    Each round is one pass over the batches in which the models take turns batch by batch (the order
    rotating with the batch), so that a burst of load on a shared machine slows every model alike
    rather than whichever one was running. A model's time for the round is the sum of its batches.
    Returns the median and best rate per model, with the round times. ``warmup_batches`` batches per
    model go first, untimed (allocator, kernels, caches; -1: a full pass).
    """
    from distill.glue.modeling import takes_token_types

    types = [takes_token_types(m) for m, _ in models]
    for m, _ in models:
        m.to(device).eval()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(i: int, batch: dict) -> float:
        sync()
        t0 = time.perf_counter()
        forward_logits(models[i][0], batch, types[i])
        sync()
        return time.perf_counter() - t0

    n_batches = min(len(b) for _, b in models)
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode(), O.autocast(device, torch.bfloat16 if bf16 else None):
        for i, (_, batches) in enumerate(models):  # warm-up
            for batch in batches[:None if warmup_batches < 0 else warmup_batches]:
                run(i, batch)
        for r in range(repeats):
            spent = [0.0] * len(models)
            for j in range(n_batches):
                k = (r + j) % len(models)
                for i in list(range(k, len(models))) + list(range(k)):
                    spent[i] += run(i, models[i][1][j])
            for i, t in enumerate(spent):
                times[i].append(t)
    return [{"sentences_per_s": n_sentences / statistics.median(t), "best_sentences_per_s": n_sentences / min(t),
             "pass_seconds": [round(x, 4) for x in t]} for t in times]


def compare(teacher_dir: str | Path, student_dirs: list | dict, data_dir: str | Path | None = None,
            task: str | None = None, *, output: str | Path | None = None, overwrite: bool = False,
            batch_size: int = 32, max_seq_length: int | None = None, num_examples: int = 512, repeats: int = 3,
            warmup_batches: int = 2, evaluate: bool = False, bf16: bool = False, no_cuda: bool = False,
            overwrite_cache: bool = False, disable_tqdm: bool = False,
            log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """One row per model (teacher first): parameters, sentences/s, metrics, score, % of the teacher's score.

    ``student_dirs`` is a list of folders (named by their folder name) or a ``{name: folder}`` dict.
    ``task``, ``data_dir`` and ``max_seq_length`` default to those the teacher was fine-tuned with.
    With ``output``, writes ``comparison.md`` and ``comparison.json`` there (refusing to replace
    earlier ones unless ``overwrite``).
    """
    entries = _named(teacher_dir, student_dirs)
    glue_task, data_dir, max_seq_length = _resolve_task(entries, task, data_dir, max_seq_length)
    for name, value in (("batch_size", batch_size), ("num_examples", num_examples), ("repeats", repeats)):
        if value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}")
    if warmup_batches < 0:
        raise UserError(f"--warmup_batches must not be negative, got {warmup_batches}")
    out = _check_output(output, overwrite)
    device = pick_device(no_cuda)
    loaded = [_load_entry(name, role, folder, glue_task) for name, role, folder in entries]
    load = functools.partial(load_features, glue_task, data_dir, max_seq_length=max_seq_length,
                             overwrite_cache=overwrite_cache, log=log)
    rows, timed = [], []
    for entry in loaded:
        row, batches = _score_and_batches(entry, glue_task, load, evaluate=evaluate, batch_size=batch_size,
                                          num_examples=num_examples, device=device, bf16=bf16,
                                          progress=progress_bars(disable_tqdm), log=log)
        rows.append(row)
        timed.append((entry[4].model, batches))
    n_timed = rows[0]["n_timed"]
    if any(r["n_timed"] != n_timed for r in rows):
        raise UserError("the models' dev files hold different numbers of examples")
    log(f"timing {len(rows)} models on {n_timed} dev sentences, batch size {batch_size}, {repeats} rounds on {device}")
    speeds = measure_speed(timed, n_timed, repeats=repeats, warmup_batches=warmup_batches, device=device, bf16=bf16)
    _relative_to_teacher(rows, speeds)
    table = markdown_table(glue_task, rows)
    print(table, flush=True)
    if out is not None:
        settings = {"task_name": glue_task.name, "data_dir": str(data_dir), "batch_size": batch_size,
                    "max_seq_length": max_seq_length, "timed_examples": n_timed, "repeats": repeats,
                    "device": str(device), "bf16": bf16, "torch_threads": torch.get_num_threads()}
        _write_report(out, settings, rows, table, log)
    return rows


def _resolve_task(entries, task, data_dir, max_seq_length):
    """The task, data folder and length: as given, else as the teacher was fine-tuned."""
    for _, role, folder in entries:
        check_model_folder(folder, f"the {role} folder")
    saved = read_glue_args(entries[0][2]) or {}
    if task is None:
        task = saved.get("task_name") or (_read_json(entries[0][2] / "eval_results.json") or {}).get("task_name")
        if task is None:
            raise UserError(f"the teacher {entries[0][2]} does not say which task it was fine-tuned on; "
                            "pass --task_name")
    data_dir = data_dir if data_dir is not None else saved.get("data_dir")
    if data_dir is None:
        raise UserError("pass --data_dir (the teacher folder does not record one)")
    return get_task(task), data_dir, max_seq_length or saved.get("max_seq_length") or 128


def _check_output(output, overwrite: bool) -> Path | None:
    if output is None:
        return None
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} exists and is not a folder")
    if (out / REPORT_JSON).exists() and not overwrite:
        raise UserError(f"{out / REPORT_JSON} already exists; pass --overwrite to replace it")
    return out


def _load_entry(name: str, role: str, folder: Path, glue_task: Task):
    """(name, role, folder, tokenizer, classifier, pad id) of a model fine-tuned on ``glue_task``."""
    glue_args = read_glue_args(folder)
    if glue_args is not None and glue_args.get("task_name") not in (None, glue_task.name):
        raise UserError(f"the {role} {folder} was fine-tuned on {glue_args['task_name']}, not {glue_task.name}")
    tok = load_tokenizer(folder, f"the {role} folder")
    clf = load_classifier(folder, glue_task, flag=f"the {role} folder")
    if clf.new_weights or clf.resized_weights:
        raise UserError(f"the {role} {folder} has no classification head trained on {glue_task.name}; "
                        "fine-tune it with run_glue --do_train first")
    return name, role, folder, tok, clf, set_padding(clf, tok)


def _score_and_batches(entry, glue_task: Task, load, *, evaluate: bool, batch_size: int, num_examples: int,
                       device: torch.device, bf16: bool, progress, log) -> tuple[dict, list[dict]]:
    """The model's row (its saved dev results, or evaluated here) and its timing batches, on the device."""
    name, role, folder, tok, clf, pad_id = entry
    results = None if evaluate else _metrics_from_folder(folder, glue_task)
    source = "eval_results.json"
    if results is None:
        feats = {split: load(split=split, tok=tok, model_name_or_path=folder) for split in glue_task.dev_splits}
        log(f"evaluating {name} ({folder})")
        results = evaluate_task(clf.model, glue_task, feats, batch_size=batch_size, device=device, pad_id=pad_id,
                                bf16=bf16, progress=progress, log=log)
        source = "evaluated here"
    speed_feats = subset(load(split=glue_task.dev_splits[0], tok=tok, model_name_or_path=folder), num_examples)
    # segment ids are collated for all; forward_logits passes them only to models that take them
    batches = [{k: v.to(device) for k, v in collate(speed_feats, idx, pad_id, token_types=True).items()}
               for idx in batch_indices(len(speed_feats), batch_size)]
    row = {"name": name, "role": role, "path": str(folder), "model_class": type(clf.model).__name__,
           "parameters": clf.num_parameters, "metrics": dict(results["metrics"]), "score": float(results["score"]),
           "metrics_source": source, "n_timed": len(speed_feats)}
    return row, batches


def _relative_to_teacher(rows: list[dict], speeds: list[dict]) -> None:
    teacher = rows[0]
    for row, speed in zip(rows, speeds):
        row.update(speed)
    for row in rows:
        row["speedup"] = row["sentences_per_s"] / teacher["sentences_per_s"]
        row["parameters_pct_of_teacher"] = 100.0 * row["parameters"] / teacher["parameters"]
        row["pct_of_teacher"] = 100.0 * row["score"] / teacher["score"] if teacher["score"] > 0 else None


def _write_report(out: Path, settings: dict, rows: list[dict], table: str, log) -> None:
    out.mkdir(parents=True, exist_ok=True)
    s = settings
    header = (f"# {s['task_name']}: teacher vs students\n\nData: {s['data_dir']}. Speed: {s['timed_examples']} dev "
              f"sentences, batch size {s['batch_size']}, max length {s['max_seq_length']}, median of {s['repeats']} "
              f"interleaved timed passes after a warm-up, on {s['device']}{' with bf16' if s['bf16'] else ''}. "
              "Metrics ×100.\n\n")
    write_atomic(out / REPORT_MD, header + table + "\n")
    write_atomic(out / REPORT_JSON, json.dumps({**settings, "rows": rows}, indent=2) + "\n")
    log(f"wrote {out / REPORT_MD} and {out / REPORT_JSON}")


def markdown_table(task: Task, rows: list[dict]) -> str:
    metric_names = list(rows[0]["metrics"])
    head = ["model", "parameters", "sentences/s", "speed-up"] + metric_names + ["score", "% of teacher"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    for r in rows:
        pct = "n/a" if r["pct_of_teacher"] is None else f"{r['pct_of_teacher']:.1f}%"
        cells = [f"{r['name']} ({r['role']})" if r["name"] != r["role"] else r["name"],
                 f"{r['parameters'] / 1e6:.2f}M ({r['parameters_pct_of_teacher']:.0f}%)",
                 f"{r['sentences_per_s']:.1f}", f"{r['speedup']:.2f}x"]
        cells += [f"{100 * r['metrics'][m]:.1f}" if m in r["metrics"] else "" for m in metric_names]
        cells += [f"{100 * r['score']:.1f}", pct]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
