"""Distil a teacher into a student: ``python train.py --student_type distilbert --teacher_type bert ...``

The wiring, top to bottom: parse and check the flags; load and check the run (distill.training);
start fresh or resume (distill.checkpoint.CheckpointManager); train (distill.distiller); save the
student. Everything a user can get wrong ends in one sentence before the first step.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path

from distill import distributed
from distill.checkpoint import CHECKPOINTS, CheckpointManager
from distill.config import TrainConfig, parse_config
from distill.distiller import Distiller, TrainingDiverged, TrainingStopped, write_jsonl
from distill.errors import UserError, cli_entry, say
from distill.fileio import write_atomic
from distill.seeding import seed_everything
from distill.trackers import open_trackers, scalars
from distill.training import Run, build_run, git_info, save_final_student, save_student, use_gpu, warn_about_flags

logger = logging.getLogger("distill")


@distributed.exits_without_finalization
@cli_entry
def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg, given = parse_config(argv)  # validated as it is built
    warn_about_flags(cfg, given)
    env = distributed.init(use_gpu(cfg, given))
    finished = False
    try:
        rc = train(cfg, env)
        finished = True
        return rc
    finally:
        distributed.shutdown(env, finished=finished)


def train(cfg: TrainConfig, env: distributed.DistEnv) -> int:
    if cfg.fsdp and not env.enabled:
        raise UserError("--fsdp shards the models over processes: launch train.py with torchrun "
                        "(torchrun --nproc_per_node 2 train.py ...)")
    # The same on every rank: a student built from a config starts from the same weights everywhere.
    seed_everything(cfg.seed, deterministic=cfg.deterministic)
    run = build_run(cfg, env.world_size)
    checkpoints = CheckpointManager(cfg, env, log=logger)
    state = checkpoints.start()  # everything checked: only now is --dump_path touched, by the main process
    dump = checkpoints.dump
    if env.is_main:
        write_atomic(dump / "parameters.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
        write_atomic(dump / "git_log.json", json.dumps(git_info(), indent=2) + "\n")
    # Training's draws (dropout) start from a known state whatever loading drew, on every path (a student
    # built from a config or loaded from weights). They differ per rank; the initial weights are rank 0's
    # (DDP broadcasts them).
    seed_everything(cfg.seed, rank=env.rank)
    describe(cfg, run)

    teacher = None if run.teacher is None else run.teacher.model  # None: the soft targets are cached
    distiller = Distiller(cfg, run.student.model, teacher, run.dataset, run.collator, env.device,
                          student_objective=run.student.objective, layer_map=run.layer_map,
                          projection=run.projection, checkpoints=checkpoints, dist=env,
                          extra_teachers=[m.model for m in run.extra_teachers])
    if state is not None:
        distiller.load_state_dict(state)
        del state
        checkpoints.rewind_logs(distiller.global_step)
        say(f"resumed from {checkpoints.resumed_from} at step {distiller.global_step} (epoch {distiller.epoch}, "
            f"batch {distiller.batches_in_epoch})")
    trackers = []
    if env.is_main:
        trackers = open_trackers(cfg.trackers(), dump, cfg.to_dict(),
                                 checkpoints.tensorboard_purge_step(distiller.global_step))
        distiller.on_log = lambda record: log_record(checkpoints.metrics_path, trackers, record)

    sharding = ", FSDP2: student and teacher sharded" if distiller.fsdp else ""
    where = str(env.device)
    if env.enabled:
        where = f"{env.world_size} processes ({env.backend}, {env.device.type}{sharding})"
    say(f"training for {distiller.total_steps} optimizer steps of {cfg.gradient_accumulation_steps} x "
        f"{cfg.batch_size} sequences{' per process' if env.enabled else ''} on {where}")
    try:
        with stop_on_signals(distiller):
            distiller.train()
    except TrainingDiverged:
        weights = distiller.student_state_dict()  # every rank takes part with --fsdp
        if env.is_main:
            save_student(run.student.model, run.tokenizer, dump / "student_at_stop", weights)
        raise
    except TrainingStopped as stop:
        say(f"stopped by {stop} at step {distiller.global_step}; checkpoint saved in {dump / CHECKPOINTS}. "
            f"Resume with the same command plus --resume")
        return 0
    finally:
        for tracker in trackers:
            tracker.close()
    weights = distiller.student_state_dict()
    if env.is_main:
        save_final_student(run.student.model, run.tokenizer, dump, weights)
        say(f"saved the student to {dump} (load it with from_pretrained)")
    env.barrier()
    return 0


def describe(cfg: TrainConfig, run: Run) -> None:
    def params(m):
        return sum(p.numel() for p in m.parameters())

    losses = ", ".join(f"{k}={v}" for k, v in cfg.loss_weights().items() if v > 0)
    say(f"data: {run.dataset.stats.summary()}")
    if run.teacher is None:
        teacher = f"cached in {run.cache.describe()}; not loaded"
    else:
        models = [run.teacher, *run.extra_teachers]
        dtype = str(next(run.teacher.model.parameters()).dtype).replace("torch.", "")
        teacher = "; ".join(f"{name} ({params(m.model):,} parameters, {dtype})"
                            for name, m in zip(cfg.teacher_names(), models))
        if len(models) > 1:
            weights = ", ".join(f"{w:.3g}" for w in cfg.teacher_weight_list())
            teacher = f"{len(models)} teachers, {cfg.teacher_combine} averaged with weights {weights}: {teacher}"
    say(f"teacher: {teacher}; student: {params(run.student.model):,} parameters; losses: {losses}")


def log_record(metrics_path: Path, trackers: list, record: dict) -> None:
    """One log line: appended to metrics.jsonl and sent to every tracker of --report_to."""
    write_jsonl(metrics_path, record)
    values = scalars(record)
    for tracker in trackers:
        tracker.log(values, record["step"])


class stop_on_signals:
    """SIGTERM or SIGINT asks the Distiller to checkpoint after the current step and stop; a second
    signal stops at once. The previous handlers come back on exit."""

    def __init__(self, distiller: Distiller):
        self.distiller = distiller
        self.previous: dict = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.distiller.stop_requested is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.distiller.stop_requested = name
        print(f"\n{name}: saving a checkpoint after this step, then stopping", file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
