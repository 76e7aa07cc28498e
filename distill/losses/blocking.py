"""How the fused vocabulary losses (:mod:`.fused`) cut their work on the CPU: rows of hidden states per
chunk, and vocabulary columns per projection matmul, measured once per machine and shape.

A (rows, H) x (H, V) matmul with V in the tens of thousands runs well below the CPU's matmul peak; the
same rows against slices of a few thousand columns of the weight run near it, and which slice width
and how many rows are best depends on the CPU's caches and instructions, and on H and the dtype. So on
first use for a (compute dtype, H, V, threads) on a CPU, :func:`cpu_blocking` times the matmuls one
chunk makes (its projection, and the two gradient matmuls), for a few row counts and slice widths, on
fixed data, in well under ten seconds, and keeps the fastest in ``~/.cache/distill/blocking.json``
(``DISTILL_BLOCKING_CACHE`` moves the folder), keyed also by the CPU's model and flags and the torch
version. A candidate replaces the default only when it measured at least 5% faster, so that noise
does not pick between near ties.

The choice changes the order in which the weight gradient is summed, so a run's results depend on it
in the last bits: it is measured once per machine and then read from the file, under a file lock, so
that every later run and every process of a run uses the same. Where the file cannot be written the
defaults are used. ``DISTILL_BLOCKING=ROWS,COLS`` pins both; ``DISTILL_BLOCKING=default`` uses the
defaults. Shapes too small for the choice to matter (V x H under 2^20), and 16-bit compute on a CPU without
bf16 instructions, use the defaults unmeasured.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import torch

from distill.machine import cpu_identity, fast_16bit, load_or_measure

# The defaults, by compute dtype: measured on an AMD EPYC with AVX-512, where one (384, H) x (H, V) fp32
# matmul over the whole vocabulary ran at 55% of the matmul peak and against 1024-column slices at 80%.
DEFAULT_ROWS = {"fp32": 384, "16bit": 128}
DEFAULT_COLS = {"fp32": 1024, "16bit": 4096}
# Rows trade memory for speed: the workspace keeps a few (rows, V) blocks. So the candidates stop at the
# fp32 default. On the throughput benchmark's shape (H 256, V 30,522) 512 rows measured up to 5% faster
# a chunk row than 384, but raised the training step's peak RSS by 64 MiB (benchmarks/README.md).
ROW_CANDIDATES = (128, 256, 384)
COL_CANDIDATES = (512, 1024, 2048, 4096, 8192)
MIN_ELEMS = 1 << 20  # V x H below this: the defaults, unmeasured
MEASURE_COLS = 16384  # the measurement projects onto at most this many vocabulary columns
MIN_GAIN = 0.05  # a candidate must be this much faster than the default to replace it
_REPEATS = 3  # timed runs per candidate (the best counts), after one untimed

_memo: dict[str, Blocking] = {}
_lock = threading.Lock()


@dataclass(frozen=True)
class Blocking:
    """Rows per chunk and vocabulary columns per projection matmul; ``source`` says where they came from
    (``measured``, ``file``, ``default``, ``env``)."""

    rows: int
    cols: int
    source: str


def _kind(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16bit"


def default_blocking(dtype: torch.dtype) -> Blocking:
    k = _kind(dtype)
    return Blocking(DEFAULT_ROWS[k], DEFAULT_COLS[k], "default")


_fast_16bit = fast_16bit  # a module global, so that tests can pretend either CPU


def _key(dtype: torch.dtype, hidden: int, vocab: int) -> str:
    return (f"{str(dtype).replace('torch.', '')} H{hidden} V{vocab} threads{torch.get_num_threads()} "
            f"torch{torch.__version__} {cpu_identity()}")


def _env_blocking(dtype: torch.dtype) -> Blocking | None:
    value = os.environ.get("DISTILL_BLOCKING", "").strip()
    if not value:
        return None
    if value == "default":
        return default_blocking(dtype)
    try:
        rows, cols = (int(v) for v in value.split(","))
        if rows < 1 or cols < 1:
            raise ValueError
    except ValueError:
        raise ValueError(f"DISTILL_BLOCKING must be 'ROWS,COLS' (two positive integers) or 'default', not "
                         f"{value!r}") from None
    return Blocking(rows, cols, "env")


def cpu_blocking(dtype: torch.dtype, hidden: int, vocab: int) -> Blocking:
    """The rows per chunk and columns per matmul for a (hidden, vocab) projection in ``dtype`` on this
    CPU: pinned by ``DISTILL_BLOCKING``, else read from the per-machine file, else measured now and
    written there."""
    env = _env_blocking(dtype)
    if env is not None:
        return env
    if vocab * hidden < MIN_ELEMS or (dtype != torch.float32 and not _fast_16bit()):
        return default_blocking(dtype)
    key = _key(dtype, hidden, vocab)
    with _lock:
        if key not in _memo:
            _memo[key] = _load_or_measure(key, dtype, hidden, vocab)
        return _memo[key]


def _load_or_measure(key: str, dtype: torch.dtype, hidden: int, vocab: int) -> Blocking:
    def valid(entry: dict) -> bool:  # chosen among other candidates (an older version's file): measured again
        return entry.get("rows") in ROW_CANDIDATES and entry.get("cols") in COL_CANDIDATES

    def measured() -> dict:
        found = measure(dtype, hidden, vocab)
        return {"rows": found.rows, "cols": found.cols, "timings": found.timings}

    got = load_or_measure("blocking", key, valid, measured)
    if got is None:
        return default_blocking(dtype)  # nowhere to keep a measurement: every process must agree
    entry, source = got
    return Blocking(entry["rows"], entry["cols"], source)


@dataclass
class Measurement:
    rows: int
    cols: int
    timings: dict  # "cols=C" and "rows=R": seconds per chunk row of the timed matmuls, best of the repeats


def _best_time(fn) -> float:
    fn()
    best = float("inf")
    for _ in range(_REPEATS):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _pick(times: dict[int, float], default: int) -> int:
    best = min(times, key=times.get)
    if default in times and times[best] > (1.0 - MIN_GAIN) * times[default]:
        return default
    return best


def measure(dtype: torch.dtype, hidden: int, vocab: int) -> Measurement:
    """Times, on fixed data, a chunk's projection for each column slice width (at the default rows),
    then for each row count (at the chosen width) the projection and the two gradient matmuls, per
    row; returns the fastest (the default unless a candidate is at least ``MIN_GAIN`` faster). Draws
    nothing from the global random generators."""
    d = default_blocking(dtype)
    V = min(vocab, MEASURE_COLS)
    g = torch.Generator().manual_seed(0)
    rmax = max(ROW_CANDIDATES)
    x = torch.randn(rmax, hidden, generator=g).to(dtype)
    w = (torch.randn(V, hidden, generator=g) * hidden ** -0.5).to(dtype)
    out = torch.empty(rmax, V, dtype=dtype)
    dx = torch.empty(rmax, hidden, dtype=dtype)
    dw = torch.zeros(V, hidden, dtype=dtype)

    def project(rows: int, cols: int) -> None:
        xr = x[:rows]
        for c in range(0, V, cols):
            o = out[:rows, c:c + cols]
            torch.addmm(o, xr, w[c:c + cols].t(), beta=0, out=o)

    timings: dict[str, float] = {}
    col_times = {}
    for cols in COL_CANDIDATES:
        if cols < V or cols == d.cols:
            col_times[cols] = _best_time(lambda: project(d.rows, cols)) / d.rows
            timings[f"cols={cols}"] = col_times[cols]
    cols = _pick(col_times, d.cols) if col_times else d.cols

    def chunk(rows: int) -> None:
        project(rows, cols)
        gr = out[:rows]
        torch.mm(gr, w, out=dx[:rows])
        dw.addmm_(gr.t(), x[:rows])

    row_times = {}
    for rows in ROW_CANDIDATES:
        row_times[rows] = _best_time(lambda: chunk(rows)) / rows
        timings[f"rows={rows}"] = row_times[rows]
    return Measurement(_pick(row_times, d.rows), cols, timings)

