"""Soft targets from a teacher cache: the divergence over the teacher's top-k tokens and one tail bucket.

A cache (:mod:`distill.teacher_cache`) holds, for every position, the teacher's k most probable tokens
at temperature T, their log-probabilities, and the log of the mass left over. Here the student's
distribution ``p = softmax(s / T)`` over the V tokens is grouped into the same k + 1 buckets: ``P_j =
p_{v_j}`` for the cached tokens, ``P_tail`` the sum of the others. The loss is ``T² · D(Q, P)`` over
the buckets with the run's divergence (:mod:`.divergences`), exact on what was cached. With k = V the
tail is empty and it is the full divergence.

The teacher's k + 1 log-masses are renormalised (a 16-bit cache rounds them, so they sum to 1 only
approximately).

**Gradient.** ``D`` is ``F(P)`` for fixed ``Q``. Since ``P_j = Σ_{v ∈ j} p_v``, ``∂F/∂p_v = h_{j(v)}``
with ``h = ∂F/∂P``, and through the softmax the gradient in ``a = s / T`` is
``p_v (h_{j(v)} − Σ_j P_j h_j)``. The kernels compute the products ``P_j h_j`` directly, so that a
bucket whose mass underflows gives 0 and not 0 × ∞:

- forward KL: ``P h = −Q``;
- reverse KL: ``P h = P (log P − log Q)``;
- JSD(β): ``P h = (1−β) P (log P − log M)``, ``M = β Q + (1−β) P``;
- TVD: ``P h = ½ P sign(P − Q)``;
- skew KL(α): ``P h = −(1−α) Q P / M``, ``M = α Q + (1−α) P``.

A cached token's logit gradient is ``P_j h_j − P_j c`` with ``c = Σ_j P_j h_j``, and a tail token's
is ``p_v (h_tail − c)``. No (B, L, V) tensor is made in the fused path (:mod:`.fused`).

**The sampled tail (forward KL).** The buckets say how much mass the tail holds, not which of its
tokens hold it: a tail token's gradient ``p_v (h_tail − c)`` moves all of the student's tail logits
together, so their shape is never taught. A cache can also hold S tokens drawn from the teacher's
tail, ``q̃ = q / Q_tail`` on the tokens outside the top k, and the entropy ``H̃`` of ``q̃``. By the
chain rule of KL, ``KL(q ‖ p) = KL(Q ‖ P) + Q_tail KL(q̃ ‖ p̃)`` with ``p̃ = p / P_tail`` on the
tail, and ``KL(q̃ ‖ p̃) = E_{v∼q̃}[−log p̃_v] − H̃``. The loss adds the S-sample estimate of that
term, ``Q_tail ((1/S) Σ_i (log P_tail − log p_{v_i}) − H̃)``, so its value and gradient are unbiased
estimates of the full forward KL's. The gradient comes out as the online one with the teacher's
tail replaced by its sample: ``p_v − q̂_v``, where ``q̂`` is the cached ``Q_j`` on the top k and
``Q_tail n_v / S`` on a tail token drawn ``n_v`` times (0 on the others). The other divergences do
not split this way over a partition and use the buckets alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from distill.losses.divergences import FORWARD_KL, Divergence
from distill.losses.kernels import KERNEL_ROWS, LOGIT_FLOOR, Workspace, scatter_columns_

_TINY = torch.finfo(torch.float32).tiny


@dataclass
class CachedTargets:
    """The teacher's cached signal for a batch, in place of its logits.

    ``ids`` (..., k) int64 token ids, ``logprobs`` (..., k) their log-probabilities at the cache's
    temperature, ``tail`` (...,) the log of the remaining mass (``-inf`` when k is the vocabulary).
    The leading dims are the batch's, (B, L) or (N,).
    """

    ids: Tensor
    logprobs: Tensor
    tail: Tensor
    samples: Tensor | None = None  # (..., S) int64: tokens drawn from the teacher's tail (S may be 0)
    entropy: Tensor | None = None  # (...,) float32: the entropy of the teacher's renormalised tail

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    @property
    def num_samples(self) -> int:
        return 0 if self.samples is None else self.samples.shape[-1]

    @property
    def leading(self) -> torch.Size:
        return self.ids.shape[:-1]

    def _map(self, fn) -> "CachedTargets":
        return CachedTargets(*(None if x is None else fn(x) for x in
                               (self.ids, self.logprobs, self.tail, self.samples, self.entropy)))

    def flat(self) -> "CachedTargets":
        """(N, k), (N, k), (N,), (N, S), (N,)."""
        n = self.ids[..., 0].numel()
        return self._map(lambda x: x.reshape(n, *x.shape[len(self.leading):]))

    def rows(self, index: Tensor | slice) -> "CachedTargets":
        """The flat rows at ``index``."""
        f = self.flat()
        if isinstance(index, slice):
            return f._map(lambda x: x[index])
        return f._map(lambda x: x.index_select(0, index))


def _buckets(lq: Tensor, lt: Tensor) -> Tensor:
    """The teacher's k + 1 log-masses (n, k + 1), fp32, renormalised."""
    LQ = torch.cat([lq.float(), lt.float().unsqueeze(1)], 1)
    return LQ - LQ.logsumexp(-1, keepdim=True)


