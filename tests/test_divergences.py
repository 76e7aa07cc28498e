"""The soft-target divergences (forward and reverse KL, JSD(beta), TVD, skew KL): value and gradients of
the materialised and the fused losses against autograd on a direct computation, fp32 and bf16, with
masks and temperatures; the flags; and a Distiller step with each divergence."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distill import losses as L
from distill.errors import UserError
from distill.losses.divergences import DIVERGENCES, Divergence

DIVS = [Divergence("kl"), Divergence("reverse_kl"), Divergence("jsd", beta=0.5), Divergence("jsd", beta=0.1),
        Divergence("tvd"), Divergence("skew_kl", alpha=0.1), Divergence("skew_kl", alpha=0.0)]
IDS = [f"{d.name}-b{d.beta}-a{d.alpha}" for d in DIVS]


def direct(div: Divergence, s: torch.Tensor, t: torch.Tensor, T: float, mask: torch.Tensor | None) -> torch.Tensor:
    """T^2 * sum over the masked rows of D(softmax(t / T), softmax(s / T)), written out, for autograd."""
    a, b = s.float() / T, t.float() / T
    logp, logq = F.log_softmax(a, -1), F.log_softmax(b, -1)
    p, q = logp.exp(), logq.exp()
    if div.name == "kl":
        rows = (q * (logq - logp)).sum(-1)
    elif div.name == "reverse_kl":
        rows = (p * (logp - logq)).sum(-1)
    elif div.name == "jsd":
        m = div.beta * q + (1 - div.beta) * p
        rows = div.beta * (q * (logq - m.log())).sum(-1) + (1 - div.beta) * (p * (logp - m.log())).sum(-1)
    elif div.name == "tvd":
        rows = 0.5 * (p - q).abs().sum(-1)
    else:
        m = div.alpha * q + (1 - div.alpha) * p
        rows = (q * (logq - m.log())).sum(-1)
    if mask is not None:
        rows = rows[mask.reshape(rows.shape).bool()]
    return rows.sum() * T * T


def _data(dtype, seed=0, V=50):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(2, 7, V, generator=g) * 3).to(dtype)
    t = (torch.randn(2, 7, V, generator=g) * 3).to(dtype)
    mask = torch.rand(2, 7, generator=g) > 0.3
    return s, t, mask


@pytest.mark.parametrize("div", DIVS, ids=IDS)
@pytest.mark.parametrize("dtype,T", [(torch.float32, 1.0), (torch.float32, 2.0), (torch.bfloat16, 2.0)])
def test_materialised_loss_and_gradient_match_autograd(div, dtype, T):
    s, t, mask = _data(dtype)
    s1 = s.clone().requires_grad_(True)
    got = L.soft_target_ce(s1, t, T, mask=mask, divergence=div)
    got.backward()
    s2 = s.float().clone().requires_grad_(True)  # the reference on the same values, in fp32
    ref = direct(div, s2, t, T, mask)
    ref.backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert got.item() == pytest.approx(ref.item(), rel=tol, abs=1e-6)
    assert _max_err(s1.grad, s2.grad) <= tol
    assert (s1.grad[~mask] == 0).all()


def _max_err(mine: torch.Tensor, theirs: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest entry of the reference."""
    return (mine.float() - theirs).abs().max().item() / max(theirs.abs().max().item(), 1e-30)


@pytest.mark.parametrize("div", DIVS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_projection_matches_autograd_on_materialised_logits(div, dtype):
    g = torch.Generator().manual_seed(1)
    N, H, V, T = 40, 16, 300, 2.0
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.5).to(dtype)
    bias = (torch.randn(V, generator=g) * 0.1).to(dtype)
    teacher = torch.randn(N, V, generator=g) * 2
    mask = torch.rand(N, generator=g) > 0.25
    x, w, b = (v.clone().requires_grad_(True) for v in (hidden, weight, bias))
    got = L.projected_vocab_losses(x, w, b, teacher=teacher, temperature=T, soft_target=True, mask=mask,
                                   compute_dtype=dtype, chunk_size=16, divergence=div)["soft_target_ce"]
    got.backward()
    x2, w2, b2 = (v.float().clone().requires_grad_(True) for v in (hidden, weight, bias))
    logits = x2 @ w2.T + b2
    if dtype == torch.bfloat16:  # the fused path's logits are bf16 matmuls: compare on those values
        logits = logits + ((x.detach() @ w.detach().T + b.detach()).float() - logits).detach()
    ref = direct(div, logits, teacher, T, mask)
    ref.backward()
    tol = 1e-4 if dtype == torch.float32 else 5e-2  # bf16: the logit gradients are kept and projected in bf16
    if dtype == torch.bfloat16 and div.name == "tvd":
        # TVD's gradient jumps where p = q: the fused path folds 1/T into its bf16 matmuls, so its logits
        # differ from these by bf16 rounding, which flips sign(p - q) on a few near-equal entries.
        tol = 0.15
    assert got.item() == pytest.approx(ref.item(), rel=tol)
    for mine, theirs in ((x, x2), (w, w2), (b, b2)):
        assert _max_err(mine.grad, theirs.grad) <= tol, div


