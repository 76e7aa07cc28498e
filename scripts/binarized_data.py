#!/usr/bin/env python
"""Binarize a text corpus (see distill/cli/binarized_data.py; also the `distill-binarize` command)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from distill.cli.binarized_data import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
