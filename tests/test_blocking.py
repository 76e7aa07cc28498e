"""The CPU blocking of the fused vocabulary losses (distill.losses.blocking): pinned, measured once per
machine and shape and then read back, the same in every process, and the losses unchanged by it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from distill.losses import ProjectedLogits, blocking, fused, projected_vocab_losses
from distill.losses.pointwise import lm_ce, soft_target_ce

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_BLOCKING_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DISTILL_BLOCKING", raising=False)
    monkeypatch.setattr(blocking, "_memo", {})
    return tmp_path / "cache"


def test_pinned_by_the_environment(monkeypatch, cache_dir):
    monkeypatch.setenv("DISTILL_BLOCKING", "200,700")
    assert blocking.cpu_blocking(torch.float32, 384, 30522) == blocking.Blocking(200, 700, "env")
    monkeypatch.setenv("DISTILL_BLOCKING", "default")
    assert blocking.cpu_blocking(torch.bfloat16, 384, 30522) == blocking.Blocking(128, 4096, "default")
    for bad in ("200", "0,700", "a,b", "1,2,3"):
        monkeypatch.setenv("DISTILL_BLOCKING", bad)
        with pytest.raises(ValueError, match="DISTILL_BLOCKING must be"):
            blocking.cpu_blocking(torch.float32, 384, 30522)
    assert not cache_dir.exists()  # nothing measured, nothing written


def test_small_shapes_use_the_defaults_unmeasured(cache_dir):
    assert blocking.cpu_blocking(torch.float32, 32, 1000) == blocking.default_blocking(torch.float32)
    assert not cache_dir.exists()


def test_measured_once_then_read_from_the_file(cache_dir):
    rng = torch.get_rng_state()
    first = blocking.cpu_blocking(torch.float32, 64, 16384)
    assert torch.equal(torch.get_rng_state(), rng)  # the measurement draws nothing from the global generator
    assert first.source == "measured"
    assert first.rows in blocking.ROW_CANDIDATES and first.cols in blocking.COL_CANDIDATES
    data = json.loads((cache_dir / "blocking.json").read_text())
    (key, entry), = data.items()
    assert "H64 V16384" in key and "float32" in key and blocking.cpu_identity() in key
    assert (entry["rows"], entry["cols"]) == (first.rows, first.cols)
    assert {f"rows={r}" for r in blocking.ROW_CANDIDATES} <= entry["timings"].keys()
    assert all(t > 0 for t in entry["timings"].values())
    assert blocking.cpu_blocking(torch.float32, 64, 16384) is first  # in-process: no second look
    blocking._memo.clear()
    # A later process reads the file as it is, whichever of the candidates it holds.
    picked = (128 if first.rows != 128 else 256, 8192 if first.cols != 8192 else 512)
    entry["rows"], entry["cols"] = picked
    (cache_dir / "blocking.json").write_text(json.dumps(data))
    assert blocking.cpu_blocking(torch.float32, 64, 16384) == blocking.Blocking(*picked, "file")
    blocking._memo.clear()
    # An entry outside them (an older version's 512 rows, which cost the step memory) is measured again.
    entry["rows"] = 512
    (cache_dir / "blocking.json").write_text(json.dumps(data))
    again = blocking.cpu_blocking(torch.float32, 64, 16384)
    assert again.source == "measured" and again.rows in blocking.ROW_CANDIDATES
    assert json.loads((cache_dir / "blocking.json").read_text())[key]["rows"] == again.rows
    # Another shape is another entry.
    other = blocking.cpu_blocking(torch.float32, 128, 8192)
    assert other.source == "measured"
    assert len(json.loads((cache_dir / "blocking.json").read_text())) == 2


def test_16bit_measured_only_with_bf16_instructions(cache_dir, monkeypatch):
    monkeypatch.setattr(blocking, "_fast_16bit", lambda: False)  # emulated bf16: minutes, for nothing
    assert blocking.cpu_blocking(torch.bfloat16, 64, 16384) == blocking.default_blocking(torch.bfloat16)
    assert not cache_dir.exists()
    monkeypatch.setattr(blocking, "_fast_16bit", lambda: True)
    got = blocking.cpu_blocking(torch.bfloat16, 64, 16384)
    assert got.source == "measured" and "bfloat16 H64 V16384" in next(iter(
        json.loads((cache_dir / "blocking.json").read_text())))


def test_unwritable_cache_gives_the_defaults(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("DISTILL_BLOCKING_CACHE", str(tmp_path / "file" / "cache"))
    monkeypatch.delenv("DISTILL_BLOCKING", raising=False)
    monkeypatch.setattr(blocking, "_memo", {})
    assert blocking.cpu_blocking(torch.float32, 64, 16384) == blocking.default_blocking(torch.float32)


def test_a_candidate_must_beat_the_default_clearly():
    assert blocking._pick({128: 0.97, 384: 1.0, 512: 1.2}, 384) == 384  # 3% faster: noise, keep the default
    assert blocking._pick({128: 0.90, 384: 1.0, 512: 1.2}, 384) == 128
    assert blocking._pick({128: 0.90, 256: 0.80}, 384) == 256  # the default not measured: the fastest


def test_processes_started_together_agree(cache_dir):
    """Two processes that find no entry: one measures under the lock, the other reads its result."""
    code = ("import torch; from distill.losses.blocking import cpu_blocking; "
            "b = cpu_blocking(torch.float32, 64, 16384); print(b.rows, b.cols, b.source)")
    env = {**os.environ, "DISTILL_BLOCKING_CACHE": str(cache_dir), "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0][:2] == outs[1][:2]
    assert sorted(o[2] for o in outs) == ["file", "measured"]
    assert len(json.loads((cache_dir / "blocking.json").read_text())) == 1


@pytest.mark.parametrize("pin", ["3,7", "5,64", "100,5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_losses_do_not_depend_on_the_blocking(pin, dtype, monkeypatch, cache_dir):
    """Rows per chunk and columns per matmul (a slice smaller than the vocabulary, or not) change
    nothing beyond rounding, with a teacher projection, kl and ce."""
    g = torch.Generator().manual_seed(3)
    N, H, V = 23, 8, 37
    h0, w0, b0 = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g), torch.randn(V, generator=g)
    th, tw = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::3] = -100
    monkeypatch.setenv("DISTILL_BLOCKING", pin)
    rows, cols = (int(v) for v in pin.split(","))
    cpu = torch.device("cpu")
    assert fused._blocking(None, cpu, dtype, H, V) == (rows, cols)  # what the call below runs with
    assert fused._blocking(4, cpu, dtype, H, V) == (4, cols)  # an explicit chunk_size wins
    h, w, b = (t.clone().requires_grad_(True) for t in (h0, w0, b0))
    out = projected_vocab_losses(h, w, b, teacher=ProjectedLogits(th, tw), temperature=2.0, soft_target=True,
                                 labels=labels, compute_dtype=dtype)
    grads = torch.autograd.grad(out["soft_target_ce"] + out["lm_ce"], [h, w, b])
    rh, rw, rb = (t.clone().requires_grad_(True) for t in (h0, w0, b0))
    if dtype == torch.float32:
        logits, t_logits = F.linear(rh, rw, rb), th @ tw.t()
    else:  # the fused path's rounding: bf16 operands and logits, fp32 softmaxes
        logits = F.linear(rh.bfloat16(), rw.bfloat16(), rb.bfloat16()).float()
        t_logits = (th.bfloat16() @ tw.bfloat16().t()).float()
    ref = {"soft_target_ce": soft_target_ce(logits, t_logits, 2.0), "lm_ce": lm_ce(logits, labels)}
    ref_grads = torch.autograd.grad(ref["soft_target_ce"] + ref["lm_ce"], [rh, rw, rb])
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], **tol)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, **tol)


def test_the_benchmark_prints_the_measurement(cache_dir, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("vocab_blocking", ROOT / "benchmarks" / "vocab_blocking.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--hidden", "64", "--vocab", "16384"])
    rec = json.loads(capsys.readouterr().out)
    assert rec["default"] == [384, 1024] and rec["chosen"][0] in blocking.ROW_CANDIDATES
    assert set(rec["us_per_row"]) == {f"cols={c}" for c in blocking.COL_CANDIDATES if c < 16384} | {
        f"rows={r}" for r in blocking.ROW_CANDIDATES}
    assert not cache_dir.exists()  # the benchmark neither reads nor writes the file


def test_the_layout_benchmark_times_every_variant(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("projection_layout", ROOT / "benchmarks" / "projection_layout.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rec = mod.main(["--rows", "16", "--hidden", "16", "--vocab", "1000", "--cols", "256", "512",
                    "--rounds", "2", "--reps", "1", "--matmul_size", "64"])
    assert json.loads(capsys.readouterr().out) == rec
    assert set(rec["median_gflops"]) == {"256", "512"} and {"cpu", "isa"} <= set(rec)
    names = {"rows", "cols", "cols_copied", "dx_rows", "dx_cols", "dw_rows", "dw_cols"}
    for cols in ("256", "512"):
        assert set(rec["median_gflops"][cols]) == names
        assert all(v > 0 for v in rec["median_gflops"][cols].values())
        assert all(lo <= hi for lo, hi in rec["range_gflops"][cols].values())


def test_the_layouts_compute_the_same_products():
    """Each layout's block holds the same logits, so the benchmark compares one product written two ways."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("projection_layout", ROOT / "benchmarks" / "projection_layout.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    vs, t = mod.variants(8, 16, 700, 256)
    want = t["x"] @ t["w"].t()
    vs["rows"][0]()
    torch.testing.assert_close(t["block"], want)
    vs["cols"][0]()
    torch.testing.assert_close(t["block_t"].t(), want)
    t["block"].zero_()
    vs["cols_copied"][0]()
    torch.testing.assert_close(t["block"], want)
