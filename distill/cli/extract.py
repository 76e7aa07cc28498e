"""Initialise a student from a teacher's layers: ``python scripts/extract.py --model_type bert ...``
(also ``distill-extract``). The work is distill.extract's; this parses the flags and reports."""

from __future__ import annotations

import argparse

from distill.errors import ArgumentParser, cli_entry
from distill.extract import extract_student


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description="Initialise a student model from a subset of a teacher's layers.")
    p.add_argument("--model_type", required=True, help="teacher type: bert, distilbert, roberta, gpt2, llama or auto")
    p.add_argument("--model_name", required=True, help="teacher folder, or a .gguf file")
    p.add_argument("--dump_checkpoint", required=True, help="output folder for the student")
    p.add_argument("--student_type", default=None,
                   help="default: distilbert for a bert teacher, else the teacher's type")
    p.add_argument("--layers", default=None, help="comma-separated 0-based teacher layers, e.g. 0,2,4,7,9,11")
    p.add_argument("--num_layers", type=int, default=None,
                   help="student depth when --layers is not given (default: half, rounded up)")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --dump_checkpoint")
    p.add_argument("--seed", type=int, default=56,
                   help="seed of any weights initialised at random (a head the teacher lacks); default 56")
    return p.parse_args(argv)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    done = extract_student(a.model_type, a.model_name, a.dump_checkpoint, student_type=a.student_type,
                           layers=a.layers, n_layers=a.num_layers, force=a.force, seed=a.seed)
    for note in done.notes:
        print(f"note: {note}")
    r = done.record
    print(f"teacher: {r['teacher']['family']}, {r['teacher']['num_layers']} layers, "
          f"{r['parameters']['teacher']:,} parameters")
    print(f"student: {r['student_family']}, kept layers {','.join(map(str, r['layers']))}, "
          f"{r['parameters']['student']:,} parameters")
    print(f"saved to {a.dump_checkpoint}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
