"""What both demos' stages share: their timing, the reuse of a finished stage, how a run restarts."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from distill import checkpoint as C


class Stages:
    """Runs a demo's stages in order, printing each one's name before it and its wall time after it.

    A stage is a function that returns ``(output, did_work)``: ``did_work`` is False when the stage
    found its outputs from an earlier run and reused them. :meth:`run` returns ``output``.

    - ``now``: this run's wall time of each stage, reused or not, in the order they ran;
    - ``done``: each stage's wall time on the last run that did its work. With a ``timings_file``
      it is read from that file at the start and written back after every stage that did work, so
      a second run that reuses everything still reports what the work took.
    """

    def __init__(self, timings_file: Path | None = None):
        self.file = timings_file
        self.done: dict[str, float] = (json.loads(timings_file.read_text())
                                       if timings_file is not None and timings_file.is_file() else {})
        self.now: dict[str, float] = {}
        self.started = time.perf_counter()

    def run(self, name: str, fn: Callable[..., tuple[Any, bool]], *args, **kwargs) -> Any:
        print(f"\n== {name}", flush=True)
        t0 = time.perf_counter()
        out, did_work = fn(*args, **kwargs)
        self.now[name] = time.perf_counter() - t0
        if did_work:
            self.done[name] = self.now[name]
            if self.file is not None:
                self.file.write_text(json.dumps(self.done, indent=2) + "\n")
        print(f"   ({self.now[name]:.1f}s)", flush=True)
        return out

    def elapsed(self) -> float:
        """Seconds since the stages began, stages and what ran between them."""
        return time.perf_counter() - self.started

    def print_times(self) -> None:
        """The run's total wall time and each stage's, one line each."""
        print(f"\ndone in {self.elapsed() / 60:.1f} min; stage times:")
        for name, secs in self.now.items():
            print(f"   {name:<55} {secs:7.1f}s")


def offline_environment() -> None:
    """Both demos run on packaged files only: no model hub, and no tokenizer threads beside the workers."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def restart_flags(dump: Path) -> list[str]:
    """The trainer's flags for a distillation into ``dump``: ``--resume`` where an interrupted run
    left a checkpoint, ``--force`` where one stopped before its first (nothing to keep), else none."""
    if C.list_checkpoints(dump):
        return ["--resume"]
    return ["--force"] if dump.exists() else []
