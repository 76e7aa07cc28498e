"""Token counts over a binarized dataset, for MLM smoothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from distill.data.binarize import open_tokens
from distill.errors import UserError


def count_tokens(data_file: str | Path, vocab_size: int | None = None, block: int = 1 << 24) -> np.ndarray:
    """int64 counts per id (length ``vocab_size``, default the dataset's), one bincount per block."""
    tokens, _, meta = open_tokens(data_file)
    vocab_size = int(meta["vocab_size"]) if vocab_size is None else int(vocab_size)
    counts = np.zeros(vocab_size, dtype=np.int64)
    for b in range(0, len(tokens), block):
        chunk = np.asarray(tokens[b:b + block])
        top = int(chunk.max())
        if top >= vocab_size:
            raise UserError(f"{data_file} holds token id {top}, beyond --vocab_size {vocab_size}")
        counts += np.bincount(chunk, minlength=vocab_size)
    return counts


def load_token_counts(path: str | Path, vocab_size: int) -> np.ndarray:
    """Read counts written by token_counts.py and check they fit the vocabulary."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"token counts file {p} does not exist; create it with scripts/token_counts.py")
    try:
        counts = np.load(p, allow_pickle=False)
    except (ValueError, OSError):
        raise UserError(f"{p} is not a token counts file written by scripts/token_counts.py") from None
    if counts.ndim != 1 or len(counts) != vocab_size:
        raise UserError(f"{p} holds counts for {counts.size} ids but the vocabulary has {vocab_size}")
    return counts
