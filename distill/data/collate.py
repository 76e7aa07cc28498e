"""Collation: pad a list of examples into a batch, with MLM masking or CLM labels.

MLM follows DistilBERT: ``mlm_mask_prop`` of a sequence's tokens are chosen, with probability
proportional to count(token) ** -mlm_smoothing (special tokens and padding never), then replaced
by the mask token / kept / replaced by a random token with probabilities word_mask / word_keep /
word_rand. Unlike the original, the randomness of each sequence comes from (seed, epoch, example
index), so an example is masked the same way whatever the batch size, the number of ranks or the
accumulation split — which is what makes resumed and multi-process runs exact.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

IGNORE_INDEX = -100
_MLM_STREAM = 0x6D6C6D  # keeps the masking RNG stream apart from the sampler's


def mlm_token_probs(counts: np.ndarray, smoothing: float, special_ids: Sequence[int]) -> np.ndarray:
    """Per-id selection weight count ** -smoothing (unseen ids count as 1); special ids get 0."""
    probs = np.maximum(np.asarray(counts, dtype=np.float64), 1.0) ** -smoothing
    probs[list(special_ids)] = 0.0
    return probs


class Collator:
    """Turn ``[{"index", "input_ids"}, ...]`` into padded tensors.

    Returns ``input_ids`` (B, L), ``attention_mask`` (B, L), ``indices`` (B,), and ``labels``
    (B, L) with -100 where no loss is taken (for MLM: every unmasked position; for CLM: padding;
    HF causal models shift the labels themselves). Without ``mlm`` or ``causal`` there are no labels.

    With a teacher ``cache`` (CLM), each position's cached top-k rows come too (:meth:`cached_rows`).
    With ``completion_only`` (CLM on data with a completion mask), labels keep only completion tokens,
    and ``target_mask`` (B, L) marks the positions whose next token is one: the soft-target losses'.

    Set ``epoch`` before each epoch: it is part of the masking seed.
    """

    def __init__(self, pad_id: int, *, mlm: bool = False, causal: bool = False, mask_id: int | None = None,
                 token_probs: np.ndarray | None = None, mlm_mask_prop: float = 0.15, word_mask: float = 0.8,
                 word_keep: float = 0.1, word_rand: float = 0.1, seed: int = 0, cache=None,
                 completion_only: bool = False):
        if mlm and causal:
            raise ValueError("a batch is either masked (MLM) or causal (CLM), not both")
        if mlm:
            if mask_id is None or token_probs is None:
                raise ValueError("MLM needs mask_id and token_probs")
            if not np.isclose(word_mask + word_keep + word_rand, 1.0):
                raise ValueError("word_mask + word_keep + word_rand must be 1")
            if not 0.0 < mlm_mask_prop <= 1.0:
                raise ValueError("mlm_mask_prop must be in (0, 1]")
        self.pad_id = pad_id
        self.mlm = mlm
        self.causal = causal
        self.mask_id = mask_id
        self.token_probs = None if token_probs is None else np.asarray(token_probs, dtype=np.float64)
        # Random replacements are drawn among ordinary tokens only (ids with a selection weight).
        self.random_ids = None if token_probs is None else np.flatnonzero(self.token_probs > 0)
        self.mlm_mask_prop = mlm_mask_prop
        self.word_probs = (word_mask, word_keep, word_rand)
        self.seed = seed
        self.epoch = 0
        if cache is not None and not causal:
            raise ValueError("a teacher cache goes with causal batches")
        self.cache = cache  # a distill.teacher_cache.TeacherCache, or None
        if completion_only and not causal:
            raise ValueError("a completion-only loss goes with causal batches")
        self.completion_only = completion_only

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        lengths = [len(e["input_ids"]) for e in examples]
        B, L = len(examples), max(lengths)
        input_ids = np.full((B, L), self.pad_id, dtype=np.int64)
        attention = np.zeros((B, L), dtype=np.int64)
        labels = np.full((B, L), IGNORE_INDEX, dtype=np.int64) if (self.mlm or self.causal) else None
        targets = np.zeros((B, L), dtype=bool) if self.completion_only else None
        for b, (e, n) in enumerate(zip(examples, lengths)):
            ids = e["input_ids"]
            attention[b, :n] = 1
            if self.mlm:
                input_ids[b, :n], labels[b, :n] = self.mask_sequence(ids, e["index"])
            else:
                input_ids[b, :n] = ids
                if self.completion_only:  # the loss only where the next token is a completion token
                    keep = e["loss_mask"].astype(bool)
                    labels[b, :n] = np.where(keep, ids, IGNORE_INDEX)
                    targets[b, :n - 1] = keep[1:]
                elif self.causal:
                    labels[b, :n] = ids
        out = {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention),
            "indices": torch.tensor([e["index"] for e in examples], dtype=torch.int64),
        }
        if labels is not None:
            out["labels"] = torch.from_numpy(labels)
        if targets is not None:
            out["target_mask"] = torch.from_numpy(targets)
        if self.cache is not None:
            out.update(self.cached_rows(examples, L))
        return out

    def cached_rows(self, examples: list[dict], L: int) -> dict[str, torch.Tensor]:
        """The cache's rows of each example, padded like the ids: ``teacher_ids`` (B, L, k) int64,
        ``teacher_logprobs`` (B, L, k) float32 and ``teacher_tail`` (B, L) float32; with tail samples,
        ``teacher_samples`` (B, L, S) int64 and ``teacher_entropy`` (B, L) float32."""
        B, k, S = len(examples), self.cache.k, self.cache.tail_samples
        ids = np.zeros((B, L, k), dtype=np.int64)
        lps = np.zeros((B, L, k), dtype=np.float32)
        tail = np.zeros((B, L), dtype=np.float32)
        drawn = np.zeros((B, L, S), dtype=np.int64)
        entropy = np.zeros((B, L), dtype=np.float32)
        for b, e in enumerate(examples):
            rows = self.cache.example(e["index"])
            n = len(e["input_ids"])
            if len(rows.ids) != n:  # the cache was checked against the dataset's layout: this is a bug
                raise RuntimeError(f"example {e['index']} has {n} tokens but {len(rows.ids)} cached rows")
            ids[b, :n], lps[b, :n], tail[b, :n] = rows.ids, rows.logprobs, rows.tail
            if S:
                drawn[b, :n], entropy[b, :n] = rows.samples, rows.entropy
        out = {"teacher_ids": torch.from_numpy(ids), "teacher_logprobs": torch.from_numpy(lps),
               "teacher_tail": torch.from_numpy(tail)}
        if S:
            out.update(teacher_samples=torch.from_numpy(drawn), teacher_entropy=torch.from_numpy(entropy))
        return out

    def mask_sequence(self, ids: np.ndarray, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(masked ids, labels) for one sequence; deterministic in (seed, epoch, index)."""
        rng = np.random.default_rng([self.seed, self.epoch, int(index), _MLM_STREAM])
        n = len(ids)
        weights = self.token_probs[ids]  # (n,) 0 for special tokens
        n_cand = int(np.count_nonzero(weights))
        # Stochastic rounding keeps the expected share exactly mlm_mask_prop for short sequences too.
        k = min(n_cand, int(np.floor(self.mlm_mask_prop * n + rng.random())))
        labels = np.full(n, IGNORE_INDEX, dtype=np.int64)
        out = np.array(ids, dtype=np.int64, copy=True)
        if k == 0:
            return out, labels
        # Weighted sampling without replacement (Efraimidis-Spirakis): the k largest u ** (1 / w).
        u = rng.random(n)
        with np.errstate(divide="ignore"):
            keys = np.where(weights > 0, np.log(u) / np.where(weights > 0, weights, 1.0), -np.inf)
        chosen = np.argpartition(-keys, k - 1)[:k]
        labels[chosen] = out[chosen]
        r = rng.random(k)
        p_mask, p_keep, _ = self.word_probs
        to_mask = chosen[r < p_mask]
        to_rand = chosen[r >= p_mask + p_keep]
        out[to_mask] = self.mask_id
        out[to_rand] = self.random_ids[rng.integers(0, len(self.random_ids), size=len(to_rand))]
        return out, labels
