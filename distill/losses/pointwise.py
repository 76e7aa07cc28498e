"""Losses on materialised tensors (logits (N, V) or (B, L, V)), their counts and the row helpers
every loss of :mod:`distill.losses` shares.

Conventions shared by every loss of the package (the Distiller relies on them):

* Each loss returns the **sum** over the positions it covers, as a 0-dim float32 tensor.
  The Distiller divides once per optimizer step by the number of loss-carrying positions
  summed over all micro-batches, so every loss has a matching count helper:
  :func:`count_positions` (masked losses), :func:`lm_count` (:func:`lm_ce`) and
  :func:`clm_count` (:func:`clm_ce`). Counts are 0-dim int64 tensors (no host sync).
* Computation is float32 inside whatever the input dtypes are; gradients come back in the
  student's dtype.
* A mask that selects nothing gives an exact 0.0 that is still connected to the student
  input, so ``backward()`` works (and yields zero gradients, never NaN).
* Logits may be ``(B, L, V)`` or ``(N, V)``; leading dims are flattened. Masks are bool or
  0/1 tensors of the leading shape. Teacher tensors never receive gradients.

The vocabulary-sized losses (:func:`soft_target_ce`, :func:`lm_ce`, :func:`clm_ce`,
:func:`logits_mse`) run the block kernels of :mod:`.kernels`, which compute the gradient
analytically during the forward pass; only that gradient is kept for backward, in the student's
dtype (the size of the logits), instead of float32 ``(N, V)`` intermediates saved by autograd.
The float32 working copies cover ``chunk_size`` rows at a time when it is given, and all the
selected rows at once when it is not (the default; the Distiller does not pass one: it uses these
losses only for heads the fused :func:`~distill.losses.projected_vocab_losses` cannot take, on
their full ``(B, L, V)`` logits). They do not support double backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from distill.losses.divergences import FORWARD_KL, Divergence, divergence_rows
from distill.losses.kernels import Workspace, ce_rows, floored_copy, loss_factors, mse_rows

# Below this selected fraction a mask is applied by gathering the selected rows; above it,
# every row is computed and the unselected ones are zeroed (cheaper than copying most rows).
_GATHER_FRACTION = 0.5


# --------------------------------------------------------------------------- selection


@dataclass
class _Rows:
    """Which of the N flattened rows a loss covers.

    Exactly one strategy applies: every row (``index`` and ``keep`` both None), gather the
    rows in ``index`` (K,), or compute all rows and zero those where ``keep`` (N,) is False.
    """

    n: int
    count: int
    index: Tensor | None = None
    keep: Tensor | None = None

    @property
    def empty(self) -> bool:
        return self.count == 0


def _select(mask: Tensor | None, n: int, leading: torch.Size, device: torch.device) -> _Rows:
    """Which rows a loss computes on. The strategy depends on how many rows the mask selects;
    counting them is free for a CPU mask and a host sync for a device mask, so callers that
    have the mask on the CPU (the Distiller does: batches are built there) should pass that."""
    if mask is None:
        return _Rows(n=n, count=n)
    if mask.numel() != n:
        raise ValueError(
            f"mask has shape {tuple(mask.shape)} but the inputs' leading shape is {tuple(leading)}."
        )
    keep = mask.reshape(n)
    if keep.dtype != torch.bool:
        keep = keep != 0
    index = keep.nonzero().squeeze(1)  # (K,)
    count = int(index.numel())
    if count == n:
        return _Rows(n=n, count=n)
    if count < _GATHER_FRACTION * n:
        return _Rows(n=n, count=count, index=index.to(device, non_blocking=True))
    return _Rows(n=n, count=count, keep=keep.to(device, non_blocking=True))


def _take(x: Tensor, rows: _Rows) -> Tensor:
    """Rows of x (N, ...) that the loss computes on: all of them or the gathered ones."""
    return x if rows.index is None else x.index_select(0, rows.index)


def _reduce(row_loss: Tensor, rows: _Rows) -> Tensor:
    """Sum a per-row loss computed on ``_take`` rows, dropping unselected rows."""
    if rows.keep is not None:
        # where, not multiply: a non-finite value in an unselected row must not leak in.
        row_loss = torch.where(rows.keep, row_loss, torch.zeros((), device=row_loss.device))
    return row_loss.sum()


def _connected_zero(*tensors: Tensor) -> Tensor:
    """An exact fp32 0.0 whose graph reaches every tensor given that requires grad.

    Summing an empty slice gives exactly 0 and zero gradients even if the tensor holds
    inf/NaN, unlike ``x.sum() * 0``.
    """
    zero = None
    for t in tensors:
        if t is None:
            continue
        part = t.reshape(-1)[:0].float().sum()
        zero = part if zero is None else zero + part
    if zero is None:
        return torch.zeros((), dtype=torch.float32)
    return zero


def _flatten(x: Tensor, name: str, min_dim: int = 2) -> Tensor:
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dims, got shape {tuple(x.shape)}.")
    return x.reshape(-1, x.shape[-1])


# --------------------------------------------------------------------------- counts


def count_positions(mask: Tensor | None, like: Tensor) -> Tensor:
    """Number of positions a masked loss covers, as a 0-dim int64 tensor.

    ``mask`` (leading shape) counts its nonzero entries; ``mask=None`` counts every leading
    position of ``like`` (B, L, F) or (N, F), i.e. ``like[..., 0].numel()``. This is the
    count for :func:`soft_target_ce`, :func:`logits_mse`, :func:`hidden_cosine`,
    :func:`hidden_mse`, :func:`multi_layer_cosine` and :func:`multi_layer_mse`.
    """
    if mask is None:
        return torch.tensor(like[..., 0].numel(), dtype=torch.int64, device=like.device)
    return (mask != 0).sum()


def lm_count(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Positions counted by :func:`lm_ce`: ``(labels != ignore_index).sum()`` (0-dim int64)."""
    return (labels != ignore_index).sum()


