"""Several teachers as one, for the soft-target losses: :class:`TeacherEnsemble`.

The teachers' logits ``z_i`` (materialised, or uncomputed :class:`~distill.losses.fused.ProjectedLogits`)
and their weights ``w_i`` (summing to 1) are combined, a block of rows at a time, into the logits of
one teacher, ``z``, which every soft-target loss then reads as it reads a single teacher's:

* ``combine="probs"``: the weighted average of the teachers' distributions at temperature T,
  ``softmax(z / T) = sum_i w_i softmax(z_i / T)``, with ``z = T log sum_i w_i softmax(z_i / T)``
  (a log-sum-exp over the teachers, so nothing underflows);
* ``combine="logits"``: the weighted average of the logits, ``z = sum_i w_i z_i`` (the normalised
  weighted geometric mean of the distributions). The logit-MSE loss needs logits, so it takes this one.

No (B, L, V) tensor is built on the fused path: each chunk of rows is projected per teacher into a
reused block and combined there. The teachers receive no gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

COMBINE = ("probs", "logits")


@dataclass
class TeacherEnsemble:
    """Teachers' logits ``members`` (each (B, L, V) / (N, V), or ProjectedLogits of that shape) with
    ``weights`` summing to 1, combined by ``combine`` at ``temperature``."""

    members: list
    weights: tuple[float, ...]
    combine: str = "probs"
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.combine not in COMBINE:
            raise ValueError(f"combine must be one of {COMBINE}, got {self.combine!r}")
        if len(self.members) != len(self.weights) or not self.members:
            raise ValueError(f"{len(self.members)} teachers but {len(self.weights)} weights")
        if any(not (w > 0 and math.isfinite(w)) for w in self.weights) or abs(sum(self.weights) - 1) > 1e-6:
            raise ValueError(f"the teachers' weights must be positive and sum to 1, got {self.weights}")
        shapes = {tuple(m.shape) for m in self.members}
        if len(shapes) != 1:
            raise ValueError(f"the teachers' logits differ in shape: {sorted(shapes)}")

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.members[0].shape)

    def combine_blocks(self, blocks: list[Tensor], scale: float = 1.0) -> Tensor:
        """``scale * z`` (n, V) in float32 from the teachers' blocks ``scale * z_i`` (any float dtype,
        finite)."""
        if self.combine == "logits":
            out = blocks[0].float() * self.weights[0]
            for w, b in zip(self.weights[1:], blocks[1:]):
                out.add_(b.float(), alpha=w)
            return out
        c = scale * self.temperature  # block / c = z_i / T
        out = None
        for w, b in zip(self.weights, blocks):
            lp = torch.log_softmax(b.float() / c, dim=-1).add_(math.log(w))
            out = lp if out is None else torch.logaddexp(out, lp, out=out)
        return out.mul_(c)

    def materialize(self) -> Tensor:
        """The combined logits ``z``, float32, the members' shape."""
        blocks = [m.materialize() if hasattr(m, "materialize") else m for m in self.members]
        return self.combine_blocks(blocks)


def normalised_weights(weights: list[float] | None, n: int) -> tuple[float, ...]:
    """``n`` teachers' weights summing to 1: equal when ``weights`` is None."""
    if weights is None:
        return (1.0 / n,) * n
    total = float(sum(weights))
    return tuple(float(w) / total for w in weights)
