"""How fast the fused vocabulary losses' projection runs in each layout of its logits block, on this CPU.

    python benchmarks/projection_layout.py                               # the throughput benchmark's student
    python benchmarks/projection_layout.py --hidden 576 --vocab 49152    # SmolLM2's

The fused losses (``distill/losses/fused.py``) project a chunk of ``rows`` hidden states into a row-major
(rows, V) block, ``cols`` vocabulary columns at a time: ``x @ W[c:e].T`` into ``block[:, c:e]``. The same
product written transposed, ``W[c:e] @ x.T`` into a (V, rows) block, is a different BLAS problem (the roles
of the two output dimensions swap), and on some CPUs it runs much nearer the matmul peak. This script times,
alternating in rounds in one process, per slice width:

* ``rows``: today's layout;
* ``cols``: the transposed block;
* ``cols_copied``: the transposed product into a (cols, rows) tile, copied into the row-major block with
  ``copy_`` (the cheapest way to keep the kernels' row layout);
* the backward's two matmuls from a transposed gradient block (``dx = G.T.T @ W``, ``dW = G.T @ x``) against
  the row-major one's.

Prints one JSON line: the CPU (model, ISA flags), the n^3 matmul peak before and after, and each variant's
median GFLOP/s over the rounds. Nothing is read or written on disk.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from matmul_peak import matmul_peak  # noqa: E402
from throughput import cpu_description  # noqa: E402


def _seconds(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def variants(rows: int, hidden: int, vocab: int, cols: int) -> tuple[dict, dict]:
    """(name -> (function, FLOPs), the operands and blocks they read and write) for one slice width."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g)
    xt = x.t().contiguous()
    block, block_t, tile = torch.empty(rows, vocab), torch.empty(vocab, rows), torch.empty(cols, rows)
    grad = torch.randn(rows, vocab, generator=g)
    grad_t = grad.t().contiguous()
    dx, dw = torch.empty(rows, hidden), torch.empty(vocab, hidden)
    slices = [(c, min(c + cols, vocab)) for c in range(0, vocab, cols)]

    def rows_layout():
        for c, e in slices:
            torch.mm(x, w[c:e].t(), out=block[:, c:e])

    def cols_layout():
        for c, e in slices:
            torch.mm(w[c:e], xt, out=block_t[c:e])

    def cols_copied():
        for c, e in slices:
            t = tile[:e - c]
            torch.mm(w[c:e], xt, out=t)
            block[:, c:e].copy_(t.t())

    flops = 2 * rows * hidden * vocab
    tensors = {"x": x, "w": w, "block": block, "block_t": block_t}
    return {
        "rows": (rows_layout, flops), "cols": (cols_layout, flops), "cols_copied": (cols_copied, flops),
        "dx_rows": (lambda: torch.mm(grad, w, out=dx), flops),
        "dx_cols": (lambda: torch.mm(grad_t.t(), w, out=dx), flops),
        "dw_rows": (lambda: torch.mm(grad.t(), x, out=dw), flops),
        "dw_cols": (lambda: torch.mm(grad_t, x, out=dw), flops),
    }, tensors


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=384, help="hidden states per chunk (the fp32 default)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=30522)
    ap.add_argument("--cols", type=int, nargs="+", default=[512, 1024, 2048], help="slice widths")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5, help="timed calls per variant and round (the median counts)")
    ap.add_argument("--matmul_size", type=int, default=2048)
    args = ap.parse_args(argv)
    cpu = torch.device("cpu")
    peak_before = matmul_peak(cpu, torch.float32, args.matmul_size)
    gflops: dict[str, dict[str, list[float]]] = {}
    for cols in args.cols:
        vs, _ = variants(args.rows, args.hidden, args.vocab, cols)
        runs: dict[str, list[float]] = {name: [] for name in vs}
        for _ in range(args.rounds):  # alternating, so that the machine's slow moments fall on all of them
            for name, (fn, flops) in vs.items():
                runs[name].append(flops / _seconds(fn, args.reps) / 1e9)
        gflops[str(cols)] = runs
    peak_after = matmul_peak(cpu, torch.float32, args.matmul_size)
    rec = {
        **cpu_description(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "rows": args.rows, "hidden": args.hidden, "vocab": args.vocab,
        "peak_gflops_before_after": [round(peak_before / 1e9, 1), round(peak_after / 1e9, 1)],
        "median_gflops": {cols: {name: round(statistics.median(v), 1) for name, v in runs.items()}
                          for cols, runs in gflops.items()},
        "range_gflops": {cols: {name: [round(min(v), 1), round(max(v), 1)] for name, v in runs.items()}
                         for cols, runs in gflops.items()},
    }
    print(json.dumps(rec))
    return rec


if __name__ == "__main__":
    main()
