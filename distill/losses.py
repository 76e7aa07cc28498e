"""Pure loss functions for knowledge distillation.

Conventions shared by every loss here (the Distiller relies on them):

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

import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "soft_target_ce",
    "lm_ce",
    "clm_ce",
    "logits_mse",
    "hidden_cosine",
    "hidden_mse",
    "multi_layer_cosine",
    "multi_layer_mse",
    "count_positions",
    "lm_count",
    "clm_count",
    "default_layer_map",
    "parse_layer_map",
    "HiddenProjection",
]

# Below this selected fraction a mask is applied by gathering the selected rows; above it,
# every row is computed and the unselected ones are zeroed (cheaper than copying most rows).
_GATHER_FRACTION = 0.5
# Norm floor for cosine similarity (same as F.cosine_similarity's default eps).
_COS_EPS = 1e-8


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


# --------------------------------------------------------------------------- hidden states


def _one_minus_cos(s: Tensor, t: Tensor) -> Tensor:
    """1 - cos(s, t) per row of fp32 (n, H) tensors -> (n,)."""
    dot = (s * t).sum(-1)
    # Floor the squared norms before the sqrt: flooring after would make a zero vector's
    # gradient 0/0 = NaN.
    inv = torch.rsqrt(s.square().sum(-1).clamp_min(_COS_EPS**2))
    inv = inv * torch.rsqrt(t.square().sum(-1).clamp_min(_COS_EPS**2))
    return 1.0 - dot * inv


def _sq_err_mean(s: Tensor, t: Tensor) -> Tensor:
    """Mean over H of the squared difference per row -> (n,)."""
    return (s - t).square().mean(-1)


def _hidden_loss(
    student: Tensor,
    teacher: Tensor,
    mask: Tensor | None,
    row_fn: Callable[[Tensor, Tensor], Tensor],
) -> Tensor:
    _check_pair(student, teacher, "hidden states")
    s2 = _flatten(student, "student_hidden")  # (N, H)
    t2 = _flatten(teacher.detach(), "teacher_hidden")
    rows = _select(mask, s2.shape[0], student.shape[:-1], student.device)
    if rows.empty:
        return _connected_zero(student)
    s = _take(s2, rows).float()
    t = _take(t2, rows).float()
    return _reduce(row_fn(s, t), rows)


def hidden_cosine(
    student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor | None = None
) -> Tensor:
    """``sum over selected positions of 1 - cos(s, t)``.

    Equals ``F.cosine_embedding_loss(s, t, target=1, reduction="sum")`` on the selected rows
    (up to the epsilon guarding zero vectors).

    Args:
        student_hidden: (B, L, H) or (N, H); already projected to the teacher width.
        teacher_hidden: same shape; no gradient.
        mask: (B, L) or (N,); None = all positions.

    Returns:
        0-dim float32 sum. Count: :func:`count_positions` ``(mask, student_hidden)``.
    """
    return _hidden_loss(student_hidden, teacher_hidden, mask, _one_minus_cos)


def hidden_mse(
    student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor | None = None
) -> Tensor:
    """``sum over selected positions of mean over H of (s - t)**2``.

    The mean over H (rather than the sum) keeps the scale independent of the model width,
    so one loss weight works for different teacher sizes.

    Args:
        student_hidden: (B, L, H) or (N, H); already projected to the teacher width.
        teacher_hidden: same shape; no gradient.
        mask: (B, L) or (N,); None = all positions.

    Returns:
        0-dim float32 sum. Count: :func:`count_positions` ``(mask, student_hidden)``.
    """
    return _hidden_loss(student_hidden, teacher_hidden, mask, _sq_err_mean)


# --------------------------------------------------------------------------- layer maps


def default_layer_map(n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """Uniform (student_layer, teacher_layer) pairs over hidden-state indices 1..n.

    Index 0 (the embeddings) is excluded. Student layer i maps to teacher layer
    ``round(i * n_teacher / n_student)`` (halves round up, floor 1), and the last student
    layer always maps to the last teacher layer. 3 vs 6 -> [(1, 2), (2, 4), (3, 6)].
    """
    for name, v in (("n_student", n_student), ("n_teacher", n_teacher)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}.")
    # Integer round-half-up of i * n_teacher / n_student (Python's round() is half-even).
    pairs = [
        (i, max(1, (2 * i * n_teacher + n_student) // (2 * n_student)))
        for i in range(1, n_student + 1)
    ]
    pairs[-1] = (n_student, n_teacher)
    return pairs


_PAIR_RE = re.compile(r"^\s*(-?\d+)\s*:\s*(-?\d+)\s*$")


def parse_layer_map(
    text: str, n_student: int | None = None, n_teacher: int | None = None
) -> list[tuple[int, int]]:
    """Parse ``"1:2,2:4,3:6"`` into ``[(1, 2), (2, 4), (3, 6)]``.

    Indices are hidden-state indices (0 = embeddings). When ``n_student`` / ``n_teacher``
    are given, indices above them are rejected. Raises ValueError with a readable message
    for empty text, malformed pairs, negative or out-of-range indices and duplicates.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError('layer map is empty; expected pairs like "1:2,2:4,3:6".')
    pairs: list[tuple[int, int]] = []
    for item in text.split(","):
        m = _PAIR_RE.match(item)
        if m is None:
            raise ValueError(
                f'bad layer map entry {item.strip()!r} in {text!r}; expected '
                f'"student:teacher" integer pairs separated by commas, like "1:2,2:4".'
            )
        s, t = int(m.group(1)), int(m.group(2))
        if s < 0 or t < 0:
            raise ValueError(f"layer indices must be >= 0, got {s}:{t} in {text!r}.")
        if n_student is not None and s > n_student:
            raise ValueError(
                f"student layer {s} in {text!r} is out of range; the student has {n_student} layers."
            )
        if n_teacher is not None and t > n_teacher:
            raise ValueError(
                f"teacher layer {t} in {text!r} is out of range; the teacher has {n_teacher} layers."
            )
        if (s, t) in pairs:
            raise ValueError(f"layer pair {s}:{t} appears twice in {text!r}.")
        pairs.append((s, t))
    return pairs


