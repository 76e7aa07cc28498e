"""Training checkpoints that a killed run resumes from exactly.

Layout in ``<dump_path>/checkpoints/``::

    step_00000400/state.pt      student, projection, optimizer, schedule, scaler, counters,
                                sampler position, log window, RNG states
    step_00000400/meta.json     step, epoch, resolved config, identity of teacher and data
    step_00000400/shards/       with --fsdp: student, projection and optimizer, each rank's shards
                                (torch.distributed.checkpoint); state.pt holds the rest
    latest                      the name of the newest complete checkpoint

A checkpoint is written into a temporary folder and renamed when complete; ``latest`` moves last,
also by rename. So a kill at any moment leaves the previous checkpoint usable. The teacher is never
copied: its identity (path, weight file sizes, config hash) is recorded and checked on resume.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from distill.errors import UserError, note
from distill.fileio import sha256_file, write_atomic, write_error
from distill.testing.faults import kill_point

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE = "state.pt"
META = "meta.json"
SHARDS = "shards"


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


def data_identity(data_file: str) -> dict:
    folder = Path(data_file)
    return {"path": str(folder.resolve()), "tokens_bytes": (folder / "tokens.bin").stat().st_size,
            "meta_sha256": sha256_file(folder / "meta.json")[:16]}


def teacher_identity(teacher_name: str) -> dict:
    p = Path(teacher_name)
    if p.is_file():  # a .gguf file
        return {"path": str(p.resolve()), "bytes": p.stat().st_size}
    weights = sorted(f for f in p.iterdir() if f.suffix in (".safetensors", ".bin", ".gguf"))
    return {"path": str(p.resolve()), "weights": {f.name: f.stat().st_size for f in weights},
            "config_sha256": sha256_file(p / "config.json")[:16] if (p / "config.json").is_file() else None}


def run_teacher_identity(cfg) -> dict:
    """The teacher a run trains with: its files, or those of the teacher cache that stands for it."""
    if getattr(cfg, "teacher_cache", None):
        from distill.teacher_cache import TeacherCache

        return TeacherCache(cfg.teacher_cache).identity()
    names = cfg.teacher_names() if hasattr(cfg, "teacher_names") else [cfg.teacher_name]
    if len(names) == 1:
        return teacher_identity(names[0])
    return {"teachers": [teacher_identity(n) for n in names]}


def checkpoint_tmp(dump: Path, step: int) -> Path:
    """The empty temporary folder checkpoint ``step`` is written into before its rename."""
    root = dump / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _shard_files(folder: Path) -> list[Path]:
    shards = folder / SHARDS
    return sorted(f for f in shards.rglob("*") if f.is_file()) if shards.is_dir() else []


def save_checkpoint(dump: Path, step: int, state: dict, meta: dict, keep: int, shards_written: bool = False) -> Path:
    """Write checkpoint ``step``; move ``latest`` to it; keep the newest ``keep``.

    A write that fails (a full disk, a file-size limit) removes its temporary folder and raises a
    UserError; the checkpoints already there and ``latest`` are untouched. ``shards_written``: every
    rank has written its shards into :func:`checkpoint_tmp`'s folder already (--fsdp).
    """
    root = dump / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final = root / name
    tmp = root / f".tmp-{name}"
    if not shards_written:
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(exist_ok=shards_written)
        torch.save(state, tmp / STATE)
        kill_point(f"during_checkpoint_write_{step}")
        # The state's checksum: a file damaged later (a bad disk, a copy cut short) is caught on resume;
        # torch.load alone reads damaged tensor bytes without complaint. The shards' too.
        meta = {**meta, "state_sha256": sha256_file(tmp / STATE)}
        shards = _shard_files(tmp)
        if shards:
            meta["shards_sha256"] = {str(f.relative_to(tmp)): sha256_file(f) for f in shards}
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        for f in (tmp / STATE, tmp / META, *shards):
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
    write_atomic(root / LATEST, name + "\n")
    for old in list_checkpoints(dump)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


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
    write_atomic(path, "".join(ln + "\n" for ln in keep))


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
    if expected is not None and sha256_file(folder / STATE) != expected:
        raise CorruptCheckpoint(f"{folder / STATE} does not match its checksum")
    for rel, digest in meta.get("shards_sha256", {}).items():
        if not (folder / rel).is_file() or sha256_file(folder / rel) != digest:
            raise CorruptCheckpoint(f"{folder / rel} is missing or does not match its checksum")
    state = torch.load(folder / STATE, map_location="cpu", weights_only=False)
    if state.get("sharded"):  # the Distiller reads student and optimizer from there
        state["shards_dir"] = str(folder / SHARDS)
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
HARMLESS = {"report_to", "log_interval", "checkpoint_interval", "max_steps", "keep_checkpoints", "num_workers", "force",
            "resume", "config", "dump_path", "n_gpu", "local_rank", "fp16_opt_level", "max_bad_steps",
            "fsdp", "gradient_checkpointing"}


PATHS = {"data_file", "teacher_name", "teacher_cache", "student_config", "student_pretrained_weights", "token_counts"}


def config_changes(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(harmless changes, incompatible changes) between a checkpoint's config and this run's."""
    harmless, bad = [], []

    def norm(k, v):
        if k in PATHS and isinstance(v, list):  # several teachers
            return [str(Path(x).resolve()) for x in v]
        return str(Path(v).resolve()) if k in PATHS and v is not None else v

    from distill.config import TrainConfig

    # A field newer than the checkpoint was at its default when that run trained.
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for k in sorted(set(saved) | set(current)):
        if k in ("resume", "force"):  # how this run was started, not what it trains
            continue
        if norm(k, saved.get(k, defaults.get(k))) != norm(k, current.get(k, defaults.get(k))):
            (harmless if k in HARMLESS else bad).append(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}")
    return harmless, bad


METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
# Inputs that --force must never delete, whatever --dump_path is.
_INPUT_FLAGS = ("data_file", "teacher_name", "teacher_cache", "student_pretrained_weights", "student_config",
                "token_counts", "config")


class CheckpointManager:
    """The one owner of a run's checkpoints and of resuming it.

    Before training, :meth:`start` decides where the run begins: a fresh ``--dump_path`` (a
    non-empty one is refused without ``--force``, and ``--force`` never deletes an input), or the
    checkpoint ``--resume`` names or the latest readable one, checked against this run's data,
    teacher and config. During training the Distiller calls :meth:`save` at each checkpoint. After
    a resume, :meth:`rewind_logs` drops the log lines the interrupted run wrote past the checkpoint,
    and :meth:`tensorboard_purge_step` tells TensorBoard to do the same.

    In a distributed run every rank calls every method; only the main process writes or chooses,
    and the others read the checkpoint it chose.
    """

    def __init__(self, cfg, env, log=None):
        self.cfg, self.env = cfg, env
        self.dump = Path(cfg.dump_path)
        self.metrics_path = self.dump / METRICS
        self.log = log  # a logging.Logger for the write timings, or None
        self.resumed_from: Path | None = None
        self._run_meta: dict | None = None

    @property
    def run_meta(self) -> dict:
        """What every checkpoint records about the run besides its step: the resolved config and the
        identity of the data and the teacher (checked on resume)."""
        if self._run_meta is None:
            self._run_meta = {"config": self.cfg.to_dict(), "data": data_identity(self.cfg.data_file),
                              "teacher": run_teacher_identity(self.cfg), "world_size": self.env.world_size}
        return self._run_meta

    # -- where the run starts --------------------------------------------------------------

    def start(self) -> dict | None:
        """Prepare ``--dump_path`` for a fresh run (returns None), or choose, check and read the
        checkpoint to resume from (returns its state, on every rank)."""
        if self.cfg.resume is None:
            self.env.on_main(self._prepare_fresh)
            return None
        if self.cfg.force:
            raise UserError("--resume and --force contradict each other (continue the run, or delete it)")
        if not self.dump.is_dir():
            raise UserError(f"--resume: --dump_path {self.dump} does not exist")
        chosen: dict = {}

        def choose() -> str:
            chosen["state"], meta, folder = load_for_resume(self.dump, self.cfg.resume, note)
            self.check_resumable(meta)
            return str(folder)

        self.resumed_from = Path(self.env.on_main(choose))  # then every other rank reads that one
        return chosen["state"] if self.env.is_main else read_checkpoint(self.resumed_from)[0]

    def _prepare_fresh(self) -> None:
        from distill.fileio import is_within

        dump, cfg = self.dump, self.cfg
        if dump.exists() and not dump.is_dir():
            raise UserError(f"--dump_path {dump} exists and is not a folder")
        if dump.exists() and any(dump.iterdir()):
            if not cfg.force:
                if list_checkpoints(dump):
                    raise UserError(f"--dump_path {dump} holds checkpoints of a run: add --resume to continue it, "
                                    "or --force to delete it and start over")
                raise UserError(f"--dump_path {dump} is not empty; pass --force to delete its contents and start "
                                "over")
            for name in _INPUT_FLAGS:  # never delete the inputs themselves
                values = getattr(cfg, name)
                for value in values if isinstance(values, list) else [values]:
                    if value and is_within(value, dump):
                        raise UserError(f"--{name} {value} lies inside --dump_path {dump}; --force would delete it")
            shutil.rmtree(dump)
        dump.mkdir(parents=True, exist_ok=True)

    def check_resumable(self, ck_meta: dict) -> None:
        """Refuse a checkpoint of another data set, teacher, global batch or training config; note
        the harmless changes (intervals, a later --max_steps, ...)."""
        cfg, world_size = self.cfg, self.env.world_size
        saved = ck_meta["config"]
        saved_world = ck_meta.get("world_size", 1)
        saved_global = saved["batch_size"] * saved_world
        if saved_global != cfg.batch_size * world_size:
            raise UserError(f"cannot resume: the global batch would change from {saved_world} x {saved['batch_size']}"
                            f" to {world_size} x {cfg.batch_size} sequences; keep --batch_size x processes at "
                            f"{saved_global}")
        if saved_world != world_size:
            note(f"resuming on {world_size} processes instead of {saved_world}: the same global batches, "
                 "re-sharded (dropout's random draws differ from an uninterrupted run)")
            saved = dict(saved, batch_size=cfg.batch_size)
        harmless, bad = config_changes(saved, cfg.to_dict())
        if bad:
            raise UserError(f"cannot resume: the config differs from the checkpoint's in {'; '.join(bad)}")
        if data_identity(cfg.data_file) != ck_meta["data"]:
            raise UserError(f"cannot resume: {cfg.data_file} is not the data the checkpoint was trained on")
        if run_teacher_identity(cfg) != ck_meta["teacher"]:
            which = cfg.teacher_cache or ", ".join(cfg.teacher_names())
            raise UserError(f"cannot resume: {which} is not the teacher the checkpoint was trained with")
        for change in harmless:
            note(f"resuming with a changed setting: {change}")

    # -- after a resume ----------------------------------------------------------------------

    def rewind_logs(self, step: int) -> None:
        """metrics.jsonl as of the checkpoint: the resumed run logs the later steps again."""
        if self.resumed_from is not None and self.env.is_main:
            truncate_metrics(self.metrics_path, step)

    def tensorboard_purge_step(self, step: int) -> int | None:
        """TensorBoard's purge_step: events the interrupted run logged after the checkpoint are dropped."""
        return step + 1 if self.resumed_from is not None else None

    # -- during training ---------------------------------------------------------------------

    def save(self, distiller) -> None:
        """Checkpoint the Distiller at its current step (every rank takes part: it gathers their
        RNG states); the main process writes it."""
        import time

        t0 = time.perf_counter()
        step = distiller.global_step
        state = distiller.state_dict()
        sharded = bool(state.get("sharded"))
        if sharded:  # every rank writes its shards into the main process's temporary folder
            tmp = Path(self.env.on_main(lambda: str(checkpoint_tmp(self.dump, step))))
            try:
                distiller.save_shards(tmp / SHARDS)
            except (OSError, RuntimeError) as e:
                raise UserError(f"could not write the shards of checkpoint {tmp.name} in {tmp.parent} "
                                f"({write_error(e, tmp.parent)}); the checkpoints already there are kept") from None
            self.env.barrier()
        if self.env.is_main:
            folder = save_checkpoint(self.dump, step, state, {"step": step, "epoch": distiller.epoch,
                                                              **self.run_meta}, self.cfg.keep_checkpoints,
                                     shards_written=sharded)
            if self.log is not None:
                size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
                self.log.info("checkpoint %s: %.1f MB in %.2fs", folder.name, size / 1e6, time.perf_counter() - t0)
        self.env.barrier()
