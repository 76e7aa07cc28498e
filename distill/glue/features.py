"""Tokenise a GLUE split once and cache it next to the data; pad per batch when training.

A cache is one ``.npz`` file in the data folder, named by what it depends on:

    <data_dir>/cached_<split>_<model name>_<max_seq_length>_<task>.npz

It holds the token ids of all examples as one flat int32 array plus an offsets index (example
``i`` is ``input_ids[offsets[i]:offsets[i+1]]``), the segment ids the same way when the tokenizer
makes them, the labels, and a JSON ``meta`` entry: the tokenizer's fingerprint and the source
file's size and hash. A cache is reused unless ``overwrite_cache``; one whose tokenizer or
source file differs from the current ones is refused with a sentence, never silently reused
(two model folders with the same name but different tokenizers would otherwise share it).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from distill.errors import UserError
from distill.fileio import atomic_path
from distill.glue.tasks import Example, Task, read_split, split_path

CACHE_VERSION = 1


@dataclass
class Features:
    """Tokenised examples of one split: flat ids + offsets, labels, and what made them."""

    input_ids: np.ndarray  # (total tokens,) int32
    offsets: np.ndarray  # (n + 1,) int64
    labels: np.ndarray  # (n,) int64 class ids, or float32 scores (STS-B)
    token_type_ids: np.ndarray | None = None  # (total tokens,) int8, when the tokenizer makes them
    meta: dict = field(default_factory=dict)
    reused: bool = False  # True when read from an existing cache

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


# ---------------------------------------------------------------------------------------------
# Cache identity


def model_name(model_name_or_path: str | Path) -> str:
    """The model part of a cache name: the folder's last component, made file-name safe."""
    parts = [p for p in str(model_name_or_path).replace("\\", "/").split("/") if p not in ("", ".")]
    name = parts[-1] if parts else "model"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name)


def cache_path(data_dir: str | Path, split: str, model_name_or_path: str | Path, max_seq_length: int,
               task: Task) -> Path:
    """Where the features of ``split`` for this model, length and task are cached."""
    return Path(data_dir) / f"cached_{split}_{model_name(model_name_or_path)}_{max_seq_length}_{task.name}.npz"


