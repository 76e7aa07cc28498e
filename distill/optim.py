"""The optimizer pieces the Distiller and the GLUE trainer share: AdamW with BERT's weight-decay
groups, the linear warm-up-then-decay schedule, and autocast."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Iterable

import torch
from torch import nn


def decays(name: str, p: nn.Parameter) -> bool:
    """Weight decay applies to matrices, not to biases, norm weights or other vectors (BERT's recipe)."""
    return not (p.ndim < 2 or name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name)


def adamw(named: Iterable[tuple[str, nn.Parameter]], *, lr: float, eps: float, weight_decay: float,
          betas: tuple[float, float] = (0.9, 0.999), fused: bool = False) -> torch.optim.AdamW:
    """AdamW over the trainable ``(name, parameter)`` pairs, in two groups: with and without decay."""
    named = [(n, p) for n, p in named if p.requires_grad]
    groups = [{"params": [p for n, p in named if decays(n, p)], "weight_decay": weight_decay},
              {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, eps=eps, betas=betas, fused=fused)


def linear_warmup_decay(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Learning-rate factor rising linearly over ``warmup_steps``, then falling to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)  # never exactly 0: the first step already learns a little
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on the device's type (CPU autocast supports bf16), a no-op for None."""
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()
