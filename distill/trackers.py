"""Where a run's scalars go besides ``metrics.jsonl``: TensorBoard, Weights & Biases, or nowhere.

``--report_to`` is repeatable (or comma-separated): every tracker named gets the same scalars at
the same steps. Runs are named after ``--dump_path``. W&B is an optional extra (``pip install
'distill[wandb]'``). It runs offline unless ``WANDB_MODE`` says otherwise, writing under
``--dump_path/wandb``, and ``wandb sync`` uploads it later.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from distill.errors import UserError

TRACKERS = ("tensorboard", "wandb", "none")
TENSORBOARD = "tensorboard"  # the folder under --dump_path


def parse_report_to(value: str | list | tuple | None) -> list[str]:
    """'tensorboard,wandb' or ['tensorboard', 'wandb'] -> the trackers, checked; 'none' -> []."""
    if value is None:
        return ["tensorboard"]
    items = value if isinstance(value, (list, tuple)) else [value]
    names = [n.strip() for item in items for n in str(item).split(",") if n.strip()]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise UserError(f"--report_to {unknown[0]} is not a tracker; choose from {', '.join(TRACKERS)}")
    if "none" in names and len(set(names)) > 1:
        raise UserError("--report_to none cannot be combined with a tracker")
    return [] if names == ["none"] or not names else list(dict.fromkeys(names))


def scalar_name(key: str) -> str:
    return key if key.startswith("loss") else f"train/{key}"


def scalars(record: dict) -> dict[str, float]:
    """The record's numbers under their tracker names (not the step, epoch or wall time)."""
    return {scalar_name(k): v for k, v in record.items() if k not in ("step", "epoch", "time") and v is not None}


class TensorBoardTracker:
    def __init__(self, dump: Path, purge_step: int | None):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir=str(dump / TENSORBOARD), purge_step=purge_step)

    def log(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, dump: Path, config: dict, resumed: bool):
        try:
            import wandb
        except ImportError:
            raise UserError("--report_to wandb needs the wandb package: pip install 'distill[wandb]' "
                            "(or pip install wandb)") from None
        os.environ.setdefault("WANDB_MODE", "offline")  # nothing leaves the machine unless asked
        os.environ.setdefault("WANDB_SILENT", "true")
        self.wandb = wandb
        # One W&B run per --dump_path, so a resumed run continues it.
        run_id = hashlib.sha256(str(dump.resolve()).encode()).hexdigest()[:16]
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "distill"), name=dump.name, id=run_id,
                              dir=str(dump), config=config, resume="allow" if resumed else None)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def open_trackers(names: list[str], dump: Path, config: dict, purge_step: int | None) -> list:
    """The trackers of ``--report_to``, opened (a resumed run has a purge step)."""
    out = []
    for name in names:
        if name == "tensorboard":
            out.append(TensorBoardTracker(dump, purge_step))
        elif name == "wandb":
            out.append(WandbTracker(dump, config, resumed=purge_step is not None))
    return out