def clm_count(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Positions counted by :func:`clm_ce`: ``(labels[:, 1:] != ignore_index).sum()``."""
    return (labels[:, 1:] != ignore_index).sum()


# --------------------------------------------------------------------------- vocabulary losses

# A row loss runs a block kernel of .kernels on logits that belong to the caller: it takes a chunk
# of student rows (n, V) in the student's dtype, which it leaves untouched, the matching target
# rows, where to write the kernel's gradient ((n, V) in the student's dtype, or None) and a
# workspace; it returns the per-row loss (n,) in float32.
_RowLoss = Callable[[Tensor, Tensor, "Tensor | None", Workspace], Tensor]


class _AnalyticGradLoss(torch.autograd.Function):
    """Sum of a per-row loss whose gradient the kernel computes in the forward pass."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        student: Tensor,
        target: Tensor,
        row_loss: _RowLoss,
        factors: tuple[float, float],
        rows: _Rows,
        chunk_size: int | None,
        need_grad: bool,
    ) -> Tensor:
        s2 = student.reshape(rows.n, student.shape[-1])  # (N, V), a view when contiguous
        t2 = target.reshape(rows.n, *target.shape[student.dim() - 1 :])  # (N, V) or (N,)
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        span = rows.count if rows.index is not None else rows.n
        # Gradient of the rows computed on: (K, V) when gathering (scattered in backward),
        # else (N, V). Kept in the student's dtype, so it costs no more than the logits.
        grad = s2.new_empty((span, s2.shape[1])) if need_grad else None
        workspace = Workspace()  # the kernels' working blocks, reused over this call's chunks

        step = span if not chunk_size or chunk_size <= 0 else int(chunk_size)
        for start in range(0, span, step):
            stop = min(start + step, span)
            if rows.index is not None:
                ix = rows.index[start:stop]
                s, t = s2.index_select(0, ix), t2.index_select(0, ix)
            else:
                s, t = s2[start:stop], t2[start:stop]
            g = None if grad is None else grad[start:stop]
            row = row_loss(s, t, g, workspace)  # (n,)
            if rows.keep is not None:
                k = rows.keep[start:stop]
                row = torch.where(k, row, torch.zeros((), device=row.device))
                if g is not None:
                    g.masked_fill_(~k.unsqueeze(1), 0.0)
            total += row.sum()
        if grad is not None:
            if rows.index is not None:
                ctx.save_for_backward(grad, rows.index)
            else:
                ctx.save_for_backward(grad)
        ctx.student_shape = student.shape
        row_factor, ctx.grad_factor = factors
        return total * row_factor

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        grad, *index = ctx.saved_tensors
        # Out of place so that a retained graph can be backpropagated again.
        g = grad * (grad_out.float() * ctx.grad_factor).to(grad.dtype)
        if index:
            full = grad.new_zeros((ctx.student_shape.numel() // grad.shape[1], grad.shape[1]))
            g = full.index_copy_(0, index[0], g)
        return g.reshape(ctx.student_shape), None, None, None, None, None, None


def _vocab_loss(
    student: Tensor,
    target: Tensor,
    row_loss: _RowLoss,
    factors: tuple[float, float],
    mask: Tensor | None,
    chunk_size: int | None,
) -> Tensor:
    n = student.numel() // student.shape[-1] if student.shape[-1] else 0
    rows = _select(mask, n, student.shape[:-1], student.device)
    if rows.empty:
        return _connected_zero(student)
    need_grad = torch.is_grad_enabled() and student.requires_grad
    return _AnalyticGradLoss.apply(student, target.detach(), row_loss, factors, rows, chunk_size, need_grad)


def _soft_row_loss(temperature: float, divergence: Divergence) -> _RowLoss:
    inv_t = 1.0 / temperature

    def row_loss(s: Tensor, t: Tensor, g_out: Tensor | None, workspace: Workspace) -> Tensor:
        # Floored: the kernel needs finite logits (a -inf teacher logit is vocabulary padding).
        return divergence_rows(divergence, floored_copy(s, inv_t), floored_copy(t, inv_t), g_out, workspace)[0]

    return row_loss


def _ce_row_loss(s: Tensor, labels: Tensor, g_out: Tensor | None, workspace: Workspace) -> Tensor:
    # Ignored rows are zeroed by the caller; clamp so gather stays in range for them.
    return ce_rows(s, labels.clamp_min(0), g_out)[0]


def _mse_row_loss(s: Tensor, t: Tensor, g_out: Tensor | None, workspace: Workspace) -> Tensor:
    return mse_rows(s, t, g_out)[0]


def _check_pair(student: Tensor, teacher: Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher {what} must have the same shape, got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}."
        )
    if student.dim() < 2:
        raise ValueError(f"{what} must be (B, L, F) or (N, F), got shape {tuple(student.shape)}.")


def soft_target_ce(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    mask: Tensor | None = None,
    chunk_size: int | None = None,
    divergence: Divergence | None = None,
) -> Tensor:
    """Temperature-scaled distillation loss, summed over the selected positions.

    Returns ``T**2 * sum_positions KL(p_t || p_s)`` with ``p = softmax(logits / T)``: the
    DistilBERT soft-target loss (``KLDivLoss(reduction="batchmean") * T**2``) before its
    division by the number of positions. With ``divergence``, ``T**2 * sum D(p_t, p_s)`` for
    that divergence instead (:mod:`distill.losses.divergences`).

    Args:
        student_logits: (B, L, V) or (N, V), any float dtype.
        teacher_logits: same shape; may have another dtype; receives no gradient.
        temperature: T > 0.
        mask: (B, L) or (N,) bool/0-1, positions to include; None = all.
        chunk_size: rows processed at a time (bounds the fp32 (chunk, V) temporaries);
            None = all rows at once.

    Returns:
        0-dim float32 sum. Count: :func:`count_positions` ``(mask, student_logits)``.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    _check_pair(student_logits, teacher_logits, "logits")
    return _vocab_loss(student_logits, teacher_logits,
                       _soft_row_loss(float(temperature), (divergence or FORWARD_KL).check()),
                       loss_factors("kl", temperature), mask, chunk_size)


def lm_ce(
    logits: Tensor,
    labels: Tensor,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    label_mask: Tensor | None = None,
) -> Tensor:
    """Token cross-entropy summed over positions whose label is not ``ignore_index``.

    For masked LM: labels are already aligned with logits (no shift).

    Args:
        logits: (B, L, V) or (N, V), any float dtype.
        labels: (B, L) or (N,) integer class ids, ``ignore_index`` where no loss applies.
        chunk_size: rows processed at a time; None = all at once.
        label_mask: ``labels != ignore_index``, given when it is already at hand on the CPU
            (saves a host sync when the labels live on a GPU); None = computed from labels.

    Returns:
        0-dim float32 sum, equal to ``F.cross_entropy(..., reduction="sum")``.
        Count: :func:`lm_count` ``(labels, ignore_index)``.
    """
    if logits.dim() < 2 or labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels must have the leading shape of logits, got logits {tuple(logits.shape)} "
            f"and labels {tuple(labels.shape)}."
        )
    mask = labels != ignore_index if label_mask is None else label_mask
    return _vocab_loss(logits, labels, _ce_row_loss, loss_factors("ce"), mask, chunk_size)


def clm_ce(logits: Tensor, labels: Tensor, ignore_index: int = -100, chunk_size: int | None = None,
           label_mask: Tensor | None = None) -> Tensor:
    """Causal LM cross-entropy, summed: ``logits[:, :-1]`` predict ``labels[:, 1:]``.

    Args:
        logits: (B, L, V).
        labels: (B, L), ``ignore_index`` where no loss applies (e.g. padding).
        label_mask: (B, L) ``labels != ignore_index`` (unshifted), e.g. on the CPU; see lm_ce.

    Returns:
        0-dim float32 sum. Count: :func:`clm_count` ``(labels, ignore_index)``.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"clm_ce expects logits (B, L, V) and labels (B, L), got {tuple(logits.shape)} "
            f"and {tuple(labels.shape)}."
        )
    # Shift the labels rather than slicing logits[:, :-1], which is non-contiguous and
    # would force a copy of the whole (B, L, V) tensor.
    shifted, shifted_mask = shift_labels(labels, label_mask, ignore_index)
    return lm_ce(logits, shifted, ignore_index=ignore_index, chunk_size=chunk_size, label_mask=shifted_mask)


