"""Running the teacher once over a binarized dataset and writing its top-k signal (:mod:`.store`).

The positions are cut into shards of whole examples. Everything is written in a staging folder beside
the destination (``.<name>.partial``); after each shard its rows are flushed to disk and the shard is
recorded in ``done.json`` (written atomically), so a killed run started again with the same command
skips the finished shards. The staging folder becomes the cache by one rename, after ``meta.json``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from distill import losses as L
from distill import models as M
from distill import optim as O
from distill.data.binarize import vocab_fingerprint
from distill.data.dataset import LMSeqsDataset
from distill.errors import UserError, note, say
from distill.fileio import publish_folder, write_atomic
from distill.hf import quiet_transformers
from distill.teacher_cache import store as S
from distill.testing.faults import kill_point

PLAN_FILE, DONE_FILE = "plan.json", "done.json"
_TINY = torch.finfo(torch.float32).tiny


@dataclass
class CacheResult:
    folder: Path
    positions: int
    bytes: int
    seconds: float  # of this invocation's teacher passes
    positions_written: int  # by this invocation (a resumed run skips the finished shards)

    @property
    def tokens_per_s(self) -> float:
        return self.positions_written / max(self.seconds, 1e-9)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n} B"


def shard_bounds(rows: np.ndarray, shard_positions: int) -> list[tuple[int, int]]:
    """Consecutive (first example, end example) ranges of about ``shard_positions`` rows each."""
    n = len(rows) - 1
    bounds, a = [], 0
    while a < n:
        b = int(np.searchsorted(rows, rows[a] + shard_positions, side="left"))
        b = min(max(b, a + 1), n)
        bounds.append((a, b))
        a = b
    return bounds


def _reserve(path: Path, size: int) -> None:
    """Create ``path`` at ``size`` bytes, its blocks reserved where the filesystem can (a full disk then
    fails here, before any teacher pass, not halfway through)."""
    with open(path, "wb") as f:
        if size and hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(f.fileno(), 0, size)
                return
            except OSError as e:
                if e.errno == 28:  # ENOSPC
                    raise
        f.truncate(size)


def _teacher_tokenizer(teacher_name: str):
    from transformers import AutoTokenizer

    from distill.hf import has_tokenizer

    name = Path(teacher_name)
    try:
        with quiet_transformers(progress_bars=True):
            if name.suffix == ".gguf":
                return AutoTokenizer.from_pretrained(name.parent, gguf_file=name.name, local_files_only=True)
            if not has_tokenizer(name):
                return None
            return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception:  # no usable tokenizer files next to the teacher
        return None


def _teacher_identity(teacher_type: str, teacher_name: str, model) -> dict:
    from distill.checkpoint import teacher_identity

    return {"name": str(teacher_name), "type": teacher_type, "class": type(model).__name__,
            **teacher_identity(teacher_name)}


def _files(positions: int, k: int, vocab: int, logprob_dtype: str, tail_samples: int) -> dict[str, int]:
    """The cache's row files and their sizes in bytes."""
    ids = S.id_dtype(vocab).itemsize
    files = {S.IDS_FILE: positions * k * ids, S.LOGPROBS_FILE: positions * k * S.LOGPROB_DTYPES[logprob_dtype].itemsize,
             S.TAIL_FILE: positions * S.TAIL_DTYPE.itemsize}
    if tail_samples:
        files[S.SAMPLES_FILE] = positions * tail_samples * ids
        files[S.ENTROPY_FILE] = positions * S.TAIL_DTYPE.itemsize
    return files


