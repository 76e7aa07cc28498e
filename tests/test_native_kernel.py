"""The native forward-KL block (distill/losses/csrc/kl_block.c) against the eager PyTorch kernel."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill import losses as L
from distill.losses import native
from distill.losses.kernels import LOGIT_FLOOR, Workspace, ce_rows, ce_rows_scaled, kl_rows, scatter_columns_

ROOT = Path(__file__).resolve().parents[1]

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernel: {native.unavailable_reason()}")


def eager(a: torch.Tensor, b: torch.Tensor, g_dtype: torch.dtype | None, colsum: bool):
    g = None if g_dtype is None else torch.empty(a.shape, dtype=g_dtype)
    rows, sums = kl_rows(a.clone(), b.clone(), g, Workspace(native=False), colsum)
    return rows, g, sums


def logits(n: int, V: int, dtype: torch.dtype, seed: int, spread: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return ((torch.randn(n, V, generator=g) * spread).to(dtype), (torch.randn(n, V, generator=g) * spread).to(dtype))


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("g_dtype", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("colsum", [False, True])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_native_kl_rows_match_the_eager_kernel(dtype, g_dtype, colsum, threads):
    a, b = logits(37, 1031, dtype, seed=threads)
    want_rows, want_g, want_sums = eager(a, b, g_dtype, colsum)
    g = None if g_dtype is None else torch.empty(a.shape, dtype=g_dtype)
    a0, b0 = a.clone(), b.clone()
    rows, sums = native.kl_rows(a, b, g, colsum, threads=threads)
    assert torch.equal(a, a0) and torch.equal(b, b0)  # inputs untouched
    assert torch.allclose(rows, want_rows, rtol=2e-5, atol=2e-6)
    if g_dtype is None:
        assert sums is None
        return
    tol = 1e-6 if g_dtype == torch.float32 else 4e-3  # bf16: one rounding of the same fp32 value, or the next
    assert (g.float() - want_g.float()).abs().max() <= tol * max(want_g.float().abs().max().item(), 1e-6) + 1e-7
    if colsum:
        assert torch.allclose(sums, want_sums, atol=2e-5)
    else:
        assert sums is None


@needs_native
def test_native_kl_handles_padding_logits_peaked_rows_and_no_rows():
    a, b = logits(9, 300, torch.float32, seed=5, spread=30.0)  # far-apart logits: probabilities underflow
    a[:, -20:] = -torch.inf  # vocabulary padding the model never predicts
    b[:, -20:] = LOGIT_FLOOR
    b[0, 3] = 500.0  # a teacher row with all its mass on one token
    want_rows, want_g, want_sums = eager(a.clamp(min=LOGIT_FLOOR), b, torch.float32, True)  # eager wants them floored
    g = torch.empty(a.shape)
    rows, sums = native.kl_rows(a, b, g, True)
    assert torch.isfinite(rows).all() and torch.isfinite(g).all()
    assert torch.allclose(rows, want_rows, rtol=1e-4, atol=1e-4)
    assert torch.allclose(g, want_g, atol=1e-6) and torch.allclose(sums, want_sums, atol=1e-5)
    assert (g[:, -20:] == 0).all()
    empty_rows, empty_sums = native.kl_rows(a[:0], b[:0], torch.empty(0, 300), True)
    assert empty_rows.shape == (0,) and torch.equal(empty_sums, torch.zeros(300))


@needs_native
def test_native_kl_is_deterministic_for_a_thread_count():
    a, b = logits(64, 2000, torch.float32, seed=7)
    g1, g2 = torch.empty(a.shape), torch.empty(a.shape)
    r1, s1 = native.kl_rows(a, b, g1, True, threads=2)
    r2, s2 = native.kl_rows(a, b, g2, True, threads=2)
    assert torch.equal(r1, r2) and torch.equal(g1, g2) and torch.equal(s1, s2)


needs_openmp = pytest.mark.skipif(not native.openmp(), reason="the native library was built without OpenMP")


def _all_kernels(dtype: torch.dtype, threads: int) -> list[torch.Tensor]:
    a, b = logits(37, 1500, dtype, seed=11)
    g = torch.empty(a.shape, dtype=dtype)
    rows, sums = native.kl_rows(a, b, g, colsum=True, threads=threads)
    ids = torch.stack([torch.randperm(1500, generator=torch.Generator().manual_seed(i))[:8] for i in range(37)])
    lse, tail = native.softmax_stats(a, ids, threads=threads, mul=0.5)
    e = torch.empty(a.shape, dtype=dtype)
    assert native.scaled_exp(a, lse, torch.rand(37, generator=torch.Generator().manual_seed(3)), e, threads=threads,
                              mul=0.5)
    return [rows, g, sums, lse, tail, e]


@needs_native
@needs_openmp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_openmp_threads_and_the_thread_pool_give_the_same_bits(monkeypatch, dtype, threads):
    on_openmp = _all_kernels(dtype, threads)
    pool_calls = []
    in_parallel = native._in_parallel
    monkeypatch.setattr(native, "_use_openmp", False)  # the pool, as a build without OpenMP runs
    monkeypatch.setattr(native, "_in_parallel", lambda *a: (pool_calls.append(a[:2]), in_parallel(*a)))
    on_pool = _all_kernels(dtype, threads)
    assert len(pool_calls) == 3
    for x, y in zip(on_openmp, on_pool):
        assert torch.equal(x, y)


@needs_openmp
@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps")
def test_the_library_runs_on_pytorchs_own_openmp_runtime():
    # One libgomp in the process: the library's threads are PyTorch's intra-op threads, not a second pool.
    maps = Path("/proc/self/maps").read_text().splitlines()
    gomp = {line.split()[-1] for line in maps if "libgomp" in line.rsplit("/", 1)[-1]}
    assert len(gomp) == 1, gomp


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_losses_with_the_native_kernel_match_the_eager_ones(dtype):
    g = torch.Generator().manual_seed(11)
    N, H, V = 50, 16, 700
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.5).to(dtype)
    bias = (torch.randn(V, generator=g) * 0.1).to(dtype)
    teacher = (torch.randn(N, V, generator=g) * 2).to(dtype)
    mask = torch.rand(N, generator=g) > 0.3
    labels = torch.randint(0, V, (N,), generator=g)
    out = {}
    for use in (True, False):
        x, w, b = (v.clone().requires_grad_(True) for v in (hidden, weight, bias))
        res = L.projected_vocab_losses(x, w, b, teacher=teacher, temperature=2.0, soft_target=True, mask=mask,
                                       labels=labels, compute_dtype=dtype, chunk_size=16,
                                       workspace=Workspace(native=use))
        (res["soft_target_ce"] + res["lm_ce"]).backward()
        out[use] = (res["soft_target_ce"].item(), res["lm_ce"].item(), x.grad, w.grad, b.grad)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert out[True][0] == pytest.approx(out[False][0], rel=tol)
    assert out[True][1] == pytest.approx(out[False][1], rel=tol)
    for mine, theirs in zip(out[True][2:], out[False][2:]):
        assert (mine.float() - theirs.float()).abs().max() <= tol * theirs.float().abs().max()


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("g_dtype", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mul", [1.0, 2.0, 0.25])
@pytest.mark.parametrize("colsum", [False, True])
def test_native_ce_rows_match_the_eager_kernel(dtype, g_dtype, mul, colsum):
    """Cross-entropy of mul * s with the labels: rows, gradient softmax - onehot, its column sums; with
    padding logits (-inf and the floor) in some rows."""
    a, _ = logits(37, 1003, dtype, seed=5)
    a[3, :500] = float("-inf")
    a[4, 7] = LOGIT_FLOOR
    y = torch.randint(0, 1003, (37,), generator=torch.Generator().manual_seed(6))
    y[3] = 900  # a label among the finite logits of the padded row
    g_n = None if g_dtype is None else torch.empty(a.shape, dtype=g_dtype)
    g_e = None if g_dtype is None else torch.empty(a.shape, dtype=g_dtype)
    rows_n, sums_n = ce_rows_scaled(a, y, g_n, colsum, mul=mul, native=True)
    rows_e, sums_e = ce_rows(a.float() * mul, y, g_e, colsum)
    torch.testing.assert_close(rows_n, rows_e, rtol=1e-5, atol=1e-5)
    if g_dtype is not None:
        tol = dict(rtol=1e-5, atol=1e-6) if g_dtype == torch.float32 else dict(rtol=1e-2, atol=4e-3)
        torch.testing.assert_close(g_n.float(), g_e.float(), **tol)
        assert torch.equal(g_n[3, :500].float(), torch.zeros(500))  # -inf logits: exactly no probability
        if colsum:
            torch.testing.assert_close(sums_n, sums_e, rtol=1e-4, atol=2e-3 if g_dtype == torch.bfloat16 else 1e-5)
    assert sums_n is None if (g_dtype is None or not colsum) else sums_n.shape == (1003,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scatter_columns_puts_the_values_scatter_puts(dtype):
    """16-bit blocks are scattered through their bits (PyTorch's 16-bit CPU scatter is slow): the
    result is scatter_'s, bit for bit, on a non-contiguous row slice too; a repeated id gets its value."""
    g = torch.Generator().manual_seed(3)
    block = torch.randn(40, 301, generator=g).to(dtype)
    ids = torch.rand(40, 301, generator=g).argsort(1)[:, :17]
    ids[:, 16] = ids[:, 2]  # an id given twice, with the same value (as the drawn tail tokens)
    src = torch.randn(40, 17, generator=g)
    src[:, 16] = src[:, 2]
    want = block.float().scatter_(1, ids, src.to(dtype).float()).to(dtype)
    got = block.clone()
    assert scatter_columns_(got, ids, src) is got
    assert torch.equal(got.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       want.view(torch.int16 if dtype != torch.float32 else torch.int32))
    part = block.clone()
    scatter_columns_(part[5:25, 1:], ids[5:25] % 300, src[5:25])
    assert torch.equal(part[5:25, 1:], block[5:25, 1:].clone().scatter_(1, ids[5:25] % 300, src[5:25].to(dtype)))
    assert torch.equal(part[:5], block[:5]) and torch.equal(part[:, 0], block[:, 0])


def _probe(env: dict) -> str:
    code = "from distill.losses import native; print(native.available(), native.unavailable_reason())"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_a_compiler_without_openmp_builds_the_library_without_it(tmp_path):
    from distill.losses.native import _compiler

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    cc = bin_dir / "cc"  # the real compiler, refusing -fopenmp as one without OpenMP does
    refuse = '[ "$a" = -fopenmp ] && { echo "unsupported option" >&2; exit 1; }'
    cc.write_text(f'#!/bin/sh\nfor a in "$@"; do {refuse}; done\nexec {_compiler()} "$@"\n')
    cc.chmod(0o755)
    code = "from distill.losses import native; print(native.available(), native.openmp())"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "CC": str(cc), "DISTILL_NATIVE_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0 and r.stdout.split() == ["True", "False"], (r.stdout, r.stderr)


def test_without_a_compiler_or_when_switched_off_the_eager_kernel_runs(tmp_path):
    assert _probe({"DISTILL_NATIVE": "0"}) == "False DISTILL_NATIVE=0"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    broken = bin_dir / "cc"
    broken.write_text("#!/bin/sh\necho 'cc: error: no such thing' >&2\nexit 1\n")
    broken.chmod(0o755)
    out = _probe({"CC": str(broken), "DISTILL_NATIVE_CACHE": str(tmp_path / "cache")})
    assert out.startswith("False RuntimeError: cc failed: cc: error: no such thing"), out
    # The loss still runs (eagerly) in such a process.
    code = ("import torch; from distill import losses as L; from distill.losses import native; "
            "x = torch.randn(6, 4, requires_grad=True); w = torch.randn(9, 4); t = torch.randn(6, 9); "
            "r = L.projected_vocab_losses(x, w, teacher=t, soft_target=True)['soft_target_ce']; r.backward(); "
            "print(native.available(), bool(torch.isfinite(x.grad).all()))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "CC": str(broken), "DISTILL_NATIVE_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0 and r.stdout.split() == ["False", "True"], r.stderr
