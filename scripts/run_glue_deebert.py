#!/usr/bin/env python
"""Early exit on a GLUE task (see distill/cli/early_exit.py; also the `distill-early-exit` command)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from distill.cli.early_exit import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
