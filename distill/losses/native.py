"""The soft-target KL block as native code (``csrc/kl_block.c``), built at first use for this CPU.

PyTorch's eager ops make a pass over memory per operation, and the KL block needs about twenty
(:func:`distill.losses.kernels.kl_block`). The C kernel makes three passes over each row, which
stays in the core's cache meanwhile, with a vectorised exponential. It is compiled once per machine
with the C compiler (``cc``, ``gcc`` or ``clang``) and ``-march=native`` into
``~/.cache/distill/native`` (``DISTILL_NATIVE_CACHE`` moves it), keyed by the source, the compiler
and the CPU's flags, and loaded with ctypes: no PyTorch headers, a build in about a second.

The same library computes a softmax's statistics over a row and its scaled probabilities
(:func:`softmax_stats`, :func:`scaled_exp`), of ``mul * a`` for a multiplier ``mul``: the cached soft
targets (:mod:`.cached`) and the labels' cross-entropy (:func:`distill.losses.kernels.ce_rows_scaled`)
use them.

:func:`kl_rows` returns None when the kernel cannot be used here (no compiler, a build error, not
x86-64 or ARM Linux/macOS, ``DISTILL_NATIVE=0``); callers then run the eager kernel. Row ranges run
in parallel on ``torch.get_num_threads()`` threads: built with ``-fopenmp``, on PyTorch's own OpenMP
threads (the library shares the libgomp PyTorch loaded; checked in ``/proc/self/maps``), else on a pool
of Python threads (ctypes releases the GIL). The pool competes for the cores with PyTorch's OpenMP
worker, which spins for some milliseconds after each parallel op: a (384, 30,522) fp32 block right after
a matmul took 14 ms on the pool against 8 ms on OpenMP's threads (2-core AVX-512 EPYC;
``benchmarks/README.md``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("csrc") / "kl_block.c"
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC"]
OPENMP = "-fopenmp"  # tried first; a compiler without OpenMP builds the library without it
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_use_openmp = False  # the row ranges on OpenMP's threads (see openmp())
_tried = False
_error: str | None = None
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _cpu_key() -> str:
    from distill.machine import cpu_model_and_flags

    model, flags = cpu_model_and_flags()
    return f"{platform.machine()} {model} {flags}"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _compile(cc: str, flags: list[str], version: str, cache: Path) -> Path:
    """The library built with ``flags`` (kept in ``cache``, keyed by the source, the flags, the compiler
    and the CPU); raises RuntimeError with the compiler's message when it fails."""
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(flags), version, _cpu_key()]).encode())
    lib = cache / f"kl_block_{key.hexdigest()[:16]}.so"
    if not lib.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:  # built aside, renamed into place
            out = Path(tmp) / lib.name
            r = subprocess.run([cc, *flags, "-o", str(out), str(SOURCE), "-lm"], capture_output=True, text=True,
                               timeout=120)
            if r.returncode != 0:
                raise RuntimeError(f"{Path(cc).name} failed: {r.stderr.strip()[-300:]}")
            os.replace(out, lib)
    return lib


def _build() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    cache = Path(os.environ.get("DISTILL_NATIVE_CACHE", Path.home() / ".cache" / "distill" / "native"))
    try:  # with OpenMP when the compiler has it (apple clang has not)
        lib = _compile(cc, [*FLAGS, OPENMP], version, cache)
    except RuntimeError:
        lib = _compile(cc, FLAGS, version, cache)
    dll = ctypes.CDLL(str(lib))
    P, C, N, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    for name, args in (("distill_kl_rows", [P, P, C, P, C, P, P, P, N, N, N]),
                       ("distill_softmax_stats_rows", [P, C, F, P, N, P, P, P, N, N, N]),
                       ("distill_scaled_exp_rows", [P, C, F, P, P, P, C, N, N, N]),
                       ("distill_kl_rows_par", [P, P, C, P, C, P, P, P, N, N, C]),
                       ("distill_softmax_stats_rows_par", [P, C, F, P, N, P, P, P, N, N, C]),
                       ("distill_scaled_exp_rows_par", [P, C, F, P, P, P, C, N, N, C]),
                       ("distill_openmp", [])):
        f = getattr(dll, name)
        f.restype, f.argtypes = (ctypes.c_int if name == "distill_openmp" else None), args
    return dll


