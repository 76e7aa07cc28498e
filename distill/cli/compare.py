"""Compare a fine-tuned teacher with fine-tuned students: ``python scripts/compare.py --teacher_dir ...``
(also ``distill-compare``). The work is distill.glue.compare's; this parses the flags."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from distill.errors import ArgumentParser, UserError, cli_entry
from distill.glue.compare import compare


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="compare.py", description="Compare a fine-tuned teacher with fine-tuned students on a GLUE "
                                                "task: parameters, speed, metrics, % of the teacher's score.")
    p.add_argument("--teacher_dir", required=True, help="the teacher's run_glue output folder")
    p.add_argument("--student_dir", action="append", required=True, metavar="[NAME=]FOLDER",
                   help="a student's run_glue output folder; repeat for several (NAME= labels the row)")
    p.add_argument("--output", required=True, help="folder for comparison.md and comparison.json")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier comparison in --output")
    p.add_argument("--task_name", default=None, help="default: the task the teacher was fine-tuned on")
    p.add_argument("--data_dir", default=None, help="the task's TSV folder; default: the teacher's")
    p.add_argument("--max_seq_length", type=int, default=None, help="default: the teacher's")
    p.add_argument("--per_device_eval_batch_size", "--batch_size", dest="batch_size", type=int, default=32,
                   help="batch size of the timed passes and of any evaluation (default: 32)")
    p.add_argument("--num_examples", type=int, default=512, help="dev sentences timed per pass (default: 512)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per model (default: 3)")
    p.add_argument("--warmup_batches", type=int, default=2, help="untimed batches per model first (default: 2)")
    p.add_argument("--evaluate", action="store_true", help="evaluate here even where eval_results.json exists")
    p.add_argument("--overwrite_cache", action="store_true", help="tokenise the dev file(s) again")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--no_cuda", action="store_true", help="stay on the CPU")
    p.add_argument("--disable_tqdm", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def _students(specs: list[str]) -> dict[str, str] | list[str]:
    if not any("=" in s for s in specs):
        return specs
    named = {}
    for s in specs:
        name, _, path = s.partition("=") if "=" in s else (Path(s).name, "", s)
        if name in named:
            raise UserError(f"two students are named {name!r}")
        named[name] = path
    return named


@cli_entry
def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    a = parse_args(argv)
    compare(a.teacher_dir, _students(a.student_dir), a.data_dir, a.task_name, output=a.output,
            overwrite=a.overwrite, batch_size=a.batch_size, max_seq_length=a.max_seq_length,
            num_examples=a.num_examples, repeats=a.repeats, warmup_batches=a.warmup_batches, evaluate=a.evaluate,
            bf16=a.bf16, no_cuda=a.no_cuda, overwrite_cache=a.overwrite_cache, disable_tqdm=a.disable_tqdm)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
