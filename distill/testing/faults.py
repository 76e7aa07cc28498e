"""Fault injection: the resume tests and ``benchmarks/faults.py`` kill a run at named points.

Nothing happens unless the variables are set:

``DISTILL_FAULT=<point>`` (or ``<point>@<rank>``, that rank of a distributed run only) sends
SIGKILL to this process when it reaches ``<point>``:

    after_step_<n>                 optimizer step n is done (before its log line and checkpoint)
    during_checkpoint_write_<n>    checkpoint n's state.pt is written, its meta.json not yet
    before_latest_<n>              checkpoint n is complete and renamed, ``latest`` not yet moved
    during_metrics_append_<n>      half of step n's line is in metrics.jsonl
    during_final_save              some of the final student's files are in place, not all

``DISTILL_NAN_AT=<rank>:<step>`` makes that rank's loss NaN at that optimizer step (1-based).
"""

from __future__ import annotations

import os
import signal

KILL_VAR = "DISTILL_FAULT"
NAN_VAR = "DISTILL_NAN_AT"


def armed(point: str) -> bool:
    want = os.environ.get(KILL_VAR)
    return bool(want) and want in (point, f"{point}@{os.environ.get('RANK', '0')}")


def kill_point(point: str) -> None:
    """SIGKILL this process if ``DISTILL_FAULT`` names ``point``."""
    if armed(point):
        os.kill(os.getpid(), signal.SIGKILL)


def nan_at(rank: int, step: int) -> bool:
    """True if ``DISTILL_NAN_AT`` asks for a NaN loss on ``rank`` at optimizer ``step``."""
    want = os.environ.get(NAN_VAR)
    return bool(want) and want == f"{rank}:{step}"