def _one_openmp_runtime() -> bool:
    """Whether the process maps a single libgomp (Linux; elsewhere, whether the library can be trusted to
    share PyTorch's runtime is unknown, so no)."""
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        return False
    paths = {line.split()[-1] for line in maps.read_text().splitlines() if "/libgomp" in line}
    return len(paths) == 1


def openmp() -> bool:
    """Whether the library runs its row ranges on OpenMP's threads: built with OpenMP, and sharing
    PyTorch's OpenMP runtime (a second runtime would bring a second pool of threads competing for the
    cores, as the Python pool does, so the pool is used then)."""
    return available() and _use_openmp


def available() -> bool:
    """Whether the native kernel is built (building it on the first call)."""
    global _lib, _tried, _error, _use_openmp
    if _tried:
        return _lib is not None
    with _lock:
        if not _tried:
            if os.environ.get("DISTILL_NATIVE", "1") == "0":
                _error = "DISTILL_NATIVE=0"
            elif platform.system() not in ("Linux", "Darwin") or platform.machine() not in (
                    "x86_64", "AMD64", "aarch64", "arm64"):
                _error = f"not built for {platform.system()} {platform.machine()}"
            else:
                try:
                    _lib = _build()
                    _use_openmp = bool(_lib.distill_openmp()) and _one_openmp_runtime()
                except Exception as e:  # no compiler, a build error, a sandbox without a writable home, ...
                    _error = f"{type(e).__name__}: {e}"
            _tried = True
    return _lib is not None


def unavailable_reason() -> str | None:
    available()
    return _error


