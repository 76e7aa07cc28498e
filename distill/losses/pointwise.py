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
:func:`logits_mse`) compute their gradient analytically during the forward pass, chunk by
chunk, and keep only that gradient (in the student's dtype) for backward. The float32
``(N, V)`` temporaries therefore live for one chunk at a time instead of being saved by
autograd. They do not support double backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

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


# --------------------------------------------------------------------------- fused vocab losses

# A row kernel takes a float32 chunk of student rows that it may overwrite (n, V), the
# matching target rows, and whether a gradient is wanted; it returns the per-row loss (n,)
# and d(loss)/d(student rows) (n, V) or None.
_RowKernel = Callable[[Tensor, Tensor, bool], "tuple[Tensor, Tensor | None]"]


class _FusedRowLoss(torch.autograd.Function):
    """Sum of a per-row loss whose gradient the kernel computes in the forward pass."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        student: Tensor,
        target: Tensor,
        kernel: _RowKernel,
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

        step = span if not chunk_size or chunk_size <= 0 else int(chunk_size)
        for start in range(0, span, step):
            stop = min(start + step, span)
            if rows.index is not None:
                ix = rows.index[start:stop]
                # index_select copies, so the kernel may overwrite s even when fp32.
                s = s2.index_select(0, ix).to(torch.float32)
                t = t2.index_select(0, ix)
            else:
                # copy=True: the kernel overwrites its input and s2 may already be fp32.
                s = s2[start:stop].to(torch.float32, copy=True)
                t = t2[start:stop]
            row_loss, g = kernel(s, t, need_grad)  # (n,), (n, V)
            if rows.keep is not None:
                k = rows.keep[start:stop]
                row_loss = torch.where(k, row_loss, torch.zeros((), device=row_loss.device))
                if g is not None:
                    g.masked_fill_(~k.unsqueeze(1), 0.0)
            total += row_loss.sum()
            if grad is not None:
                grad[start:stop] = g
        if grad is not None:
            if rows.index is not None:
                ctx.save_for_backward(grad, rows.index)
            else:
                ctx.save_for_backward(grad)
        ctx.student_shape = student.shape
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        grad, *index = ctx.saved_tensors
        # Out of place so that a retained graph can be backpropagated again.
        g = grad * grad_out.to(grad.dtype)
        if index:
            full = grad.new_zeros((ctx.student_shape.numel() // grad.shape[1], grad.shape[1]))
            g = full.index_copy_(0, index[0], g)
        return g.reshape(ctx.student_shape), None, None, None, None, None


def _fused(
    student: Tensor,
    target: Tensor,
    kernel: _RowKernel,
    mask: Tensor | None,
    chunk_size: int | None,
) -> Tensor:
    n = student.numel() // student.shape[-1] if student.shape[-1] else 0
    rows = _select(mask, n, student.shape[:-1], student.device)
    if rows.empty:
        return _connected_zero(student)
    need_grad = torch.is_grad_enabled() and student.requires_grad
    return _FusedRowLoss.apply(student, target.detach(), kernel, rows, chunk_size, need_grad)


def _kl_kernel(temperature: float) -> _RowKernel:
    t_sq = float(temperature) ** 2

    def kernel(s: Tensor, t: Tensor, need_grad: bool) -> tuple[Tensor, Tensor | None]:
        if temperature != 1.0:
            s.div_(temperature)
        log_ps = s.log_softmax(-1)  # (n, V)
        del s
        log_pt = t.to(torch.float32, copy=True)  # (n, V)
        if temperature != 1.0:
            log_pt.div_(temperature)
        log_pt = log_pt.log_softmax(-1)
        p_t = log_pt.exp()  # (n, V)
        terms = log_pt.sub_(log_ps).mul_(p_t)  # p_t * (log p_t - log p_s)
        # 0 * log 0 = 0 (as in xlogy); otherwise a -inf teacher logit would give NaN.
        terms.masked_fill_(p_t == 0, 0.0)
        row = terms.sum(-1).mul_(t_sq)  # (n,)
        del terms
        g = None
        if need_grad:
            # d/ds [T^2 KL(p_t || softmax(s/T))] = T (p_s - p_t)
            g = log_ps.exp_().sub_(p_t).mul_(float(temperature))
        return row, g

    return kernel


def _ce_kernel(s: Tensor, labels: Tensor, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    # Ignored rows are zeroed by the caller; clamp so gather stays in range for them.
    y = labels.clamp_min(0).unsqueeze(1)  # (n, 1)
    lse = torch.logsumexp(s, -1)  # (n,)
    row = lse - s.gather(1, y).squeeze(1)
    g = None
    if need_grad:
        # d/ds CE = softmax(s) - onehot(y)
        g = s.sub_(lse.unsqueeze(1)).exp_()
        g.scatter_add_(1, y, torch.full_like(y, -1.0, dtype=g.dtype))
    return row, g


def _mse_kernel(s: Tensor, t: Tensor, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    d = s.sub_(t.to(torch.float32))  # (n, V)
    row = d.square().sum(-1)
    return row, (d.mul_(2.0) if need_grad else None)


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
) -> Tensor:
    """Temperature-scaled distillation loss, summed over the selected positions.

    Returns ``T**2 * sum_positions KL(p_t || p_s)`` with ``p = softmax(logits / T)``: the
    DistilBERT soft-target loss (``KLDivLoss(reduction="batchmean") * T**2``) before its
    division by the number of positions.

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
    return _fused(student_logits, teacher_logits, _kl_kernel(float(temperature)), mask, chunk_size)


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
    return _fused(logits, labels, _ce_kernel, mask, chunk_size)


def clm_ce(
    logits: Tensor,
    labels: Tensor,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    label_mask: Tensor | None = None,
) -> Tensor:
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
    shifted = torch.full_like(labels, ignore_index)  # (B, L); last position predicts nothing
    shifted[:, :-1] = labels[:, 1:]
    shifted_mask = None
    if label_mask is not None:
        shifted_mask = torch.zeros_like(label_mask, dtype=torch.bool)
        shifted_mask[:, :-1] = label_mask[:, 1:]
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
    return _fused(student_logits, teacher_logits, _mse_kernel, mask, chunk_size)


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
