"""Dataset chunking and filtering, the length-grouped sampler, collation and MLM masking."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.data.binarize import FORMAT_VERSION
from distill.data.collate import IGNORE_INDEX, Collator, mlm_token_probs
from distill.data.dataset import LMSeqsDataset, count_in_ranges
from distill.data.sampler import LengthGroupedBatchSampler, padding_fraction
from distill.errors import UserError

START, END, UNK, PAD, MASK = 2, 3, 1, 0, 4
SPECIAL = [PAD, UNK, START, END, MASK]


def write_dataset(folder: Path, seqs: list[list[int]], vocab_size: int = 50) -> Path:
    """A dataset folder in the binarized format, written directly from id lists."""
    folder.mkdir(parents=True)
    flat = np.concatenate([np.asarray(s, dtype=np.uint16) for s in seqs])
    flat.tofile(folder / "tokens.bin")
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in seqs], out=offsets[1:])
    np.save(folder / "offsets.npy", offsets)
    meta = {"format_version": FORMAT_VERSION, "vocab_size": vocab_size, "dtype": "uint16",
            "num_sequences": len(seqs), "num_tokens": int(offsets[-1]), "start_id": START, "end_id": END,
            "special_token_ids": {"pad_token": PAD, "unk_token": UNK, "cls_token": START, "sep_token": END,
                                  "mask_token": MASK}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def wrap(content: list[int]) -> list[int]:
    return [START] + content + [END]


# ---------------------------------------------------------------------------------------------
# Dataset


def test_long_sequences_are_chunked_with_start_and_end(tmp_path):
    long = list(range(10, 10 + 45))  # 45 content tokens
    ds = LMSeqsDataset(write_dataset(tmp_path / "d", [wrap(long), wrap(list(range(5, 20)))]),
                       max_model_input_size=20, min_length=3)
    items = [ds[i]["input_ids"].tolist() for i in range(len(ds))]
    # 45 content tokens at 18 per chunk -> 18 + 18 + 9, each re-wrapped
    assert items[:3] == [wrap(long[0:18]), wrap(long[18:36]), wrap(long[36:45])]
    assert items[3] == wrap(list(range(5, 20)))
    assert all(len(x) <= 20 for x in items)
    assert ds.stats.split == 1 and ds.stats.chunks == 4 and ds.stats.examples == 4
    assert ds.lengths.tolist() == [20, 20, 11, 17]
    assert [ds[i]["index"] for i in range(4)] == [0, 1, 2, 3]


def test_short_and_unknown_sequences_are_dropped(tmp_path):
    seqs = [
        wrap(list(range(10, 19))),  # 11 tokens: dropped (11 or fewer, as DistilBERT)
        wrap(list(range(10, 20))),  # 12 tokens: kept
        wrap([UNK] * 6 + list(range(10, 16))),  # 6 unknown of 14: 43%, kept
        wrap([UNK] * 7 + list(range(10, 15))),  # 7 unknown of 14: half, dropped
    ]
    ds = LMSeqsDataset(write_dataset(tmp_path / "d", seqs), max_model_input_size=64)
    assert ds.lengths.tolist() == [12, 14]
    assert ds.stats.dropped_short == 1 and ds.stats.dropped_unk == 1 and ds.stats.examples == 2
    assert "dropped" in ds.stats.summary()
    # thresholds are configurable
    ds2 = LMSeqsDataset(tmp_path / "d", max_model_input_size=64, min_length=2, max_unk_fraction=1.1)
    assert len(ds2) == 4


def test_dataset_is_memory_mapped(tmp_path):
    ds = LMSeqsDataset(write_dataset(tmp_path / "d", [wrap(list(range(10, 30)))] * 3))
    assert isinstance(ds.tokens, np.memmap)


def test_dataset_refuses_what_is_not_a_dataset(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        LMSeqsDataset(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a binarized dataset"):
        LMSeqsDataset(str(tmp_path / "empty"))
    folder = write_dataset(tmp_path / "trunc", [wrap(list(range(10, 30)))])
    (folder / "tokens.bin").write_bytes(b"\x00\x00")
    with pytest.raises(UserError, match="truncated"):
        LMSeqsDataset(str(folder))


def test_count_in_ranges_matches_python():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 4, size=5000)
    starts = rng.integers(0, 4500, size=300)
    lens = rng.integers(0, 500, size=300)
    ref = [int((tokens[s:s + n] == 2).sum()) for s, n in zip(starts, lens)]
    assert count_in_ranges(tokens, 2, starts, lens, block=97).tolist() == ref


# ---------------------------------------------------------------------------------------------
# Sampler


def lengths_fixture(n=203, seed=0):
    return np.random.default_rng(seed).integers(12, 128, size=n)


@pytest.mark.parametrize("group", [True, False])
def test_each_example_once_per_epoch(group):
    lengths = lengths_fixture()
    s = LengthGroupedBatchSampler(lengths, 8, seed=3, group_by_size=group, drop_last=False)
    seen = [i for b in s for i in b]
    assert sorted(seen) == list(range(len(lengths)))
    assert len(list(LengthGroupedBatchSampler(lengths, 8, seed=3, group_by_size=group, drop_last=False))) == len(s)
    s2 = LengthGroupedBatchSampler(lengths, 8, seed=3, group_by_size=group)  # drop_last: 203 = 25 * 8 + 3
    seen2 = [i for b in s2 for i in b]
    assert len(seen2) == len(set(seen2)) == 200 and len(s2) == 25


def test_order_depends_on_seed_and_epoch_only():
    lengths = lengths_fixture()
    a = LengthGroupedBatchSampler(lengths, 8, seed=3)
    b = LengthGroupedBatchSampler(lengths, 8, seed=3)
    assert list(a) == list(b)
    a.set_epoch(1)
    b.set_epoch(1)
    e1 = list(a)
    assert e1 == list(b)
    a.set_epoch(0)
    assert list(a) != e1
    c = LengthGroupedBatchSampler(lengths, 8, seed=4)
    a.set_epoch(0)
    assert list(a) != list(c)
    # the examples dropped by drop_last change with the epoch
    drops = [set(range(len(lengths))) - {i for bt in LengthGroupedBatchSampler(lengths, 8, seed=3).global_batches(e)
                                           for i in bt} for e in range(4)]
    assert len({frozenset(d) for d in drops}) > 1


def test_grouping_keeps_padding_low_and_is_on_by_default():
    lengths = lengths_fixture(2000)
    grouped = LengthGroupedBatchSampler(lengths, 8, seed=0)
    plain = LengthGroupedBatchSampler(lengths, 8, seed=0, group_by_size=False)
    assert grouped.group_by_size
    pf_grouped = padding_fraction(lengths, grouped.global_batches(0))
    pf_plain = padding_fraction(lengths, plain.global_batches(0))
    assert pf_grouped < 0.05 < 0.25 < pf_plain
    for b in grouped.global_batches(0):
        assert lengths[b].max() // 4 - lengths[b].min() // 4 <= 1  # at most two adjacent bins


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_split_each_global_batch(world):
    lengths = lengths_fixture(500)
    single = list(LengthGroupedBatchSampler(lengths, 2 * world, seed=9))
    ranks = [list(LengthGroupedBatchSampler(lengths, 2, seed=9, num_replicas=world, rank=r)) for r in range(world)]
    assert all(len(r) == len(single) for r in ranks)
    for step, global_batch in enumerate(single):
        shares = [ranks[r][step] for r in range(world)]
        flat = [i for s in shares for i in s]
        assert len(set(flat)) == len(flat)  # disjoint
        assert flat == global_batch  # together exactly the single-rank batch, in order


def test_restored_position_continues_exactly():
    lengths = lengths_fixture()
    full = LengthGroupedBatchSampler(lengths, 8, seed=5)
    full.set_epoch(2)
    straight = list(full)
    s = LengthGroupedBatchSampler(lengths, 8, seed=5)
    s.set_epoch(2)
    it = iter(s)
    first = [next(it) for _ in range(7)]
    state = s.state_dict()
    assert state["epoch"] == 2 and state["position"] == 7
    r = LengthGroupedBatchSampler(lengths, 8, seed=5)
    r.load_state_dict(json.loads(json.dumps(state)))  # survives serialisation
    assert first + list(r) == straight
    # a consumer that runs behind the sampler reports its own position
    assert s.state_dict(position=3)["position"] == 3
    with pytest.raises(ValueError, match="seed"):
        LengthGroupedBatchSampler(lengths, 8, seed=6).load_state_dict(state)


def test_position_survives_a_change_of_world_size():
    # The global batch is what is saved, so 2 ranks x 4 resume where 1 rank x 8 stopped.
    lengths = lengths_fixture()
    one = LengthGroupedBatchSampler(lengths, 8, seed=5)
    it = iter(one)
    [next(it) for _ in range(4)]
    rest_single = list(it)
    two = [LengthGroupedBatchSampler(lengths, 4, seed=5, num_replicas=2, rank=r) for r in range(2)]
    for s in two:
        s.load_state_dict(one.state_dict(position=4))
    rest_two = [a + b for a, b in zip(*(list(s) for s in two))]
    assert rest_two == rest_single


# ---------------------------------------------------------------------------------------------
# Collation and masking


def mlm_collator(vocab=50, counts=None, smoothing=0.7, **kw):
    counts = np.ones(vocab) if counts is None else counts
    return Collator(PAD, mlm=True, mask_id=MASK, token_probs=mlm_token_probs(counts, smoothing, SPECIAL), **kw)


def example(i, ids):
    return {"index": i, "input_ids": np.asarray(ids, dtype=np.int64)}


def test_padding_and_attention_mask():
    c = Collator(PAD)
    b = c([example(0, wrap([10, 11, 12])), example(1, wrap([13]))])
    assert b["input_ids"].tolist() == [[2, 10, 11, 12, 3], [2, 13, 3, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert b["indices"].tolist() == [0, 1] and "labels" not in b


def test_clm_labels_ignore_padding_even_when_pad_is_a_real_token():
    c = Collator(END, causal=True)  # GPT-2 style: padding with the end-of-text id
    b = c([example(0, wrap([10, 11, 12])), example(1, wrap([13]))])
    assert b["labels"].tolist() == [[2, 10, 11, 12, 3], [2, 13, 3, -100, -100]]


def test_masking_statistics():
    rng = np.random.default_rng(0)
    c = mlm_collator(smoothing=0.0, seed=1)
    n_real = n_chosen = n_mask = n_keep = n_rand = 0
    for i in range(3000):
        ids = wrap(list(rng.integers(5, 50, size=int(rng.integers(10, 60)))))
        b = c([example(i, ids)])
        labels, inp = b["labels"][0], b["input_ids"][0]
        chosen = labels != IGNORE_INDEX
        n_real += len(ids)
        n_chosen += int(chosen.sum())
        orig = torch.tensor(ids)
        n_mask += int((inp[chosen] == MASK).sum())
        n_keep += int((inp[chosen] == orig[chosen]).sum())
        n_rand += int(((inp[chosen] != MASK) & (inp[chosen] != orig[chosen])).sum())
        assert torch.equal(labels[chosen], orig[chosen])
        assert torch.equal(inp[~chosen], orig[~chosen])  # unchosen tokens untouched
        assert not chosen[0] and not chosen[-1]  # start/end never chosen
    assert abs(n_chosen / n_real - 0.15) < 0.005
    assert abs(n_mask / n_chosen - 0.8) < 0.015
    # a random replacement can hit the original token (1 in 45 here): it counts as kept
    assert abs(n_keep / n_chosen - (0.1 + 0.1 / 45)) < 0.01
    assert abs(n_rand / n_chosen - 0.1 * 44 / 45) < 0.01


def test_selection_probability_follows_smoothed_counts():
    # Two ordinary tokens, 10 and 11; token 10 is 16x as frequent. With smoothing 0.5 a rare token
    # is 4x as likely to be chosen as a frequent one when one of them is chosen.
    counts = np.ones(50)
    counts[10], counts[11] = 1600, 100
    c = mlm_collator(counts=counts, smoothing=0.5, mlm_mask_prop=0.25, word_mask=1.0, word_keep=0.0,
                     word_rand=0.0)
    picks = {10: 0, 11: 0}
    for i in range(6000):
        b = c([example(i, [START, 10, 11, END])])  # 4 tokens x 0.25: one chosen per sequence
        lab = b["labels"][0]
        for t in lab[lab != IGNORE_INDEX].tolist():
            picks[t] += 1
    assert sum(picks.values()) == 6000
    ratio = picks[11] / picks[10]
    assert 3.6 < ratio < 4.4


def test_special_tokens_and_padding_are_never_masked():
    c = mlm_collator(mlm_mask_prop=1.0)
    b = c([example(0, wrap([MASK, UNK, 10, 11, 12])), example(1, wrap([13]))])
    labels, attn = b["labels"], b["attention_mask"]
    assert labels[attn == 0].eq(IGNORE_INDEX).all()
    assert labels[0].tolist() == [-100, -100, -100, 10, 11, 12, -100]
    assert labels[1].tolist()[:3] == [-100, 13, -100]


def test_same_sequence_masked_identically_in_any_batching():
    rng = np.random.default_rng(2)
    exs = [example(i, wrap(list(rng.integers(5, 50, size=int(rng.integers(10, 40)))))) for i in range(16)]
    c = mlm_collator(seed=7)
    whole = c(exs)
    parts = [c(exs[i:i + 2]) for i in range(0, 16, 2)] + [c(list(reversed(exs)))]
    for j, e in enumerate(exs):
        n = len(e["input_ids"])
        ref = (whole["input_ids"][j, :n], whole["labels"][j, :n])
        p = parts[j // 2]
        got = (p["input_ids"][j % 2, :n], p["labels"][j % 2, :n])
        assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])
        rev = parts[-1]
        assert torch.equal(rev["input_ids"][15 - j, :n], ref[0])
    # another epoch or seed masks differently
    c.epoch = 1
    assert not torch.equal(c(exs)["labels"], whole["labels"])
    assert not torch.equal(mlm_collator(seed=8)(exs)["labels"], whole["labels"])


@pytest.mark.real
def test_kjv_padding_figures_real_corpus(tmp_path, kjv_text, real_bert_dir):
    """The real corpus behaves as the closing note reports: grouping cuts padding to a few percent."""
    from distill.data.binarize import binarize

    binarize(kjv_text, str(real_bert_dir), tmp_path / "kjv", progress=False)
    ds = LMSeqsDataset(str(tmp_path / "kjv"), max_model_input_size=128)
    grouped = padding_fraction(ds.lengths, LengthGroupedBatchSampler(ds.lengths, 8, seed=0).global_batches(0))
    plain = padding_fraction(ds.lengths, LengthGroupedBatchSampler(ds.lengths, 8, seed=0, group_by_size=False)
                             .global_batches(0))
    assert grouped < 0.06 and plain > 0.3