# --------------------------------------------------------------------------- projection


class HiddenProjection(nn.Module):
    """Learned linear maps from student width to teacher width, one per layer pair.

    With equal widths and ``force=False`` every map is the identity (no parameters). With
    ``force=True`` and equal widths the maps are Linear layers initialised to the identity;
    with unequal widths they are Linear layers with the default init.
    """

    def __init__(self, student_dim: int, teacher_dim: int, n_pairs: int, force: bool = False):
        super().__init__()
        if student_dim < 1 or teacher_dim < 1 or n_pairs < 1:
            raise ValueError(
                f"HiddenProjection needs positive sizes, got student_dim={student_dim}, "
                f"teacher_dim={teacher_dim}, n_pairs={n_pairs}."
            )
        self.student_dim = student_dim
        self.teacher_dim = teacher_dim
        self.n_pairs = n_pairs
        self.is_identity = student_dim == teacher_dim and not force
        layers: list[nn.Module] = []
        for _ in range(n_pairs):
            if self.is_identity:
                layers.append(nn.Identity())
                continue
            lin = nn.Linear(student_dim, teacher_dim)
            if student_dim == teacher_dim:
                with torch.no_grad():
                    lin.weight.copy_(torch.eye(student_dim))
                    lin.bias.zero_()
            layers.append(lin)
        self.maps = nn.ModuleList(layers)

    def forward(self, student_hidden_list: Sequence[Tensor]) -> list[Tensor]:
        """Map each (..., student_dim) tensor to (..., teacher_dim); one tensor per pair."""
        if len(student_hidden_list) != self.n_pairs:
            raise ValueError(
                f"HiddenProjection was built for {self.n_pairs} layer pairs but got "
                f"{len(student_hidden_list)} hidden states."
            )
        out = []
        for layer, h in zip(self.maps, student_hidden_list):
            if isinstance(layer, nn.Linear):
                h = layer(h.to(layer.weight.dtype))  # match the parameters' dtype
            out.append(h)
        return out


# --------------------------------------------------------------------------- multi-layer


