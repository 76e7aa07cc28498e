"""The pipeline's stages. Each returns ``(output, did_work)`` for :class:`distill.demo.stages.Stages`:
``did_work`` is False when it found its output from an earlier run and reused it."""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distill import checkpoint as C
from distill.data.binarize import binarize, read_meta
from distill.demo.stages import restart_flags
from distill.errors import UserError
from distill.fileio import atomic_path, write_atomic
from distill.pipeline.config import RECIPE, ROWS, Budget, PipelineConfig

# The early-exit stage's recipes: DeeBERT's stage 2 on the labels and on the final classifier's soft
# targets, both with the backbone frozen (PABEE's joint training is one more epoch of the whole
# model: `distill-early-exit --recipe joint` runs it).
EARLY_EXIT_RECIPES = "two_stage,self_distill"


@dataclass(frozen=True)
class Outputs:
    """Where the stages write in the output folder; the quick run's names end in ``_quick``."""

    data: Path  # the binarized corpus
    counts: Path  # its token counts (MLM masking probabilities)
    data_report: Path
    student_init: Path  # the extracted student
    student: Path  # the general distillation's run and its student
    task: Path  # the quick run's slice of the task (the task folder itself in a full run)
    task_text: Path  # the task's training sentences as a corpus (the in-domain stage)
    task_data: Path
    task_counts: Path
    student_in_domain: Path
    similarity: Path
    glue: Path  # the teacher's fine-tuning, and a folder per row and seed
    early_exit: Path
    report: Path
    stage_seconds: Path

    @classmethod
    def in_folder(cls, run_dir: Path, quick: bool) -> Outputs:
        s = "_quick" if quick else ""
        return cls(data=run_dir / f"data{s}", counts=run_dir / f"token_counts{s}.npy",
                   data_report=run_dir / f"data_report{s}.json", student_init=run_dir / f"student_init{s}",
                   student=run_dir / f"student{s}", task=run_dir / "task_quick",
                   task_text=run_dir / f"task_sentences{s}.txt", task_data=run_dir / f"task_data{s}",
                   task_counts=run_dir / f"task_token_counts{s}.npy",
                   student_in_domain=run_dir / f"student_in_domain{s}",
                   similarity=run_dir / f"embedding_similarity{s}.json", glue=run_dir / f"glue{s}",
                   early_exit=run_dir / f"early_exit{s}", report=run_dir / f"report{s}",
                   stage_seconds=run_dir / f"stage_seconds{s}.json")

    def row_dir(self, row: str, seed: int) -> Path:
        return self.glue / row / f"seed{seed}"


def _done(folder: Path, marker: str) -> bool:
    return (folder / marker).is_file()


