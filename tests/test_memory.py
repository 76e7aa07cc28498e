"""distill.memory: the fixed glibc mmap threshold the Distiller sets on CPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from distill import memory


def _glibc() -> bool:
    import platform

    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def test_a_users_setting_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert memory.fix_mmap_threshold() is False


def test_the_onednn_caches_are_capped_unless_the_user_set_them(monkeypatch):
    monkeypatch.delenv(memory.ONEDNN_CACHE_ENV, raising=False)
    monkeypatch.delenv(memory.IDEEP_CACHE_ENV, raising=False)
    assert memory.limit_onednn_cache(64) == (memory.ONEDNN_CACHE_ENV, memory.IDEEP_CACHE_ENV)
    assert os.environ[memory.ONEDNN_CACHE_ENV] == os.environ[memory.IDEEP_CACHE_ENV] == "64"
    monkeypatch.setenv(memory.ONEDNN_CACHE_ENV, "512")  # each of the user's settings wins on its own
    monkeypatch.delenv(memory.IDEEP_CACHE_ENV)
    assert memory.limit_onednn_cache() == (memory.IDEEP_CACHE_ENV,)
    assert os.environ[memory.ONEDNN_CACHE_ENV] == "512"
    assert os.environ[memory.IDEEP_CACHE_ENV] == str(memory.DEFAULT_ONEDNN_CACHE)
    assert memory.limit_onednn_cache() == ()


def _has_mallinfo2() -> bool:
    import ctypes

    return _glibc() and hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")


def _bf16_matmul_growth(capped: bool) -> float:
    """MiB that malloc holds more after bf16 matmuls (forward and backward) of 37 shapes, in a fresh process."""
    code = r"""
import ctypes, sys, torch
from distill import memory
if sys.argv[1] == "capped":
    assert memory.limit_onednn_cache(4)
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
torch.set_num_threads(1)
def matmuls():
    for n in range(20, 129, 3):
        x = torch.randn(8 * n, 256, dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(1024, 256, dtype=torch.bfloat16, requires_grad=True)
        torch.nn.functional.linear(x, w).sum().backward()
x = torch.randn(8, 256, dtype=torch.bfloat16)
x @ x.t()  # the libraries' one-off set-up
start = libc.mallinfo2().uordblks
matmuls()
print((libc.mallinfo2().uordblks - start) / 2**20)
"""
    env = {k: v for k, v in os.environ.items() if k not in (memory.ONEDNN_CACHE_ENV, memory.IDEEP_CACHE_ENV)}
    out = subprocess.run([sys.executable, "-c", code, "capped" if capped else "default"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(not _has_mallinfo2(), reason="glibc 2.33+ only (mallinfo2)")
def test_the_cap_bounds_what_bf16_matmuls_of_many_shapes_keep():
    # With the libraries' defaults every new shape keeps about 0.85 MB; capped at 4 entries the memory
    # held stays flat. Where bf16 matmuls do not go through oneDNN (no such caches), there is nothing to cap.
    default = _bf16_matmul_growth(capped=False)
    if default < 8:
        pytest.skip(f"bf16 matmuls of 37 shapes kept {default:.1f} MiB here: not through oneDNN's caches")
    capped = _bf16_matmul_growth(capped=True)
    assert capped < default / 3, (capped, default)


@pytest.mark.skipif(not _glibc(), reason="glibc only")
def test_large_freed_blocks_go_back_to_the_system():
    # Blocks of 9-31 MB in changing sizes, each freed after a smaller one is made: with the dynamic
    # threshold they end up on the heap and the resident set grows; with the fixed one it stays put.
    code = r"""
import sys, numpy as np
from distill import memory
if sys.argv[1] == "fixed":
    assert memory.fix_mmap_threshold()
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024
keep = []
for i in range(60):
    a = np.ones((9 + (i * 7) % 23) * 2**18, dtype=np.float32)  # 9-31 MB, touched
    keep.append(np.ones(2**16, dtype=np.uint8))  # a small block that outlives it
    del a
print(rss())
"""
    out = {}
    for mode in ("dynamic", "fixed"):
        r = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        out[mode] = int(r.stdout.strip())
    print(out)
    assert out["fixed"] < out["dynamic"] - 20, out


# -- EmbeddingRowGrads: a tied input embedding's gradient added as rows ---------------------------


def _tiny_llama(seed: int = 0, tied: bool = True):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                      tie_word_embeddings=tied, pad_token_id=3, attention_dropout=0.1)  # dropout on
    return LlamaForCausalLM(cfg).train()


def _grads(model, ids, head: bool, rows=None, steps: int = 2):
    """Gradients after ``steps`` backwards (accumulated); each backward adds its rows when it finishes."""
    import torch

    model.zero_grad(set_to_none=True)
    for i in range(steps):
        torch.manual_seed(10 + i)  # the same dropout masks in both runs
        out = model(input_ids=ids, output_hidden_states=True)
        loss = out.hidden_states[1].square().mean()  # a gradient into the embedding through the layers
        if head:
            loss = loss + torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), ids.flatten())
        loss.backward()
        assert rows is None or not rows.pending
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("head", [True, False])
def test_embedding_rows_give_the_dense_gradient(head):
    """With a vocabulary loss (the rows land in the projection's gradient) and without one (they are the
    weight's only gradient), over two accumulated backwards, with padding tokens in the batch: the
    gradients of every parameter match the dense embedding backward's to float rounding, and the
    padding index gets no gradient from the embedding."""
    import torch

    ids = torch.randint(0, 97, (3, 9), generator=torch.Generator().manual_seed(1))
    ids[0, -3:] = 3  # padding
    dense_model, rows_model = _tiny_llama(), _tiny_llama()
    dense = _grads(dense_model, ids, head)
    rows = memory.EmbeddingRowGrads.install(rows_model)
    assert rows is not None
    got = _grads(rows_model, ids, head, rows)
    assert set(got) == set(dense)
    for name in dense:
        torch.testing.assert_close(got[name], dense[name], rtol=1e-5, atol=1e-7, msg=name)
    assert not rows.pending
    w = rows_model.get_input_embeddings().weight
    assert w.grad.layout == torch.strided
    if not head:
        assert torch.equal(w.grad[3], torch.zeros(16))  # the padding row: no gradient
        assert w.grad.abs().sum() > 0


def test_embedding_rows_install_only_on_a_tied_plain_embedding():
    import torch

    assert memory.EmbeddingRowGrads.install(_tiny_llama(tied=False)) is None
    frozen = _tiny_llama()
    frozen.get_input_embeddings().weight.requires_grad_(False)
    assert memory.EmbeddingRowGrads.install(frozen) is None
    model = _tiny_llama()
    assert memory.EmbeddingRowGrads.install(model) is not None
    assert memory.EmbeddingRowGrads.install(model) is None  # once
    assert memory.EmbeddingRowGrads.install(torch.nn.Linear(2, 2)) is None
    other = torch.nn.Embedding(5, 2)
    assert "forward" not in vars(other)  # the class is untouched
