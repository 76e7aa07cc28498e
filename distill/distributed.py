"""Data-parallel training with torchrun: the process group, the main-process flag, the collectives.

One process per device. ``torchrun`` (or any launcher that sets ``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``) starts them; nccl on GPUs, gloo on CPU. The
student is wrapped in DistributedDataParallel; the teacher is replicated on every rank and never
wrapped. A second, gloo, group carries the small CPU-side agreements (loss counts, the stop flag,
RNG states for the checkpoint), so they never wait on the GPU.

Without those variables everything here is a no-op on a world of one process.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistEnv:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    cpu_group: Any = None  # gloo group for CPU tensors and objects

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only this process writes logs, TensorBoard, checkpoints and the final student."""
        return self.rank == 0

    # -- collectives (identity on one process) ------------------------------------------------

    def all_reduce_cpu(self, t: torch.Tensor, op=None) -> torch.Tensor:
        """Sum (or ``op``) a CPU tensor over ranks, in place, without touching the GPU."""
        if self.enabled:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=self.cpu_group)
        return t

    def all_reduce(self, t: torch.Tensor, op=None) -> torch.Tensor:
        """Sum (or ``op``) a tensor on the training device over ranks, in place."""
        if self.enabled:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t

    def gather_objects(self, obj) -> list | None:
        """Every rank's ``obj`` on the main process (None elsewhere)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0, group=self.cpu_group)
        return out

    def broadcast_object(self, obj):
        """The main process's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]

    def on_main(self, fn, *args):
        """Run ``fn`` on the main process only; every rank gets its result, or raises its UserError."""
        from distill.errors import UserError

        result = error = None
        if self.is_main:
            try:
                result = fn(*args)
            except UserError as e:
                error = str(e)
        result, error = self.broadcast_object((result, error))
        if error is not None:
            raise UserError(error)
        return result

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier(group=self.cpu_group)

    def any(self, flag: bool) -> bool:
        """True on every rank if it is True on any rank."""
        if not self.enabled:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int32)
        return bool(self.all_reduce_cpu(t, dist.ReduceOp.MAX).item())


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(use_gpu: bool, timeout_s: float = 1800) -> DistEnv:
    """Join the process group described by the launcher's variables (one process: no group).

    ``use_gpu``: one GPU per process, chosen by ``LOCAL_RANK``, and nccl; otherwise gloo on CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        device = torch.device("cuda") if use_gpu else torch.device("cpu")
        return DistEnv(device=device)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_gpu:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank} but this node has {torch.cuda.device_count()} GPUs")
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
    cpu_group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
    return DistEnv(world_size=world, rank=rank, local_rank=local_rank, device=device, backend=backend,
                   cpu_group=cpu_group)


def shutdown(env: DistEnv, finished: bool = False) -> None:
    """Leave the process group. ``finished``: every rank ended its run normally, so they first meet
    at a barrier; a rank tearing gloo down while another still talked to it was seen to abort at
    exit ("terminate called without an active exception"). On an error path there is no barrier:
    a rank that failed must not wait for peers that may be stuck elsewhere (torchrun stops them)."""
    if env.enabled and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


class StudentWithProjection(nn.Module):
    """What DDP wraps: the student and, when widths differ, the hidden-state projection, so both
    have their gradients all-reduced. The forward is the student's; the projection is applied by
    the losses (its gradients are still reduced: DDP hooks every parameter, not the forward)."""

    def __init__(self, student: nn.Module, projection: nn.Module | None):
        super().__init__()
        self.student = student
        self.projection = projection

    def forward(self, **kwargs):
        return self.student(**kwargs)


def wrap(env: DistEnv, student: nn.Module, projection: nn.Module | None) -> nn.Module:
    """The module the training step calls: the student itself, or its DDP wrapper."""
    if not env.enabled:
        return student
    from torch.nn.parallel import DistributedDataParallel as DDP

    module = StudentWithProjection(student, projection)
    ids = [env.local_rank] if env.device.type == "cuda" else None
    # The broadcast at construction makes every rank start from rank 0's weights.
    return DDP(module, device_ids=ids, output_device=ids[0] if ids else None)
