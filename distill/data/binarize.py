"""Turn a text corpus into a binarized dataset: one flat token array, an offsets index, meta.json.

Layout of a dataset folder (what ``--dump_file`` writes and ``--data_file`` reads)::

    tokens.bin    every sequence's ids back to back, uint16 (vocab <= 65,536) or uint32
    offsets.npy   int64 (num_sequences + 1,): sequence i is tokens[offsets[i]:offsets[i+1]]
    mask.bin      chat and prompt/completion data only: one bit per token of tokens.bin (packed,
                  little-endian bit order), 1 where the token is a completion token
    meta.json     tokenizer, vocab size, special ids, dtype, counts, seed, source, kind

Each line of a text corpus (or ``text`` value of a dataset, :mod:`.sources`) becomes one sequence
wrapped in the tokenizer's start and end tokens. A chat conversation is its chat template's
rendering, unwrapped (the template has its own markers; meta.json's ``wrapped`` is false); see
:mod:`.chat`. The input is streamed in batches, so memory stays flat however large it is.
"""

from __future__ import annotations

import collections
import contextlib
import gzip
import hashlib
import io
import json
import multiprocessing as mp
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from distill.errors import UserError
from distill.fileio import publish_folder
from distill.hf import quiet_transformers

TOKENS_FILE = "tokens.bin"
OFFSETS_FILE = "offsets.npy"
MASK_FILE = "mask.bin"
META_FILE = "meta.json"
FORMAT_VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding every id of the vocabulary (ids run 0..vocab_size-1)."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


# ----------------------------------------------------------------------------------------------
# Reading the corpus


def check_text_file(path: Path) -> None:
    """Refuse, with one sentence, anything that is not a readable, non-empty text file."""
    if not path.exists():
        raise UserError(f"input file {path} does not exist")
    if path.is_dir():
        raise UserError(f"{path} is a directory; --file_path takes a text file")
    if path.stat().st_size == 0:
        raise UserError(f"input file {path} is empty")
    try:
        with _open_text(path) as f:
            head = f.read(1 << 16)
    except (UnicodeDecodeError, OSError, EOFError) as e:  # gzip errors are OSError
        raise UserError(f"{path} is not a UTF-8 text file ({type(e).__name__})") from None
    if "\x00" in head:
        raise UserError(f"{path} is not a text file (it contains NUL bytes)")


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _is_jsonl(path: Path) -> bool:
    suffixes = path.suffixes
    return ".jsonl" in suffixes or ".ndjson" in suffixes


