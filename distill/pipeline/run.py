"""The pipeline's stages in order (see :mod:`distill.pipeline`)."""

from __future__ import annotations

import json
from pathlib import Path

from distill.demo.stages import Stages, offline_environment
from distill.fileio import write_atomic
from distill.optim import use_bf16
from distill.pipeline import stages as S
from distill.pipeline.config import RECIPE, PipelineConfig


def run_pipeline(cfg: PipelineConfig, *, title: str | None = None, describe: list[str] | None = None) -> Path:
    """Run every stage (reusing finished ones); returns the report's path.

    ``title`` and ``describe`` (lines under it) head the report; the demo names its packaged assets there.
    """
    cfg.validate()
    offline_environment()
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    b = cfg.budget
    bf16 = use_bf16(cfg.bf16)
    out = S.Outputs.in_folder(run_dir, cfg.quick)
    stages = Stages(out.stage_seconds)
    teacher, tok_type = Path(cfg.teacher), cfg.teacher_type

    stages.run("binarize the corpus", S.binarize_corpus, Path(cfg.corpus), teacher, out.data, b.corpus_lines, tok_type)
    counts = stages.run("token counts", S.corpus_token_counts, out.data, out.counts)
    data_report = stages.run("load, group and mask", S.inspect_batches, out.data, teacher, counts, b.batch_size)
    write_atomic(out.data_report, json.dumps(data_report, indent=2) + "\n")
    stages.run(f"extract a {cfg.student_layers}-layer student", S.extract_student, cfg, out.student_init)
    print("   the general recipe: the student matches the teacher's hidden states by cosine (alpha_cos 1) and MSE "
          "(alpha_hidden_mse 1), with MLM on its own head as a light auxiliary loss (alpha_mlm 0.01); the "
          "soft-target loss (alpha_ce) is off, since a sentence encoder may have no MLM head")
    stages.run("distil on the corpus", S.distil, cfg, teacher, out.student_init, out.data, out.counts, out.student,
               epochs=b.distil_epochs, max_steps=b.distil_max_steps, bf16=bf16)

    task = Path(cfg.task_dir)
    if cfg.quick:
        from distill.glue.tasks import get_task

        task = stages.run("a slice of the task", S.slice_task, task, out.task, b.task_train, b.task_dev,
                          get_task(cfg.task_name).dev_splits)
    teacher_ft = out.glue / "teacher"
    stages.run("fine-tune the teacher", S.finetune, cfg, teacher, task, teacher_ft, lr=b.finetune_lr[0],
               seed=cfg.seeds[0], bf16=bf16)
    students = {"student_distilled": out.student, "student_extracted": out.student_init}
    if cfg.in_domain:
        text = stages.run("the task's training sentences as a corpus", S.task_sentences, cfg, task, out.task_text)
        stages.run("binarize the task's sentences", S.binarize_corpus, text, teacher, out.task_data, None, tok_type)
        stages.run("their token counts", S.corpus_token_counts, out.task_data, out.task_counts)
        source = teacher_ft if cfg.in_domain_teacher == "finetuned" else teacher
        stages.run(f"distil on the task's sentences ({cfg.in_domain_teacher} teacher's hidden states)", S.distil,
                   cfg, source, out.student, out.task_data, out.task_counts, out.student_in_domain,
                   epochs=b.in_domain_epochs, max_steps=b.in_domain_max_steps, bf16=bf16)
        students["student_in_domain"] = out.student_in_domain
    similarity = stages.run("sentence embeddings against the teacher's (held-out sentences)",
                            S.similarity_to_teacher, teacher, students, task, out.similarity, cfg.task_name)
    scores = stages.run(f"fine-tune 4 rows x {len(cfg.seeds)} seed(s)", S.finetune_rows, cfg, out, task, bf16)
    rows = stages.run("compare (inference speed measured side by side)", S.compare_rows, cfg, out, task)
    sweep = None
    if cfg.early_exit:
        sweep = stages.run("early exit on the fine-tuned teacher (exits trained, thresholds swept and timed)",
                           S.early_exit, cfg, teacher_ft, task, out.early_exit, bf16)

    from distill.pipeline.report import write_report

    extra = {"quick": cfg.quick, "bf16": bf16, "data": data_report, "similarity": similarity, "early_exit": sweep,
             "seeds": cfg.seeds, "scores": scores, "in_domain": cfg.in_domain,
             "in_domain_teacher": cfg.in_domain_teacher if cfg.in_domain else None,
             "task_distillation": {"temperature": cfg.task_temperature, "alpha_ce": cfg.task_alpha_ce},
             "distil_command": "python train.py " + " ".join(RECIPE), "title": title, "describe": describe or [],
             "task_name": cfg.task_name, "stage_seconds_of_the_work": stages.done}

    def report():
        path = write_report(out.report, rows, out.student / "metrics.jsonl",
                            {**stages.now, "total": stages.elapsed()}, extra)
        print(f"   {path}")
        return path, True

    path = stages.run("report", report)
    stages.print_times()
    print(f"report: {path}")
    return path
