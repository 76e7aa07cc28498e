"""The teacher cache: the bucketed divergences against autograd and against the online losses, writing a
cache (layout, values, disk check, kill and resume), training from it on the README's CLM path (k = V
reproduces online training; two runs and a kill/resume give the same student), and every refusal."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distill import losses as L
from distill.errors import UserError
from distill.losses import native
from distill.losses.cached import (
    CachedTargets,
    bucket_divergence,
    cached_block,
    cached_block_native,
    cached_soft_target,
)
from distill.losses.divergences import Divergence
from distill.losses.kernels import LOGIT_FLOOR
from distill.teacher_cache import store as S
from distill.teacher_cache.write import cache_teacher, shard_bounds, top_k_rows
from tests.test_reproducibility import assert_same_student, launch, metrics_without_timing, ok

DIVS = [Divergence("kl"), Divergence("reverse_kl"), Divergence("jsd", beta=0.3), Divergence("tvd"),
        Divergence("skew_kl", alpha=0.1), Divergence("skew_kl", alpha=0.0)]
IDS = [f"{d.name}-b{d.beta}-a{d.alpha}" for d in DIVS]


def targets_from_logits(t: torch.Tensor, k: int, T: float, samples: int = 0, seed: int = 0) -> CachedTargets:
    """What the cache holds for teacher logits t (..., V), in fp32 (with ``samples`` tail samples)."""
    V = t.shape[-1]
    rows = top_k_rows(t.reshape(-1, V), k, T, samples, torch.Generator().manual_seed(seed))
    rows = type(rows)(*(None if x is None else x.clone() for x in rows))  # out of inference mode
    lead = t.shape[:-1]
    drawn = None if rows.samples is None else rows.samples.reshape(*lead, samples)
    entropy = None if rows.entropy is None else rows.entropy.reshape(lead)
    return CachedTargets(rows.ids.reshape(*lead, k), rows.logprobs.reshape(*lead, k), rows.tail.reshape(lead),
                         drawn, entropy)


def _max_err(mine: torch.Tensor, theirs: torch.Tensor) -> float:
    return (mine.float() - theirs.float()).abs().max().item() / max(theirs.abs().max().item(), 1e-30)


# --------------------------------------------------------------------------- the loss


def test_bucketed_kl_is_the_kl_of_the_grouped_distributions():
    """Written out by hand in numpy: KL over the top-k tokens and one bucket for the rest."""
    g = torch.Generator().manual_seed(0)
    s, t, T, k = torch.randn(3, 20, generator=g) * 2, torch.randn(3, 20, generator=g) * 2, 1.5, 4
    got = cached_soft_target(s, targets_from_logits(t, k, T), T).item()
    q = torch.softmax(t / T, -1).double().numpy()
    p = torch.softmax(s / T, -1).double().numpy()
    total = 0.0
    for r in range(3):
        top = np.argsort(-q[r])[:k]
        rest = np.setdiff1d(np.arange(20), top)
        Q = np.append(q[r, top], q[r, rest].sum())
        P = np.append(p[r, top], p[r, rest].sum())
        total += (Q * np.log(Q / P)).sum()
    assert got == pytest.approx(T * T * total, rel=1e-5)


@pytest.mark.parametrize("div", DIVS, ids=IDS)
def test_bucket_divergences_vanish_on_equal_buckets_and_are_positive_otherwise(div):
    lq = torch.log_softmax(torch.randn(4, 6), -1)
    lp = torch.log_softmax(torch.randn(4, 6), -1)
    assert bucket_divergence(div, lq, lq)[0].abs().max() < 1e-6
    assert (bucket_divergence(div, lq, lp)[0] > 0).all()


@pytest.mark.parametrize("div", DIVS, ids=IDS)
@pytest.mark.parametrize("dtype,T,k,S", [(torch.float32, 1.0, 7, 0), (torch.float32, 2.0, 1, 0),
                                         (torch.float32, 2.0, 299, 0), (torch.bfloat16, 2.0, 16, 0),
                                         (torch.float32, 1.0, 7, 5), (torch.float32, 2.0, 1, 16),
                                         (torch.bfloat16, 2.0, 16, 3)])
def test_fused_cached_loss_and_gradients_match_autograd(div, dtype, T, k, S):
    g = torch.Generator().manual_seed(1)
    N, H, V = 40, 16, 300
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.5).to(dtype)
    bias = (torch.randn(V, generator=g) * 0.1).to(dtype)
    cached = targets_from_logits(torch.randn(N, V, generator=g) * 2, k, T, samples=S)
    mask = torch.rand(N, generator=g) > 0.25
    x, w, b = (v.clone().requires_grad_(True) for v in (hidden, weight, bias))
    got = L.projected_vocab_losses(x, w, b, teacher=cached, temperature=T, soft_target=True, mask=mask,
                                   compute_dtype=dtype, chunk_size=16, divergence=div)["soft_target_ce"]
    got.backward()
    x2, w2, b2 = (v.float().clone().requires_grad_(True) for v in (hidden, weight, bias))
    logits = x2 @ w2.T + b2
    if dtype == torch.bfloat16:  # compare on the bf16 matmul's values
        logits = logits + ((x.detach() @ w.detach().T + b.detach()).float() - logits).detach()
    ref = cached_soft_target(logits, cached, T, mask=mask, divergence=div)
    ref.backward()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert got.item() == pytest.approx(ref.item(), rel=tol, abs=1e-5)
    if dtype == torch.bfloat16 and div.name == "tvd":
        return  # sign(P - Q) flips on near-equal buckets under bf16 rounding (as in test_divergences)
    for mine, theirs in ((x.grad, x2.grad), (w.grad, w2.grad), (b.grad, b2.grad)):
        assert _max_err(mine, theirs) <= tol


@pytest.mark.skipif(not native.available(), reason="no native kernel here")
@pytest.mark.parametrize("div", DIVS, ids=IDS)
@pytest.mark.parametrize("dtype,k,S", [(torch.float32, 7, 0), (torch.float32, 7, 5), (torch.float32, 300, 0),
                                       (torch.bfloat16, 16, 4)])
def test_the_native_cached_kernel_matches_the_eager_one(div, dtype, k, S):
    g = torch.Generator().manual_seed(6)
    n, V = 45, 300
    a = (torch.randn(n, V, generator=g) * 3).to(dtype)
    a[:, -3:] = -torch.inf  # padding the student never predicts (the teacher neither)
    t = targets_from_logits(torch.cat([torch.randn(n, V - 3, generator=g) * 2, torch.full((n, 3), -1e4)], 1),
                            k if k < V else V, 1.0, samples=S)
    want_g, got_g = torch.empty(n, V, dtype=dtype), torch.empty(n, V, dtype=dtype)
    want = cached_block(div, a.float().clamp(min=LOGIT_FLOOR).to(dtype), t, want_g, colsum=True)
    got = cached_block_native(div, a, t, got_g, colsum=True)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    finite = torch.isfinite(want[0])
    assert torch.equal(finite, torch.isfinite(got[0]))
    assert torch.allclose(got[0][finite], want[0][finite], rtol=tol, atol=1e-5)
    if not finite.all():
        return  # KL is infinite where a cached token has no student mass (a padded one here): as eager
    assert (got_g.float() - want_g.float()).abs().max() <= tol * want_g.float().abs().max() + 1e-7
    assert torch.allclose(got[1], want[1], atol=tol * 10)


@pytest.mark.parametrize("div", DIVS, ids=IDS)
def test_with_k_equal_to_the_vocabulary_the_cached_loss_is_the_online_one(div):
    g = torch.Generator().manual_seed(2)
    N, H, V, T = 30, 8, 64, 2.0
    x = torch.randn(N, H, generator=g, requires_grad=True)
    w = torch.randn(V, H, generator=g, requires_grad=True)
    teacher = torch.randn(N, V, generator=g) * 3
    mask = torch.rand(N, generator=g) > 0.2
    got = L.projected_vocab_losses(x, w, teacher=targets_from_logits(teacher, V, T), temperature=T,
                                   soft_target=True, mask=mask, divergence=div)["soft_target_ce"]
    gx, gw = torch.autograd.grad(got, (x, w))
    online = L.soft_target_ce(x @ w.T, teacher, T, mask=mask, divergence=div)
    ox, ow = torch.autograd.grad(online, (x, w))
    assert got.item() == pytest.approx(online.item(), rel=1e-5)
    assert _max_err(gx, ox) < 1e-5 and _max_err(gw, ow) < 1e-5


def _full_kl_and_grad(s: torch.Tensor, t: torch.Tensor, T: float) -> tuple[float, torch.Tensor]:
    s = s.double().clone().requires_grad_(True)
    q = torch.softmax(t.double() / T, -1)
    kl = (q * (q.log() - torch.log_softmax(s / T, -1))).sum() * T * T
    kl.backward()
    return kl.item(), s.grad


def test_the_tail_sample_makes_forward_kl_unbiased():
    """Averaged over many caches of the same teacher (other seeds), the sampled loss and its gradient are
    the full forward KL's; the buckets alone are not (they never shape the student's tail)."""
    g = torch.Generator().manual_seed(3)
    N, V, k, T, S = 6, 50, 4, 1.5, 8
    s, t = torch.randn(N, V, generator=g) * 2, torch.randn(N, V, generator=g) * 2
    full, full_grad = _full_kl_and_grad(s, t, T)
    values, grads = [], []
    for seed in range(400):
        x = s.clone().requires_grad_(True)
        loss = cached_soft_target(x, targets_from_logits(t, k, T, samples=S, seed=seed), T)
        loss.backward()
        values.append(loss.item())
        grads.append(x.grad.double())
    mean_grad = torch.stack(grads).mean(0)
    assert np.mean(values) == pytest.approx(full, rel=0.02)
    assert (mean_grad - full_grad).abs().max() < 0.03 * full_grad.abs().max()
    x = s.clone().requires_grad_(True)
    cached_soft_target(x, targets_from_logits(t, k, T), T).backward()
    assert (x.grad.double() - full_grad).abs().max() > 0.2 * full_grad.abs().max()  # biased without the sample


def test_the_sampled_gradient_is_the_student_minus_the_sampled_teacher():
    """p - q_hat: the cached tokens' Q_j, and Q_tail n_v / S on a tail token drawn n_v times."""
    g = torch.Generator().manual_seed(4)
    V, k, T, S = 30, 3, 1.0, 10
    s, t = torch.randn(2, V, generator=g), torch.randn(2, V, generator=g) * 2
    c = targets_from_logits(t, k, T, samples=S)
    x = s.clone().requires_grad_(True)
    cached_soft_target(x, c, T).backward()
    q = torch.softmax(t / T, -1)
    q_hat = torch.zeros(2, V).scatter_(1, c.ids, q.gather(1, c.ids))
    q_tail = 1 - q.gather(1, c.ids).sum(-1, keepdim=True)
    q_hat.scatter_add_(1, c.samples, (q_tail / S).expand(2, S))
    assert torch.allclose(x.grad, (torch.softmax(s / T, -1) - q_hat) * T, atol=1e-6)


