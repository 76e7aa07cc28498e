"""Data-parallel training with torchrun: the process group, the main-process flag, the collectives.

One process per device. ``torchrun`` (or any launcher that sets ``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``) starts them; nccl on GPUs, gloo on CPU. The
student is wrapped in DistributedDataParallel; the teacher is replicated on every rank and never
wrapped; with ``--fsdp`` both are sharded instead (:func:`shard`), and checkpoints are written as
each rank's shards (:func:`save_shards`). A second, gloo, group carries the small CPU-side
agreements (loss counts, the stop flag, RNG states for the checkpoint), so they never wait on the GPU.

Without those variables everything here is a no-op on a world of one process.
"""

from __future__ import annotations

import datetime
import functools
import gc
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

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
    at a barrier, and none ends while another still writes. On an error path there is no barrier:
    a rank that failed must not wait for peers that may be stuck elsewhere (torchrun stops them).

    This does not end gloo's worker threads when something still holds the group (FSDP2's module
    state does); :func:`exits_without_finalization` is what makes the process end cleanly then."""
    if env.enabled and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def exits_without_finalization(main: Callable[..., int]) -> Callable[..., int]:
    """Decorate the ``main`` of a command that torchrun launches: under torchrun, the process ends
    with ``os._exit`` once ``main`` has returned (or exited through ``SystemExit``, as a one-sentence
    error does), after flushing the standard streams and logging, without Python's finalization.

    Why: a gloo worker thread releases each finished collective's work after the caller has moved
    on, and a barrier's work holds the collective before it. Their tensors have Python objects, so
    the thread takes the GIL to let them go. If Python is finalizing by then, the thread is ended
    inside a C++ destructor and the process aborts with "terminate called without an active
    exception" (a core dump shows ``~AsyncBarrierWork`` -> ``~AsyncAllreduceWork`` ->
    ``TensorImpl::decref_pyobject`` -> ``take_gil`` -> ``pthread_exit`` -> ``std::terminate``).
    ``destroy_process_group`` joins those threads only when nothing else holds the group, and
    FSDP2's module state does: it outlives the model. A 15-line script doing all-reduces, a
    barrier and ``destroy_process_group`` while it holds the group aborted in 9 of 40 two-process
    runs; none of 40 ended with ``os._exit`` (``benchmarks/gloo_exit.py``). Everything a run
    writes is closed by the time ``main`` returns. Outside torchrun ``main`` is called as it is.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        if not launched_by_torchrun():
            return main(*args, **kwargs)
        try:
            code = main(*args, **kwargs)
        except SystemExit as e:
            code = e.code
        if code is None:
            code = 0
        elif not isinstance(code, int):  # SystemExit("message"): Python prints it and exits with 1
            print(code, file=sys.stderr)
            code = 1
        gc.collect()  # what the run left in reference cycles (a DataLoader's workers) is shut down
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)

    return wrapper


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


# ------------------------------------------------------------------------------------------------
# FSDP2 (--fsdp): PyTorch's own sharding, torch.distributed.fsdp.fully_shard