def slice_task(src: Path, dest: Path, n_train: int | None, n_dev: int | None, splits: tuple[str, ...]):
    """A seeded random sample of n rows of the task's train and dev files (the quick run's task)."""
    if n_train is None and n_dev is None:
        return src, False
    dest.mkdir(parents=True, exist_ok=True)
    did = False
    for name, n in (("train", n_train), *((s, n_dev) for s in splits)):
        lines = (src / f"{name}.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
        header, rows = lines[:1], lines[1:]
        if n is not None and n < len(rows):  # the files may be ordered by label: sample, keep the order
            pick = np.sort(np.random.default_rng(0).permutation(len(rows))[:n])
            rows = [rows[i] for i in pick]
        keep = "".join(header + rows)
        path = dest / f"{name}.tsv"
        if not path.is_file() or path.read_text(encoding="utf-8") != keep:
            write_atomic(path, keep)
            did = True
    return dest, did


def binarize_corpus(corpus: Path, teacher: Path, data: Path, max_lines: int | None, tokenizer_type: str):
    if data.exists():
        meta = read_meta(data)
        print(f"   reusing {data}: {meta['num_sequences']:,} sequences, {meta['num_tokens']:,} tokens")
        return None, False
    res = binarize(corpus, str(teacher), data, tokenizer_type=tokenizer_type, num_workers=min(4, os.cpu_count() or 1),
                   max_lines=max_lines)
    print(f"   wrote {res.num_sequences:,} sequences, {res.num_tokens:,} tokens in {res.seconds:.1f}s "
          f"({res.num_tokens / res.seconds:,.0f} tokens/s) to {res.path}")
    return None, True


def corpus_token_counts(data: Path, counts_file: Path):
    from distill.data.counts import count_tokens

    if counts_file.is_file():
        print(f"   reusing {counts_file}")
        return np.load(counts_file), False
    counts = count_tokens(data)
    with atomic_path(counts_file) as tmp, open(tmp, "wb") as f:  # a path without .npy: np.save would add it
        np.save(f, counts)
    print(f"   {int(counts.sum()):,} tokens, {int((counts > 0).sum()):,} distinct ids -> {counts_file}")
    return counts, True


def inspect_batches(data: Path, teacher: Path, counts: np.ndarray, batch_size: int):
    """The data as the trainer sees it: padding with and without length grouping, a masked batch."""
    from transformers import AutoTokenizer

    from distill.data.collate import Collator, mlm_token_probs
    from distill.data.dataset import LMSeqsDataset
    from distill.data.sampler import LengthGroupedBatchSampler, padding_fraction

    ds = LMSeqsDataset(str(data), max_model_input_size=128)
    print(f"   {ds.stats.summary()}")
    report = {}
    for group in (True, False):
        s = LengthGroupedBatchSampler(ds.lengths, batch_size, seed=0, group_by_size=group)
        report["grouped" if group else "ungrouped"] = pf = padding_fraction(ds.lengths, s.global_batches(0))
        print(f"   padding over an epoch, batch {batch_size}, {'with' if group else 'without'} length grouping: "
              f"{pf:.1%}")
    special = ds.meta["special_token_ids"]
    collate = Collator(special["pad_token"], mlm=True, mask_id=special["mask_token"],
                       token_probs=mlm_token_probs(counts, 0.7, sorted(set(special.values()))), seed=0)
    batch = collate([ds[i] for i in next(iter(LengthGroupedBatchSampler(ds.lengths, 2, seed=0)))])
    tok = AutoTokenizer.from_pretrained(teacher)
    print("   a masked batch:")
    for row, attn in zip(batch["input_ids"], batch["attention_mask"]):
        print("     " + tok.decode(row[attn.bool()]))
    return {"dataset": ds.stats.__dict__, "padding_fraction": report}, True


def extract_student(cfg: PipelineConfig, student_init: Path):
    from distill.cli import extract

    if _done(student_init, "config.json"):
        print(f"   reusing {student_init}")
        return None, False
    extract.main(["--model_type", cfg.teacher_type, "--model_name", cfg.teacher, "--dump_checkpoint",
                  str(student_init), "--student_type", cfg.student_type, "--num_layers", str(cfg.student_layers)])
    return None, True


def distil(cfg: PipelineConfig, teacher: Path, student_from: Path, data: Path, counts: Path, dump: Path, *,
           epochs: int, max_steps: int | None, bf16: bool):
    """``train.py`` with the general recipe (:data:`RECIPE`) into ``dump``; resumes an interrupted run."""
    from distill.cli import train

    if _done(dump, "model.safetensors"):
        print(f"   reusing the distilled student in {dump}")
        return None, False
    b = cfg.budget
    argv = ["--dump_path", str(dump), "--data_file", str(data), "--token_counts", str(counts),
            "--student_type", cfg.student_type, "--student_pretrained_weights", str(student_from),
            "--teacher_type", cfg.teacher_type, "--teacher_name", str(teacher), *RECIPE,
            "--batch_size", str(b.batch_size), "--n_epoch", str(epochs),
            "--checkpoint_interval", str(b.checkpoint_interval)]
    if max_steps is not None:
        argv += ["--max_steps", str(max_steps)]
    if bf16:
        argv += ["--bf16"]
    restart = restart_flags(dump)
    if "--resume" in restart:
        print(f"   resuming the interrupted distillation in {dump}")
    train.main(argv + restart)
    if not _done(dump, "model.safetensors"):
        raise UserError(f"the distillation stopped before its end; run the same command again to resume it from "
                        f"{dump / C.CHECKPOINTS}")
    return None, True


def task_sentences(cfg: PipelineConfig, task_dir: Path, dest: Path, min_chars: int = 160):
    """The task's training text as a corpus for the in-domain stage, no labels: consecutive sentences
    joined into lines of at least ``min_chars`` characters, since the trainer drops sequences under
    12 tokens and most single sentences of a sentiment task are shorter."""
    from distill.glue.tasks import read_split

    texts = []
    for ex in read_split(cfg.task_name, task_dir, "train"):
        texts += [ex.text_a] + ([ex.text_b] if ex.text_b else [])
    lines, cur = [], ""
    for t in texts:
        cur = f"{cur} {t}".strip()
        if len(cur) >= min_chars:
            lines.append(cur)
            cur = ""
    if cur:
        lines.append(cur)
    text = "\n".join(lines) + "\n"
    if dest.is_file() and dest.read_text(encoding="utf-8") == text:
        print(f"   reusing {dest}")
        return dest, False
    write_atomic(dest, text)
    print(f"   {len(texts):,} training sentences in {len(lines):,} lines -> {dest}")
    return dest, True


def similarity_to_teacher(teacher: Path, students: dict[str, Path], task: Path, similarity_file: Path,
                          task_name: str = "sst-2"):
    """What distillation changed, before any fine-tuning: sentence embeddings against the teacher's, on the
    first sentence of each example of the task's (first) dev file."""
    from distill.demo.similarity import embedding_similarity
    from distill.glue.tasks import get_task, read_split

    stamp = {k: (p / "model.safetensors").stat().st_mtime for k, p in students.items()}
    if similarity_file.is_file():
        saved = json.loads(similarity_file.read_text())
        if saved.get("model_mtimes") == stamp:
            print(f"   reusing {similarity_file}")
            return saved, False
    glue_task = get_task(task_name)
    sentences = [ex.text_a for ex in read_split(glue_task, task, glue_task.dev_splits[0])]
    cos = embedding_similarity(teacher, students, sentences)
    for name, value in cos.items():
        print(f"   {name}: cosine {value:.3f} to the teacher's sentence embeddings")
    saved = {"cosine": cos, "sentences": len(sentences), "text": "the task's dev sentences", "model_mtimes": stamp}
    write_atomic(similarity_file, json.dumps(saved, indent=2) + "\n")
    return saved, True


def finetune_argv(cfg: PipelineConfig, model: Path, task: Path, out: Path, *, lr: float, seed: int, bf16: bool,
                  teacher: Path | None = None) -> list[str]:
    """run_glue's flags: fine-tune ``model`` on the task into ``out`` (task-distilled from ``teacher`` when given)."""
    argv = ["--task_name", cfg.task_name, "--data_dir", str(task), "--model_name_or_path", str(model),
            "--output_dir", str(out), "--do_train", "--do_eval", "--max_seq_length", str(cfg.max_seq_length),
            "--per_device_train_batch_size", "32", "--per_device_eval_batch_size", "64",
            "--learning_rate", str(lr), "--num_train_epochs", str(cfg.budget.finetune_epochs),
            "--warmup_prop", "0.1", "--seed", str(seed), "--logging_steps", "50", "--overwrite_output_dir",
            "--disable_tqdm"]
    if teacher is not None:
        argv += ["--teacher_name_or_path", str(teacher), "--temperature", str(cfg.task_temperature),
                 "--alpha_ce", str(cfg.task_alpha_ce), "--alpha_task", str(round(1 - cfg.task_alpha_ce, 6))]
    if bf16:
        argv += ["--bf16"]
    return argv


def finetune(cfg: PipelineConfig, model: Path, task: Path, out: Path, *, lr: float, seed: int, bf16: bool,
             teacher: Path | None = None):
    """run_glue in this process: fine-tune ``model`` into ``out``; its dev results."""
    from distill.cli import run_glue

    did_work = not _done(out, "eval_results.json")
    if not did_work:
        print(f"   reusing {out}")
    else:
        run_glue.main(finetune_argv(cfg, model, task, out, lr=lr, seed=seed, bf16=bf16, teacher=teacher))
    return json.loads((out / "eval_results.json").read_text()), did_work


def row_models(out: Outputs, in_domain: bool) -> dict[str, Path]:
    """Each row's starting model: the extracted student, the distilled one, and the recipe's."""
    start = {"init": out.student_init, "distilled": out.student,
             "recipe": out.student_in_domain if in_domain else out.student}
    return {name: start[kind] for name, _, kind, _ in ROWS}


def finetune_workers(cfg: PipelineConfig) -> int:
    """Fine-tuning runs side by side: ``--finetune_workers``, or by default two on a CPU with at least
    two cores (a small student's matmuls use two cores poorly: two runs of one thread each finish sooner
    than two runs of two threads one after the other), one on a GPU."""
    import torch

    if cfg.finetune_workers > 0:
        return cfg.finetune_workers
    return 1 if torch.cuda.is_available() else min(2, os.cpu_count() or 1)


def run_side_by_side(jobs: list[tuple[str, Path, list[str]]], workers: int) -> None:
    """Each job's run_glue in its own process, ``workers`` at a time, the cores split between them;
    each one's console output goes to ``<its output folder>.log``."""
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    import distill

    threads = max(1, (os.cpu_count() or 1) // workers)
    root = str(Path(distill.__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])]))

    def run(job):
        label, out, argv = job
        log = out.parent / f"{out.name}.log"
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w", encoding="utf-8") as f:
            r = subprocess.run([sys.executable, "-m", "distill.cli.run_glue", *argv], env=env, stdout=f,
                               stderr=subprocess.STDOUT)
        if r.returncode != 0:
            tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            raise UserError(f"fine-tuning {label} failed ({tail[0]}); its output is in {log}")
        print(f"   {label}: done ({log})", flush=True)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(run, jobs))


