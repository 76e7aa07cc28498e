"""The whole recipe on a user's own teacher, corpus and task: ``distill-pipeline --teacher DIR --corpus FILE
--task_dir DIR --task_name sst-2 --output_dir runs/x`` (also ``python scripts/pipeline.py``). The work is
distill.pipeline's; this parses the flags."""

from __future__ import annotations

from distill.errors import cli_entry
from distill.pipeline.config import parse_config
from distill.pipeline.run import run_pipeline


@cli_entry
def main(argv: list[str] | None = None) -> int:
    run_pipeline(parse_config(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
