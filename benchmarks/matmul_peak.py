"""The machine's matmul peak: the best FLOP/s of an n^3 matmul, what the hardware gives a process now.

    python benchmarks/matmul_peak.py THREADS N DTYPE [DTYPE ...]    # e.g. 2 2048 float32 bfloat16

Run as a script it prints one JSON object, FLOP/s by dtype name. ``benchmarks/throughput.py`` runs it so, in a
child process, so that the matmul's operands (48 MiB in fp32 at n = 2048) do not count in the peak RSS it
reports for the training; the other benchmarks call :func:`matmul_peak` in their own process.
"""

from __future__ import annotations

import json
import sys
import time

import torch


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, reps: int = 5, warmup_s: float = 0.5) -> float:
    """Best FLOP/s of ``reps`` n^3 matmuls into a preallocated output, after ``warmup_s`` seconds of the same
    (the threads and the cores' clocks warmed up, as they are in the middle of a training run)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t_end = time.perf_counter() + warmup_s
    while True:
        torch.mm(a, b, out=c)
        sync()
        if time.perf_counter() >= t_end:
            break
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def main(argv: list[str]) -> None:
    threads, n, names = int(argv[0]), int(argv[1]), argv[2:]
    torch.set_num_threads(threads)
    cpu = torch.device("cpu")
    print(json.dumps({name: matmul_peak(cpu, getattr(torch, name), n) for name in names}))


if __name__ == "__main__":
    main(sys.argv[1:])
