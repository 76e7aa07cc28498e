"""Training checkpoints that a killed run resumes from exactly.

Layout in ``<dump_path>/checkpoints/``::

    step_00000400/state.pt      student, projection, optimizer, schedule, scaler, counters,
                                sampler position, log window, RNG states
    step_00000400/meta.json     step, epoch, resolved config, identity of teacher and data
    latest                      the name of the newest complete checkpoint

A checkpoint is written into a temporary folder and renamed when complete; ``latest`` moves last,
also by rename. So a kill at any moment leaves the previous checkpoint usable. The teacher is never
copied: its identity (path, weight file sizes, config hash) is recorded and checked on resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from distill.errors import UserError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE = "state.pt"
META = "meta.json"


def _fault(point: str) -> None:
    """Fault injection for the resume tests: DISTILL_FAULT=<point> kills the process there;
    DISTILL_FAULT=<point>@<rank> kills only that rank of a distributed run."""
    want = os.environ.get("DISTILL_FAULT")
    if want is not None and want in (point, f"{point}@{os.environ.get('RANK', '0')}"):
        os.kill(os.getpid(), 9)


def _nan_fault(rank: int, step: int) -> bool:
    """Fault injection for the NaN tests: DISTILL_NAN_AT=<rank>:<step> makes that rank's loss NaN
    at that optimizer step (1-based)."""
    want = os.environ.get("DISTILL_NAN_AT")
    return want is not None and want == f"{rank}:{step}"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def data_identity(data_file: str) -> dict:
    folder = Path(data_file)
    return {"path": str(folder.resolve()), "tokens_bytes": (folder / "tokens.bin").stat().st_size,
            "meta_sha256": _sha256(folder / "meta.json")}


def teacher_identity(teacher_name: str) -> dict:
    p = Path(teacher_name)
    if p.is_file():  # a .gguf file
        return {"path": str(p.resolve()), "bytes": p.stat().st_size}
    weights = sorted(f for f in p.iterdir() if f.suffix in (".safetensors", ".bin", ".gguf"))
    return {"path": str(p.resolve()), "weights": {f.name: f.stat().st_size for f in weights},
            "config_sha256": _sha256(p / "config.json") if (p / "config.json").is_file() else None}


def save_checkpoint(dump: Path, step: int, state: dict, meta: dict, keep: int) -> Path:
    """Write checkpoint ``step``; move ``latest`` to it; keep the newest ``keep``."""
    root = dump / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final = root / name
    tmp = root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(state, tmp / STATE)
    _fault(f"during_checkpoint_write_{step}")
    (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
    for f in (tmp / STATE, tmp / META):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # the same step saved again (end of epoch == interval): replace it
        shutil.rmtree(final)
    tmp.rename(final)
    pointer_tmp = root / f".{LATEST}.tmp"
    pointer_tmp.write_text(name + "\n")
    os.replace(pointer_tmp, root / LATEST)
    for old in list_checkpoints(dump)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(dump: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = dump / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def read_checkpoint(folder: Path) -> tuple[dict, dict]:
    meta = json.loads((folder / META).read_text())
    state = torch.load(folder / STATE, map_location="cpu", weights_only=False)
    return state, meta


def load_for_resume(dump: Path, path: str | None, warn) -> tuple[dict, dict, Path]:
    """The checkpoint to resume from: ``path``, or the latest in ``dump``; a corrupt latest is
    reported and the one before it is used."""
    if path not in (None, "latest"):
        folder = Path(path)
        if not (folder / STATE).is_file():
            raise UserError(f"--resume {path} is not a checkpoint folder (no {STATE})")
        try:
            state, meta = read_checkpoint(folder)
        except Exception as e:  # truncated or corrupt files
            raise UserError(f"checkpoint {folder} cannot be read ({type(e).__name__})") from None
        return state, meta, folder
    candidates = list_checkpoints(dump)
    if not candidates:
        raise UserError(f"--resume: {dump} holds no checkpoint to resume from")
    pointer = dump / CHECKPOINTS / LATEST
    if pointer.is_file():  # the pointer first, then any newer or older complete folder
        named = dump / CHECKPOINTS / pointer.read_text().strip()
        candidates = [c for c in candidates if c != named] + ([named] if named.is_dir() else [])
    for folder in reversed(candidates):
        try:
            state, meta = read_checkpoint(folder)
            return state, meta, folder
        except Exception as e:  # truncated or corrupt: report and fall back to an older one
            warn(f"checkpoint {folder.name} cannot be read ({type(e).__name__}); trying the one before it")
    raise UserError(f"no checkpoint in {dump / CHECKPOINTS} can be read")


# Config fields a resumed run may change; every other field must match the checkpoint's.
HARMLESS = {"log_interval", "checkpoint_interval", "max_steps", "keep_checkpoints", "num_workers", "force",
            "resume", "config", "dump_path", "n_gpu", "local_rank", "fp16_opt_level", "max_bad_steps"}


PATHS = {"data_file", "teacher_name", "student_config", "student_pretrained_weights", "token_counts"}


def config_changes(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(harmless changes, incompatible changes) between a checkpoint's config and this run's."""
    harmless, bad = [], []

    def norm(k, v):
        return str(Path(v).resolve()) if k in PATHS and v is not None else v

    for k in sorted(set(saved) | set(current)):
        if k in ("resume", "force"):  # how this run was started, not what it trains
            continue
        if norm(k, saved.get(k)) != norm(k, current.get(k)):
            (harmless if k in HARMLESS else bad).append(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}")
    return harmless, bad