def test_the_divergences_differ_and_vanish_on_equal_distributions():
    s, t, _ = _data(torch.float32)
    values = {d.name + str(d.beta) + str(d.alpha): L.soft_target_ce(s, t, 1.0, divergence=d).item() for d in DIVS}
    assert len({round(v, 4) for v in values.values()}) >= 6  # skew_kl at alpha 0 is kl
    for d in DIVS:
        assert L.soft_target_ce(s, s.clone(), 2.0, divergence=d).item() == pytest.approx(0.0, abs=1e-4)
    # TVD is at most 1 per row; JSD at most log 2 (beta 0.5)
    n = s.shape[0] * s.shape[1]
    assert L.soft_target_ce(s, t, 1.0, divergence=Divergence("tvd")).item() <= n
    assert L.soft_target_ce(s, t, 1.0, divergence=Divergence("jsd", 0.5)).item() <= n * math.log(2)


def test_vocabulary_padding_at_minus_infinity_stays_finite():
    s, t, _ = _data(torch.float32)
    t[..., -5:] = float("-inf")
    s[..., -5:] = float("-inf")
    for d in DIVS:
        x = s.clone().requires_grad_(True)
        loss = L.soft_target_ce(x, t, 2.0, divergence=d)
        loss.backward()
        assert math.isfinite(loss.item()) and torch.isfinite(x.grad).all(), d


@pytest.mark.parametrize("bad,message", [(dict(divergence="js"), "invalid choice"),
                                         (dict(divergence="jsd", divergence_beta=0.0), "strictly between 0 and 1"),
                                         (dict(divergence="jsd", divergence_beta=1.0), "strictly between 0 and 1"),
                                         (dict(divergence="skew_kl", divergence_alpha=1.0), "in [0, 1)")])
def test_bad_divergence_flags_are_one_sentence(bad, message):
    from distill.config import TrainConfig, parse_config

    base = ["--dump_path", "x", "--data_file", "d", "--student_type", "gpt2", "--student_config", "c",
            "--teacher_type", "gpt2", "--teacher_name", "t"]
    argv = base + [f"--{k}={v}" for k, v in bad.items()]
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace(")", r"\)")):
        parse_config(argv)
    assert set(DIVERGENCES) == set(next(f for f in __import__("dataclasses").fields(TrainConfig)
                                        if f.name == "divergence").metadata["choices"])


from .test_train import world  # noqa: E402,F401  (the module-scoped tiny world)


@pytest.mark.parametrize("kind", ["mlm", "clm"])
@pytest.mark.parametrize("name", ["reverse_kl", "jsd", "tvd", "skew_kl"])
def test_a_distiller_step_uses_the_divergence(world, kind, name):  # noqa: F811
    """The Distiller's soft-target part (fused for these heads) against the direct computation."""
    from .test_distiller_losses import T, _distiller

    d, micro = _distiller(world, kind, divergence=name, divergence_beta=0.3, divergence_alpha=0.2)
    div = Divergence(name, 0.3, 0.2)
    total, count = 0.0, 0
    with torch.no_grad():
        for b in micro:
            s = d.student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
            t = d.teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
            rows = b["attention_mask"].bool()
            total += direct(div, s, t, T, rows).item()
            count += int(rows.sum())
    res = d.step(micro)
    assert float(res.parts["ce"]) == pytest.approx(total / count, rel=1e-4, abs=1e-6)
