"""The teacher cache on disk: its layout, its identity, and reading it back for training.

A cache folder (what ``distill-cache-teacher`` writes and ``train.py --teacher_cache`` reads)::

    ids.bin        (positions, k) the teacher's top-k token ids per position, uint16 (V <= 65,536) or uint32
    logprobs.bin   (positions, k) their log-probabilities at the cache's temperature, fp16, bf16, fp32 or q8
    tail.bin       (positions,) float32, the log of the mass outside the top k (-inf when k = V)
    samples.bin    (positions, S) tokens drawn from the teacher's tail (the top k excluded), ids as ids.bin
    entropy.bin    (positions,) float32, the entropy of the teacher's tail distribution (renormalised)
    offsets.npy    int64 (examples + 1,): example i of the dataset owns rows offsets[i]:offsets[i+1]
    tokenizer/     the teacher's tokenizer, saved with the student trained from the cache
    meta.json      the teacher, k, temperature, dtypes, the dataset and its hash, the example layout

The rows follow the training dataset's examples (:class:`~distill.data.dataset.LMSeqsDataset` at
the cache's ``--max_model_input_size``: a binarized sequence cut into chunks, each wrapped in the
start and end tokens), one row per token of an example, in dataset order. Bytes per position:
``k * (id bytes + log-prob bytes) + 4``, plus ``S * id bytes + 4`` with S tail samples. At k = 64
with a vocabulary under 65,536: 260 with fp16 log-probabilities and no samples; 300 by default, q8
log-probabilities (one byte each, :func:`float32_to_q8`) and S = 50, where fp16 would leave room
for 16 (296 bytes). At the same disk, 50 draws give the tail's gradient about 1/1.8 of 16's error and
q8 changes it by less than 0.1% (docs/teacher_cache.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

from distill.data.binarize import OFFSETS_FILE, TOKENS_FILE, read_meta
from distill.errors import UserError
from distill.fileio import sha256_file

FORMAT_VERSION = 2  # 2: the tail samples and entropy
KIND = "distill-teacher-cache"
IDS_FILE, LOGPROBS_FILE, TAIL_FILE = "ids.bin", "logprobs.bin", "tail.bin"
SAMPLES_FILE, ENTROPY_FILE = "samples.bin", "entropy.bin"
DEFAULT_TAIL_SAMPLES = 50
ROWS_FILE, META_FILE = "offsets.npy", "meta.json"
TOKENIZER_DIR = "tokenizer"
# Stored dtypes of the log-probabilities; bf16 is kept as its raw 16 bits (numpy has no bfloat16), q8
# as one byte a log-probability (see float32_to_q8).
LOGPROB_DTYPES = {"fp16": np.dtype(np.float16), "bf16": np.dtype(np.uint16), "fp32": np.dtype(np.float32),
                  "q8": np.dtype(np.uint8)}
Q8_STEPS_PER_NAT = 16  # q8: the log-probability -code / 16 nats, code 0..255, so over [-15.94, 0]
TAIL_DTYPE = np.dtype(np.float32)


def id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def bytes_per_position(k: int, vocab_size: int, logprob_dtype: str, tail_samples: int = 0) -> int:
    """Disk bytes of one cached position: k ids, k log-probabilities and the tail's log-mass; with
    tail samples, their ids and the tail's entropy."""
    ids = id_dtype(vocab_size).itemsize
    top = k * (ids + LOGPROB_DTYPES[logprob_dtype].itemsize) + TAIL_DTYPE.itemsize
    return top + (tail_samples * ids + TAIL_DTYPE.itemsize if tail_samples else 0)


def tail_samples_for(k: int, vocab_size: int, requested: int | None) -> int:
    """The tail samples a cache stores: none when the top k are the whole vocabulary."""
    if k >= vocab_size:
        return 0
    return DEFAULT_TAIL_SAMPLES if requested is None else requested


def logprob_dtype_for(tail_samples: int, requested: str | None) -> str:
    """The stored dtype of the top-k log-probabilities: q8 by default when the cache has tail samples
    (the bytes it saves pay for 32 of them at k = 64), fp16 without (a k = V cache reproduces online
    training only with fp32)."""
    if requested is not None:
        return requested
    return "q8" if tail_samples else "fp16"


class CacheRows(NamedTuple):
    """One example's cached rows (n positions): ids (n, k) int64, logprobs (n, k) float32, tail (n,)
    float32, samples (n, S) int64 and entropy (n,) float32 (None without tail samples)."""

    ids: np.ndarray
    logprobs: np.ndarray
    tail: np.ndarray
    samples: np.ndarray | None
    entropy: np.ndarray | None


