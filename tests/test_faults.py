"""benchmarks/faults.py --quick: one trial of every fault ends in an exact resume, one sentence, or a
run that carried on, and never loses a user's file (the full matrix: python benchmarks/faults.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

ROWS = {"SIGKILL at a random point", "SIGTERM (stop, then --resume)", "SIGINT (stop, then --resume)",
        "truncated latest checkpoint", "corrupt latest checkpoint (bytes flipped)",
        "unreadable meta.json in the latest", "missing latest pointer", "every checkpoint corrupt",
        "disk full during a checkpoint write (RLIMIT_FSIZE)", "NaN loss on one rank of two (torchrun, gloo)"}


def test_fault_matrix_quick(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "faults.py"), "--quick",
                        "--work_dir", str(tmp_path)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    table = "\n".join(ln for ln in r.stdout.splitlines() if ln.startswith(("|", "-", "fault matrix")))
    assert r.returncode == 0, table + r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(result["rows"]) == ROWS, table
    totals = result["totals"]
    assert totals.get("other", 0) == 0 and totals.get("user data lost", 0) == 0, table
    assert totals["trials"] == totals.get("resumed exactly", 0) + totals.get("refused with a sentence", 0) \
        + totals.get("continued", 0), table
    # the kinds of kill the issue names are all among the points
    points = result["kill_points"]
    for kind in ("during_checkpoint_write_", "during_final_save", "during_metrics_append_", "before_latest_"):
        assert any(p.startswith(kind) for p in points), points
