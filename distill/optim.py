"""The optimizer pieces the Distiller and the GLUE trainer share: AdamW with BERT's weight-decay
groups, the linear warm-up-then-decay schedule, and autocast."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Iterable

import torch
from torch import nn


def decays(name: str, p: nn.Parameter) -> bool:
    """Weight decay applies to matrices, not to biases, norm weights or other vectors (BERT's recipe)."""
    return not (p.ndim < 2 or name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name)


def adamw(named: Iterable[tuple[str, nn.Parameter]], *, lr: float, eps: float, weight_decay: float,
          betas: tuple[float, float] = (0.9, 0.999), fused: bool = False,
          extra: Iterable[tuple[Iterable[tuple[str, nn.Parameter]], float]] = ()) -> torch.optim.AdamW:
    """AdamW over the trainable ``(name, parameter)`` pairs, in two groups: with and without decay.
    Each ``(named parameters, learning rate)`` of ``extra`` adds its own two groups at its own rate."""

    def groups(pairs, rate: float) -> list[dict]:
        pairs = [(n, p) for n, p in pairs if p.requires_grad]
        return [{"params": [p for n, p in pairs if decays(n, p)], "weight_decay": weight_decay, "lr": rate},
                {"params": [p for n, p in pairs if not decays(n, p)], "weight_decay": 0.0, "lr": rate}]

    all_groups = groups(named, lr) + [g for pairs, rate in extra for g in groups(pairs, rate)]
    return torch.optim.AdamW(all_groups, lr=lr, eps=eps, betas=betas, fused=fused)


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


def cpu_has_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls in hardware (AVX-512 BF16 or AMX); without them torch emulates
    bf16, which is many times slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(choice: str) -> bool:
    """``--bf16 auto|on|off``: auto is on with a GPU or a CPU with bf16 instructions, off otherwise."""
    if choice != "auto":
        return choice == "on"
    return torch.cuda.is_available() or cpu_has_bf16()
