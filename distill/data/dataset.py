"""The training dataset: a memory-mapped binarized corpus cut to the model's maximum input.

Only an index of (start, length) per example is held in memory; the token ids stay on disk and
are read per item, so memory does not grow with the corpus.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

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
    dropped_no_completion: int = 0  # chat data: examples (chunks) with no completion token to predict

    def summary(self) -> str:
        no_completion = (f", {self.dropped_no_completion:,} dropped for having no completion token"
                         if self.dropped_no_completion else "")
        return (f"{self.sequences:,} sequences: {self.split:,} split into chunks, "
                f"{self.dropped_short:,} dropped as short, {self.dropped_unk:,} dropped as mostly unknown"
                f"{no_completion}; {self.examples:,} examples")


class LMSeqsDataset(torch.utils.data.Dataset):
    """Examples of at most ``max_model_input_size`` tokens, each starting and ending with the
    sequence's start/end tokens.

    A sequence longer than the maximum is cut into chunks of ``max_model_input_size - 2`` content
    tokens, each re-wrapped in the start and end tokens. Examples of fewer than ``min_length``
    tokens (DistilBERT dropped 11 or fewer) and those whose share of unknown tokens is at least
    ``max_unk_fraction`` are dropped.

    Chat renders (meta.json's ``wrapped`` false) are cut into chunks of ``max_model_input_size``
    tokens as they are, with no added tokens. With a completion mask (meta.json's ``loss_mask``), each
    token keeps its bit through the cut, and chunks in which no token after the first is a completion
    token (nothing to predict) are dropped too.

    ``dataset[i]`` is ``{"index": i, "input_ids": int64 array}``, plus ``"loss_mask"`` (uint8, the
    same length) with a completion mask; the index seeds the example's masking, so it is the same
    however the example is batched.
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
        self.wrapped = bool(self.meta.get("wrapped", True))
        extra = 2 if self.wrapped else 0  # start and end tokens around each chunk
        content_start = offsets[:-1] + extra // 2  # skip the start token
        content_len = np.diff(offsets) - extra
        per_chunk = max_model_input_size - extra
        n_chunks = np.maximum(1, -(-content_len // per_chunk))  # ceil, at least one
        seq_of = np.repeat(np.arange(n_seq), n_chunks)
        first_chunk = np.repeat(np.cumsum(n_chunks) - n_chunks, n_chunks)
        k = np.arange(len(seq_of)) - first_chunk  # chunk number inside its sequence
        starts = content_start[seq_of] + k * per_chunk
        lens = np.minimum(per_chunk, content_len[seq_of] - k * per_chunk)
        lengths = lens + extra
        # The real end token (a chat sequence has none added): the stored one, after a sequence's last chunk.
        last_chunk = k == n_chunks[seq_of] - 1

        keep_len = lengths >= min_length
        unk_id = self.meta["special_token_ids"].get("unk_token")
        if unk_id is not None and max_unk_fraction <= 1.0:
            unk = count_in_ranges(self.tokens, unk_id, starts, lens)
            keep_unk = unk < max_unk_fraction * lengths
        else:
            keep_unk = np.ones(len(starts), dtype=bool)
        keep = keep_len & keep_unk
        self.mask_bits = None
        keep_completion = np.ones(len(starts), dtype=bool)
        if self.meta.get("loss_mask"):
            self.mask_bits = open_mask(data_file, int(self.meta["num_tokens"]))
            # Targets of a chunk: every content token and the real end token (wrapped), every token but
            # the first (chat: its first token's predecessor is in the previous chunk).
            if self.wrapped:
                hits = count_bits(self.mask_bits, starts, lens)
                ends = starts + lens  # the position of the stored end token, after a last chunk
                hits += np.where(last_chunk, count_bits(self.mask_bits, ends, np.ones_like(ends)), 0)
            else:
                hits = count_bits(self.mask_bits, starts + 1, lens - 1)
            keep_completion = hits > 0
        self.last_chunk = last_chunk[keep & keep_completion]
        kept = keep & keep_completion
        self.starts = starts[kept].astype(np.int64)
        self.content_lengths = lens[kept].astype(np.int64)
        self.lengths = lengths[kept].astype(np.int64)
        self.stats = DatasetStats(
            sequences=n_seq, split=int((n_chunks > 1).sum()), chunks=len(starts),
            dropped_short=int((~keep_len).sum()), dropped_unk=int((keep_len & ~keep_unk).sum()),
            examples=int(kept.sum()), dropped_no_completion=int((keep & ~keep_completion).sum()))
        if self.stats.examples == 0:
            raise UserError(f"no example of {data_file} is left after dropping sequences shorter than "
                            f"{min_length} tokens, mostly unknown tokens or without a completion token")

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict:
        s, n = int(self.starts[i]), int(self.content_lengths[i])
        if not self.wrapped:
            out = {"index": int(i), "input_ids": np.asarray(self.tokens[s:s + n], dtype=np.int64)}
            if self.mask_bits is not None:
                out["loss_mask"] = bits_of(self.mask_bits, s, n)
            return out
        ids = np.empty(n + 2, dtype=np.int64)
        ids[0] = self.start_id
        ids[1:-1] = self.tokens[s:s + n]
        ids[-1] = self.end_id
        out = {"index": int(i), "input_ids": ids}
        if self.mask_bits is not None:
            mask = np.zeros(n + 2, dtype=np.uint8)
            mask[1:-1] = bits_of(self.mask_bits, s, n)
            if self.last_chunk[i]:  # the stored end token is this chunk's; an added one is never a completion
                mask[-1] = bits_of(self.mask_bits, s + n, 1)[0]
            out["loss_mask"] = mask
        return out

    def max_token_id(self, block: int = 1 << 24) -> int:
        """Largest id stored in the corpus (a scan of the memory map, a block at a time)."""
        m = 0
        for b in range(0, len(self.tokens), block):
            m = max(m, int(self.tokens[b:b + block].max()))
        return m


def open_mask(data_file: str, num_tokens: int) -> np.ndarray:
    """The completion mask of a dataset folder, memory-mapped: one bit per token, packed."""
    from distill.data.binarize import MASK_FILE

    path = Path(data_file) / MASK_FILE
    want = (num_tokens + 7) // 8
    if not path.is_file() or path.stat().st_size != want:
        raise UserError(f"{path} is missing or truncated; binarize the dataset again")
    return np.memmap(path, dtype=np.uint8, mode="r", shape=(want,))


def bits_of(packed: np.ndarray, start: int, n: int) -> np.ndarray:
    """Bits start..start+n-1 of a packed (little-endian bit order) mask, as uint8 0/1."""
    if n <= 0:
        return np.zeros(0, dtype=np.uint8)
    b0, b1 = start // 8, (start + n + 7) // 8
    bits = np.unpackbits(np.asarray(packed[b0:b1]), bitorder="little")
    off = start - 8 * b0
    return bits[off:off + n]


def range_counts(blocks: Iterator[tuple[int, np.ndarray]], starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """The sum of a 0/1 sequence over each range [starts[i], starts[i] + lens[i]), the sequence given as
    consecutive blocks ``(offset, values)``.

    Vectorised: a running count C(x) = sum of the values before x is evaluated at every range
    boundary, a block at a time, so memory is bounded by the block size.
    """
    lens = np.maximum(lens, 0)
    points = np.concatenate([starts, starts + lens])
    uniq, inverse = np.unique(points, return_inverse=True)
    c_at = np.zeros(len(uniq), dtype=np.int64)
    total = 0
    lo = int(np.searchsorted(uniq, 0, side="right"))  # first point not yet resolved; C(0) = 0
    for b0, values in blocks:
        cum = np.cumsum(values, dtype=np.int64)
        hi = int(np.searchsorted(uniq, b0 + len(values), side="right"))
        c_at[lo:hi] = total + cum[uniq[lo:hi] - b0 - 1]
        total += int(cum[-1])
        lo = hi
    counts = c_at[inverse]
    return counts[len(starts):] - counts[:len(starts)]


def count_bits(packed: np.ndarray, starts: np.ndarray, lens: np.ndarray, block: int = 1 << 20) -> np.ndarray:
    """How many set bits each range [starts[i], starts[i] + lens[i]) of a packed mask holds (streamed,
    ``block`` bytes at a time)."""
    blocks = ((8 * b, np.unpackbits(np.asarray(packed[b:b + block]), bitorder="little"))
              for b in range(0, len(packed), block))
    return range_counts(blocks, starts, lens)


def count_in_ranges(tokens: np.ndarray, value: int, starts: np.ndarray, lens: np.ndarray,
                    block: int = 1 << 22) -> np.ndarray:
    """How many times ``value`` occurs in each ``tokens[starts[i]:starts[i] + lens[i]]`` (streamed over
    the memory map, ``block`` tokens at a time)."""
    blocks = ((b, np.asarray(tokens[b:b + block]) == value) for b in range(0, len(tokens), block))
    return range_counts(blocks, starts, lens)