def finetune_rows(cfg: PipelineConfig, out: Outputs, task: Path, bf16: bool):
    """Every row over every seed, side by side where the machine allows; {row: {seed: score}}."""
    starts = row_models(out, cfg.in_domain)
    teacher_ft = out.glue / "teacher"
    jobs, lr = [], cfg.budget.finetune_lr[1]
    for name, what, _, distilled in ROWS:
        for seed in cfg.seeds:
            dest = out.row_dir(name, seed)
            if _done(dest, "eval_results.json"):
                print(f"   reusing {dest}")
                continue
            argv = finetune_argv(cfg, starts[name], task, dest, lr=lr, seed=seed, bf16=bf16,
                                 teacher=teacher_ft if distilled else None)
            jobs.append((f"{what}, seed {seed}", dest, argv))
    if any("--teacher_name_or_path" in argv for *_, argv in jobs):
        from distill.glue.teacher_outputs import cache_teacher_outputs

        print("   the fine-tuned teacher's outputs on the training set, computed once for every task-distilled run")
        cache_teacher_outputs(teacher_ft, task, cfg.task_name, max_seq_length=cfg.max_seq_length, bf16=bf16,
                              log=lambda s: print("   " + s))
    workers = min(finetune_workers(cfg), len(jobs)) if jobs else 1
    if workers > 1:
        print(f"   {len(jobs)} fine-tuning runs, {workers} side by side", flush=True)
        run_side_by_side(jobs, workers)
    else:
        from distill.cli import run_glue

        for label, _, argv in jobs:
            print(f"   {label}", flush=True)
            run_glue.main(argv)
    scores: dict[str, dict[int, float]] = {}
    for name, *_ in ROWS:
        scores[name] = {seed: float(json.loads((out.row_dir(name, seed) / "eval_results.json").read_text())["score"])
                        for seed in cfg.seeds}
        v = list(scores[name].values())
        print(f"   {name}: {100 * statistics.mean(v):.2f}"
              + (f" ± {100 * statistics.stdev(v):.2f}" if len(v) > 1 else "") + f" over {len(v)} seed(s)")
    return scores, bool(jobs)