def test_top_k_rows_draw_their_samples_from_the_tail_alone():
    t = torch.randn(3, 40) * 2
    rows = top_k_rows(t, 5, 1.0, 20000, torch.Generator().manual_seed(0))
    assert rows.samples.shape == (3, 20000)
    q = torch.softmax(t, -1).scatter_(1, rows.ids, 0.0)
    q = q / q.sum(-1, keepdim=True)
    for r in range(3):
        counts = torch.bincount(rows.samples[r], minlength=40).double() / 20000
        assert counts[rows.ids[r]].sum() == 0
        assert (counts - q[r]).abs().max() < 0.01
    assert torch.allclose(rows.entropy, -(q * q.clamp_min(1e-30).log()).sum(-1), atol=1e-5)
    again = top_k_rows(t, 5, 1.0, 20000, torch.Generator().manual_seed(0))
    assert torch.equal(again.samples, rows.samples)
    assert top_k_rows(t, 40, 1.0, 7).samples is None  # no tail to sample


def test_cached_targets_of_the_wrong_shape_or_with_mse_are_refused():
    x, w = torch.randn(4, 3), torch.randn(10, 3)
    good = targets_from_logits(torch.randn(4, 10), 3, 1.0)
    with pytest.raises(ValueError, match="positions"):
        L.projected_vocab_losses(x, w, teacher=targets_from_logits(torch.randn(5, 10), 3, 1.0), soft_target=True)
    with pytest.raises(ValueError, match="top-k"):
        L.projected_vocab_losses(x, w, teacher=good, soft_target=True, mse=True)
    drawn = targets_from_logits(torch.randn(4, 10), 3, 1.0, samples=2)
    drawn.entropy = None
    with pytest.raises(ValueError, match="entropy"):
        L.projected_vocab_losses(x, w, teacher=drawn, soft_target=True)


