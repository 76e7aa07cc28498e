"""Fine-tune and/or evaluate a model on a GLUE task: ``python scripts/run_glue.py --task_name sst-2 ...``
(also ``distill-glue``). The work is distill.glue.run's; this parses the flags."""

from __future__ import annotations

import os

from distill.errors import cli_entry
from distill.glue.config import parse_config
from distill.glue.run import run_glue


@cli_entry
def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run_glue(parse_config(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
