"""Hidden-state losses (cosine, MSE), layer maps and the student-to-teacher width projection."""

from __future__ import annotations

import re
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from distill.losses.pointwise import _check_pair, _connected_zero, _flatten, _reduce, _select, _take

# Norm floor for cosine similarity (same as F.cosine_similarity's default eps).
_COS_EPS = 1e-8


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
    so one loss weight works for different teacher sizes. Arguments (``student_hidden``
    (B, L, H) or (N, H), ``teacher_hidden`` the same shape, ``mask`` (B, L) or (N,)), result
    and count as :func:`hidden_cosine`.
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


def multi_layer_mse(student_hiddens: Sequence[Tensor], teacher_hiddens: Sequence[Tensor],
                    layer_map: Sequence[tuple[int, int]], mask: Tensor | None = None,
                    projection: HiddenProjection | None = None) -> Tensor:
    """Sum over positions of the mean over layer pairs of :func:`hidden_mse`'s row term.

    Same arguments, count and errors as :func:`multi_layer_cosine`; the per-position term is
    ``mean over Ht of (proj(s_i) - t_j)**2``.
    """
    return _multi_layer(student_hiddens, teacher_hiddens, layer_map, mask, projection, _sq_err_mean)