def test_top_k_rows_keep_the_most_probable_tokens_and_the_rest_of_the_mass():
    t = torch.randn(5, 40) * 3
    ids, lps, tail, _, _ = top_k_rows(t, 6, 2.0)
    ls = torch.log_softmax(t / 2.0, -1)
    assert torch.equal(ids, ls.topk(6, -1).indices)
    assert torch.allclose(lps, ls.gather(1, ids))
    assert torch.allclose(torch.logaddexp(lps.logsumexp(-1), tail), torch.zeros(5), atol=1e-6)
    assert torch.isinf(top_k_rows(t, 40, 2.0)[2]).all()


def test_bf16_bits_round_trip_as_torch_rounds_them():
    x = np.array([0.0, -1.5, -3.14159, -20.123, -1e-3, 7.77, np.nan, -np.inf], dtype=np.float32)
    bits = S.float32_to_bf16(x)
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(bits[:-2], want[:-2]) and np.isnan(S.bf16_to_float32(bits)[-2])
    assert S.bf16_to_float32(bits)[-1] == -np.inf


def test_q8_codes_keep_each_log_probability_within_half_a_step():
    x = np.array([0.0, -1e-3, -0.5, -3.14159, -9.03, -15.9, -16.5, -80.0, -np.inf, np.nan], dtype=np.float32)
    back = S.q8_to_float32(S.float32_to_q8(x))
    assert S.float32_to_q8(x).dtype == np.uint8
    assert np.abs(back[:6] - x[:6]).max() <= 0.5 / S.Q8_STEPS_PER_NAT + 1e-6
    assert (back[6:] == -255 / S.Q8_STEPS_PER_NAT).all()  # below the range, -inf and nan: the smallest code
    assert np.array_equal(S.decode_logprobs(S.encode_logprobs(x, "q8"), "q8"), back)
    assert np.array_equal(S.decode_logprobs(S.encode_logprobs(x, "fp32"), "fp32")[:8], x[:8])


