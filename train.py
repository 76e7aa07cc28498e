#!/usr/bin/env python
"""Distil a teacher into a student (see distill/cli/train.py; also the `distill-train` command)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a checkout without installing

from distill.cli.train import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