_LAYER_LISTS = ("layer", "layers", "h", "blocks")  # BERT/RoBERTa/DistilBERT, Llama, GPT-2, others


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks (the longest ModuleList named like one), each of which
    becomes its own FSDP unit; a UserError when there is none."""
    from distill.errors import UserError

    found = [(len(m), name) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) > 0 and name.rsplit(".", 1)[-1] in _LAYER_LISTS]
    if not found:
        raise UserError(f"--fsdp: cannot find the transformer layers of {type(model).__name__} for per-layer "
                        f"sharding (no module list named {', '.join(_LAYER_LISTS)})")
    return model.get_submodule(max(found)[1])


def shard(student: nn.Module, projection: nn.Module | None, teachers: list[nn.Module],
          param_dtype: torch.dtype | None) -> nn.Module:
    """Shard the student per transformer layer and then as a whole (the whole, with the hidden-state
    projection, is :class:`StudentWithProjection`, the root unit the step calls), and every teacher
    the same way; in place. Returns the root.

    The student's units compute in ``param_dtype`` (--bf16/--fp16; None: fp32) and reduce gradients
    in fp32. The teachers' layers reshard after their forward; their root (embeddings, vocabulary
    projection) stays gathered until :meth:`~torch.distributed.fsdp.FSDPModule.reshard` is called
    after the step's losses, because the fused losses apply the vocabulary projection themselves
    after the forward, a chunk of rows at a time, from the whole weight. The student's root is not
    resharded after its forward for the same reason (FSDP2's default for a root): the fused losses
    run inside that unshard, and their weight gradient is reduce-scattered with the others."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in transformer_layers(student):
        fully_shard(layer, mp_policy=mp)
    if projection is not None:
        fully_shard(projection, mp_policy=mp)
    root = StudentWithProjection(student, projection)
    fully_shard(root, mp_policy=mp)
    for teacher in teachers:
        for layer in transformer_layers(teacher):
            fully_shard(layer, reshard_after_forward=True)
        fully_shard(teacher, reshard_after_forward=False)
    return root


def wrap(env: DistEnv, student: nn.Module, projection: nn.Module | None) -> nn.Module:
    """The module the training step calls: the student itself, or its DDP wrapper."""
    if not env.enabled:
        return student
    from torch.nn.parallel import DistributedDataParallel as DDP

    module = StudentWithProjection(student, projection)
    ids = [env.local_rank] if env.device.type == "cuda" else None
    # The broadcast at construction makes every rank start from rank 0's weights.
    return DDP(module, device_ids=ids, output_device=ids[0] if ids else None)


def _fqn_by_param(root: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in root.named_parameters()}


def _optimizer_fqns(root: nn.Module, optimizer) -> list[str]:
    """The FQN of each optimizer parameter, in the order a plain optimizer state dict numbers them."""
    names = _fqn_by_param(root)
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_model_state_dicts(root: nn.Module) -> tuple[dict, dict]:
    """The student's and the projection's whole state dicts from the sharded root, on the main
    process (CPU); empty on the others. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    msd = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    student = {k[len("student."):]: v for k, v in msd.items() if k.startswith("student.")}
    projection = {k[len("projection."):]: v for k, v in msd.items() if k.startswith("projection.")}
    return student, projection


def load_full_state_dicts(root: nn.Module, optimizer, student: dict, projection: dict | None,
                          optim_state: dict) -> None:
    """Load whole (one-process) state dicts into the sharded root and its optimizer: each rank keeps
    its shards. Every rank passes the same dicts."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    msd = {f"student.{k}": v for k, v in student.items()}
    msd.update({f"projection.{k}": v for k, v in (projection or {}).items()})
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(root, msd, options=opts)
    fqns = _optimizer_fqns(root, optimizer)
    osd = {"state": {fqns[int(i)]: st for i, st in optim_state["state"].items()},
           "param_groups": [{**g, "params": [fqns[int(i)] for i in g["params"]]} for g in optim_state["param_groups"]]}
    set_optimizer_state_dict(root, optimizer, osd, options=opts)


def _dcp_state(root: nn.Module, optimizer) -> dict:
    """The model's and the optimizer's state for torch.distributed.checkpoint, keyed by parameter
    name: each rank's shards under FSDP, whole tensors for a plain module."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optim = get_state_dict(root, optimizer)
    return {"model": model, "optim": optim}


def save_shards(root: nn.Module, optimizer, folder) -> None:
    """Every rank writes its shards of the student, the projection and AdamW's state into ``folder``
    (torch.distributed.checkpoint's format: a file per rank and the metadata). Collective."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_dcp_state(root, optimizer), checkpoint_id=str(folder))


def load_shards(root: nn.Module, optimizer, folder) -> None:
    """Load shards written by :func:`save_shards`, by any number of processes, into ``root`` (sharded
    or not) and its optimizer: torch.distributed.checkpoint re-shards them to this world size.
    Collective when a process group is up; one process reads them alone."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _dcp_state(root, optimizer)
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(root, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
