"""A length-grouped, distributed, resumable batch sampler.

Every rank computes the same list of *global* batches from (seed, epoch) and takes its slice of
each, so N ranks with batch b see exactly the data of one rank with batch N*b, and the order does
not depend on the number of ranks. The position (epoch, batches consumed) is part of the training
checkpoint, so a resumed run continues with the very next batch.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np


class LengthGroupedBatchSampler:
    """Batches of indices into a dataset with ``lengths``.

    Args:
        lengths: length of each example (what padding is computed from).
        batch_size: examples per batch on this rank.
        seed: with ``epoch``, decides everything random here.
        group_by_size: draw each batch from examples of similar length (length bins of
            ``bin_width`` tokens, as DistilBERT did) to keep padding low; the order of the batches
            is shuffled. If False, batches are consecutive slices of a random permutation.
        num_replicas, rank: distributed data parallel; the global batch is batch_size * num_replicas.
        drop_last: drop the examples that do not fill a last global batch (a random subset each
            epoch, not systematically the longest). Required with several ranks, so that every
            rank takes the same number of steps.
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, seed: int = 0, group_by_size: bool = True,
                 num_replicas: int = 1, rank: int = 0, drop_last: bool = True, bin_width: int = 4):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        if num_replicas > 1 and not drop_last:
            raise ValueError("with several ranks the last incomplete global batch must be dropped")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.global_batch_size = batch_size * num_replicas
        if len(self.lengths) < self.global_batch_size and drop_last:
            raise ValueError(f"{len(self.lengths)} examples are fewer than one global batch "
                             f"({self.global_batch_size})")
        self.seed = seed
        self.group_by_size = group_by_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.drop_last = drop_last
        self.bin_width = bin_width
        self.epoch = 0
        self.position = 0  # batches of the current epoch already consumed

    # -- the order ---------------------------------------------------------------------------

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        """All global batches of ``epoch``, in the order they are served."""
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.lengths)
        g = self.global_batch_size
        perm = rng.permutation(n)
        if self.drop_last and n % g:
            perm = perm[: n - n % g]  # a random subset is left out, not the tail of a sort
        if self.group_by_size:
            # Stable sort by length bin: within a bin the random order of perm survives.
            bins = self.lengths[perm] // self.bin_width
            perm = perm[np.argsort(bins, kind="stable")]
        batches = [perm[i:i + g] for i in range(0, len(perm), g)]
        if self.group_by_size:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __len__(self) -> int:
        n = len(self.lengths)
        g = self.global_batch_size
        return n // g if self.drop_last else -(-n // g)

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.global_batches(self.epoch)
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        while self.position < len(batches):
            b = batches[self.position]
            self.position += 1
            yield b[lo:hi].tolist()

    # -- position ----------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch (a different epoch gives a different order)."""
        self.epoch = epoch
        self.position = 0

    def state_dict(self, position: int | None = None) -> dict:
        """Where the sampler stands. Pass ``position`` (batches consumed this epoch) when the
        consumer runs behind the sampler, e.g. a DataLoader that prefetches."""
        return {"epoch": self.epoch, "position": self.position if position is None else position,
                "seed": self.seed, "global_batch_size": self.global_batch_size,
                "group_by_size": self.group_by_size, "num_examples": len(self.lengths)}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "global_batch_size", "group_by_size", "num_examples"):
            mine = self.state_dict()[key]
            if state[key] != mine:
                raise ValueError(f"sampler state was saved with {key}={state[key]}, this run has {mine}")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


def padding_fraction(lengths: np.ndarray, batches: list[np.ndarray], max_len: int | None = None) -> float:
    """Share of the padded (B, L) positions that are padding, over a list of batches."""
    lengths = np.asarray(lengths)
    if max_len is not None:
        lengths = np.minimum(lengths, max_len)
    real = padded = 0
    for b in batches:
        lb = lengths[b]
        real += int(lb.sum())
        padded += int(lb.max()) * len(lb)
    return 1.0 - real / padded if padded else 0.0
