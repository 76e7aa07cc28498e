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
every call. What growth remains levels off; it is the math library's cache of one kernel per matmul
shape. The training benchmark was no slower with the fixed threshold (benchmarks/README.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

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
