"""Loss functions for knowledge distillation, as one namespace (``from distill import losses as L``).

* :mod:`.pointwise`: losses on materialised tensors (soft-target CE, LM/CLM CE, logit MSE), their
  counts, and the row-selection helpers the package shares.
* :mod:`.hidden`: hidden-state losses, layer maps and :class:`HiddenProjection`.
* :mod:`.fused`: :func:`projected_vocab_losses`, the vocabulary projection fused with the losses, and
  :class:`ProjectedLogits`.
* :mod:`.heads`: which models' logits are a plain projection (:func:`output_projection`), and
  :class:`ProjectionInput` to run a model up to it.
* :mod:`.kernels`: the per-block loss math both vocabulary paths share, and :class:`Workspace`.
* :mod:`.divergences`: the soft-target divergences beyond forward KL.
* :mod:`.cached`: soft targets from a teacher cache (top-k and a tail bucket), :class:`CachedTargets`.
* :mod:`.ensemble`: several teachers combined as one, :class:`TeacherEnsemble`.
"""

from distill.losses.cached import CachedTargets, cached_soft_target
from distill.losses.ensemble import TeacherEnsemble
from distill.losses.fused import ProjectedLogits, projected_vocab_losses
from distill.losses.heads import ProjectionInput, output_projection, projection_input
from distill.losses.hidden import (
    HiddenProjection,
    default_layer_map,
    hidden_cosine,
    hidden_mse,
    multi_layer_cosine,
    multi_layer_mse,
    parse_layer_map,
)
from distill.losses.kernels import Workspace
from distill.losses.pointwise import (
    clm_ce,
    clm_count,
    count_positions,
    lm_ce,
    lm_count,
    logits_mse,
    shift_labels,
    soft_target_ce,
)

__all__ = [
    "soft_target_ce",
    "cached_soft_target",
    "CachedTargets",
    "TeacherEnsemble",
    "lm_ce",
    "clm_ce",
    "logits_mse",
    "projected_vocab_losses",
    "ProjectedLogits",
    "output_projection",
    "projection_input",
    "shift_labels",
    "ProjectionInput",
    "Workspace",
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
