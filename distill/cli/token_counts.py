"""Count token ids over a binarized dataset (for MLM smoothing).

    python scripts/token_counts.py --data_file data/corpus --token_counts_dump data/corpus_counts.npy
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from distill.data.counts import count_tokens
from distill.errors import ArgumentParser, UserError, cli_entry
from distill.fileio import atomic_path


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_file", required=True, help="dataset folder written by binarized_data.py")
    p.add_argument("--token_counts_dump", required=True, help="output .npy file (int64 count per id)")
    p.add_argument("--vocab_size", type=int, default=None, help="default: the dataset's tokenizer vocabulary")
    p.add_argument("--overwrite", action="store_true", help="replace an existing counts file")
    args = p.parse_args(argv)
    if args.vocab_size is not None and args.vocab_size < 1:
        p.error("--vocab_size must be positive")
    return args


@cli_entry
def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.token_counts_dump)
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it")
    t0 = time.perf_counter()
    counts = count_tokens(args.data_file, args.vocab_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, open(tmp, "wb") as f:  # a handle, so np.save does not append ".npy"
        np.save(f, counts)
    print(f"counted {int(counts.sum()):,} tokens over {len(counts):,} ids "
          f"({int((counts > 0).sum()):,} seen) in {time.perf_counter() - t0:.2f}s to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
