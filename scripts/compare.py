#!/usr/bin/env python
"""Compare a fine-tuned teacher and students (see distill/cli/compare.py; also the `distill-compare` command)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from distill.cli.compare import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