def compare_rows(cfg: PipelineConfig, out: Outputs, task: Path):
    """Parameters, inference speed measured side by side (the teacher and the first seed of each row) and
    the dev score of each folder."""
    from distill.glue.compare import compare

    first = cfg.seeds[0]
    rows = compare(out.glue / "teacher", {name: out.row_dir(name, first) for name, *_ in ROWS}, task, cfg.task_name,
                   output=out.report, overwrite=True, batch_size=32, num_examples=cfg.budget.timing_examples,
                   repeats=cfg.budget.timing_repeats, disable_tqdm=True)
    return rows, True


def early_exit(cfg: PipelineConfig, teacher_ft: Path, task: Path, out: Path, bf16: bool):
    """Exit heads on the fine-tuned teacher (DeeBERT's stage 2 on the labels and on the final classifier's
    soft targets), the threshold sweep with measured speed-ups; its sweep.json.

    The exits read the mean of their layer's tokens: all-MiniLM-L6-v2 was trained as a mean-pooling
    sentence encoder, and its early layers' [CLS] vectors carry little (benchmarks/early_exit_heads.py
    measures both: 50-64 against 77 dev accuracy at layer 1)."""
    from distill.cli import early_exit as cli

    if _done(out, "sweep.json"):
        print(f"   reusing {out}")
        return json.loads((out / "sweep.json").read_text()), False
    b: Budget = cfg.budget
    argv = ["--task_name", cfg.task_name, "--data_dir", str(task), "--model_name_or_path", str(teacher_ft),
            "--output_dir", str(out), "--overwrite_output_dir", "--do_train", "--skip_first_stage", "--do_sweep",
            "--do_eval", "--eval_each_highway", "--recipe", EARLY_EXIT_RECIPES, "--exit_pooling", "mean",
            "--max_seq_length", str(cfg.max_seq_length), "--per_device_train_batch_size", "32",
            "--per_device_eval_batch_size", "64", "--learning_rate", str(b.finetune_lr[0]),
            "--num_train_epochs", str(b.finetune_epochs), "--seed", str(cfg.seeds[0]), "--logging_steps", "50",
            "--timing_examples", "32" if cfg.quick else "256", "--timing_repeats", "3",
            "--timing_points", "2", "--disable_tqdm"]
    if bf16:
        argv += ["--bf16"]
    cli.main(argv)
    return json.loads((out / "sweep.json").read_text()), True
