"""Writing files so that a kill at any moment leaves the old version or the new one, never half of one.

Every writer in the package goes through these: a file or a folder is written under a temporary
name beside its destination (same filesystem, so the rename is atomic) and renamed into place.
"""

from __future__ import annotations

import os
import resource
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def temp_name(path: Path, tag: str = "tmp") -> Path:
    """A hidden name beside ``path``, unique to this process."""
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write ``path`` through; on success it is renamed over ``path``,
    on any error it is removed (file or folder) and ``path`` is left as it was."""
    path = Path(path)
    tmp = temp_name(path)
    _remove(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` (text is written as UTF-8)."""
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")


def publish_folder(staging: Path, dest: Path) -> None:
    """Move the finished folder ``staging`` to ``dest``; an existing ``dest`` is moved aside first
    and deleted only once the new one is in place."""
    if dest.exists():
        old = temp_name(dest, "old")
        dest.rename(old)
        staging.rename(dest)
        shutil.rmtree(old)
    else:
        staging.rename(dest)


@contextmanager
def staged_folder(dest: Path) -> Iterator[Path]:
    """Yield an empty folder beside ``dest`` to build it in; on success it is published as ``dest``
    (:func:`publish_folder`), on any error it is removed and ``dest`` is left as it was."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)  # a leftover of this very process id
    staging.mkdir()
    try:
        yield staging
        publish_folder(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def sha256_file(path: str | Path, block: int = 1 << 24) -> str:
    """The file's sha256 (hex), read a block at a time."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def write_error(e: BaseException, folder: Path | None = None) -> str:
    """A short reason for a failed write: errno's words where there are some, else what the machine
    says (torch.save reports a failed write only as an internal assertion)."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror.lower()
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        return f"a file reached this process's file-size limit (ulimit -f) of {limit:,} bytes"
    if folder is not None and shutil.disk_usage(folder).free < 64 << 20:
        return "the disk is full"
    text = str(e).strip().splitlines()
    return text[0][:120] if text else type(e).__name__


def is_within(path: str | Path, folder: str | Path) -> bool:
    """``path`` is ``folder`` or lies inside it (symbolic links resolved)."""
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
        return True
    except ValueError:
        return False


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink()
