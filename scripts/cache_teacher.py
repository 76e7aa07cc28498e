#!/usr/bin/env python
"""Cache a teacher's top-k log-probabilities (see distill/cli/cache_teacher.py; also the `distill-cache-teacher` command)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from distill.cli.cache_teacher import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
