"""One seeding function for every entry point: the same flags and seed give the same run.

Every generator a run draws from is seeded here: Python's ``random``, NumPy's global generator,
torch's CPU generator and every CUDA device's. Components that own their randomness (the
length-grouped sampler, the MLM collator, the DataLoader, the GLUE shuffle) take ``seed`` directly
and do not depend on these global generators, so a resumed run draws exactly what a straight one
would.

On the CPU a seeded run is bitwise reproducible for the same flags, the same number of threads and
the same torch build. On a GPU some kernels (atomics in scatter/index_add backward, some cuBLAS
reductions) are not deterministic by default; ``deterministic=True`` makes torch use deterministic
implementations or fail loudly where it has none (see docs/training.md, "Reproducibility").
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int, *, rank: int = 0, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device) with ``seed + rank``.

    ``rank`` offsets the seed so that processes of a distributed run draw different dropout masks
    (their data is already different; their initial weights come from rank 0 by DDP's broadcast).
    ``deterministic`` switches torch to deterministic algorithms (for GPU runs; the CPU kernels
    used here are deterministic already).
    """
    value = (int(seed) + int(rank)) % 2**32
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)  # also seeds every CUDA device
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(value)
    if deterministic:
        set_deterministic()


def set_deterministic() -> None:
    """Deterministic kernels on the GPU: cuBLAS's fixed workspace, cuDNN without autotuning, and
    torch's deterministic implementations (an error, not silent nondeterminism, where there is none)."""
    # cuBLAS reads this when its handle is created: it must be set before the first GPU matmul.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
