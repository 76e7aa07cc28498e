#!/usr/bin/env python
"""Count token ids (see distill/cli/token_counts.py; also the `distill-token-counts` command)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from distill.cli.token_counts import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
