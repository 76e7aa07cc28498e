"""The Distiller: teacher and student on the same batch, the weighted losses, one optimizer step.

An optimizer step is ``gradient_accumulation_steps`` micro-batches. Every loss is a sum over
the positions it covers (distill.losses); the step divides each by the number of positions that
carry it summed over all the step's micro-batches, once. So 4 micro-batches of 2 give the same
update as 1 batch of 8 whatever their lengths. Those counts are read from the CPU batch before
anything runs on the device, so they cost no synchronisation.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from distill import losses as L
from distill import optim as O
from distill.attention import use_fp32_attention
from distill.checkpoint import CheckpointManager
from distill.config import TrainConfig
from distill.data.collate import IGNORE_INDEX, Collator
from distill.data.dataset import LMSeqsDataset
from distill.data.sampler import LengthGroupedBatchSampler
from distill.distributed import (
    DistEnv,
    StudentWithProjection,
    full_model_state_dicts,
    load_full_state_dicts,
    load_shards,
    save_shards,
    shard,
    wrap,
)
from distill.errors import UserError
from distill.losses.terms import TERMS, TermContext
from distill.memory import EmbeddingRowGrads, fix_mmap_threshold, limit_onednn_cache
from distill.testing import faults

logger = logging.getLogger(__name__)


class TrainingDiverged(UserError):
    """Too many consecutive optimizer steps had a NaN or Inf loss."""


class TrainingStopped(Exception):
    """A stop was requested (SIGTERM/SIGINT); a checkpoint was saved first."""


@dataclass
class StepResult:
    skipped: bool  # the loss was NaN/Inf: gradients dropped, no update
    loss: torch.Tensor  # 0-dim, on the device: the weighted loss of the step
    parts: dict[str, torch.Tensor]  # each enabled loss, normalised, on the device
    tokens: int  # real (non-padding) tokens in the step
    grad_norm: torch.Tensor | None = None


@dataclass
class LogWindow:
    """Running sums between two log lines; read (and synchronised) only on logging steps."""

    steps: int = 0
    loss: float | torch.Tensor = 0.0
    parts: dict = field(default_factory=dict)
    tokens: int = 0
    t0: float = field(default_factory=time.perf_counter)


class Distiller:
    def __init__(self, cfg: TrainConfig, student: nn.Module, teacher: nn.Module | None, dataset: LMSeqsDataset,
                 collator: Collator, device: torch.device, *, student_objective: str,
                 layer_map: list[tuple[int, int]] | None = None, projection: nn.Module | None = None,
                 on_log: Callable[[dict], None] | None = None, checkpoints: CheckpointManager | None = None,
                 dist: DistEnv | None = None, extra_teachers: list[nn.Module] = ()):
        self.cfg = cfg
        self.device = device
        self.dist = dist if dist is not None else DistEnv(device=device)
        if device.type == "cpu":  # the step's large host blocks go back to the system (distill.memory)
            fix_mmap_threshold()
            limit_onednn_cache()
        self.student = student.to(device).train()
        # No teacher: its soft targets come with each batch, from a teacher cache (the collator's).
        self.teacher = None if teacher is None else teacher.to(device).eval()
        # Several teachers: the ones after the first serve the soft targets only, combined with the first's
        # (L.TeacherEnsemble: cfg.teacher_combine, with cfg.teacher_weights).
        self.extra_teachers = [t.to(device).eval() for t in extra_teachers]
        self.teachers = ([] if teacher is None else [self.teacher]) + self.extra_teachers
        for model in self.teachers:
            for p in model.parameters():
                p.requires_grad_(False)
        self.teacher_weights = cfg.teacher_weight_list() if self.extra_teachers else (1.0,)
        self.mlm = student_objective == "mlm"
        # The enabled loss terms (distill.losses.terms), in the registry's order, and what they need.
        self.alphas = cfg.loss_weights(mlm=self.mlm)
        self.enabled = [k for k in self.alphas if self.alphas[k] > 0]
        self.terms = {k: TERMS[k] for k in self.enabled}
        needs = [t.needs for t in self.terms.values()]
        self.need_teacher_logits = any(n.teacher_logits for n in needs)
        self.need_hidden = any(n.hidden_states for n in needs)
        self.student_outputs = sorted({o for n in needs for o in n.student_outputs})
        self.teacher_outputs = sorted({o for n in needs for o in n.teacher_outputs})
        self.need_teacher_forward = any(n.teacher_forward for n in needs)
        self._teacher_out = None  # the teacher's outputs of the current micro-batch, for the terms
        for term in self.terms.values():  # hooks, say
            term.prepare(self.student, self.teacher)
        self.layer_map = layer_map
        self.projection = projection.to(device) if projection is not None else None
        # What the step calls: the student, or (several processes) its DistributedDataParallel wrapper, or
        # with --fsdp the sharded root holding it (distill.distributed.shard: the teachers are sharded too).
        self.fsdp = cfg.fsdp and self.dist.enabled
        if self.fsdp:
            param_dtype = torch.bfloat16 if cfg.bf16 else torch.float16 if cfg.fp16 else None
            self.model = shard(self.student, self.projection, self.teachers, param_dtype)
        else:
            self.model = wrap(self.dist, self.student, self.projection)
        # One eager process on the CPU: a tied input embedding's gradient goes into the projection's weight
        # gradient as rows, not through a fresh (V, H) block every backward (distill.memory).
        self.embedding_rows = None
        dynamo = sys.modules.get("torch._dynamo")  # loaded if the student was compiled (importing it costs ~1 s)
        compiled = dynamo is not None and isinstance(self.student, dynamo.eval_frame.OptimizedModule)
        if device.type == "cpu" and not self.dist.enabled and not compiled:
            self.embedding_rows = EmbeddingRowGrads.install(self.student)
        # bf16 on the CPU: the student's attention in fp32 where this CPU measured it faster (distill.attention).
        self.attention = None
        if device.type == "cpu" and cfg.bf16 and not compiled:
            self.attention = use_fp32_attention(self.student, cfg.max_model_input_size)
            if self.attention is not None:
                logger.info("bf16 on the CPU: the student's attention runs in %s (%s)",
                            "fp32" if self.attention.fp32 else "bf16", self.attention.source)
        # Scratch blocks of the fused vocabulary losses, kept from step to step (see L.Workspace).
        self.loss_workspace = L.Workspace()
        # One process on the CPU: the projection's weight gradient goes back to the workspace when cleared,
        # for the next step's (L.Workspace.recycle). Several hold their gradients in their own buckets.
        proj = L.output_projection(self.student) if device.type == "cpu" and not self.dist.enabled else None
        self._recycled_grad = None if proj is None else proj.weight
        self.divergence = cfg.soft_divergence()  # of the soft-target loss

        self.dataset = dataset
        self.collator = collator
        # Each rank takes its slice of every global batch (batch_size x world_size sequences).
        self.sampler = LengthGroupedBatchSampler(dataset.lengths, cfg.batch_size, seed=cfg.seed,
                                                 group_by_size=cfg.group_by_size,
                                                 num_replicas=self.dist.world_size, rank=self.dist.rank)
        # Its own generator: each iter() of a DataLoader draws a seed, which would otherwise come from
        # the global RNG (dropout's) and make a resumed run draw one number more than a straight one.
        self.loader = torch.utils.data.DataLoader(dataset, batch_sampler=self.sampler, collate_fn=collator,
                                                  num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                                                  generator=torch.Generator().manual_seed(cfg.seed))
        steps_per_epoch = math.ceil(len(self.sampler) / cfg.gradient_accumulation_steps)
        self.total_steps = cfg.n_epoch * steps_per_epoch
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)

        self._params = [p for _, p in self._trainable()]  # what is clipped and stepped
        # The fused implementation: one kernel over all parameters (on the benchmark's CPU shape it
        # halved the optimizer's time, 26 -> 12 ms a step, against the default foreach one).
        self.optimizer = O.adamw(self._trainable(), lr=cfg.learning_rate, eps=cfg.adam_epsilon,
                                 weight_decay=cfg.weight_decay, betas=(0.9, 0.98), fused=device.type in ("cpu", "cuda"))
        self.scheduler = O.linear_warmup_decay(self.optimizer, int(cfg.warmup_prop * self.total_steps),
                                               self.total_steps)

        # Mixed precision lives here: autocast for the forwards, a scaler for fp16 only.
        self.amp_dtype = torch.bfloat16 if cfg.bf16 else torch.float16 if cfg.fp16 else None
        self.scaler = torch.amp.GradScaler("cuda") if cfg.fp16 else None

        self.on_log = on_log
        self.checkpoints = checkpoints  # saves at the intervals, the end of an epoch, and on a stop
        self.global_step = 0
        self.epoch = 0
        self.batches_in_epoch = 0  # micro-batches of this epoch consumed: the sampler position
        self._resuming = False  # load_state_dict put the sampler mid-epoch: train() must not restart it
        self.bad_steps = 0
        self.last_good_step = 0
        self.window = LogWindow()
        self.stop_requested: str | None = None  # set by a signal handler; honoured after the step

    # -- set-up --------------------------------------------------------------------------------

    def _trainable(self) -> list[tuple[str, nn.Parameter]]:
        named = [(n, p) for n, p in self.student.named_parameters() if p.requires_grad]
        if self.projection is not None:
            named += [(f"projection.{n}", p) for n, p in self.projection.named_parameters()]
        return named

    def _autocast(self):
        return O.autocast(self.device, self.amp_dtype)

    # -- one optimizer step --------------------------------------------------------------------

    def masks(self, batch: dict) -> dict[str, torch.Tensor]:
        """The positions each loss covers, from the CPU batch. Losses get these CPU masks, so
        choosing their rows needs no device sync, and the step's counts come from them too."""
        attn = batch["attention_mask"].bool()  # (B, L)
        out = {"attn": attn}
        labels = batch.get("labels")
        if labels is not None:
            out["labels"] = labels != IGNORE_INDEX  # (B, L)
        out["ce"] = out["labels"] if self.cfg.restrict_ce_to_mask else attn
        if "target_mask" in batch:  # completion-only: the positions that predict a completion token
            out["ce"] = batch["target_mask"]
        return out

    def loss_counts(self, masks: dict[str, torch.Tensor]) -> dict[str, int]:
        """Positions carrying each enabled loss (each term's :meth:`~distill.losses.terms.LossTerm.count`)."""
        return {k: self.terms[k].count(masks) for k in self.enabled}

    def teacher_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Only what the enabled losses need: logits, hidden states, or hidden states alone
        (then the vocabulary projection is skipped by running the base model), and nothing at all
        when no term reads the teacher. A plain vocabulary projection is not run here: the logits
        come back as L.ProjectedLogits, which the fused losses compute a chunk of rows at a time
        (no (B, L, V) tensor)."""
        self._teacher_out = None
        if not (self.need_teacher_logits or self.need_hidden or self.teacher_outputs or self.need_teacher_forward):
            return None, None
        proj = L.output_projection(self.teacher) if self.need_teacher_logits else None
        extra = {f"output_{o}": True for o in self.teacher_outputs}
        others = [self._teacher_logits(t, input_ids, attention_mask)
                  for t in (self.extra_teachers if self.need_teacher_logits else [])]
        with torch.inference_mode(), self._autocast():
            if proj is not None:
                with L.projection_input(self.teacher):
                    out = self.teacher(input_ids=input_ids, attention_mask=attention_mask,
                                       output_hidden_states=self.need_hidden, **extra)
                logits = L.ProjectedLogits(out.logits, proj.weight, proj.bias, self.amp_dtype)
                hidden = out.hidden_states
            elif self.need_teacher_logits:
                out = self.teacher(input_ids=input_ids, attention_mask=attention_mask,
                                   output_hidden_states=self.need_hidden, **extra)
                logits, hidden = out.logits, out.hidden_states
            else:
                out = self.teacher.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                              output_hidden_states=self.need_hidden, **extra)
                logits, hidden = None, out.hidden_states
        self._teacher_out = out  # the terms that ask for further outputs read them here
        if others:
            logits = L.TeacherEnsemble([logits, *others], self.teacher_weights, self.cfg.teacher_combine,
                                       self.cfg.temperature)
        if hidden is not None:
            # Autograd may not save inference tensors; the cosine/MSE backward saves the teacher's
            # side, so the layers that are matched (all, for a plug-in term without a layer map)
            # become ordinary tensors (a (B, L, H) copy each).
            used = {t for _, t in self.layer_map} if self.layer_map else set(range(len(hidden)))
            hidden = tuple(h.clone() if i in used else h for i, h in enumerate(hidden))
        return logits, hidden

    def _teacher_logits(self, teacher: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """A further teacher's logits only (L.ProjectedLogits for a plain vocabulary projection)."""
        proj = L.output_projection(teacher)
        with torch.inference_mode(), self._autocast():
            if proj is None:
                return teacher(input_ids=input_ids, attention_mask=attention_mask).logits
            with L.projection_input(teacher):
                out = teacher(input_ids=input_ids, attention_mask=attention_mask)
            return L.ProjectedLogits(out.logits, proj.weight, proj.bias, self.amp_dtype)

    def loss_sums(self, batch: dict, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Forward teacher and student on one micro-batch (on the device); each enabled loss as a sum."""
        input_ids = batch["input_ids"]
        attention_mask = batch["attention_mask"]
        labels = batch.get("labels")
        if self.teacher is None:  # cached: the top-k rows the collator read (no hidden-state loss runs)
            t_logits = L.CachedTargets(batch["teacher_ids"], batch["teacher_logprobs"], batch["teacher_tail"],
                                       batch.get("teacher_samples"), batch.get("teacher_entropy"))
            t_hidden = None
        else:
            t_logits, t_hidden = self.teacher_forward(input_ids, attention_mask)
        # The vocabulary terms share one fused projection-and-loss pass (distill.losses.fused).
        vocab = [k for k in self.enabled if self.terms[k].fused is not None]
        kernels = {self.terms[k].fused for k in vocab}
        # A plain vocabulary projection is left to the fused losses: no (B, L, V) logits are made.
        proj = L.output_projection(self.student) if vocab else None
        extra = {f"output_{o}": True for o in self.student_outputs}
        with self._autocast(), L.projection_input(self.student) if proj is not None else contextlib.nullcontext():
            s_out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                               output_hidden_states=self.need_hidden, **extra)  # the DDP wrapper when distributed
        sums = {}
        if proj is not None:  # s_out.logits is the projection's input (B, L, H)
            has_lm = "lm_ce" in kernels
            lm_labels, lm_mask = labels, masks.get("labels")
            if has_lm and not self.mlm:
                lm_labels, lm_mask = L.shift_labels(labels, lm_mask)
            fused = L.projected_vocab_losses(
                s_out.logits, proj.weight, proj.bias, teacher=t_logits, temperature=self.cfg.temperature,
                soft_target="soft_target_ce" in kernels, mse="logits_mse" in kernels, mask=masks["ce"],
                labels=lm_labels if has_lm else None, label_mask=lm_mask if has_lm else None,
                compute_dtype=self.amp_dtype, workspace=self.loss_workspace, divergence=self.divergence)
            sums = {k: fused[self.terms[k].fused] for k in vocab}
        elif isinstance(t_logits, (L.ProjectedLogits, L.TeacherEnsemble)):
            t_logits = t_logits.materialize()
        rest = [k for k in self.enabled if k not in sums]
        if rest:
            ctx = TermContext(cfg=self.cfg, batch=batch, masks=masks, student=s_out,
                              teacher=self._teacher_out,
                              student_logits=None if proj is not None else s_out.logits, teacher_logits=t_logits,
                              teacher_hidden=t_hidden, layer_map=self.layer_map, projection=self.projection,
                              divergence=self.divergence)
            for k in rest:
                sums[k] = self.terms[k].compute(ctx)
        if self.fsdp:  # the teachers' roots stayed gathered for the losses (distill.distributed.shard)
            for t in self.teachers:
                t.reshard()
        return {k: sums[k] for k in self.enabled}

    def step(self, micro_batches: list[dict]) -> StepResult:
        """Forward and backward over the micro-batches of one optimizer step, then optimize().

        Several processes: each loss is divided by its count summed over every rank's micro-batches
        (one all-reduce of a few CPU integers), so the summed gradients are those of one process
        with the whole global batch; gradients are all-reduced on the last micro-batch only.
        """
        masks = [self.masks(b) for b in micro_batches]
        counts = torch.zeros(len(self.enabled) + 1, dtype=torch.int64)  # each loss's positions, then tokens
        for m in masks:
            c = self.loss_counts(m)
            counts += torch.tensor([c[k] for k in self.enabled] + [int(m["attn"].sum())])
        tokens = int(counts[-1])  # this rank's
        self.dist.all_reduce_cpu(counts)
        totals = dict(zip(self.enabled, counts.tolist()))
        # DDP averages gradients over ranks; scaling by the world size makes that average a sum.
        world = self.dist.world_size
        loss_total = torch.zeros((), device=self.device)
        parts = {k: torch.zeros((), device=self.device) for k in self.enabled}
        for i, (b, m) in enumerate(zip(micro_batches, masks)):
            b = {k: v.to(self.device, non_blocking=True) for k, v in b.items()}
            last = i == len(micro_batches) - 1
            if self.fsdp:  # gradients are reduce-scattered on the last micro-batch only
                self.model.set_requires_gradient_sync(last)
            sync = contextlib.nullcontext() if last or not self.dist.enabled or self.fsdp else self.model.no_sync()
            with sync:
                loss = torch.zeros((), device=self.device)
                for k, s in self.loss_sums(b, m).items():
                    term = s / max(totals[k], 1)  # normalised once, over the whole step and every rank
                    parts[k] += term.detach()
                    loss = loss + self.alphas[k] * term
                if faults.nan_at(self.dist.rank, self.global_step + 1):
                    loss = loss * float("nan")
                scaled = loss * world if world > 1 else loss
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss_total += loss.detach()
        grad_norm = self.optimize(loss_total)
        return StepResult(grad_norm is None, loss_total, parts, tokens, grad_norm)

    def optimize(self, loss_total: torch.Tensor) -> torch.Tensor | None:
        """Unscale (fp16), clip, guard, step the optimizer and the schedule, clear the gradients.

        Returns the gradient norm, or None when the step was dropped: a NaN/Inf loss, or (without
        fp16's scaler, which skips overflowing steps itself) a NaN/Inf gradient.
        """
        params = self._params
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        # With max_grad_norm 0 the norm is still measured (an infinite threshold clips nothing).
        limit = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, limit)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor over the ranks' shards
            grad_norm = grad_norm.full_tensor()
        finite = torch.isfinite(loss_total)
        if self.scaler is None:
            finite = finite & torch.isfinite(grad_norm)
        if self.dist.enabled:  # one decision for all: every rank skips, or none
            finite = self.dist.all_reduce(finite.to(torch.int32), torch.distributed.ReduceOp.MIN)
        if not bool(finite):  # the guard is the step's one host sync
            self._clear_grads()
            if self.scaler is not None:
                self.scaler.update()  # the unscale_ above must be closed by an update
            return None
        stepped = True
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # skips the step itself if the scaled grads overflowed
            self.scaler.update()
            # It backs off only after an overflow: then no update was made, and the schedule must not
            # move either (fp16's first steps calibrate the scale; they are not bad steps).
            stepped = self.scaler.get_scale() >= scale
        else:
            self.optimizer.step()
        if stepped:
            self.scheduler.step()
        self._clear_grads()
        return grad_norm

    def _clear_grads(self) -> None:
        w = self._recycled_grad
        if w is not None and w.grad is not None:
            self.loss_workspace.recycle(w.grad)
        self.optimizer.zero_grad(set_to_none=True)

    # -- the loop ------------------------------------------------------------------------------

    def train(self, progress: bool = True) -> None:
        from tqdm import tqdm

        cfg = self.cfg
        bar = tqdm(total=self.total_steps, initial=self.global_step, desc="distilling", unit="step",
                   disable=not progress or not self.dist.is_main, dynamic_ncols=True)
        self.window.t0 = time.perf_counter()
        try:
            while self.global_step < self.total_steps and self.epoch < cfg.n_epoch:
                if not self._resuming:  # a resumed epoch continues where load_state_dict put the sampler
                    self.sampler.set_epoch(self.epoch)
                    self.batches_in_epoch = 0
                self._resuming = False
                self.collator.epoch = self.epoch  # part of the masking seed
                batches = iter(self.loader)
                epoch_done = False
                while self.global_step < self.total_steps:
                    micro = list(islice(batches, cfg.gradient_accumulation_steps))
                    if not micro:
                        epoch_done = True
                        break
                    self.batches_in_epoch += len(micro)
                    res = self.step(micro)
                    self.global_step += 1
                    bar.update(1)
                    self._after_step(res)
                if not epoch_done:
                    break  # max steps reached inside the epoch
                self.epoch += 1
                self.batches_in_epoch = 0
                if self.checkpoints is not None and self.global_step % cfg.checkpoint_interval != 0:
                    self.checkpoints.save(self)  # end of epoch (unless just saved)
        finally:  # also on a stop or an error: the bar's line ends before any message
            bar.close()

    def _after_step(self, res: StepResult) -> None:
        cfg = self.cfg
        faults.kill_point(f"after_step_{self.global_step}")
        if res.skipped:
            self._on_bad_step()
        else:
            self.bad_steps = 0
            self.last_good_step = self.global_step
            w = self.window
            w.steps += 1
            w.loss = w.loss + res.loss
            for k, v in res.parts.items():
                w.parts[k] = w.parts.get(k, 0.0) + v
            w.tokens += res.tokens
            if self.global_step % cfg.log_interval == 0 or self.global_step == self.total_steps:
                record = self._log_record(w, res)  # every rank takes part in its all-reduce
                if self.on_log is not None and self.dist.is_main:
                    self.on_log(record)
                self.window = LogWindow()
        if self.checkpoints is not None and self.global_step % cfg.checkpoint_interval == 0:
            self.checkpoints.save(self)
        # A signal may reach the ranks at different steps: they agree, and all stop after this one.
        if self.dist.any(self.stop_requested is not None) and self.stop_requested is None:
            self.stop_requested = "a stop requested on another rank"
        if self.stop_requested is not None:
            if self.checkpoints is not None and self.global_step % cfg.checkpoint_interval != 0:
                self.checkpoints.save(self)
            raise TrainingStopped(self.stop_requested)

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything that decides the rest of the run (the teacher excepted: it is fixed)."""
        from distill.checkpoint import rng_state

        w = self.window
        # Per rank: its generators (dropout differs per rank) and its share of the partial log
        # window, so the first log line after a resume is the same. Gathered on the main process.
        mine = {"rng": rng_state(),
                "window": {"steps": w.steps, "loss": float(w.loss), "tokens": w.tokens,
                           "parts": {k: float(v) for k, v in w.parts.items()}}}
        ranks = self.dist.gather_objects(mine)
        if self.fsdp:  # each rank writes its own shards of these (save_shards)
            student = projection = optimizer = None
        else:
            student, optimizer = self.student.state_dict(), self.optimizer.state_dict()
            projection = None if self.projection is None else self.projection.state_dict()
        return {
            "student": student,
            "projection": projection,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "global_step": self.global_step,
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "bad_steps": self.bad_steps,
            "last_good_step": self.last_good_step,
            "sampler": self.sampler.state_dict(),  # its checks; epoch and position are the Distiller's
            "window": mine["window"],
            "rng": mine["rng"],
            "ranks": ranks,  # None off the main process, which does not write
            "world_size": self.dist.world_size,
            "sharded": self.fsdp,  # student, projection and optimizer are in the checkpoint's shards/
        }

    def save_shards(self, folder) -> None:
        """--fsdp: write this rank's shards of student, projection and optimizer (collective)."""
        save_shards(self.model, self.optimizer, folder)

    def _unsharded_root(self) -> nn.Module:
        """Student and projection under the names a sharded checkpoint gives them."""
        return StudentWithProjection(self.student, self.projection)

    def load_state_dict(self, state: dict) -> None:
        from distill.checkpoint import set_rng_state

        if state.get("sharded"):  # from the checkpoint's shards, re-sharded to this run (any world size)
            load_shards(self.model if self.fsdp else self._unsharded_root(), self.optimizer, state["shards_dir"])
        elif self.fsdp:  # a checkpoint of whole tensors (one process, DDP) resumed under FSDP
            load_full_state_dicts(self.model, self.optimizer, state["student"], state["projection"],
                                  state["optimizer"])
        else:
            self.student.load_state_dict(state["student"])
            if self.projection is not None:
                self.projection.load_state_dict(state["projection"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.global_step = state["global_step"]
        self.epoch = state["epoch"]
        self.bad_steps = state["bad_steps"]
        self.last_good_step = state["last_good_step"]
        # The resume position is set here only: the sampler continues the interrupted epoch with its
        # very next batch (it checks seed, global batch and dataset size).
        self.sampler.load_state_dict({**state["sampler"], "epoch": state["epoch"],
                                      "position": state["batches_in_epoch"]})
        self.batches_in_epoch = self.sampler.position
        self._resuming = True
        ranks = state.get("ranks") or [{"rng": state["rng"], "window": state["window"]}]
        rank, world = self.dist.rank, self.dist.world_size
        if len(ranks) == world:  # the same world size: each rank continues exactly
            w, rng = ranks[rank]["window"], ranks[rank]["rng"]
        else:
            # Another world size re-shards the same global batches, so the data order is exact;
            # dropout's draws cannot be. The log window's sums go to rank 0 (they are summed anyway).
            w = {"steps": ranks[0]["window"]["steps"], "loss": 0.0, "tokens": 0, "parts": {}}
            if rank == 0:
                for r in ranks:
                    w["loss"] += r["window"]["loss"]
                    w["tokens"] += r["window"]["tokens"]
                    for k, v in r["window"]["parts"].items():
                        w["parts"][k] = w["parts"].get(k, 0.0) + v
            rng = ranks[rank % len(ranks)]["rng"]
        self.window = LogWindow(steps=w["steps"], loss=torch.tensor(w["loss"], device=self.device),
                                parts={k: torch.tensor(v, device=self.device) for k, v in w["parts"].items()},
                                tokens=w["tokens"])
        set_rng_state(rng)
        if len(ranks) != world and rank >= len(ranks):
            torch.manual_seed(self.cfg.seed + 7919 * rank + self.global_step)  # dropout apart from rank 0's

    def student_state_dict(self) -> dict | None:
        """The student's whole state dict for writing it (gathered on the main process with --fsdp,
        a collective then; None when the model's own state dict serves)."""
        if not self.fsdp:
            return None
        weights = full_model_state_dicts(self.model)[0]
        # Tied weights (an LM head sharing the input embeddings) are gathered as separate copies, and
        # save_pretrained would write each: keep the first name, as it does for the tied module.
        seen = set()
        for name, p in self.student.named_parameters(remove_duplicate=False):
            if id(p) in seen:
                weights.pop(name, None)
            seen.add(id(p))
        return weights

    def _on_bad_step(self) -> None:
        self.bad_steps += 1
        logger.warning("step %d: the loss is NaN or Inf; its gradients were dropped (%d in a row)",
                       self.global_step, self.bad_steps)
        if self.bad_steps >= self.cfg.max_bad_steps:
            raise TrainingDiverged(
                f"training stopped at step {self.global_step}: {self.bad_steps} consecutive steps had a NaN or Inf "
                f"loss; the student as of step {self.last_good_step} is saved")

    def _log_record(self, window: LogWindow, last: StepResult) -> dict:
        elapsed = time.perf_counter() - window.t0
        n = max(window.steps, 1)
        # Each rank holds its share of each loss (its sum over the global count): summed, the whole.
        names = self.enabled  # the same list on every rank, whatever its window holds
        values = torch.stack([torch.as_tensor(window.loss, device=self.device, dtype=torch.float32)]
                             + [torch.as_tensor(window.parts.get(k, 0.0), device=self.device, dtype=torch.float32)
                                for k in names])
        self.dist.all_reduce(values)
        tokens = int(self.dist.all_reduce_cpu(torch.tensor([window.tokens]))[0])
        values = values.tolist()  # the host sync, on logging steps only
        record = {
            "step": self.global_step,
            "epoch": self.epoch,
            "loss": values[0] / n,
            **{f"loss_{k}": v / n for k, v in zip(names, values[1:])},
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": None if last.grad_norm is None else float(last.grad_norm),
            "tokens_per_s": tokens / max(elapsed, 1e-9),  # all ranks together
            "time": time.time(),
        }
        return record


def write_jsonl(path: Path, record: dict) -> None:
    """Append one line. A kill mid-write leaves a partial last line, which a resume drops
    (distill.checkpoint.truncate_metrics)."""
    line = json.dumps(record) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        if faults.armed(f"during_metrics_append_{record.get('step')}"):
            f.write(line[: len(line) // 2])
            f.flush()
            faults.kill_point(f"during_metrics_append_{record.get('step')}")
        f.write(line)
