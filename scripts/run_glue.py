#!/usr/bin/env python
"""Fine-tune and/or evaluate on a GLUE task (see distill/cli/run_glue.py; also the `distill-glue` command)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from distill.cli.run_glue import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
