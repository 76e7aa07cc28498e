"""The soft-target divergences beyond forward KL, as block kernels: value and analytic logit gradient.

With ``a = s / T`` (student), ``b = t / T`` (teacher), ``p = softmax(a)``, ``q = softmax(b)``:

| name | D(q, p) per row | as in |
| --- | --- | --- |
| ``kl`` | KL(q ‖ p) | DistilBERT, Hinton et al. |
| ``reverse_kl`` | KL(p ‖ q) | MiniLLM |
| ``jsd`` | β KL(q ‖ m) + (1-β) KL(p ‖ m), m = β q + (1-β) p | GKD (TRL's ``generalized_jsd_loss``) |
| ``tvd`` | ½ Σ |p - q| | DistillKit, "f-divergence" KD |
| ``skew_kl`` | KL(q ‖ α q + (1-α) p) | DistiLLM |

The loss is ``T² · D``, summed over rows; its gradient in the student's raw logits is ``T`` times
the gradient in ``a`` (:func:`~distill.losses.kernels.loss_factors` ``("kl", T)``, as for KL).

Every divergence here is ``F(p)`` for fixed ``q``, so its gradient in the logits is the softmax
Jacobian applied to ``∂F/∂p``: ``p ⊙ (h - Σ p h)`` with ``h = ∂F/∂p``:

- reverse KL: ``h = log p - log q`` (+1, which the centring removes);
- JSD: ``h = (1-β)(log p - log m)`` (the ``q/m`` and ``p/m`` terms cancel);
- TVD: ``h = ½ sign(p - q)``;
- skew KL: ``h = -(1-α) q / m``.

All in fp32 on (rows, V) blocks, a few rows at a time on the CPU, never a (B, L, V) tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from distill.losses.kernels import KERNEL_ROWS, Workspace, kl_rows

DIVERGENCES = ("kl", "reverse_kl", "jsd", "tvd", "skew_kl")


@dataclass(frozen=True)
class Divergence:
    """Which soft-target divergence, with its parameter: ``beta`` for jsd, ``alpha`` for skew_kl."""

    name: str = "kl"
    beta: float = 0.5
    alpha: float = 0.1

    def check(self) -> "Divergence":
        """Raise ValueError for an unknown name or a parameter outside its range."""
        if self.name not in DIVERGENCES:
            raise ValueError(f"unknown divergence {self.name!r}; expected one of: {', '.join(DIVERGENCES)}")
        if self.name == "jsd" and not (math.isfinite(self.beta) and 0 < self.beta < 1):
            raise ValueError(f"--divergence_beta must lie strictly between 0 and 1 for jsd (at 0 it vanishes; use "
                             f"kl or reverse_kl for the ends), got {self.beta}")
        if self.name == "skew_kl" and not (math.isfinite(self.alpha) and 0 <= self.alpha < 1):
            raise ValueError(f"--divergence_alpha must lie in [0, 1) for skew_kl (0 is kl), got {self.alpha}")
        return self

    @property
    def is_forward_kl(self) -> bool:
        return self.name == "kl" or (self.name == "skew_kl" and self.alpha == 0)


FORWARD_KL = Divergence()


def divergence_block(div: Divergence, a: Tensor, b: Tensor, g_out: Tensor | None,
                     colsum: bool = False) -> tuple[Tensor, Tensor | None]:
    """Rows of ``D(softmax(b), softmax(a))`` for fp32 (n, V) blocks ``a`` (student), ``b`` (teacher),
    finite; into ``g_out`` its gradient in ``a``; with ``colsum`` that gradient's column sums (V,)."""
    log_p = torch.log_softmax(a, -1)
    log_q = torch.log_softmax(b, -1)
    p = log_p.exp()
    name = div.name
    if name == "reverse_kl":
        h = log_p - log_q
        row = (p * h).sum(-1)
    elif name == "jsd":
        beta = div.beta
        log_m = torch.logaddexp(log_q + math.log(beta), log_p + math.log1p(-beta))
        q = log_q.exp()
        row = beta * (q * (log_q - log_m)).sum(-1) + (1 - beta) * (p * (log_p - log_m)).sum(-1)
        h = (1 - beta) * (log_p - log_m)
    elif name == "tvd":
        d = p - log_q.exp()
        row = 0.5 * d.abs().sum(-1)
        h = 0.5 * d.sign()
    elif name == "skew_kl":
        alpha = div.alpha
        log_m = torch.logaddexp(log_q + math.log(alpha), log_p + math.log1p(-alpha)) if alpha > 0 else log_p
        q = log_q.exp()
        row = (q * (log_q - log_m)).sum(-1)
        h = -(1 - alpha) * (log_q - log_m).exp()
    else:  # forward KL (the fast path is kernels.kl_block): the gradient is p - q, no centring needed
        q = log_q.exp()
        row = (q * (log_q - log_p)).sum(-1)
        h = None
    if g_out is None:
        return row, None
    g = p - q if h is None else h.sub_((p * h).sum(-1, keepdim=True)).mul_(p)  # softmax Jacobian on dF/dp
    g_out.copy_(g)
    return row, (g.sum(0) if colsum else None)


def divergence_rows(div: Divergence, a: Tensor, b: Tensor, g_out: Tensor | None, workspace: Workspace,
                    colsum: bool = False) -> tuple[Tensor, Tensor | None]:
    """:func:`divergence_block` over a chunk (n, V) of temperature-scaled logits, a few rows at a time on
    the CPU; forward KL (and skew KL at alpha 0) goes through the fused KL kernel."""
    if div.is_forward_kl:
        return kl_rows(a, b, g_out, workspace, colsum)
    n = a.shape[0]
    step = KERNEL_ROWS if a.device.type == "cpu" else n
    rows, sums = [], None
    for r in range(0, n, step):
        e = min(r + step, n)
        row, cs = divergence_block(div, a[r:e].float(), b[r:e].float(), None if g_out is None else g_out[r:e], colsum)
        rows.append(row)
        if cs is not None:
            sums = cs if sums is None else sums.add_(cs)
    return (rows[0] if len(rows) == 1 else torch.cat(rows)), sums