def _multi_layer(
    student_hiddens: Sequence[Tensor],
    teacher_hiddens: Sequence[Tensor],
    layer_map: Sequence[tuple[int, int]],
    mask: Tensor | None,
    projection: HiddenProjection | None,
    row_fn: Callable[[Tensor, Tensor], Tensor],
) -> Tensor:
    if len(layer_map) == 0:
        raise ValueError("layer_map is empty; give at least one (student, teacher) pair.")
    for s_i, t_i in layer_map:
        if not 0 <= s_i < len(student_hiddens):
            raise ValueError(
                f"student layer {s_i} is out of range: the student gave {len(student_hiddens)} "
                f"hidden states (indices 0..{len(student_hiddens) - 1})."
            )
        if not 0 <= t_i < len(teacher_hiddens):
            raise ValueError(
                f"teacher layer {t_i} is out of range: the teacher gave {len(teacher_hiddens)} "
                f"hidden states (indices 0..{len(teacher_hiddens) - 1})."
            )
    students = [student_hiddens[s_i] for s_i, _ in layer_map]
    teachers = [teacher_hiddens[t_i] for _, t_i in layer_map]
    lead = students[0].shape[:-1]
    for (s_i, t_i), s, t in zip(layer_map, students, teachers):
        if s.shape[:-1] != lead or t.shape[:-1] != lead:
            raise ValueError(
                f"hidden states for pair {s_i}:{t_i} have shapes {tuple(s.shape)} and "
                f"{tuple(t.shape)}; all must share the leading shape {tuple(lead)}."
            )
        if projection is None and s.shape[-1] != t.shape[-1]:
            raise ValueError(
                f"student width {s.shape[-1]} differs from teacher width {t.shape[-1]} "
                f"(pair {s_i}:{t_i}); pass a HiddenProjection to map between them."
            )
    if projection is not None:
        s_w, t_w = students[0].shape[-1], teachers[0].shape[-1]
        if projection.n_pairs != len(layer_map) or (projection.student_dim, projection.teacher_dim) != (
            s_w,
            t_w,
        ):
            raise ValueError(
                f"projection maps {projection.n_pairs} pairs {projection.student_dim}->"
                f"{projection.teacher_dim}, but the layer map has {len(layer_map)} pairs "
                f"{s_w}->{t_w}."
            )

    n = students[0].numel() // students[0].shape[-1]
    rows = _select(mask, n, lead, students[0].device)
    if rows.empty:
        params = list(projection.parameters()) if projection is not None else []
        # Reach the projection too, so every trainable parameter sees a (zero) gradient.
        return _connected_zero(*students, *params)
    # Gather before projecting: the projection is position-wise, so this saves work.
    s_rows = [_take(s.reshape(n, s.shape[-1]), rows) for s in students]  # P x (K, Hs)
    if projection is not None:
        s_rows = projection(s_rows)  # P x (K, Ht)
    acc = None
    for s, t in zip(s_rows, teachers):
        t = _take(t.detach().reshape(n, t.shape[-1]), rows)
        row = row_fn(s.float(), t.float())  # (K,)
        acc = row if acc is None else acc + row
    # Mean over pairs: each position counts once however many layers are matched.
    return _reduce(acc / len(layer_map), rows)


def multi_layer_cosine(
    student_hiddens: Sequence[Tensor],
    teacher_hiddens: Sequence[Tensor],
    layer_map: Sequence[tuple[int, int]],
    mask: Tensor | None = None,
    projection: HiddenProjection | None = None,
) -> Tensor:
    """Sum over positions of the mean over layer pairs of ``1 - cos(proj(s_i), t_j)``.

    Args:
        student_hiddens: tuple of (B, L, Hs), e.g. ``output_hidden_states`` (0 = embeddings).
        teacher_hiddens: tuple of (B, L, Ht); no gradient.
        layer_map: (student_index, teacher_index) pairs into those tuples.
        mask: (B, L); None = all positions.
        projection: required when Hs != Ht; one map per pair, in layer_map order.

    Returns:
        0-dim float32 sum. Count: :func:`count_positions` ``(mask, student_hiddens[0])``
        (each position once, regardless of the number of pairs).

    Raises:
        ValueError: widths differ without a projection, or a layer index is out of range.
    """
    return _multi_layer(student_hiddens, teacher_hiddens, layer_map, mask, projection, _one_minus_cos)


def multi_layer_mse(
    student_hiddens: Sequence[Tensor],
    teacher_hiddens: Sequence[Tensor],
    layer_map: Sequence[tuple[int, int]],
    mask: Tensor | None = None,
    projection: HiddenProjection | None = None,
) -> Tensor:
    """Sum over positions of the mean over layer pairs of :func:`hidden_mse`'s row term.

    Same arguments, count and errors as :func:`multi_layer_cosine`; the per-position term is
    ``mean over Ht of (proj(s_i) - t_j)**2``.
    """
    return _multi_layer(student_hiddens, teacher_hiddens, layer_map, mask, projection, _sq_err_mean)
