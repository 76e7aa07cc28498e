"""The student's attention on the CPU under bf16 autocast: in bf16, or in fp32 where that is faster.

Under bf16 autocast a model's ``scaled_dot_product_attention`` runs in bf16. On the CPU that is not
always faster than fp32: on a 2-core AMD EPYC with avx512_bf16 (torch 2.13), the attention of
SmolLM2's student (8 sequences of 128 tokens, 9 heads of 64) took 18.5 ms forward and backward in bf16
and 11.3 ms in fp32, casts included; PyTorch's CPU flash-attention backward has no fast bf16 path there.
The attention is a small part of a step's FLOPs, so in fp32 it costs little, and it is more accurate.

:func:`use_fp32_attention` therefore measures the two once per machine and attention shape (forward and
backward, on fixed data, well under a second), keeps the result beside the fused losses' blocking
(:mod:`distill.machine`), and when fp32 was at least ``MIN_GAIN`` faster switches the student to
``FP32_SDPA``: Hugging Face's own SDPA attention with its inputs cast to fp32 and autocast off, and its
output cast back to bf16. The rest of the model stays under autocast. ``DISTILL_CPU_ATTENTION=fp32``
or ``=bf16`` pins the choice. The choice changes a run's rounding, so, like the blocking, it is read from
the file by every later run and every process.

The implementation's name lives on the model object only: ``save_pretrained`` does not write it, and
a saved student loads with the default attention anywhere.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distill.machine import cpu_identity, fast_16bit, load_or_measure

FP32_SDPA = "distill_sdpa_fp32"
ENV = "DISTILL_CPU_ATTENTION"
MIN_GAIN = 0.05  # fp32 must be this much faster than bf16 to be chosen
MEASURE_TOKENS = 4096  # sequences of the run's length are measured until they hold about this many tokens
_REPEATS = 5  # timed runs per variant (the best counts), after two untimed


def fp32_sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    """Hugging Face's SDPA attention (``transformers.integrations.sdpa_attention``) in fp32 with autocast
    off, its output in autocast's dtype; outside autocast, that attention unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    device = query.device.type
    if not torch.is_autocast_enabled(device):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    dtype = torch.get_autocast_dtype(device)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()  # an additive mask
    with torch.autocast(device, enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              **kwargs)
    return out.to(dtype), weights


def register() -> None:
    """Make ``FP32_SDPA`` a name Hugging Face models accept (attention and mask functions); idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FP32_SDPA, fp32_sdpa_attention)
    AttentionMaskInterface.register(FP32_SDPA, sdpa_mask)


@dataclass(frozen=True)
class Choice:
    fp32: bool
    source: str  # "env", "file", "measured", "default"


def _env_choice() -> Choice | None:
    value = os.environ.get(ENV, "").strip().lower()
    if not value:
        return None
    if value not in ("fp32", "bf16"):
        raise ValueError(f"{ENV} must be 'fp32' or 'bf16', not {value!r}")
    return Choice(value == "fp32", "env")


def measure(heads: int, head_dim: int, seq_len: int) -> dict:
    """Seconds for one forward and backward of the attention, bf16 and fp32 (inputs cast up, output cast
    down), on fixed random data with a padding mask, for sequences of ``seq_len`` tokens; the best of
    ``_REPEATS``. Draws nothing from the global random generators."""
    batch = max(1, MEASURE_TOKENS // seq_len)
    g = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(batch, heads, seq_len, head_dim, generator=g).bfloat16() for _ in range(4))
    lengths = torch.randint(seq_len // 2, seq_len + 1, (batch,), generator=g)
    mask = (torch.arange(seq_len)[None, :] < lengths[:, None])[:, None, None, :]  # padding, as SDPA's masks
    mask = mask.expand(batch, 1, seq_len, seq_len)  # (B, 1, L, L)
    for t in (q, k, v):
        t.requires_grad_(True)

    def step(fp32: bool) -> None:
        a, b, c = (t.float() for t in (q, k, v)) if fp32 else (q, k, v)
        out = F.scaled_dot_product_attention(a, b, c, attn_mask=mask)
        out.bfloat16().backward(grad)

    times = {}
    for name, fp32 in (("bf16", False), ("fp32", True)):
        for _ in range(2):
            step(fp32)
        best = float("inf")
        for _ in range(_REPEATS):
            t0 = time.perf_counter()
            step(fp32)
            best = min(best, time.perf_counter() - t0)
        times[name] = best
    return times


def cpu_attention_choice(heads: int, head_dim: int, seq_len: int) -> Choice:
    """Whether the attention of this shape runs in fp32 under bf16 autocast on this CPU: pinned by
    ``DISTILL_CPU_ATTENTION``, else read from the per-machine file, else measured now and kept there."""
    env = _env_choice()
    if env is not None:
        return env
    if not fast_16bit():  # bf16 emulated: the fused losses use their defaults too; so does this
        return Choice(False, "default")
    key = (f"sdpa heads{heads} dim{head_dim} L{seq_len} threads{torch.get_num_threads()} torch{torch.__version__} "
           f"{cpu_identity()}")

    def measured() -> dict:
        timings = measure(heads, head_dim, seq_len)
        return {"fp32": timings["fp32"] < (1.0 - MIN_GAIN) * timings["bf16"], "timings": timings}

    got = load_or_measure("attention", key, lambda e: isinstance(e.get("fp32"), bool), measured)
    if got is None:
        return Choice(False, "default")  # nowhere to keep a measurement: every process must agree
    entry, source = got
    return Choice(entry["fp32"], source)


def use_fp32_attention(model: torch.nn.Module, seq_len: int) -> Choice | None:
    """Switch ``model`` (a Hugging Face model with SDPA attention, trained under bf16 autocast on the CPU)
    to ``FP32_SDPA`` where :func:`cpu_attention_choice` says so. None when the model's attention is not
    SDPA (eager, asked for by a loss that reads attention weights) or the model cannot switch it."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return None
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_heads", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "dim", None)
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if heads and hidden else None)
    if not heads or not head_dim:
        return None
    choice = cpu_attention_choice(heads, head_dim, seq_len)
    if choice.fp32:
        register()
        model.set_attn_implementation(FP32_SDPA)
        if config._attn_implementation != FP32_SDPA:  # a model class that cannot switch (transformers warns)
            return None
    return choice
