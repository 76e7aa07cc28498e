#!/usr/bin/env python
"""The whole recipe on your own teacher, corpus and task (see distill/cli/pipeline.py; also `distill-pipeline`)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from distill.cli.pipeline import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
