"""Process memory: keep glibc from holding on to the training step's large freed blocks.

glibc serves allocations above a threshold with their own mmap and unmaps them when freed. But the
threshold is dynamic: each time such a block is freed, it rises to that block's size (up to 32 MB).
After the first step, the step's 8-32 MB blocks therefore come from the heap, in sizes that change
with every batch (length-grouped batches, a varying number of masked tokens), and the heap fragments
and grows. In the fused vocabulary losses in bf16 that is the weights' bf16 copies, the logit
gradients and the fp32 weight gradients. Measured on the loss alone, bf16, MLM only, with varying
batch shapes, over 100 calls: RSS 378 -> 2,246 MB with the dynamic threshold, 345 -> 520 MB with it
fixed at 8 MB, and 349 -> 570 MB at 16 MB. 16 MB is the default because 8 MB made bf16 with
--restrict_ce_to_mask 27% slower: its logit-gradient blocks, about 9 MB, were then mapped afresh on
every call. What growth remains in bf16 is oneDNN's and ideep's caches of one entry per matmul
shape, which :func:`limit_onednn_cache` caps. The training benchmark was no slower with the fixed
threshold (benchmarks/README.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import torch

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
DEFAULT_MMAP_THRESHOLD = 16 * 2**20
_ENV = "MALLOC_MMAP_THRESHOLD_"  # glibc's own tunable: a user's setting wins


def fix_mmap_threshold(nbytes: int = DEFAULT_MMAP_THRESHOLD) -> bool:
    """Make glibc mmap every allocation of at least ``nbytes``, so it goes back to the system when
    freed. This also turns off the dynamic threshold.

    Returns True when applied. It is not applied, and False is returned, off Linux, with another C
    library, or when the user set ``MALLOC_MMAP_THRESHOLD_`` in the environment.
    """
    if not sys.platform.startswith("linux") or _ENV in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, int(nbytes)) == 1


ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"  # oneDNN's own cache of compiled primitives
IDEEP_CACHE_ENV = "LRU_CACHE_CAPACITY"  # ideep's (PyTorch's wrapper of oneDNN) cache of matmul objects
DEFAULT_ONEDNN_CACHE = 64


def limit_onednn_cache(capacity: int = DEFAULT_ONEDNN_CACHE) -> tuple[str, ...]:
    """Cap the two caches that keep one entry per matmul shape for bf16 matmuls on the CPU at
    ``capacity`` entries each: oneDNN's cache of compiled primitives (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``)
    and ideep's cache of the matmul objects PyTorch builds on them (``LRU_CACHE_CAPACITY``). Both hold
    1,024 by default. Forward and backward matmuls of 37 shapes kept 32 MB with the defaults and 4 MB
    with both at 4 (``tests/test_memory.py``).

    A run with varying sequence lengths makes hundreds of matmul shapes, and with the defaults both
    caches grow through the whole run. On the throughput benchmark's one-paragraph shape in bf16 (60
    timed and 10 instrumented steps, an AVX-512 BF16 EPYC), peak RSS was 1,081-1,094 MiB with oneDNN's
    cache at 128 and ideep's at its default, and 904-925 MiB with both at 64, at the same speed
    (benchmarks/README.md). One step uses a few dozen shapes (the encoders' layers forward and
    backward, the vocabulary chunks); a cache smaller than that would rebuild them every step.

    Both libraries read the settings when they make their first matmul, so this must run before the
    first bf16 matmul; afterwards it changes nothing. Returns the variables it set: a user's own
    setting of either wins.
    """
    set_now = []
    for name in (ONEDNN_CACHE_ENV, IDEEP_CACHE_ENV):
        if name not in os.environ:
            os.environ[name] = str(int(capacity))
            set_now.append(name)
    return tuple(set_now)


class EmbeddingRowGrads:
    """The gradient of an input embedding whose weight is tied to the output projection's, added as rows
    into the weight's gradient after each backward, instead of through a dense (V, H) block.

    PyTorch's embedding backward makes a zero (V, H) fp32 block on every backward, adds the batch's
    rows into it, and autograd adds that block to the projection's (V, H) weight gradient. On the CPU a
    block of that size is mapped afresh each time (:func:`fix_mmap_threshold`), so all its pages fault
    in again: for SmolLM2's (49,152, 576) that is 113 MB, 100-180 ms a micro-batch
    (benchmarks/README.md). Installed on the embedding module, its backward hands the weight no
    gradient and keeps the rows (the token ids, the gradient of their vectors); :meth:`flush`, which the
    backward queues to run when it has finished (as DistributedDataParallel queues its reductions), adds
    them into ``weight.grad`` with ``index_add_``. Any ``backward()`` through the module does this,
    inside or outside the Distiller (``torch.autograd.grad`` would too, although it should leave
    ``.grad`` alone; nothing here calls it). The sum is the same; its order differs (the rows are added
    to the projection's gradient, not summed apart first), so results agree with the dense path to
    float rounding, not bit for bit.

    For one eager process only: DistributedDataParallel and FSDP reduce gradients during the backward,
    before the rows are added. :meth:`install` checks the module (a plain ``nn.Embedding``, without
    ``max_norm`` or ``scale_grad_by_freq``, tied to the output projection) and leaves others alone.
    """

    def __init__(self, embedding: torch.nn.Embedding):
        self.embedding = embedding
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    @classmethod
    def install(cls, model: torch.nn.Module) -> EmbeddingRowGrads | None:
        get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
        if get_in is None or get_out is None:
            return None
        emb, head = get_in(), get_out()
        if (type(emb) is not torch.nn.Embedding or head is None or getattr(head, "weight", None) is not emb.weight
                or not emb.weight.requires_grad or emb.max_norm is not None or emb.scale_grad_by_freq
                or emb.sparse or "forward" in vars(emb)):
            return None
        rows = cls(emb)
        emb.forward = rows.forward  # an instance attribute: the class and its other instances are untouched
        return rows

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return _EmbeddingRows.apply(ids, self.embedding.weight, self)

    def flush(self) -> None:
        """Add the rows of the backwards since the last flush into the weight's gradient."""
        w = self.embedding.weight
        for ids, g in self.pending:
            if w.grad is None:  # no vocabulary loss: the rows are the weight's only gradient
                w.grad = torch.zeros_like(w)
            w.grad.index_add_(0, ids, g.to(w.grad.dtype))
        self.pending.clear()


class _EmbeddingRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor, rows: EmbeddingRowGrads) -> torch.Tensor:
        ctx.rows, ctx.ids = rows, ids
        return torch.nn.functional.embedding(ids, weight, rows.embedding.padding_idx)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ids, g = ctx.ids.reshape(-1), grad.reshape(-1, grad.shape[-1])
        pad = ctx.rows.embedding.padding_idx
        if pad is not None:  # as the dense backward: no gradient at the padding index
            keep = ids != pad
            ids, g = ids[keep], g[keep]
        rows = ctx.rows
        if not rows.pending:  # the first rows of this backward: added to the gradient once it has finished
            torch.autograd.Variable._execution_engine.queue_callback(rows.flush)
        rows.pending.append((ids, g))
        return None, None, None