def test_storage_arithmetic():
    assert S.bytes_per_position(64, 49152, "fp16") == 260  # SmolLM2's vocabulary: uint16 ids
    assert S.bytes_per_position(64, 128256, "bf16") == 388  # Llama 3's: uint32 ids
    assert S.bytes_per_position(8, 100, "fp32") == 8 * (2 + 4) + 4
    assert S.bytes_per_position(64, 49152, "fp16", 16) == 296  # what fp16 leaves room for under 300
    assert S.bytes_per_position(64, 128256, "fp16", 16) == 388 + 16 * 4 + 4
    assert S.bytes_per_position(64, 49152, "q8", 50) == 300  # the defaults: one byte a log-probability, 34 more samples
    assert S.tail_samples_for(64, 49152, None) == 50 and S.tail_samples_for(49152, 49152, 16) == 0
    assert S.logprob_dtype_for(50, None) == "q8" and S.logprob_dtype_for(0, None) == "fp16"
    assert S.logprob_dtype_for(50, "fp32") == "fp32"
    assert shard_bounds(np.array([0, 5, 10, 30, 31]), 10) == [(0, 2), (2, 3), (3, 4)]


# --------------------------------------------------------------------------- writing


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The README's CLM world (tiny GPT-2 teacher with dropout, extracted student) and a cache of it."""
    from distill.testing import tiny

    root = tmp_path_factory.mktemp("cache_world")
    return tiny.build(root / "clm", "clm")


def write(world, out: Path, **kw):
    args = dict(teacher_type=world.teacher_type, teacher_name=str(world.teacher), data_file=str(world.data),
                out=out, k=8, temperature=2.0, max_model_input_size=64, shard_positions=500, progress=False)
    return cache_teacher(**{**args, **kw})