def logits_mse(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Squared logit difference summed over V and over the selected positions.

    DistilBERT's ``MSELoss(reduction="sum") / n_positions`` without the division.

    Args:
        student_logits: (B, L, V) or (N, V).
        teacher_logits: same shape; no gradient.
        mask: (B, L) or (N,); None = all positions.
        chunk_size: rows processed at a time; None = all at once.

    Returns:
        0-dim float32 sum. Count: :func:`count_positions` ``(mask, student_logits)``.
    """
    _check_pair(student_logits, teacher_logits, "logits")
    return _vocab_loss(student_logits, teacher_logits, _mse_row_loss, loss_factors("mse"), mask, chunk_size)


def shift_labels(labels: Tensor, label_mask: Tensor | None = None, ignore_index: int = -100):
    """Causal LM targets: position i predicts ``labels[:, i + 1]``; the last predicts nothing.

    Returns (shifted labels (B, L), shifted label_mask (B, L) or None), as :func:`clm_ce` uses them.
    """
    shifted = torch.full_like(labels, ignore_index)
    shifted[:, :-1] = labels[:, 1:]
    mask = None
    if label_mask is not None:
        mask = torch.zeros_like(label_mask, dtype=torch.bool)
        mask[:, :-1] = label_mask[:, 1:]
    return shifted, mask