def tokenizer_fingerprint(tok) -> str:
    """A short hash of everything that decides how the tokenizer encodes text.

    For a fast tokenizer: its full serialised pipeline (normaliser, pre-tokeniser, vocabulary,
    post-processor) minus the truncation/padding state a call leaves behind, plus the special
    tokens; otherwise the vocabulary, the class and the lower-casing flag.
    """
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
    else:
        spec = {"class": type(tok).__name__, "vocab": sorted(tok.get_vocab().items(), key=lambda kv: kv[1]),
                "lower": getattr(tok, "do_lower_case", None)}
    spec["special_tokens"] = {k: str(v) for k, v in sorted(tok.special_tokens_map.items())}
    blob = json.dumps(spec, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def file_identity(path: Path) -> dict:
    """Size and content hash of a data file (the cache is for this version of it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return {"size": path.stat().st_size, "sha256": h.hexdigest()[:16]}


# ---------------------------------------------------------------------------------------------
# Building and caching


def tokenize(task: Task, examples: list[Example], tok, max_seq_length: int,
             progress: Callable | None = None) -> Features:
    """Token ids of each example (pairs joined the tokenizer's way), truncated to ``max_seq_length``."""
    ids: list[np.ndarray] = []
    types: list[np.ndarray] = []
    chunk = 1000
    bar = progress(total=len(examples), desc="tokenising", unit="ex") if progress else None
    for start in range(0, len(examples), chunk):
        part = examples[start:start + chunk]
        pairs = None if part[0].text_b is None else [e.text_b for e in part]
        enc = tok([e.text_a for e in part], pairs, truncation=True, max_length=max_seq_length,
                  return_attention_mask=False)
        ids.extend(np.asarray(x, dtype=np.int32) for x in enc["input_ids"])
        if "token_type_ids" in enc:
            types.extend(np.asarray(x, dtype=np.int8) for x in enc["token_type_ids"])
        if bar is not None:
            bar.update(len(part))
    if bar is not None:
        bar.close()
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if task.is_regression:
        labels = np.asarray([e.label for e in examples], dtype=np.float32)
    else:
        labels = np.asarray([task.labels.index(e.label) for e in examples], dtype=np.int64)
    return Features(
        input_ids=np.concatenate(ids) if ids else np.zeros(0, np.int32),
        offsets=offsets,
        labels=labels,
        token_type_ids=np.concatenate(types) if types else None,
        meta={"num_examples": len(ids), "num_tokens": int(offsets[-1]),
              "num_at_max_length": int((lengths >= max_seq_length).sum())},
    )


def save_features(feats: Features, path: Path) -> None:
    """Write the cache under a temporary name, then rename it into place."""
    arrays = {"input_ids": feats.input_ids, "offsets": feats.offsets, "labels": feats.labels,
              "meta": np.array(json.dumps(feats.meta))}
    if feats.token_type_ids is not None:
        arrays["token_type_ids"] = feats.token_type_ids
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a handle, so numpy does not append ".npz"
        np.savez(f, **arrays)


def read_features(path: Path) -> Features:
    try:
        with np.load(path, allow_pickle=False) as z:
            return Features(input_ids=z["input_ids"], offsets=z["offsets"], labels=z["labels"],
                            token_type_ids=z["token_type_ids"] if "token_type_ids" in z.files else None,
                            meta=json.loads(str(z["meta"])), reused=True)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"the feature cache {path} is unreadable ({type(e).__name__}); "
                        "pass --overwrite_cache to rebuild it") from None


def load_features(task: Task, data_dir: str | Path, split: str, tok, model_name_or_path: str | Path,
                  max_seq_length: int, *, overwrite_cache: bool = False, log: Callable[[str], None] = print,
                  progress: Callable | None = None) -> Features:
    """The features of ``data_dir/<split>.tsv``: from the cache when it matches, else built and cached.

    Refuses (UserError) a cache made with another tokenizer or from another version of the file,
    unless ``overwrite_cache``.
    """
    source = split_path(task, data_dir, split)
    path = cache_path(data_dir, split, model_name_or_path, max_seq_length, task)
    want = {
        "version": CACHE_VERSION, "task": task.name, "split": split, "max_seq_length": max_seq_length,
        "tokenizer": tokenizer_fingerprint(tok), "source": file_identity(source),
    }
    if path.is_file() and not overwrite_cache:
        feats = read_features(path)
        _check_cache(feats.meta, want, path, model_name_or_path)
        log(f"{split}: {len(feats):,} examples from the cache {path}")
        return feats
    examples = read_split(task, data_dir, split, on_skip=lambda m: log(f"note: {m}"))
    feats = tokenize(task, examples, tok, max_seq_length, progress)
    feats.meta = {**want, "model_name_or_path": str(model_name_or_path),
                  "tokenizer_class": type(tok).__name__, **feats.meta}
    try:
        save_features(feats, path)
        where = f"cached in {path}"
    except OSError as e:  # a read-only data folder: work without a cache
        where = f"not cached ({path.parent} is not writable: {e.strerror})"
    n_long = feats.meta["num_at_max_length"]
    log(f"{split}: tokenised {len(feats):,} examples ({feats.meta['num_tokens']:,} tokens, {n_long:,} "
        f"cut at {max_seq_length}), {where}")
    return feats


def _check_cache(have: dict, want: dict, path: Path, model_name_or_path) -> None:
    if have.get("version") != want["version"]:
        raise UserError(f"the feature cache {path} was written by another version of distill; "
                        "pass --overwrite_cache to rebuild it")
    if have.get("tokenizer") != want["tokenizer"]:
        raise UserError(f"the feature cache {path} was made with another tokenizer "
                        f"({have.get('model_name_or_path')}) than {model_name_or_path}'s; "
                        "pass --overwrite_cache to rebuild it")
    if have.get("source") != want["source"]:
        raise UserError(f"the feature cache {path} was made from another version of "
                        f"{want['split']}.tsv; pass --overwrite_cache to rebuild it")
    for key in ("task", "split", "max_seq_length"):  # only a renamed file can get here
        if have.get(key) != want[key]:
            raise UserError(f"the feature cache {path} is for {key} {have.get(key)!r}, not {want[key]!r}; "
                            "pass --overwrite_cache to rebuild it")


# ---------------------------------------------------------------------------------------------
# Batching


def batch_indices(n: int, batch_size: int, *, shuffle: bool = False,
                  generator: torch.Generator | None = None) -> Iterator[np.ndarray]:
    """Index arrays of consecutive batches (the last may be short); a seeded permutation if shuffle."""
    order = torch.randperm(n, generator=generator).numpy() if shuffle else np.arange(n)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def collate(feats: Features, idx: np.ndarray, pad_id: int, *, token_types: bool) -> dict[str, torch.Tensor]:
    """Pad the examples ``idx`` to the longest of them (dynamic padding).

    Returns ``input_ids`` (B, L) int64, ``attention_mask`` (B, L), ``labels`` (B,), and
    ``token_type_ids`` (B, L) when ``token_types`` and the features have them.
    """
    starts, ends = feats.offsets[idx], feats.offsets[idx + 1]
    width = int((ends - starts).max()) if len(idx) else 0
    ids = np.full((len(idx), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(idx), width), dtype=np.int64)
    use_types = token_types and feats.token_type_ids is not None
    types = np.zeros((len(idx), width), dtype=np.int64) if use_types else None
    for row, (s, e) in enumerate(zip(starts, ends)):
        ids[row, :e - s] = feats.input_ids[s:e]
        mask[row, :e - s] = 1
        if use_types:
            types[row, :e - s] = feats.token_type_ids[s:e]
    batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
             "labels": torch.from_numpy(feats.labels[idx])}
    if use_types:
        batch["token_type_ids"] = torch.from_numpy(types)
    return batch
