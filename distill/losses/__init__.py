"""Loss functions for knowledge distillation, as one namespace (``from distill import losses as L``).

* :mod:`.pointwise`: losses on materialised tensors (soft-target CE, LM/CLM CE, logit MSE), their
  counts, and the row-selection helpers the package shares.
* :mod:`.hidden`: hidden-state losses, layer maps and :class:`HiddenProjection`.
* :mod:`.fused`: :func:`projected_vocab_losses`, the vocabulary projection fused with the losses.
"""

from distill.losses.fused import (
    ProjectedLogits,
    clear_workspace,
    output_projection,
    projected_vocab_losses,
    projection_input,
    use_compiled_kernels,
)
from distill.losses.hidden import (
    HiddenProjection,
    default_layer_map,
    hidden_cosine,
    hidden_mse,
    multi_layer_cosine,
    multi_layer_mse,
    parse_layer_map,
)
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
    "lm_ce",
    "clm_ce",
    "logits_mse",
    "projected_vocab_losses",
    "ProjectedLogits",
    "output_projection",
    "projection_input",
    "shift_labels",
    "clear_workspace",
    "use_compiled_kernels",
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