class _Writer:
    """The open memory maps of a staging folder."""

    def __init__(self, folder: Path, positions: int, k: int, vocab: int, logprob_dtype: str, tail_samples: int):
        self.ids = np.memmap(folder / S.IDS_FILE, dtype=S.id_dtype(vocab), mode="r+", shape=(positions, k))
        self.lps = np.memmap(folder / S.LOGPROBS_FILE, dtype=S.LOGPROB_DTYPES[logprob_dtype], mode="r+",
                             shape=(positions, k))
        self.tail = np.memmap(folder / S.TAIL_FILE, dtype=S.TAIL_DTYPE, mode="r+", shape=(positions,))
        self.maps = [self.ids, self.lps, self.tail]
        if tail_samples:
            self.samples = np.memmap(folder / S.SAMPLES_FILE, dtype=S.id_dtype(vocab), mode="r+",
                                     shape=(positions, tail_samples))
            self.entropy = np.memmap(folder / S.ENTROPY_FILE, dtype=S.TAIL_DTYPE, mode="r+", shape=(positions,))
            self.maps += [self.samples, self.entropy]
        self.logprob_dtype = logprob_dtype

    def put(self, a: int, rows: "TopK") -> None:
        b = a + rows.ids.shape[0]
        self.ids[a:b] = rows.ids.numpy()
        lp = rows.logprobs.float().numpy()
        self.lps[a:b] = S.encode_logprobs(lp, self.logprob_dtype)
        self.tail[a:b] = rows.tail.float().numpy()
        if rows.samples is not None:
            self.samples[a:b] = rows.samples.numpy()
            self.entropy[a:b] = rows.entropy.numpy()

    def flush(self) -> None:
        for m in self.maps:
            m.flush()


