"""How the exits learn: DeeBERT's two stages, self-distillation into the exits, and PABEE's joint training.

- ``two_stage`` (DeeBERT): stage 1 fine-tunes backbone and final classifier (``distill.glue``'s
  fine-tuning); stage 2 trains only the exits, each on the task's labels, and sums their losses.
- ``self_distill``: stage 2 as above, but each exit learns the final classifier's (or an external
  teacher's) softened outputs, ``T² · KL``, plus an optional weight of the labels' loss. With that
  weight 0 it needs no labels.
- ``joint`` (PABEE): backbone, exits and final classifier trained together in one stage on the
  labels, exit ``e`` weighted by its layer number.

Stage 2 never runs the backbone backward. The backbone is frozen and in eval mode, so each
training example's layer outputs, as the exits read them, are computed once, in one inference pass,
and the exits train on those (N, layers, H) features for as many epochs as asked. An epoch of
stage 2 costs a fraction of an epoch of stage 1; its first pass is one forward over the data.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch

from distill import optim as O
from distill.early_exit.model import EarlyExitClassifier
from distill.glue.features import Features
from distill.glue.losses import soft_target_loss, task_loss
from distill.glue.modeling import takes_token_types
from distill.glue.tasks import Task
from distill.glue.trainer import device_batch, forward_logits, map_batches, train_loop

RECIPES = ("two_stage", "self_distill", "joint")
STAGE2_RECIPES = ("two_stage", "self_distill")


def layer_features(ee: EarlyExitClassifier, feats: Features, *, batch_size: int, device: torch.device, pad_id: int,
                   bf16: bool = False, progress: Callable | None = None) -> torch.Tensor:
    """(N, layers, H) float32 :meth:`~EarlyExitClassifier.layer_states` of every example, backbone in eval mode."""
    ee.to(device).eval()
    return torch.cat(map_batches(
        lambda b: ee.layer_states(b["input_ids"], b["attention_mask"], b.get("token_type_ids")).float(), feats,
        batch_size=batch_size, device=device, pad_id=pad_id, bf16=bf16, progress=progress, desc="backbone features"))


def teacher_logits(teacher: torch.nn.Module, feats: Features, *, batch_size: int, device: torch.device,
                   pad_id: int, bf16: bool = False) -> torch.Tensor:
    """(N, C) float32 outputs of an external teacher on every training example."""
    teacher.to(device).eval()
    types = takes_token_types(teacher)
    return torch.cat(map_batches(lambda b: forward_logits(teacher, b, types).float(), feats, batch_size=batch_size,
                                 device=device, pad_id=pad_id, bf16=bf16))


@torch.inference_mode()
def final_logits_from_states(ee: EarlyExitClassifier, states: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """The model's own classifier (eval mode) on cached :func:`layer_features` (N, layers, H): (N, C)."""
    ee.eval()
    return torch.cat([ee.runner.final_logits(states[i:i + batch_size, -1]).float()
                      for i in range(0, len(states), batch_size)])


def exit_loss(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None, *, regression: bool,
              temperature: float, alpha_ce: float, weights: list[float] | None = None):
    """The exits' loss on (B, E, C) logits: labels' loss, or soft targets (B, C) plus ``alpha_ce`` of it.

    Summed over exits (DeeBERT), or averaged with ``weights`` (PABEE). Returns (loss, parts).
    """
    per_exit = []
    for e in range(logits.shape[1]):
        if targets is None:
            per_exit.append(task_loss(logits[:, e], labels, regression=regression))
        else:
            kd = soft_target_loss(logits[:, e], targets, temperature=temperature, regression=regression)
            if alpha_ce > 0:
                kd = kd + alpha_ce * task_loss(logits[:, e], labels, regression=regression)
            per_exit.append(kd)
    stacked = torch.stack(per_exit)
    if weights is None:
        total = stacked.sum()
    else:
        w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
        total = (stacked * w).sum() / w.sum()
    return total, {f"loss_exit{e}": v.detach() for e, v in enumerate(per_exit)}


def train_exits(ee: EarlyExitClassifier, states: torch.Tensor, labels: torch.Tensor, cfg, device: torch.device, *,
                recipe: str, regression: bool, targets: torch.Tensor | None = None,
                on_log: Callable[[dict], None] | None = None, progress: Callable | None = None) -> dict:
    """Stage 2: only the exit heads learn, on cached :func:`layer_features` (N, layers, H); the backbone is frozen.

    ``recipe`` two_stage: the labels; self_distill: ``targets`` (N, C), softened by ``cfg.temperature``,
    plus ``cfg.exit_alpha_ce`` of the labels' loss. Returns the loop's summary.
    """
    trainable = [p for p in ee.model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    ee.to(device)
    ee.model.eval()
    ee.heads.train()
    layers = torch.tensor(ee.settings.exit_layers, device=device) - 1
    labels = labels.to(device)
    soft = targets.to(device) if recipe == "self_distill" else None

    def batch_of(idx: np.ndarray) -> dict:
        i = torch.from_numpy(idx).to(device)
        b = {"states": states[i][:, layers].to(device), "labels": labels[i]}  # (B, E, H)
        if soft is not None:
            b["targets"] = soft[i]
        return b

    def loss_of(b: dict):
        logits = torch.stack([head(b["states"][:, e]) for e, head in enumerate(ee.heads)], dim=1)  # (B, E, C)
        return exit_loss(logits, b["labels"], b.get("targets"), regression=regression, temperature=cfg.temperature,
                         alpha_ce=cfg.exit_alpha_ce)

    hyper = dataclasses.replace(cfg, learning_rate=cfg.exit_learning_rate, num_train_epochs=cfg.exit_epochs,
                                max_steps=-1)
    try:
        return train_loop(ee.heads.named_parameters(), len(states), batch_of, loss_of, hyper, on_log=on_log,
                          progress=progress, desc=f"stage 2 ({recipe})")
    finally:  # the model is handed back as it came
        for p in trainable:
            p.requires_grad_(True)


def train_joint(ee: EarlyExitClassifier, feats: Features, task: Task, cfg, device: torch.device, *, pad_id: int,
                on_log: Callable[[dict], None] | None = None, progress: Callable | None = None) -> dict:
    """PABEE: backbone, exits and final classifier in one stage, exit at layer l weighted l. The model
    learns at ``cfg.learning_rate``, the new exits at ``cfg.exit_learning_rate``."""
    ee.to(device).train()
    weights = [float(layer) for layer in ee.exit_layers]

    def batch_of(idx: np.ndarray) -> dict:
        return device_batch(feats, idx, pad_id, device)

    def loss_of(b: dict):
        with O.autocast(device, torch.bfloat16 if cfg.bf16 else None):
            logits = ee.exit_logits(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))  # (B, E+1, C)
        return exit_loss(logits.float(), b["labels"], None, regression=task.is_regression, temperature=1.0,
                         alpha_ce=0.0, weights=weights)

    heads = [(f"heads.{k}", p) for k, p in ee.heads.named_parameters()]
    return train_loop(ee.model.named_parameters(), len(feats), batch_of, loss_of, cfg, on_log=on_log,
                      progress=progress, desc="joint training", extra_groups=[(heads, cfg.exit_learning_rate)])