@pytest.fixture(scope="module")
def cache8(world, tmp_path_factory):
    return write(world, tmp_path_factory.mktemp("c8") / "cache").folder


def test_a_cache_holds_the_teachers_top_k_for_every_position_of_every_example(world, cache8):
    from transformers import AutoModelForCausalLM

    from distill.data.dataset import LMSeqsDataset

    cache = S.TeacherCache(cache8)
    ds = LMSeqsDataset(str(world.data), max_model_input_size=64)
    assert cache.positions == int(ds.lengths.sum()) and cache.k == 8
    assert cache.tail_samples == 50 and cache.logprob_dtype == "q8"  # the defaults
    assert cache.meta["bytes"] == cache.positions * (8 * 3 + 4 + 50 * 2 + 4) and cache.meta["dataset"]["tokens_sha256"]
    for name in (S.IDS_FILE, S.LOGPROBS_FILE, S.TAIL_FILE, S.SAMPLES_FILE, S.ENTROPY_FILE):
        assert (cache8 / name).stat().st_size > 0
    assert (cache8 / S.TOKENIZER_DIR / "tokenizer.json").is_file() and not (cache8 / "plan.json").exists()
    teacher = AutoModelForCausalLM.from_pretrained(world.teacher).eval()
    for i in (0, 17, len(ds) - 1):
        ids = torch.from_numpy(ds[i]["input_ids"]).unsqueeze(0)
        with torch.no_grad():
            ls = torch.log_softmax(teacher(input_ids=ids).logits[0] / 2.0, -1)
        c_ids, c_lp, c_tail, c_drawn, c_entropy = cache.example(i)
        assert c_drawn.shape == (ids.shape[1], 50) and not (c_drawn[:, :, None] == c_ids[:, None, :]).any()
        tail_q = ls.exp().scatter(1, torch.from_numpy(c_ids), 0.0)
        tail_q = tail_q / tail_q.sum(-1, keepdim=True)
        assert np.allclose(c_entropy, -torch.special.xlogy(tail_q, tail_q).sum(-1).numpy(), atol=1e-3)
        assert c_ids.shape == (ids.shape[1], 8)
        mine = ls.gather(1, torch.from_numpy(c_ids))
        # The 8 most probable tokens (up to near-ties: the teacher ran here on one example, there in a batch).
        assert (mine >= ls.topk(8, -1).values[:, -1:] - 1e-5).all()
        assert np.allclose(c_lp, mine.numpy(), atol=0.5 / S.Q8_STEPS_PER_NAT + 1e-4)  # q8: half a step
        rest = ls.scatter(1, torch.from_numpy(c_ids), -math.inf).logsumexp(-1)
        assert np.allclose(c_tail, rest.numpy(), atol=1e-4)


def test_an_fp16_cache_holds_the_same_rows_as_the_default_q8_one(world, cache8, tmp_path):
    fp16 = S.TeacherCache(write(world, tmp_path / "fp16", logprob_dtype="fp16", tail_samples=20).folder)
    q8 = S.TeacherCache(cache8)
    assert fp16.logprob_dtype == "fp16" and fp16.tail_samples == 20
    assert (q8.folder / S.LOGPROBS_FILE).stat().st_size == q8.positions * q8.k
    assert fp16.meta["bytes"] == fp16.positions * (8 * 4 + 4 + 20 * 2 + 4)
    for i in (0, 5):
        mine, theirs = q8.example(i), fp16.example(i)
        assert np.array_equal(mine.ids, theirs.ids) and np.array_equal(mine.tail, theirs.tail)
        # half a q8 step, plus fp16's rounding
        assert np.abs(mine.logprobs - theirs.logprobs).max() <= 0.5 / S.Q8_STEPS_PER_NAT + 1e-2
        assert theirs.samples.shape == (len(theirs.ids), 20)


