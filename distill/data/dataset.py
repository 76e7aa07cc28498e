"""The training dataset: a memory-mapped binarized corpus cut to the model's maximum input.

Only an index of (start, length) per example is held in memory; the token ids stay on disk and
are read per item, so memory does not grow with the corpus.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from distill.data.binarize import open_tokens
from distill.errors import UserError

logger = logging.getLogger(__name__)


@dataclass
class DatasetStats:
    sequences: int  # sequences in the binarized file
    split: int  # sequences longer than the maximum input, cut into chunks
    chunks: int  # examples after cutting, before filtering
    dropped_short: int  # examples of fewer than min_length tokens
    dropped_unk: int  # examples at least max_unk_fraction unknown tokens
    examples: int  # what is left

    def summary(self) -> str:
        return (f"{self.sequences:,} sequences: {self.split:,} split into chunks, "
                f"{self.dropped_short:,} dropped as short, {self.dropped_unk:,} dropped as mostly unknown; "
                f"{self.examples:,} examples")


class LMSeqsDataset(torch.utils.data.Dataset):
    """Examples of at most ``max_model_input_size`` tokens, each starting and ending with the
    sequence's start/end tokens.

    A sequence longer than the maximum is cut into chunks of ``max_model_input_size - 2`` content
    tokens, each re-wrapped in the start and end tokens. Examples of fewer than ``min_length``
    tokens (DistilBERT dropped 11 or fewer) and those whose share of unknown tokens is at least
    ``max_unk_fraction`` are dropped.

    ``dataset[i]`` is ``{"index": i, "input_ids": int64 array}``; the index seeds the example's
    masking, so it is the same however the example is batched.
    """

    def __init__(self, data_file: str, max_model_input_size: int = 512, min_length: int = 12,
                 max_unk_fraction: float = 0.5):
        if max_model_input_size < 3:
            raise UserError("--max_model_input_size must be at least 3 (start, one token, end)")
        self.tokens, offsets, self.meta = open_tokens(data_file)
        self.data_file = str(data_file)
        self.start_id = int(self.meta["start_id"])
        self.end_id = int(self.meta["end_id"])
        self.max_len = max_model_input_size

        n_seq = len(offsets) - 1
        content_start = offsets[:-1] + 1  # skip the start token
        content_len = np.diff(offsets) - 2
        per_chunk = max_model_input_size - 2
        n_chunks = np.maximum(1, -(-content_len // per_chunk))  # ceil, at least one
        seq_of = np.repeat(np.arange(n_seq), n_chunks)
        first_chunk = np.repeat(np.cumsum(n_chunks) - n_chunks, n_chunks)
        k = np.arange(len(seq_of)) - first_chunk  # chunk number inside its sequence
        starts = content_start[seq_of] + k * per_chunk
        lens = np.minimum(per_chunk, content_len[seq_of] - k * per_chunk)
        lengths = lens + 2

        keep_len = lengths >= min_length
        unk_id = self.meta["special_token_ids"].get("unk_token")
        if unk_id is not None and max_unk_fraction <= 1.0:
            unk = count_in_ranges(self.tokens, unk_id, starts, lens)
            keep_unk = unk < max_unk_fraction * lengths
        else:
            keep_unk = np.ones(len(starts), dtype=bool)
        keep = keep_len & keep_unk
        self.starts = starts[keep].astype(np.int64)
        self.content_lengths = lens[keep].astype(np.int64)
        self.lengths = lengths[keep].astype(np.int64)
        self.stats = DatasetStats(
            sequences=n_seq, split=int((n_chunks > 1).sum()), chunks=len(starts),
            dropped_short=int((~keep_len).sum()), dropped_unk=int((keep_len & ~keep_unk).sum()),
            examples=int(keep.sum()))
        if self.stats.examples == 0:
            raise UserError(f"no example of {data_file} is left after dropping sequences shorter than "
                            f"{min_length} tokens or mostly unknown tokens")

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict:
        s, n = int(self.starts[i]), int(self.content_lengths[i])
        ids = np.empty(n + 2, dtype=np.int64)
        ids[0] = self.start_id
        ids[1:-1] = self.tokens[s:s + n]
        ids[-1] = self.end_id
        return {"index": int(i), "input_ids": ids}

    def max_token_id(self, block: int = 1 << 24) -> int:
        """Largest id stored in the corpus (a scan of the memory map, a block at a time)."""
        m = 0
        for b in range(0, len(self.tokens), block):
            m = max(m, int(self.tokens[b:b + block].max()))
        return m


def count_in_ranges(tokens: np.ndarray, value: int, starts: np.ndarray, lens: np.ndarray,
                    block: int = 1 << 22) -> np.ndarray:
    """How many times ``value`` occurs in each ``tokens[starts[i]:starts[i] + lens[i]]``.

    Vectorised: a running count C(x) = #value in tokens[:x] is evaluated at every range boundary,
    streaming over the memory map a block at a time, so memory is bounded by the block size.
    """
    points = np.concatenate([starts, starts + lens])
    uniq, inverse = np.unique(points, return_inverse=True)
    c_at = np.zeros(len(uniq), dtype=np.int64)
    total = 0
    lo = int(np.searchsorted(uniq, 0, side="right"))  # first point not yet resolved; C(0) = 0
    for b0 in range(0, len(tokens), block):
        b1 = min(b0 + block, len(tokens))
        cum = np.cumsum(np.asarray(tokens[b0:b1]) == value, dtype=np.int64)
        hi = int(np.searchsorted(uniq, b1, side="right"))
        c_at[lo:hi] = total + cum[uniq[lo:hi] - b0 - 1]
        total += int(cum[-1])
        lo = hi
    counts = c_at[inverse]
    return counts[len(starts):] - counts[:len(starts)]
