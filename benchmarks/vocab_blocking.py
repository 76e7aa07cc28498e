"""The measurement behind the fused vocabulary losses' CPU blocking (``distill/losses/blocking.py``), run now.

    python benchmarks/vocab_blocking.py                          # the throughput benchmark's student: H 256, V 30,522
    python benchmarks/vocab_blocking.py --hidden 576 --vocab 49152   # SmolLM2's
    python benchmarks/vocab_blocking.py --bf16

Neither reads nor writes ``~/.cache/distill/blocking.json``. Prints one JSON line: the CPU, the default and the
chosen (rows, cols), and the timed matmuls' microseconds per chunk row, per column slice width (at the default
rows) and per row count (at the chosen width: the projection and the two gradient matmuls).
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.losses.blocking import cpu_identity, default_blocking, measure  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=30522)
    ap.add_argument("--bf16", action="store_true")
    args = ap.parse_args(argv)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    m = measure(dtype, args.hidden, args.vocab)
    d = default_blocking(dtype)
    print(json.dumps({"cpu": cpu_identity(), "threads": torch.get_num_threads(), "dtype": str(dtype),
                      "hidden": args.hidden, "vocab": args.vocab, "default": [d.rows, d.cols],
                      "chosen": [m.rows, m.cols],
                      "us_per_row": {k: round(v * 1e6, 1) for k, v in m.timings.items()}}))


if __name__ == "__main__":
    main()
