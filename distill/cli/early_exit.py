"""Early exit on a GLUE task, DeeBERT's flow: ``python scripts/run_glue_deebert.py --task_name sst-2 ...``
(also ``distill-early-exit``). The work is distill.early_exit.run's; this parses the flags."""

from __future__ import annotations

import os

from distill.early_exit.config import parse_early_exit_config
from distill.early_exit.run import run_early_exit
from distill.errors import cli_entry


@cli_entry
def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run_early_exit(parse_early_exit_config(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