def test_a_killed_cache_run_resumes_without_redoing_finished_shards(world, cache8, tmp_path):
    out = tmp_path / "cache"
    cmd = [sys.executable, str(Path(__file__).resolve().parents[1] / "scripts" / "cache_teacher.py"),
           "--teacher_type", world.teacher_type, "--teacher_name", str(world.teacher), "--data_file", str(world.data),
           "--dump_path", str(out), "--k", "8", "--max_model_input_size", "64", "--shard_positions", "500",
           "--no_progress"]
    env = dict(os.environ, DISTILL_FAULT="after_cache_shard_1")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert not out.exists() and json.loads((tmp_path / ".cache.partial" / "done.json").read_text()) == [0, 1]
    r = subprocess.run(cmd, env=dict(env, DISTILL_FAULT=""), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming: 2 of 4 shards done" in r.stdout
    for name in (S.IDS_FILE, S.LOGPROBS_FILE, S.TAIL_FILE, S.SAMPLES_FILE, S.ENTROPY_FILE, S.ROWS_FILE):
        assert (out / name).read_bytes() == (cache8 / name).read_bytes(), name
    assert not (tmp_path / ".cache.partial").exists()


def test_a_cache_is_not_overwritten_without_force_and_a_full_disk_is_refused_first(world, cache8, tmp_path,
                                                                                   monkeypatch):
    before = (cache8 / S.META_FILE).read_bytes()
    with pytest.raises(UserError, match="--force"):
        write(world, cache8)
    assert (cache8 / S.META_FILE).read_bytes() == before
    other = tmp_path / "not_a_cache"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a teacher cache"):
        write(world, other, force=True)
    assert (other / "notes.txt").read_text() == "mine"

    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 900, 900))
    with pytest.raises(UserError, match=r"needs 243\.4 KB but only 900 B is free.*fewer --tail_samples$"):
        write(world, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists() and not (tmp_path / ".fresh.partial").exists()


def test_writing_refuses_a_masked_lm_teacher_and_a_k_beyond_the_vocabulary(world, tmp_path):
    from distill.testing import tiny

    with pytest.raises(UserError, match="between 1 and the teacher's vocabulary of 210"):
        write(world, tmp_path / "c", k=211)
    mlm = tiny.build(tmp_path / "mlm", "mlm")
    with pytest.raises(UserError, match="masked LM: its outputs depend on each epoch's random masks"):
        cache_teacher(teacher_type="bert", teacher_name=str(mlm.teacher), data_file=str(mlm.data),
                      out=tmp_path / "m", max_model_input_size=64, progress=False)
    assert not (tmp_path / "c").exists() and not (tmp_path / "m").exists()


# --------------------------------------------------------------------------- training from it


def cached_args(world, dump: Path, cache: Path, *extra: str, max_steps: int = 10) -> list[str]:
    """The README's CLM command with --teacher_cache in place of the teacher (no cosine loss)."""
    args = world.train_args(dump, max_steps=max_steps, interval=4)
    args[args.index("--alpha_cos") + 1] = "0"
    for flag in ("--teacher_name", "--teacher_type"):
        i = args.index(flag)
        del args[i:i + 2]
    return args + ["--teacher_cache", str(cache), *extra]


def losses(dump: Path) -> list[tuple[float, float]]:
    return [(r["loss"], r["loss_ce"]) for r in metrics_without_timing(dump)]


@pytest.mark.slow
def test_with_k_equal_to_the_vocabulary_training_reproduces_online_training(world, tmp_path):
    """fp32 log-probabilities, k = V: the loss of every step is the online run's, on the README's path and
    on a student initialised from a config (whose soft-target loss is larger, so its relative error means more)."""
    cache = write(world, tmp_path / "cacheV", k=210, logprob_dtype="fp32").folder
    for name, swap in (("extracted", False), ("from_config", True)):
        on_args = world.train_args(tmp_path / f"on_{name}", max_steps=6, interval=100)
        on_args[on_args.index("--alpha_cos") + 1] = "0"
        off_args = cached_args(world, tmp_path / f"off_{name}", cache, max_steps=6)
        if swap:
            for a in (on_args, off_args):
                i = a.index("--student_pretrained_weights")
                a[i:i + 2] = ["--student_config", str(world.student / "config.json")]
        ok(launch(on_args))
        ok(launch(off_args))
        on, off = losses(tmp_path / f"on_{name}"), losses(tmp_path / f"off_{name}")
        assert len(on) == len(off) == 6
        for (lo, co), (lc, cc) in zip(on, off):
            assert lc == pytest.approx(lo, rel=1e-6)
            assert cc == pytest.approx(co, rel=1e-4 if swap else 1e-3)


@pytest.mark.slow
def test_training_from_a_cache_is_reproducible_and_resumes_exactly(world, cache8, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    r = ok(launch(cached_args(world, a, cache8)))
    assert "not loaded" in r.stdout
    ok(launch(cached_args(world, b, cache8, "--num_workers", "1")))  # a worker process reads the cache too
    assert_same_student(a, b)
    r = launch(cached_args(world, c, cache8), fault="after_step_6")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    ok(launch(cached_args(world, c, cache8, "--resume")))
    assert_same_student(a, c)
    assert (a / "tokenizer.json").is_file()  # the teacher's tokenizer, from the cache, saved with the student


def _refused(argv: list[str], capsys, match: str) -> None:
    from distill.cli import train

    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([ln for ln in err if ln.startswith("error:")]) == 1 and match in err[-1], err


def test_training_refuses_what_a_cache_cannot_give_before_any_step(world, cache8, tmp_path, capsys):
    dump = tmp_path / "run"
    base = cached_args(world, dump, cache8)
    _refused(base + ["--mlm"], capsys, "depend on each epoch's random masks")
    _refused(base + ["--alpha_cos", "1"], capsys, "needs the teacher's hidden states")
    _refused(base + ["--alpha_hidden_mse", "1"], capsys, "needs the teacher's hidden states")
    _refused(base + ["--alpha_mse", "1"], capsys, "needs the teacher's full logits")
    _refused(base + ["--teacher_cache_k", "16"], capsys, "holds the top 8 tokens per position")
    _refused(base + ["--temperature", "1"], capsys, "holds the teacher at temperature 2")
    _refused(base + ["--max_model_input_size", "32"], capsys, "was written for --max_model_input_size 64")
    _refused(cached_args(world, dump, tmp_path / "nowhere"), capsys, "does not exist")
    assert not dump.exists()


def test_training_refuses_a_cache_of_another_dataset(world, cache8, tmp_path, capsys):
    from distill.cli import binarized_data

    other = tmp_path / "data_seed9"
    binarized_data.main(["--file_path", str(Path(__file__).parent / "fixtures" / "prose.txt"), "--tokenizer_name",
                         str(world.teacher), "--dump_file", str(other), "--seed", "9", "--quiet"])
    argv = cached_args(world, tmp_path / "run", cache8)
    argv[argv.index("--data_file") + 1] = str(other)
    _refused(argv, capsys, "was written from another dataset")


def test_resuming_with_another_cache_is_refused(world, cache8, tmp_path, capsys):
    dump = tmp_path / "run"
    ok(launch(cached_args(world, dump, cache8, max_steps=4)))
    other = write(world, tmp_path / "other", shard_positions=1000).folder  # same content, another cache
    _refused(cached_args(world, dump, other, "--max_steps", "6", "--resume"), capsys, "teacher_cache")


@pytest.mark.slow
def test_two_processes_from_a_cache_match_one_process_with_the_global_batch(world, cache8, tmp_path):
    """Each rank's collator reads its own examples' rows of the cache (dropout off, so the ranks draw nothing)."""
    from tests.test_distributed import assert_close_runs
    from tests.test_distributed import launch as launch_n

    config = json.loads((world.student / "config.json").read_text())
    config.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    (tmp_path / "student.json").write_text(json.dumps(config))

    def argv(dump, batch):
        a = cached_args(world, dump, cache8, max_steps=6)
        i = a.index("--student_pretrained_weights")
        a[i:i + 2] = ["--student_config", str(tmp_path / "student.json")]
        return a + ["--batch_size", str(batch)]

    r = ok(launch_n(argv(tmp_path / "two", 2), 2))
    assert "2 processes (gloo, cpu)" in r.stdout
    ok(launch_n(argv(tmp_path / "one", 4), 1))
    assert_close_runs(tmp_path / "one", tmp_path / "two", rtol=1e-4, atol=1e-5)