def iter_lines(path: Path, max_lines: int | None = None) -> Iterator[tuple[str, int]]:
    """Yield (text, bytes_read_so_far) for each non-blank document of the corpus.

    Plain text gives one document per line; ``.jsonl`` takes each record's ``text`` field.
    ``bytes_read_so_far`` is measured on the file as stored (compressed for .gz), for progress.
    """
    jsonl = _is_jsonl(path)
    raw = open(path, "rb")
    stream = gzip.open(raw, "rb") if path.suffix == ".gz" else raw
    n = 0
    try:
        for lineno, bline in enumerate(stream, start=1):
            try:
                line = bline.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{path}:{lineno} is not valid UTF-8") from None
            if jsonl:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    text = record["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise UserError(f"{path}:{lineno} is not a JSON object with a 'text' field") from None
                if not isinstance(text, str):
                    raise UserError(f"{path}:{lineno}: the 'text' field is not a string")
                text = text.strip()
            else:
                text = line.strip()
            if not text:
                continue
            yield text, raw.tell()
            n += 1
            if max_lines is not None and n >= max_lines:
                return
    except (OSError, EOFError) as e:
        raise UserError(f"could not read {path}: {e}") from None
    finally:
        stream.close()
        raw.close()


# ----------------------------------------------------------------------------------------------
# Tokenizing


def load_tokenizer(name: str):
    """Load a fast tokenizer from a local folder (or the local cache) without touching the network."""
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        with quiet_transformers(progress_bars=True):
            tok = AutoTokenizer.from_pretrained(name, use_fast=True, local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, ... depending on what is missing
        raise UserError(f"could not load a tokenizer from {name!r} ({type(e).__name__}); "
                        "give a local folder with tokenizer files") from None
    if not getattr(tok, "is_fast", False):
        raise UserError(f"the tokenizer at {name!r} has no fast (Rust) implementation")
    return tok


def wrapping_ids(tok) -> tuple[int, int]:
    """The ids that start and end every sequence: cls/sep where defined (BERT, RoBERTa), else bos/eos."""
    start = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
    end = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
    if start is None or end is None:
        raise UserError("the tokenizer defines neither cls/sep nor bos/eos tokens to wrap sequences in")
    return int(start), int(end)


def vocab_fingerprint(tok) -> str:
    """A short hash of the token -> id map: two tokenizers with the same fingerprint encode alike."""
    items = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def special_token_ids(tok) -> dict[str, int]:
    out = {}
    for name in ("cls_token", "sep_token", "bos_token", "eos_token", "pad_token", "unk_token", "mask_token"):
        tid = getattr(tok, f"{name}_id", None)
        if tid is not None:
            out[name] = int(tid)
    return out


# Worker state: each process loads the tokenizer once.
_worker_tok = None
_worker_wrap: tuple[int, int] = (0, 0)


def _init_worker(tokenizer_name: str, tok=None) -> None:
    global _worker_tok, _worker_wrap
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    _worker_tok = load_tokenizer(tokenizer_name) if tok is None else tok
    _worker_wrap = wrapping_ids(_worker_tok)


def _encode_records(records: list, dtype_str: str, kind: str, template: bool):
    """Encode a batch of records of ``kind`` (:mod:`.sources`): (flat ids, lengths, flat completion mask
    as uint8 or None for text, conversations dropped for having no completion token)."""
    if kind == "text":
        return (*_encode_batch(records, dtype_str), None, 0)
    from distill.data import chat

    start, end = _worker_wrap
    seqs, masks, dropped = [], [], 0
    for rec in records:
        if kind == "messages":
            ids, mask = chat.encode_conversation(_worker_tok, rec)
        else:
            prompt, completion, where = rec
            if template:
                ids, mask = chat.encode_conversation(_worker_tok, chat.prompt_completion_messages(prompt, completion,
                                                                                                 where))
            elif isinstance(prompt, str) and isinstance(completion, str):
                ids, mask = chat.encode_plain_pair(_worker_tok, prompt, completion, start, end)
            else:
                raise UserError(f"{where}: without a chat template 'prompt' and 'completion' must be strings")
        if not any(mask):
            dropped += 1
            continue
        seqs.append(ids)
        masks.append(mask)
    lengths = np.fromiter((len(ids) for ids in seqs), dtype=np.int64, count=len(seqs))
    flat = np.fromiter((t for ids in seqs for t in ids), dtype=dtype_str, count=int(lengths.sum()))
    bits = np.fromiter((b for m in masks for b in m), dtype=np.uint8, count=int(lengths.sum()))
    return flat, lengths, bits, dropped


def _encode_batch(texts: list[str], dtype_str: str) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize a batch of lines; return (flat ids, lengths) ready to append."""
    enc = _worker_tok(texts, add_special_tokens=False, return_attention_mask=False,
                      return_token_type_ids=False)["input_ids"]
    start, end = _worker_wrap
    lengths = np.fromiter((len(ids) + 2 for ids in enc), dtype=np.int64, count=len(enc))
    flat = np.empty(int(lengths.sum()), dtype=dtype_str)
    pos = 0
    for ids in enc:
        flat[pos] = start
        flat[pos + 1:pos + 1 + len(ids)] = ids
        flat[pos + 1 + len(ids)] = end
        pos += len(ids) + 2
    return flat, lengths


# ----------------------------------------------------------------------------------------------
# Writing


@dataclass
class BinarizeResult:
    path: Path
    num_sequences: int
    num_tokens: int
    seconds: float
    meta: dict = field(default_factory=dict)


def _describe_name(name: str) -> str:
    """A local folder is recorded as an absolute path, so the record means the same from anywhere."""
    p = Path(name)
    return str(p.resolve()) if p.exists() else str(name)


def _batches(lines: Iterator[tuple[object, int]], batch_lines: int) -> Iterator[tuple[list, int]]:
    batch: list = []
    pos = 0
    for text, pos in lines:
        batch.append(text)
        if len(batch) == batch_lines:
            yield batch, pos
            batch = []
    if batch:
        yield batch, pos


def text_file_source(path: Path, max_lines: int | None = None):
    """A text corpus (one document a line, or .jsonl records with a ``text`` field) as a Source."""
    from distill.data.sources import Source

    check_text_file(path)
    return Source("text", lambda: iter_lines(path, max_lines), path.stat().st_size, "B",
                  {"name": path.name, "path": str(path.resolve()), "size": path.stat().st_size})


def binarize(
    file_path: str | Path | None,
    tokenizer_name: str,
    dump_path: str | Path,
    *,
    dataset: str | None = None,
    split: str | None = None,
    text_column: str | None = None,
    allow_download: bool = False,
    chat_template: str = "auto",
    tokenizer_type: str = "auto",
    num_workers: int = 1,
    seed: int = 56,
    shuffle: bool = True,
    max_lines: int | None = None,
    batch_lines: int = 1000,
    overwrite: bool = False,
    progress: bool = True,
) -> BinarizeResult:
    """Binarize ``file_path`` (a text corpus) or ``dataset`` (what :mod:`.sources` reads) into the
    dataset folder ``dump_path`` (see the module docstring).

    With ``shuffle`` (the default, as DistilBERT's script did) the sequences are stored in an order
    drawn from ``seed``; the output is identical for a seed whatever ``num_workers`` is.
    ``chat_template`` (prompt/completion data): "auto" renders pairs with the tokenizer's chat
    template when it has one, "none" joins them plain.
    """
    from distill.data.sources import dataset_source

    if (file_path is None) == (dataset is None):
        raise UserError("give one of --file_path (a text file) and --dataset (what the datasets library reads)")
    if chat_template not in ("auto", "none"):
        raise UserError("--chat_template must be auto or none")
    dst = Path(dump_path)
    if file_path is not None:
        src_name = str(file_path)
        source = text_file_source(Path(file_path), max_lines)
    else:
        src_name = str(dataset)
        source = dataset_source(dataset, split, text_column, allow_download, max_lines)
    if dst.exists() and not overwrite:
        raise UserError(f"{dst} already exists; pass --overwrite to replace it, or choose another --dump_file")
    if dst.exists() and not dst.is_dir():
        raise UserError(f"{dst} exists and is not a dataset folder; refusing to replace it")
    tok = load_tokenizer(tokenizer_name)
    start_id, end_id = wrapping_ids(tok)
    vocab_size = len(tok)
    dtype = token_dtype(vocab_size)
    has_template = bool(getattr(tok, "chat_template", None))
    if source.kind == "messages" and not has_template:
        raise UserError(f"the tokenizer at {tokenizer_name} has no chat template, which a 'messages' column needs")
    template = source.kind == "messages" or (source.kind == "prompt_completion" and has_template
                                             and chat_template == "auto")

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    t0 = time.perf_counter()
    try:
        written = _write_tokens(source, tokenizer_name, tok, tmp, dtype, num_workers, batch_lines, progress,
                                template)
        n_seq, n_tok = written.sequences, written.tokens
        if n_seq == 0:
            if written.dropped:
                raise UserError(f"{src_name} holds no example with a completion token ({written.dropped:,} dropped)")
            raise UserError(f"{src_name} holds no text (every line is blank)")
        masked = source.kind != "text"
        if shuffle:
            _shuffle_in_place(tmp, [(TOKENS_FILE, dtype)] + ([(MASK_BYTES, np.dtype(np.uint8))] if masked else []),
                              seed)
        if masked:
            _pack_mask(tmp)
        meta = {
            "format_version": FORMAT_VERSION,
            "tokenizer_name": _describe_name(tokenizer_name),
            "tokenizer_type": tokenizer_type,
            "tokenizer_class": type(tok).__name__,
            "vocab_size": vocab_size,
            "vocab_fingerprint": vocab_fingerprint(tok),
            "special_token_ids": special_token_ids(tok),
            "start_id": start_id,
            "end_id": end_id,
            "dtype": dtype.name,
            "num_sequences": n_seq,
            "num_tokens": n_tok,
            "seed": seed,
            "shuffled": shuffle,
            "source": source.record,
            "max_lines": max_lines,
            "kind": source.kind,
            # Chat renders carry their own markers; text and plain prompt/completion pairs are wrapped.
            "wrapped": not template,
            "loss_mask": masked,
            "completion_tokens": written.completion_tokens if masked else None,
            "dropped_no_completion": written.dropped,
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        publish_folder(tmp, dst)  # --overwrite: the old folder goes only once the new one is in place
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return BinarizeResult(dst, n_seq, n_tok, time.perf_counter() - t0, meta)


@dataclass
class _Written:
    sequences: int
    tokens: int
    completion_tokens: int
    dropped: int  # examples without a completion token


MASK_BYTES = "mask.u8"  # a byte per token while writing; packed into MASK_FILE at the end


def _write_tokens(source, tokenizer_name: str, tok, out_dir: Path, dtype: np.dtype, num_workers: int,
                  batch_lines: int, progress: bool, template: bool) -> _Written:
    from tqdm import tqdm

    unit_scale = source.unit == "B"
    bar = tqdm(total=source.total, unit=source.unit, unit_scale=unit_scale, desc="binarizing", disable=not progress)
    lengths_chunks: list[np.ndarray] = []
    n_tok = completion = dropped = 0
    batches = _batches(source.rows(), batch_lines)
    done_bytes = 0
    masked = source.kind != "text"
    args = (dtype.name, source.kind, template)

    with open(out_dir / TOKENS_FILE, "wb") as fout, \
            (open(out_dir / MASK_BYTES, "wb") if masked else contextlib.nullcontext()) as fmask:
        def consume(flat: np.ndarray, lengths: np.ndarray, bits: np.ndarray | None, lost: int, pos: int) -> None:
            nonlocal n_tok, done_bytes, completion, dropped
            fout.write(flat.tobytes())
            if bits is not None:
                fmask.write(bits.tobytes())
                completion += int(bits.sum())
            dropped += lost
            lengths_chunks.append(lengths)
            n_tok += len(flat)
            bar.update(pos - done_bytes)
            done_bytes = pos

        if num_workers <= 1:
            _init_worker(tokenizer_name, tok)  # in this process, with the tokenizer already loaded
            for records, pos in batches:
                consume(*_encode_records(records, *args), pos)
        else:
            # A bounded window of pending batches, consumed in order: memory stays flat and the
            # output does not depend on scheduling (Pool.imap would read the whole corpus ahead).
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            with ctx.Pool(num_workers, initializer=_init_worker, initargs=(tokenizer_name,)) as pool:
                pending: collections.deque = collections.deque()
                for records, pos in batches:
                    pending.append((pool.apply_async(_encode_records, (records, *args)), pos))
                    if len(pending) >= 2 * num_workers:
                        res, p = pending.popleft()
                        consume(*res.get(), p)
                while pending:
                    res, p = pending.popleft()
                    consume(*res.get(), p)
    bar.close()
    lengths = np.concatenate(lengths_chunks) if lengths_chunks else np.zeros(0, dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    np.save(out_dir / OFFSETS_FILE, offsets)
    return _Written(len(lengths), n_tok, completion, dropped)


def _pack_mask(folder: Path, block: int = 1 << 23) -> None:
    """mask.u8 (a byte per token) -> mask.bin (a bit per token), a block at a time."""
    src = np.fromfile(folder / MASK_BYTES, dtype=np.uint8, count=0)  # an empty file cannot be memory-mapped
    if (folder / MASK_BYTES).stat().st_size:
        src = np.memmap(folder / MASK_BYTES, dtype=np.uint8, mode="r")
    with open(folder / MASK_FILE, "wb") as f:
        for b in range(0, len(src), block):  # block is a multiple of 8: the bytes line up
            f.write(np.packbits(np.asarray(src[b:b + block]), bitorder="little").tobytes())
    del src
    (folder / MASK_BYTES).unlink()


def _shuffle_in_place(folder: Path, files: list[tuple[str, np.dtype]], seed: int, block_tokens: int = 1 << 20) -> None:
    """Rewrite each per-token file (tokens.bin, the mask) with its sequences in a seeded random
    order, a block at a time."""
    for name, dtype in files:
        _shuffle_file(folder, name, dtype, seed, block_tokens)
    offsets = np.load(folder / OFFSETS_FILE)
    lengths = np.diff(offsets)[np.random.default_rng(seed).permutation(len(offsets) - 1)]
    new_offsets = np.zeros(len(offsets), dtype=np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    np.save(folder / OFFSETS_FILE, new_offsets)


def _shuffle_file(folder: Path, name: str, dtype: np.dtype, seed: int, block_tokens: int) -> None:
    offsets = np.load(folder / OFFSETS_FILE)
    n = len(offsets) - 1
    order = np.random.default_rng(seed).permutation(n)
    lengths = np.diff(offsets)[order]
    new_offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    src = np.memmap(folder / name, dtype=dtype, mode="r")
    tmp_path = folder / (name + ".shuffled")
    with open(tmp_path, "wb") as fout:
        i = 0
        while i < n:
            # Take as many sequences as fit in one block (at least one), gather them with one index.
            j = int(np.searchsorted(new_offsets, new_offsets[i] + block_tokens, side="right")) - 1
            j = min(max(j, i + 1), n)
            starts = offsets[order[i:j]]
            lens = lengths[i:j]
            # index of every token: start of its sequence + its position inside the sequence
            seq_start_in_block = np.repeat(new_offsets[i:j] - new_offsets[i], lens)
            within = np.arange(int(lens.sum()), dtype=np.int64) - seq_start_in_block
            idx = np.repeat(starts, lens) + within
            fout.write(np.asarray(src[idx]).tobytes())
            i = j
    del src
    os.replace(tmp_path, folder / name)


# ----------------------------------------------------------------------------------------------
# Reading a dataset folder back


def read_meta(path: str | Path) -> dict:
    folder = Path(path)
    meta_path = folder / META_FILE
    if not folder.exists():
        raise UserError(f"data file {folder} does not exist; create it with scripts/binarized_data.py")
    if not meta_path.is_file():
        raise UserError(f"{folder} is not a binarized dataset (no {META_FILE}); "
                        "create it with scripts/binarized_data.py")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{meta_path} is not valid JSON; binarize the corpus again") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{folder} was written by an incompatible version of binarized_data.py")
    return meta


def open_tokens(path: str | Path) -> tuple[np.memmap, np.ndarray, dict]:
    """Memory-map a dataset folder: (tokens, offsets, meta). Nothing is read into RAM but the index."""
    folder = Path(path)
    meta = read_meta(folder)
    tokens_path = folder / TOKENS_FILE
    dtype = np.dtype(meta["dtype"])
    expected = meta["num_tokens"] * dtype.itemsize
    if not tokens_path.is_file() or tokens_path.stat().st_size != expected:
        raise UserError(f"{tokens_path} is missing or truncated; binarize the corpus again")
    tokens = np.memmap(tokens_path, dtype=dtype, mode="r", shape=(meta["num_tokens"],))
    offsets = np.load(folder / OFFSETS_FILE, mmap_mode="r")
    if len(offsets) != meta["num_sequences"] + 1 or int(offsets[-1]) != meta["num_tokens"]:
        raise UserError(f"{folder / OFFSETS_FILE} does not match {META_FILE}; binarize the corpus again")
    return tokens, np.asarray(offsets), meta