def _executor(threads: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    if _pool is None or _pool_size != threads:
        if _pool is not None:
            _pool.shutdown(wait=False)
        _pool, _pool_size = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="distill-kl"), threads
    return _pool


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _in_parallel(n: int, threads: int, run) -> None:
    """``run(i, r0, r1)`` over ``threads`` contiguous row ranges of n rows."""
    bounds = [(n * i) // threads for i in range(threads + 1)]
    if threads == 1:
        run(0, 0, n)
    else:
        list(_executor(threads).map(lambda i: run(i, bounds[i], bounds[i + 1]), range(threads)))


def _threads(n: int, threads: int | None) -> int:
    return max(1, min(threads or torch.get_num_threads(), n))


_KINDS = (torch.float32, torch.bfloat16)


def _usable(a: Tensor) -> bool:
    return a.device.type == "cpu" and a.dim() == 2 and a.dtype in _KINDS and available()


def _g_usable(g_out: Tensor | None, shape: torch.Size) -> bool:
    return g_out is None or (g_out.device.type == "cpu" and g_out.dtype in _KINDS and g_out.shape == shape
                             and g_out.is_contiguous())


def kl_rows(a: Tensor, b: Tensor, g_out: Tensor | None, colsum: bool = False,
            threads: int | None = None) -> tuple[Tensor, Tensor | None] | None:
    """:func:`distill.losses.kernels.kl_rows` (rows of KL(softmax(b) || softmax(a)); into ``g_out``
    softmax(a) - softmax(b); with ``colsum`` its column sums) in native code, for CPU blocks a, b
    (n, V) in fp32 or bf16 and ``g_out`` in fp32 or bf16. Leaves a and b untouched. None when the
    kernel is not available or the inputs are not of that kind (the caller runs the eager kernel)."""
    if not _usable(a) or b.dtype != a.dtype or b.shape != a.shape or not _g_usable(g_out, a.shape):
        return None
    a, b = a.contiguous(), b.contiguous()
    n, V = a.shape
    rows = torch.empty(n, dtype=torch.float32)
    threads = _threads(n, threads)
    sums = torch.zeros(threads, V, dtype=torch.float32) if colsum and g_out is not None else None
    if n == 0:
        return rows, (torch.zeros(V, dtype=torch.float32) if sums is not None else None)
    scratch = torch.empty(threads, 2 * V, dtype=torch.float32)
    in_bf16 = int(a.dtype == torch.bfloat16)
    g_bf16 = int(g_out is not None and g_out.dtype == torch.bfloat16)
    if _use_openmp:
        _lib.distill_kl_rows_par(a.data_ptr(), b.data_ptr(), in_bf16, _ptr(g_out), g_bf16, rows.data_ptr(),
                                 _ptr(sums), scratch.data_ptr(), n, V, threads)
    else:
        f = _lib.distill_kl_rows

        def run(i: int, r0: int, r1: int) -> None:
            f(a.data_ptr(), b.data_ptr(), in_bf16, _ptr(g_out), g_bf16, rows.data_ptr(),
              None if sums is None else sums[i].data_ptr(), scratch[i].data_ptr(), r0, r1, V)

        _in_parallel(n, threads, run)
    if sums is None:
        return rows, None
    return rows, (sums[0] if threads == 1 else sums.sum(0))


def softmax_stats(a: Tensor, ids: Tensor, threads: int | None = None, mul: float = 1.0
                  ) -> tuple[Tensor, Tensor] | None:
    """For CPU logits ``mul * a`` (a (n, V), fp32 or bf16), floored as the kernels floor them, and
    distinct token ids (n, k) per row: (log sum_v exp, log of the same sum over the tokens not in
    ``ids``), float32 (n,) each; -inf for an empty tail. None when the kernel cannot run here."""
    if not _usable(a) or ids.dim() != 2 or ids.shape[0] != a.shape[0]:
        return None
    a, ids = a.contiguous(), ids.to(torch.int64).contiguous()
    n, V = a.shape
    lse, lse_tail = torch.empty(n, dtype=torch.float32), torch.empty(n, dtype=torch.float32)
    if n == 0:
        return lse, lse_tail
    threads = _threads(n, threads)
    scratch = torch.ones(threads, V, dtype=torch.float32)
    in_bf16, k = int(a.dtype == torch.bfloat16), ids.shape[1]
    if _use_openmp:
        _lib.distill_softmax_stats_rows_par(a.data_ptr(), in_bf16, float(mul), ids.data_ptr(), k, lse.data_ptr(),
                                            lse_tail.data_ptr(), scratch.data_ptr(), n, V, threads)
        return lse, lse_tail
    f = _lib.distill_softmax_stats_rows

    def run(i: int, r0: int, r1: int) -> None:
        f(a.data_ptr(), in_bf16, float(mul), ids.data_ptr(), k, lse.data_ptr(), lse_tail.data_ptr(),
          scratch[i].data_ptr(), r0, r1, V)

    _in_parallel(n, threads, run)
    return lse, lse_tail


def scaled_exp(a: Tensor, shift: Tensor, alpha: Tensor, g_out: Tensor, threads: int | None = None,
               mul: float = 1.0) -> bool:
    """``g_out = alpha[:, None] * exp(mul * a - shift[:, None])`` for CPU logits a (n, V) (``mul * a``
    floored), with ``shift`` at least each row's maximum of ``mul * a`` (its log-sum-exp, say). False
    when the kernel cannot run."""
    if not _usable(a) or not _g_usable(g_out, a.shape):
        return False
    a = a.contiguous()
    shift, alpha = shift.float().contiguous(), alpha.float().contiguous()
    n, V = a.shape
    if n == 0:
        return True
    in_bf16, g_bf16 = int(a.dtype == torch.bfloat16), int(g_out.dtype == torch.bfloat16)
    if _use_openmp:
        _lib.distill_scaled_exp_rows_par(a.data_ptr(), in_bf16, float(mul), shift.data_ptr(), alpha.data_ptr(),
                                         g_out.data_ptr(), g_bf16, n, V, _threads(n, threads))
        return True
    f = _lib.distill_scaled_exp_rows

    def run(i: int, r0: int, r1: int) -> None:
        f(a.data_ptr(), in_bf16, float(mul), shift.data_ptr(), alpha.data_ptr(), g_out.data_ptr(), g_bf16, r0, r1, V)

    _in_parallel(n, _threads(n, threads), run)
    return True
