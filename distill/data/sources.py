"""Where ``binarized_data.py`` reads its documents: a text file (``--file_path``), or what the
``datasets`` library reads (``--dataset``): a ``save_to_disk`` folder, parquet, jsonl, json, csv or
arrow files (one file, or a folder of files of one format), and a Hub dataset ID only with
``--allow_download``.

A dataset's rows are one of three kinds, by their columns: ``text`` (or ``--text_column``), chat
``messages``, or ``prompt``/``completion``. Files are streamed, and a ``save_to_disk`` folder is
memory-mapped, so memory stays flat however large the input.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from distill.errors import UserError

FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".ndjson": "json", ".csv": "csv",
           ".arrow": "arrow"}
KINDS = ("text", "messages", "prompt_completion")


@dataclass
class Source:
    """Documents to binarize: ``rows()`` yields (record, progress) in order; a record is a string
    (text), a list of messages, or a (prompt, completion) pair."""

    kind: str
    rows: Callable[[], Iterator[tuple[Any, int]]]
    total: int | None  # what progress counts up to (bytes of a file, rows of a dataset), if known
    unit: str  # "B" or "rows"
    record: dict = field(default_factory=dict)  # what meta.json says about the source


def _suffix(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    return suffixes[-1] if suffixes else ""


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise UserError("--dataset needs the 'datasets' package (pip install datasets)") from None
    return datasets


def _is_saved_dataset(folder: Path) -> bool:
    return folder.is_dir() and any((folder / f).is_file() for f in ("dataset_dict.json", "state.json"))


def _data_files(path: Path) -> tuple[str, list[str]]:
    """(the datasets builder, the files) of a file or a folder of files of one format."""
    files = sorted(f for f in path.iterdir() if f.is_file() and _suffix(f) in FORMATS) if path.is_dir() else [path]
    if not files:
        raise UserError(f"{path} holds no parquet, jsonl, json, csv or arrow files and is not a save_to_disk folder")
    builders = {FORMATS.get(_suffix(f)) for f in files}
    if None in builders:
        raise UserError(f"{path} is not a parquet, jsonl, json, csv or arrow file")
    if len(builders) > 1:
        raise UserError(f"{path} mixes file formats ({', '.join(sorted(builders))}); give one format")
    for f in files:
        if f.stat().st_size == 0:
            raise UserError(f"{f} is empty")
    return builders.pop(), [str(f) for f in files]


def open_dataset(path: str, split: str | None, allow_download: bool):
    """The rows of ``path`` (one split) as a datasets Dataset or IterableDataset, and how many when known."""
    if not allow_download:  # before the import: datasets reads them then
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    datasets = _import_datasets()
    p = Path(path)
    try:
        if _is_saved_dataset(p):
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                name = split or "train"
                if name not in ds:
                    raise UserError(f"split {name!r} does not exist in {p}; it has: {', '.join(ds)}")
                ds = ds[name]
            elif split is not None and ds.split is not None and str(ds.split) != split:
                raise UserError(f"split {split!r} does not exist in {p}, which holds the {str(ds.split)!r} split only")
            return ds, len(ds)
        if p.exists():
            if split not in (None, "train"):
                raise UserError(f"split {split!r} does not exist: data files are read as one 'train' split")
            builder, files = _data_files(p)
            return datasets.load_dataset(builder, data_files={"train": files}, split="train", streaming=True), None
    except UserError:
        raise
    except Exception as e:  # datasets and pyarrow raise many kinds on a malformed file
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"could not read {p} as a dataset ({type(e).__name__}: {first})") from None
    if not allow_download:
        raise UserError(f"--dataset {path} does not exist here; to load the Hub dataset of that name, pass "
                        "--allow_download")
    try:
        return datasets.load_dataset(path, split=split or "train", streaming=True), None
    except Exception as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"could not load the dataset {path} ({type(e).__name__}: {first})") from None


def _columns(ds) -> list[str]:
    cols = getattr(ds, "column_names", None)
    if cols is None:  # a streamed json file: the columns of its first row
        first = next(iter(ds), None)
        cols = list(first) if first is not None else []
    return list(cols)


def detect_kind(columns: list[str], text_column: str | None, where: str) -> str:
    if text_column is not None:
        if text_column not in columns:
            raise UserError(f"{where} has no column {text_column!r} (its columns: {', '.join(columns) or 'none'})")
        return "text"
    if "messages" in columns:
        return "messages"
    if "prompt" in columns or "completion" in columns:
        missing = [c for c in ("prompt", "completion") if c not in columns]
        if missing:
            raise UserError(f"{where} has a {'prompt' if missing == ['completion'] else 'completion'} column but "
                            f"no {missing[0]!r} column")
        return "prompt_completion"
    if "text" in columns:
        return "text"
    raise UserError(f"{where} has no 'text' column (its columns: {', '.join(columns) or 'none'}); choose one with "
                    "--text_column, or give 'messages' or 'prompt'/'completion' columns")


def dataset_source(path: str, split: str | None = None, text_column: str | None = None,
                   allow_download: bool = False, max_lines: int | None = None) -> Source:
    ds, n = open_dataset(path, split, allow_download)
    kind = detect_kind(_columns(ds), text_column, path)
    column = text_column or "text"

    def rows() -> Iterator[tuple[Any, int]]:
        from distill.data.chat import check_messages

        taken = 0
        for i, row in enumerate(ds):
            where = f"row {i} of {path}"
            if kind == "text":
                text = row.get(column)
                if text is None:
                    continue
                if not isinstance(text, str):
                    raise UserError(f"{where}: the {column!r} column is not a string")
                text = text.strip()
                if not text:
                    continue
                record: Any = text
            elif kind == "messages":
                record = check_messages(row.get("messages"), where)
            else:
                record = (row.get("prompt"), row.get("completion"), where)
            yield record, i + 1
            taken += 1
            if max_lines is not None and taken >= max_lines:
                return

    described = {"name": Path(path).name, "path": str(Path(path).resolve()) if Path(path).exists() else path,
                 "split": split or "train", "kind": kind, "column": column if kind == "text" else None}
    if Path(path).is_file():
        described["size"] = Path(path).stat().st_size
    return Source(kind, rows, n, "rows", described)