class TopK(NamedTuple):
    """A block of cached rows: ids (n, k), log-probabilities (n, k), log tail mass (n,); with tail
    samples, samples (n, S) and the tail's entropy (n,), else None."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail: torch.Tensor
    samples: torch.Tensor | None = None
    entropy: torch.Tensor | None = None

    def slice(self, a: int, b: int) -> "TopK":
        return TopK(*(None if x is None else x[a:b] for x in self))


@torch.inference_mode()
def top_k_rows(logits: torch.Tensor, k: int, temperature: float, tail_samples: int = 0,
               generator: torch.Generator | None = None) -> TopK:
    """The cached rows of logits (n, V) at ``temperature``, in fp32: the top k in decreasing order,
    the tail's log-mass, and with ``tail_samples`` S, S tokens drawn with replacement from the
    teacher's tail distribution (the top k excluded, renormalised) and that distribution's entropy."""
    ls = torch.log_softmax(logits.float() / temperature, -1)
    top = ls.topk(k, -1)
    if k >= ls.shape[1]:
        return TopK(top.indices, top.values, ls.new_full((ls.shape[0],), -math.inf))
    q = ls.exp().scatter_(1, top.indices, 0.0)  # the tail's probabilities, 0 at the top k
    mass = q.sum(-1)  # a sum of small positives: no cancellation, unlike 1 - the top's
    tail = mass.log()
    empty = mass == 0  # every tail probability underflowed: the log-mass from the log-probabilities
    if bool(empty.any()):
        tail[empty] = ls[empty].scatter(1, top.indices[empty], -math.inf).logsumexp(-1)
    if not tail_samples:
        return TopK(top.indices, top.values, tail)
    # The tail distribution's entropy, log Q - (sum_v q_v log q_v) / Q, in one pass over the rows.
    entropy = tail - torch.bmm(q.unsqueeze(1), ls.unsqueeze(2)).view(-1) / mass.clamp_min(_TINY)
    if bool(empty.any()):  # any tail token will do (its weight is 0)
        q[empty] = torch.ones_like(q[empty]).scatter_(1, top.indices[empty], 0.0)
        entropy[empty] = 0.0
    samples = torch.multinomial(q, tail_samples, replacement=True, generator=generator)  # q need not sum to 1
    return TopK(top.indices, top.values, tail, samples, entropy)


class _TeacherPass:
    """The teacher on batches of examples: top-k rows of every real position, a chunk of rows at a time
    through the vocabulary projection (no (B, L, V) logits for the models whose head is a plain one)."""

    ROWS = 256  # rows projected at a time
    POST_ROWS = 32  # rows of logits reduced to their top k (and tail samples) at a time: 104 against 126 ms
    # for 256 rows of SmolLM2's 49,152 logits in blocks of 256, on a 2-core AMD EPYC

    def __init__(self, model, k: int, temperature: float, amp_dtype: torch.dtype | None, pad_id: int,
                 tail_samples: int = 0):
        self.model, self.k, self.T, self.amp_dtype, self.pad_id = model, k, temperature, amp_dtype, pad_id
        self.tail_samples = tail_samples
        self.generator = torch.Generator()
        self.device = torch.device("cpu")
        self.proj = L.output_projection(model)

    def __call__(self, examples: list[np.ndarray]) -> TopK:
        B, Lmax = len(examples), max(len(e) for e in examples)
        ids = torch.full((B, Lmax), self.pad_id, dtype=torch.int64)
        attn = torch.zeros((B, Lmax), dtype=torch.int64)
        for b, e in enumerate(examples):
            ids[b, :len(e)] = torch.from_numpy(e)
            attn[b, :len(e)] = 1
        with torch.inference_mode(), O.autocast(self.device, self.amp_dtype):
            if self.proj is not None:
                with L.projection_input(self.model):
                    hidden = self.model(input_ids=ids, attention_mask=attn, use_cache=False).logits  # (B, L, H)
            else:
                hidden = self.model(input_ids=ids, attention_mask=attn, use_cache=False).logits  # (B, L, V)
        rows = hidden[attn.bool()]  # (n, H or V), examples in order, each's tokens in order
        out = []
        for r in range(0, rows.shape[0], self.ROWS):
            x = rows[r:r + self.ROWS]
            if self.proj is not None:
                logits = L.ProjectedLogits(x, self.proj.weight, self.proj.bias, self.amp_dtype).materialize()
            else:
                logits = x
            for q in range(0, logits.shape[0], self.POST_ROWS):  # the softmax passes on blocks that stay in cache
                out.append(top_k_rows(logits[q:q + self.POST_ROWS], self.k, self.T, self.tail_samples,
                                      self.generator))
        return TopK(*(None if col[0] is None else torch.cat(col) for col in zip(*out)))


def cache_teacher(*, teacher_type: str, teacher_name: str, data_file: str, out: str | Path, k: int = 64,
                  temperature: float = 2.0, max_model_input_size: int = 512, logprob_dtype: str | None = None,
                  batch_tokens: int = 8192, shard_positions: int = 1 << 16, bf16: bool = False,
                  force: bool = False, progress: bool = True, tail_samples: int | None = None,
                  seed: int = 0) -> CacheResult:
    """Write the cache of ``teacher_name`` on ``data_file`` into ``out`` (see the module docstring).
    ``tail_samples``: tokens drawn from the teacher's tail per position (default 50, none when k is the
    vocabulary), from a generator seeded with ``seed`` and the shard. ``logprob_dtype``: by default q8
    with tail samples (their bytes come from it), fp16 without."""
    out = Path(out)
    if tail_samples is not None and tail_samples < 0:
        raise UserError("--tail_samples must be 0 or more")
    if logprob_dtype is not None and logprob_dtype not in S.LOGPROB_DTYPES:
        raise UserError(f"--logprob_dtype must be one of {', '.join(S.LOGPROB_DTYPES)}")
    if not temperature > 0 or not math.isfinite(temperature):
        raise UserError("--temperature must be a positive number")
    for name, v in (("--batch_tokens", batch_tokens), ("--shard_positions", shard_positions), ("--k", k)):
        if v < 1:
            raise UserError(f"{name} must be at least 1")
    for flag, path in (("--teacher_name", teacher_name), ("--data_file", data_file)):
        if not Path(path).exists():
            raise UserError(f"{flag} {path} does not exist")
    if out.exists():
        if not (out / S.META_FILE).is_file():
            raise UserError(f"{out} exists and is not a teacher cache; refusing to replace it")
        if not force:
            raise UserError(f"{out} already holds a teacher cache; pass --force to replace it (the old one stays "
                            "until the new one is complete)")

    dataset = LMSeqsDataset(data_file, max_model_input_size=max_model_input_size)
    with quiet_transformers(progress_bars=True):
        loaded = M.load_model(teacher_type, teacher_name)
    model = loaded.model.eval()
    if loaded.objective != "clm":
        raise UserError(f"{teacher_name} is a masked LM: its outputs depend on each epoch's random masks, so they "
                        "cannot be computed once; a teacher cache is for causal LMs")
    if loaded.lm_head_initialized:
        raise UserError(f"{teacher_name} has no LM head in its checkpoint, so it has no token probabilities to cache")
    vocab = int(model.config.vocab_size)
    if not 1 <= k <= vocab:
        raise UserError(f"--k must be between 1 and the teacher's vocabulary of {vocab:,} ids, got {k}")
    if dataset.max_token_id() >= vocab:
        raise UserError(f"{data_file} holds token ids beyond the teacher's {vocab:,}")
    tok = _teacher_tokenizer(teacher_name)
    if tok is not None and dataset.meta.get("vocab_fingerprint") != vocab_fingerprint(tok):
        raise UserError(f"{data_file} was binarized with another tokenizer ({dataset.meta.get('tokenizer_name')}) "
                        "than the teacher's; binarize it with --tokenizer_name set to the teacher")
    if tok is None:
        note("the teacher folder has no tokenizer: the data's tokenizer cannot be checked against it, and the "
             "students trained from this cache are saved without one")
    max_pos = M.max_positions(model.config)
    if max_pos is not None and max_model_input_size > max_pos:
        raise UserError(f"--max_model_input_size {max_model_input_size} exceeds the teacher's {max_pos} positions")

    rows = S.example_rows(dataset.lengths)
    positions = int(rows[-1])
    n_samples = S.tail_samples_for(k, vocab, tail_samples)
    logprob_dtype = S.logprob_dtype_for(n_samples, logprob_dtype)
    per = S.bytes_per_position(k, vocab, logprob_dtype, n_samples)
    total = positions * per
    plan = {"teacher": _teacher_identity(teacher_type, teacher_name, model), "k": k, "temperature": temperature,
            "logprob_dtype": logprob_dtype, "id_dtype": S.id_dtype(vocab).name, "vocab_size": vocab,
            "tail_samples": n_samples, "seed": seed,
            "max_model_input_size": max_model_input_size, "dataset": S.dataset_identity(data_file),
            "examples": len(dataset), "positions": positions, "shard_positions": shard_positions,
            "bf16": bf16}
    shards = shard_bounds(rows, shard_positions)

    staging = out.parent / f".{out.name}.partial"
    out.parent.mkdir(parents=True, exist_ok=True)
    done: set[int] = set()
    if staging.exists():
        try:
            same = json.loads((staging / PLAN_FILE).read_text()) == plan
            if same and (staging / DONE_FILE).is_file():
                done = set(json.loads((staging / DONE_FILE).read_text()))
        except (OSError, json.JSONDecodeError):
            same = False
        if not same:
            note(f"discarding the unfinished cache in {staging}: it was started by another command")
            shutil.rmtree(staging)
    written = sum(rows[b] - rows[a] for i, (a, b) in enumerate(shards) if i in done)
    need = (positions - written) * per
    free = shutil.disk_usage(out.parent).free
    resuming = f"; resuming: {len(done)} of {len(shards)} shards done" if done else ""
    drawn = f", {n_samples} tail samples and the tail's entropy" if n_samples else ""
    say(f"caching the teacher: {positions:,} positions x {per} bytes (k = {k}: ids {S.id_dtype(vocab).name}, "
        f"log-probabilities {logprob_dtype}, tail float32{drawn}) = {human_bytes(total)} in {out}; "
        f"{human_bytes(free)} free on its disk{resuming}")
    if not staging.exists() and free < need:
        smaller = "" if logprob_dtype == "q8" else " or --logprob_dtype q8"
        raise UserError(f"the cache needs {human_bytes(need)} but only {human_bytes(free)} is free on the disk of "
                        f"{out.parent}; free some space, or choose a smaller --k, fewer --tail_samples{smaller}")
    if not staging.exists():
        staging.mkdir()
        try:
            for name, size in _files(positions, k, vocab, logprob_dtype, n_samples).items():
                _reserve(staging / name, size)
        except OSError as e:
            shutil.rmtree(staging, ignore_errors=True)
            raise UserError(f"could not reserve {human_bytes(total)} for the cache in {out.parent} "
                            f"({e.strerror.lower() if e.strerror else e})") from None
        np.save(staging / S.ROWS_FILE, rows)
        write_atomic(staging / PLAN_FILE, json.dumps(plan, indent=2) + "\n")

    writer = _Writer(staging, positions, k, vocab, logprob_dtype, n_samples)
    special = dataset.meta["special_token_ids"]
    run = _TeacherPass(model, k, temperature, torch.bfloat16 if bf16 else None,
                       special.get("pad_token", special.get("eos_token", 0)), n_samples)
    from tqdm import tqdm

    bar = tqdm(total=positions, initial=written, unit="tok", unit_scale=True, desc="caching the teacher",
               disable=not progress, dynamic_ncols=True, smoothing=0.1)
    seconds, fresh, tail_mass = 0.0, 0, 0.0
    try:
        for s, (a, b) in enumerate(shards):
            if s in done:
                continue
            t0 = time.perf_counter()
            run.generator.manual_seed(seed * 1_000_003 + s)  # a shard's draws do not depend on the others'
            # Longest first within the shard, batched to about batch_tokens padded tokens.
            order = sorted(range(a, b), key=lambda i: -int(dataset.lengths[i]))
            i = 0
            while i < len(order):
                n = max(1, batch_tokens // int(dataset.lengths[order[i]]))
                batch = order[i:i + n]
                block = run([dataset[j]["input_ids"] for j in batch])
                tail_mass += float(block.tail.double().exp().sum())
                r = 0
                for j in batch:  # each example's rows to its place
                    m = int(dataset.lengths[j])
                    writer.put(int(rows[j]), block.slice(r, r + m))
                    r += m
                bar.update(r)
                i += n
            writer.flush()
            seconds += time.perf_counter() - t0
            fresh += int(rows[b] - rows[a])
            done.add(s)
            write_atomic(staging / DONE_FILE, json.dumps(sorted(done)) + "\n")
            kill_point(f"after_cache_shard_{s}")
    finally:
        bar.close()
    del writer
    if tok is not None:
        with quiet_transformers():
            tok.save_pretrained(staging / S.TOKENIZER_DIR)
    # How much of the teacher's distribution the top k hold (over this run's positions): at a high
    # temperature a flat distribution leaves most of it in the tail bucket, which teaches little.
    top_mass = 1.0 - tail_mass / fresh if fresh else None
    if top_mass is not None and top_mass < 0.5:
        note(f"the top {k} tokens hold {top_mass:.0%} of the teacher's probability at temperature {temperature:g} "
             f"on average; the rest is one bucket, so the cached soft targets carry little of the distribution. "
             f"A lower --temperature (1 is usual for LLMs) or a larger --k keeps more")
    meta = {"kind": S.KIND, "format_version": S.FORMAT_VERSION, **plan, "bytes": total,
            "bytes_per_position": per, "has_tokenizer": tok is not None,
            "last_run": {"seconds": seconds, "positions": fresh, "tokens_per_s": fresh / max(seconds, 1e-9),
                         "mean_top_k_mass": top_mass}}
    write_atomic(staging / S.META_FILE, json.dumps(meta, indent=2) + "\n")
    publish_folder(staging, out)
    for name in (PLAN_FILE, DONE_FILE):  # the bookkeeping of the staging folder
        (out / name).unlink(missing_ok=True)
    return CacheResult(out, positions, total, seconds, fresh)
