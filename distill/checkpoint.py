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
from distill.testing.faults import kill_point

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE = "state.pt"
META = "meta.json"


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


def _sha256(path: Path, block: int = 1 << 24) -> str:
    """The file's sha256 (hex), read a block at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def data_identity(data_file: str) -> dict:
    folder = Path(data_file)
    return {"path": str(folder.resolve()), "tokens_bytes": (folder / "tokens.bin").stat().st_size,
            "meta_sha256": _sha256(folder / "meta.json")[:16]}


def teacher_identity(teacher_name: str) -> dict:
    p = Path(teacher_name)
    if p.is_file():  # a .gguf file
        return {"path": str(p.resolve()), "bytes": p.stat().st_size}
    weights = sorted(f for f in p.iterdir() if f.suffix in (".safetensors", ".bin", ".gguf"))
    return {"path": str(p.resolve()), "weights": {f.name: f.stat().st_size for f in weights},
            "config_sha256": _sha256(p / "config.json")[:16] if (p / "config.json").is_file() else None}


def save_checkpoint(dump: Path, step: int, state: dict, meta: dict, keep: int) -> Path:
    """Write checkpoint ``step``; move ``latest`` to it; keep the newest ``keep``.

    A write that fails (a full disk, a file-size limit) removes its temporary folder and raises a
    UserError; the checkpoints already there and ``latest`` are untouched.
    """
    root = dump / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final = root / name
    tmp = root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        torch.save(state, tmp / STATE)
        kill_point(f"during_checkpoint_write_{step}")
        # The state's checksum: a file damaged later (a bad disk, a copy cut short) is caught on resume;
        # torch.load alone reads damaged tensor bytes without complaint.
        meta = {**meta, "state_sha256": _sha256(tmp / STATE)}
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        for f in (tmp / STATE, tmp / META):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"could not write checkpoint {name} in {root} ({write_error(e, root)}); the checkpoints "
                        "already there are kept: free some space, then resume with --resume") from None
    if final.exists():  # the same step saved again (end of epoch == interval): replace it
        shutil.rmtree(final)
    tmp.rename(final)
    kill_point(f"before_latest_{step}")
    publish_text(root / LATEST, name + "\n")
    for old in list_checkpoints(dump)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def write_error(e: BaseException, folder: Path | None = None) -> str:
    """A short reason for a failed write: errno's words where there are some, else what the machine
    says (torch.save reports a failed write only as an internal assertion)."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror.lower()
    import resource

    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        return f"a file reached this process's file-size limit (ulimit -f) of {limit:,} bytes"
    if folder is not None and shutil.disk_usage(folder).free < 64 << 20:
        return "the disk is full"
    text = str(e).strip().splitlines()
    return text[0][:120] if text else type(e).__name__


def publish_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically: written aside, then renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the log lines up to ``step`` (those after the checkpoint are logged again by the resumed
    run); a line cut short by a kill mid-append is dropped."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            keep.append(line)
    publish_text(path, "".join(ln + "\n" for ln in keep))


def list_checkpoints(dump: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = dump / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


class CorruptCheckpoint(Exception):
    """state.pt does not match the checksum recorded in meta.json."""


def read_checkpoint(folder: Path) -> tuple[dict, dict]:
    meta = json.loads((folder / META).read_text())
    expected = meta.get("state_sha256")
    if expected is not None and _sha256(folder / STATE) != expected:
        raise CorruptCheckpoint(f"{folder / STATE} does not match its checksum")
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