def example_rows(lengths: np.ndarray) -> np.ndarray:
    """int64 (examples + 1,): the first cache row of each example (and the total), from their lengths."""
    return np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64))])


def dataset_identity(data_file: str | Path) -> dict:
    """What a cache of ``data_file`` must match: the hash of its tokens and index, and its tokenizer."""
    folder = Path(data_file)
    meta = read_meta(folder)
    return {"path": str(folder.resolve()), "tokens_sha256": sha256_file(folder / TOKENS_FILE),
            "offsets_sha256": sha256_file(folder / OFFSETS_FILE), "num_tokens": meta["num_tokens"],
            "num_sequences": meta["num_sequences"], "vocab_fingerprint": meta.get("vocab_fingerprint"),
            "tokenizer_name": meta.get("tokenizer_name")}


def bf16_to_float32(raw: np.ndarray) -> np.ndarray:
    """Raw bfloat16 bits (uint16) as float32 (the upper half of a float32)."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> raw bfloat16 bits, rounded to nearest even (as torch's conversion)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = u + (0x7FFF + ((u >> 16) & 1))
    nan = np.isnan(x)
    out = (rounded >> 16).astype(np.uint16)
    out[nan] = 0x7FC0
    return out


def float32_to_q8(x: np.ndarray) -> np.ndarray:
    """Log-probabilities -> q8 codes: round(-x * 16), clamped to 0..255. A probability is kept within
    a factor exp(1/32) (3.2%) down to exp(-15.94) = 1.2e-7; smaller ones (and -inf) read back as 1.2e-7.
    The error of each is fixed and small beside the noise of the tail samples whose bytes it frees
    (docs/teacher_cache.md)."""
    code = np.rint(-np.asarray(x, dtype=np.float32) * Q8_STEPS_PER_NAT)
    return np.clip(np.nan_to_num(code, nan=255.0, posinf=255.0), 0, 255).astype(np.uint8)


def q8_to_float32(code: np.ndarray) -> np.ndarray:
    return code.astype(np.float32) * np.float32(-1.0 / Q8_STEPS_PER_NAT)


def decode_logprobs(raw: np.ndarray, logprob_dtype: str) -> np.ndarray:
    """Stored log-probabilities (any of LOGPROB_DTYPES) as float32."""
    if logprob_dtype == "bf16":
        return bf16_to_float32(raw)
    if logprob_dtype == "q8":
        return q8_to_float32(raw)
    return raw.astype(np.float32)


def encode_logprobs(x: np.ndarray, logprob_dtype: str) -> np.ndarray:
    """float32 log-probabilities in the stored form of ``logprob_dtype``."""
    if logprob_dtype == "bf16":
        return float32_to_bf16(x)
    if logprob_dtype == "q8":
        return float32_to_q8(x)
    return x


class TeacherCache:
    """A finished cache, memory-mapped. The maps are opened on first use in each process (a DataLoader
    worker opens its own), so pickling the object copies no data."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        meta_path = self.folder / META_FILE
        if not self.folder.is_dir():
            raise UserError(f"--teacher_cache {self.folder} does not exist")
        if not meta_path.is_file():
            raise UserError(f"{self.folder} is not a finished teacher cache (it has no {META_FILE}); write it with "
                            "distill-cache-teacher")
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            raise UserError(f"{meta_path} is not valid JSON; write the cache again") from None
        if self.meta.get("kind") != KIND or self.meta.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{self.folder} is not a teacher cache of this version (format "
                            f"{self.meta.get('format_version')}); write it again with distill-cache-teacher")
        self.k = int(self.meta["k"])
        self.positions = int(self.meta["positions"])
        self.vocab_size = int(self.meta["vocab_size"])
        self.logprob_dtype = self.meta["logprob_dtype"]
        self.tail_samples = int(self.meta.get("tail_samples", 0))
        self.rows = np.load(self.folder / ROWS_FILE)
        expected = {IDS_FILE: self.positions * self.k * id_dtype(self.vocab_size).itemsize,
                    LOGPROBS_FILE: self.positions * self.k * LOGPROB_DTYPES[self.logprob_dtype].itemsize,
                    TAIL_FILE: self.positions * TAIL_DTYPE.itemsize}
        if self.tail_samples:
            expected[SAMPLES_FILE] = self.positions * self.tail_samples * id_dtype(self.vocab_size).itemsize
            expected[ENTROPY_FILE] = self.positions * TAIL_DTYPE.itemsize
        for name, size in expected.items():
            path = self.folder / name
            if not path.is_file() or path.stat().st_size != size:
                raise UserError(f"{path} is missing or has the wrong size for {self.positions:,} positions at "
                                f"k = {self.k}; write the cache again")
        if len(self.rows) != int(self.meta["examples"]) + 1 or int(self.rows[-1]) != self.positions:
            raise UserError(f"{self.folder / ROWS_FILE} does not match {META_FILE}; write the cache again")
        self._maps = None

    @property
    def temperature(self) -> float:
        return float(self.meta["temperature"])

    def _open(self):
        if self._maps is None:
            k, n, S = self.k, self.positions, self.tail_samples
            self._maps = (
                np.memmap(self.folder / IDS_FILE, dtype=id_dtype(self.vocab_size), mode="r", shape=(n, k)),
                np.memmap(self.folder / LOGPROBS_FILE, dtype=LOGPROB_DTYPES[self.logprob_dtype], mode="r",
                          shape=(n, k)),
                np.memmap(self.folder / TAIL_FILE, dtype=TAIL_DTYPE, mode="r", shape=(n,)),
                np.memmap(self.folder / SAMPLES_FILE, dtype=id_dtype(self.vocab_size), mode="r", shape=(n, S))
                if S else None,
                np.memmap(self.folder / ENTROPY_FILE, dtype=TAIL_DTYPE, mode="r", shape=(n,)) if S else None)
        return self._maps

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_maps"] = None
        return state

    def example(self, i: int) -> CacheRows:
        """Example i's rows (:class:`CacheRows`)."""
        ids, lps, tail, samples, entropy = self._open()
        a, b = int(self.rows[i]), int(self.rows[i + 1])
        lp = decode_logprobs(lps[a:b], self.logprob_dtype)
        return CacheRows(ids[a:b].astype(np.int64), lp, np.asarray(tail[a:b], dtype=np.float32),
                         None if samples is None else samples[a:b].astype(np.int64),
                         None if entropy is None else np.asarray(entropy[a:b], dtype=np.float32))

    def describe(self) -> str:
        drawn = f", {self.tail_samples} tail samples" if self.tail_samples else ""
        return (f"{self.folder} (k = {self.k} of {self.vocab_size:,} tokens{drawn}, temperature {self.temperature:g}, "
                f"{self.positions:,} positions, {self.meta['teacher']['name']})")

    def identity(self) -> dict:
        """What a checkpoint of a run trained from this cache records (checked on resume)."""
        return {"cache": str(self.folder.resolve()), "meta_sha256": sha256_file(self.folder / META_FILE)[:16]}

    def check(self, *, data_file: str, example_lengths: np.ndarray, max_model_input_size: int, temperature: float,
              vocab_size: int, k: int | None) -> None:
        """Refuse, with one sentence, a cache that does not belong to this run's dataset, layout,
        tokenizer, temperature or k."""
        meta = self.meta
        if k is not None and k != self.k:
            raise UserError(f"--teacher_cache {self.folder} holds the top {self.k} tokens per position, not the "
                            f"--teacher_cache_k {k} asked for; cache the teacher again with --k {k}")
        if vocab_size != self.vocab_size:
            raise UserError(f"--teacher_cache {self.folder} was written by a teacher of {self.vocab_size:,} ids, "
                            f"but the student has {vocab_size:,}")
        if max_model_input_size != int(meta["max_model_input_size"]):
            raise UserError(f"--teacher_cache {self.folder} was written for --max_model_input_size "
                            f"{meta['max_model_input_size']}, and its rows follow that cut of the data; pass "
                            f"--max_model_input_size {meta['max_model_input_size']} or cache again")
        if abs(temperature - self.temperature) > 1e-12:
            raise UserError(f"--teacher_cache {self.folder} holds the teacher at temperature {self.temperature:g}, "
                            f"which the soft targets of a cache cannot be rescaled from; pass --temperature "
                            f"{self.temperature:g} or cache again with --temperature {temperature:g}")
        data_meta = read_meta(data_file)
        if data_meta.get("vocab_fingerprint") != meta["dataset"]["vocab_fingerprint"]:
            raise UserError(f"--teacher_cache {self.folder} was written from data of another tokenizer "
                            f"({meta['dataset']['tokenizer_name']}) than {data_file}")
        current = dataset_identity(data_file)
        for key in ("tokens_sha256", "offsets_sha256"):
            if current[key] != meta["dataset"][key]:
                raise UserError(f"--teacher_cache {self.folder} was written from another dataset "
                                f"({meta['dataset']['path']}) than {data_file}: their tokens differ")
        if not np.array_equal(example_rows(example_lengths), self.rows):
            raise UserError(f"--teacher_cache {self.folder} follows another cut of {data_file} into examples; "
                            "cache it again")
