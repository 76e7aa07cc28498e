#!/usr/bin/env python
"""Initialise a student from teacher layers; see ``distill.cli.extract``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from distill.cli.extract import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