def bucket_divergence(div: Divergence, lq: Tensor, lp: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of ``D(Q, P)`` over buckets, from fp32 log-masses ``lq``, ``lp`` (n, m) (``-inf`` for an
    empty bucket), and the products ``P_j h_j`` (n, m) with ``h = ∂D/∂P`` (the module's list).

    Empty buckets contribute 0 (``0 log 0 = 0``); a bucket with teacher mass but none of the
    student's makes KL infinite, as it is.
    """
    q, p = lq.exp(), lp.exp()
    has_q, has_p = q > 0, p > 0
    zero = lq.new_zeros(())
    name = div.name
    if name == "reverse_kl":
        ph = p * torch.where(has_p, lp - lq, zero)
        row = ph.sum(-1)
    elif name == "jsd":
        beta = div.beta
        lm = torch.logaddexp(lq + math.log(beta), lp + math.log1p(-beta))
        ph = (1 - beta) * p * torch.where(has_p, lp - lm, zero)
        row = beta * (q * torch.where(has_q, lq - lm, zero)).sum(-1) + ph.sum(-1)
    elif name == "tvd":
        d = p - q
        row = 0.5 * d.abs().sum(-1)
        ph = 0.5 * p * d.sign()
    elif name == "skew_kl" and div.alpha > 0:
        alpha = div.alpha
        lm = torch.logaddexp(lq + math.log(alpha), lp + math.log1p(-alpha))
        row = (q * torch.where(has_q, lq - lm, zero)).sum(-1)
        ph = -(1 - alpha) * torch.where(has_q, (lq + lp - lm).exp(), zero)
    else:  # forward KL (skew KL at alpha 0 is forward KL)
        row = (q * torch.where(has_q, lq - lp, zero)).sum(-1)
        ph = -q
    return row, ph


def _bucket_rows(div: Divergence, t: CachedTargets, lp_top: Tensor, lp_tail: Tensor,
                 lp_drawn: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The student's and teacher's k + 1 log-masses, the rows of the divergence (with the tail samples'
    term when ``lp_drawn`` is given) and ``P_j h_j``: what both block kernels share."""
    LP = torch.cat([lp_top, lp_tail.unsqueeze(1)], 1)  # (n, k + 1)
    LQ = _buckets(t.logprobs, t.tail)
    row, ph = bucket_divergence(div, LQ, LP)
    if lp_drawn is not None:
        row = row + _tail_term(LQ[:, t.k], lp_tail, lp_drawn, t.entropy)
    return LP, LQ, row, ph


def cached_block(div: Divergence, a: Tensor, t: CachedTargets, g_out: Tensor | None,
                 colsum: bool = False) -> tuple[Tensor, Tensor | None]:
    """Rows of the bucketed divergence for temperature-scaled student logits ``a`` (n, V) and the
    cached rows ``t`` (n, k); into ``g_out`` (n, V) its gradient in ``a``; with ``colsum`` that
    gradient's column sums (V,)."""
    V, k = a.shape[1], t.k
    ids = t.ids
    log_p = torch.log_softmax(a.float(), -1)  # (n, V) fp32
    lp_top = log_p.gather(1, ids)  # (n, k): finite even where p underflows
    sampled = _sampled_tail(div, t, V)
    lp_drawn = log_p.gather(1, t.samples) if sampled else None  # (n, S)
    p = log_p.exp_()  # log_p is not needed again
    p.scatter_(1, ids, 0.0)  # now the tail tokens' probabilities, 0 at the cached ones
    if k < V:  # a sum of small positives: no cancellation, unlike 1 - sum of the top
        lp_tail = p.sum(-1).clamp_min_(_TINY).log_()
    else:
        lp_tail = lp_top.new_full((lp_top.shape[0],), -math.inf)
    LP, LQ, row, ph = _bucket_rows(div, t, lp_top, lp_tail, lp_drawn)
    if g_out is None:
        return row, None
    P = LP.exp()
    if sampled:  # forward KL with the tail's sample: p - q_hat (module docstring)
        g = p  # the tail tokens' p; 0 at the cached ones
        g.scatter_(1, ids, P[:, :k] - LQ[:, :k].exp())
        g.scatter_add_(1, t.samples, (-LQ[:, k].exp() / t.num_samples).unsqueeze(1).expand_as(t.samples))
        g_out.copy_(g)
        return row, (g.sum(0) if colsum else None)
    c = ph.sum(-1, keepdim=True)  # (n, 1)
    P_tail = P[:, k]
    h_tail = torch.where(P_tail > 0, ph[:, k] / P_tail.clamp_min(_TINY), 0.0)
    g = p.mul_(h_tail.unsqueeze(1) - c)  # the tail tokens' gradient; 0 at the cached ones
    g.scatter_(1, ids, ph[:, :k] - P[:, :k] * c)
    g_out.copy_(g)
    return row, (g.sum(0) if colsum else None)


def _sampled_tail(div: Divergence, t: CachedTargets, V: int) -> bool:
    """Whether the tail's sample enters the loss: forward KL (skew KL at alpha 0 included), a cache
    with samples, and a tail to sample from."""
    forward = div.name == "kl" or (div.name == "skew_kl" and not div.alpha > 0)
    return forward and t.num_samples > 0 and t.k < V


def _tail_term(lq_tail: Tensor, lp_tail: Tensor, lp_drawn: Tensor, entropy: Tensor) -> Tensor:
    """Rows of ``Q_tail ((1/S) Σ_i (log P_tail − log p_{v_i}) − H̃)``: the S-sample estimate of
    ``Q_tail KL(q̃ ‖ p̃)``, from the teacher's tail log-mass, the student's, its log-probabilities
    at the drawn tokens (n, S) and the teacher's tail entropy (0 where the teacher has no tail)."""
    q_tail = lq_tail.exp()
    xent = lp_tail.unsqueeze(1).sub(lp_drawn).mean(1)  # (n,): the sampled cross-entropy of the tails
    return torch.where(q_tail > 0, q_tail * (xent - entropy.float()), 0.0)


def cached_block_native(div: Divergence, a: Tensor, t: CachedTargets, g_out: Tensor | None,
                        colsum: bool = False) -> tuple[Tensor, Tensor | None] | None:
    """:func:`cached_block` with the student's softmax in native code (:mod:`distill.losses.native`):
    one pass for its maximum, one for its sums over the vocabulary and over the tail, one writing the
    tail tokens' gradient ``alpha_r p_v``; the k cached tokens and the S drawn ones are then set
    from (n, k) and (n, S) tensors. None when the native kernel cannot run (the caller runs
    :func:`cached_block`)."""
    from distill.losses import native

    if g_out is not None and not (g_out.is_contiguous() and g_out.shape == a.shape):
        return None
    stats = native.softmax_stats(a, t.ids)
    if stats is None:
        return None
    lse, lse_tail = stats
    V, k = a.shape[1], t.k

    def log_p(ids: Tensor) -> Tensor:  # the student's log-probabilities at ids, floored as the kernel floors
        return a.gather(1, ids).float().clamp_min_(LOGIT_FLOOR).sub_(lse.unsqueeze(1))

    lp_top = log_p(t.ids)
    sampled = _sampled_tail(div, t, V)
    lp_drawn = log_p(t.samples) if sampled else None
    if k < V:  # as cached_block: at least the smallest normal float's log
        lp_tail = (lse_tail - lse).clamp_min_(math.log(_TINY))
    else:
        lp_tail = lp_top.new_full((lp_top.shape[0],), -math.inf)
    LP, LQ, row, ph = _bucket_rows(div, t, lp_top, lp_tail, lp_drawn)
    if g_out is None:
        return row, None
    P = LP.exp()
    if sampled:  # p - q_hat: p on the tail, P_j - Q_j on the cached tokens, p_v - Q_tail n_v / S on the drawn
        alpha = torch.ones_like(lse)
        top = P[:, :k] - LQ[:, :k].exp()
        drawn = t.samples
        counts = (drawn.unsqueeze(2) == drawn.unsqueeze(1)).sum(-1)  # (n, S): each draw's multiplicity
        drawn_g = lp_drawn.exp() - LQ[:, k:].exp() * counts / t.num_samples
    else:
        c = ph.sum(-1, keepdim=True)
        P_tail = P[:, k]
        h_tail = torch.where(P_tail > 0, ph[:, k] / P_tail.clamp_min(_TINY), 0.0)
        alpha = h_tail - c.squeeze(1)
        top = ph[:, :k] - P[:, :k] * c
    if not native.scaled_exp(a, lse, alpha, g_out):
        return None
    scatter_columns_(g_out, t.ids, top)
    if sampled:
        scatter_columns_(g_out, drawn, drawn_g)  # a token drawn twice gets the same value twice
    return row, (g_out.float().sum(0) if colsum else None)


def cached_rows(div: Divergence, a: Tensor, t: CachedTargets, g_out: Tensor | None, workspace: Workspace,
                colsum: bool = False) -> tuple[Tensor, Tensor | None]:
    """:func:`cached_block` over a chunk (n, V): on the CPU in native code when the workspace allows
    it (:func:`cached_block_native`), else a few rows at a time (their fp32 blocks stay in cache)."""
    n = a.shape[0]
    if workspace.native and a.device.type == "cpu" and n:
        done = cached_block_native(div, a, t, g_out, colsum)
        if done is not None:
            return done
    step = KERNEL_ROWS if a.device.type == "cpu" else max(n, 1)
    rows, sums = [], None
    for r in range(0, n, step):
        e = min(r + step, n)
        part = t.rows(slice(r, e))
        row, cs = cached_block(div, a[r:e], part, None if g_out is None else g_out[r:e], colsum)
        rows.append(row)
        if cs is not None:
            sums = cs if sums is None else sums.add_(cs)
    if not rows:
        return a.new_zeros(0, dtype=torch.float32), None
    return (rows[0] if len(rows) == 1 else torch.cat(rows)), sums


def check_targets(targets: CachedTargets, leading: torch.Size, vocab: int) -> None:
    """ValueError unless ``targets`` covers ``leading`` positions with at most ``vocab`` ids each."""
    if tuple(targets.leading) != tuple(leading):
        raise ValueError(f"cached teacher targets cover {tuple(targets.leading)} positions, the student "
                         f"{tuple(leading)}.")
    if targets.logprobs.shape != targets.ids.shape or tuple(targets.tail.shape) != tuple(leading):
        raise ValueError("cached teacher ids, log-probabilities and tail must share their leading shape.")
    if targets.samples is not None and (tuple(targets.samples.shape[:-1]) != tuple(leading) or targets.entropy is None
                                        or tuple(targets.entropy.shape) != tuple(leading)):
        raise ValueError("cached tail samples need their entropy, both with the positions' leading shape.")
    if not 1 <= targets.k <= vocab:
        raise ValueError(f"cached teacher targets hold {targets.k} tokens a position, for a vocabulary of {vocab}.")


def cached_soft_target(student_logits: Tensor, targets: CachedTargets, temperature: float,
                       mask: Tensor | None = None, divergence: Divergence | None = None) -> Tensor:
    """``T² Σ_positions D(Q, P)`` over the cached buckets, on materialised logits (B, L, V) or (N, V),
    with autograd (fp32 (n, V) intermediates). For heads the fused path cannot take, and as the
    reference the fused kernel is tested against. Count: the positions of ``mask``."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    div = (divergence or FORWARD_KL).check()
    V = student_logits.shape[-1]
    check_targets(targets, student_logits.shape[:-1], V)
    s = student_logits.reshape(-1, V)
    t = targets.flat()
    if mask is not None:
        idx = mask.reshape(-1).bool().nonzero().squeeze(1).to(s.device)
        s, t = s.index_select(0, idx), t.rows(idx)
    log_p = torch.log_softmax(s.float() / temperature, -1)
    lp_top = log_p.gather(1, t.ids)
    if t.k < V:
        hit = torch.zeros_like(log_p, dtype=torch.bool).scatter_(1, t.ids, True)
        lp_tail = log_p.masked_fill(hit, -math.inf).logsumexp(-1, keepdim=True)
    else:
        lp_tail = lp_top.new_full((lp_top.shape[0], 1), -math.inf)
    LQ = _buckets(t.logprobs, t.tail)
    row, _ = bucket_divergence(div, LQ, torch.cat([lp_top, lp_tail], 1))
    if _sampled_tail(div, t, V):
        row = row + _tail_term(LQ[:, t.k], lp_tail.squeeze(1), log_p.gather(1, t.samples), t.entropy)
    return row.sum() * (temperature * temperature)
