"""Choices measured once per machine and kept in ``~/.cache/distill`` (``DISTILL_BLOCKING_CACHE`` moves the
folder): the fused losses' CPU blocking (:mod:`distill.losses.blocking`) and the student's attention
precision under bf16 on the CPU (:mod:`distill.attention`).

A choice that changes a run's rounding must be the same in every later run and in every process of a
run, so it is measured by one process under a file lock, written atomically, and then only read. Each
entry's key names the CPU (its model and a hash of its flags) and the torch version, so another CPU or
torch measures its own.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Callable


def cache_dir() -> Path:
    return Path(os.environ.get("DISTILL_BLOCKING_CACHE", Path.home() / ".cache" / "distill"))


@functools.lru_cache(maxsize=1)
def cpu_model_and_flags() -> tuple[str, str]:
    """The CPU's model name and its flags line, from /proc/cpuinfo, read once (the blocking is looked up at
    every loss call; the native kernels' build key uses it too)."""
    model, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith(("flags", "Features")) and not flags:
                flags = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return model, flags


def cpu_identity() -> str:
    """The CPU's model name and a hash of its flags."""
    model, flags = cpu_model_and_flags()
    return f"{model} flags:{hashlib.sha256(flags.encode()).hexdigest()[:12]}"


def fast_16bit() -> bool:
    """Whether this CPU has bf16 matmul instructions (without them torch emulates bf16, many times slower
    than fp32, and a measurement would take minutes for a precision no one should train in here)."""
    flags = set(cpu_model_and_flags()[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def load_or_measure(name: str, key: str, valid: Callable[[dict], bool],
                    measure: Callable[[], dict]) -> tuple[dict, str] | None:
    """The entry ``key`` of ``<cache_dir>/<name>.json`` and where it came from: ``("file")`` when the file
    holds one that ``valid`` accepts, else ``measure()``'s, written there (``"measured"``).

    Returns None where nothing can be kept (the folder cannot be made or written): the caller must then
    use its defaults, since another process could measure otherwise. One process measures under the file
    lock ``<name>.lock``; the others wait and read its entry."""
    folder = cache_dir()
    path = folder / f"{name}.json"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / f"{name}.lock", "a")
    except OSError:
        return None
    with lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)  # one process measures; the others then read its result
        except (ImportError, OSError):
            pass
        entry = _read(path).get(key)
        if isinstance(entry, dict) and valid(entry):
            return entry, "file"
        # Absent, or not one this version can use (an older version's file): measured again.
        entry = {**measure(), "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
        data = _read(path)
        data[key] = entry
        try:
            with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(f.name, path)
        except OSError:
            return None  # not kept: a later process would measure again, maybe otherwise
        return entry, "measured"
