"""Language-model heads whose vocabulary projection the fused losses can take over:
:func:`output_projection` finds it, :class:`ProjectionInput` runs a model up to it."""

from __future__ import annotations

from torch import Tensor, nn

# Language models whose logits are exactly ``get_output_embeddings()(last hidden)``: nothing (a scale,
# a soft cap) follows the projection, so it may be left to the fused losses.
_PLAIN_HEAD_MODELS = frozenset({"BertForMaskedLM", "DistilBertForMaskedLM", "RobertaForMaskedLM",
                                "GPT2LMHeadModel", "LlamaForCausalLM"})
_WRAPPERS = frozenset({"DistributedDataParallel", "OptimizedModule"})


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while type(model).__name__ in _WRAPPERS:
        model = getattr(model, "module", None) or model._orig_mod
    return model


def _is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(model, FSDPModule)


def output_projection(model: nn.Module) -> nn.Linear | None:
    """The model's vocabulary projection when its logits are that ``nn.Linear`` of its last hidden
    states and nothing else (see ``_PLAIN_HEAD_MODELS``); None otherwise."""
    inner = _unwrap(model)
    name = type(inner).__name__
    if name.startswith("FSDP") and _is_fsdp(inner):  # fully_shard makes the class FSDP<name>(FSDPModule, <name>)
        name = name[len("FSDP"):]
    if name not in _PLAIN_HEAD_MODELS:
        return None
    proj = inner.get_output_embeddings()
    return proj if type(proj) is nn.Linear else None


def _identity(x: Tensor) -> Tensor:
    return x


_ABSENT = object()  # no instance attribute "forward" to restore


class ProjectionInput:
    """A context manager under which ``model(...).logits`` is the input of the model's vocabulary
    projection (B, L, H) rather than the logits, for :func:`projected_vocab_losses` or
    :class:`ProjectedLogits` to apply the projection themselves.

    Entering sets the projection's ``forward`` to the identity as an *instance* attribute, which
    ``nn.Module.__call__`` uses instead of ``Linear.forward`` (the parameters, hooks and every other
    module are untouched); it returns the projection (``weight`` (V, H), ``bias`` (V,) or None).
    Leaving puts back what the instance had before (normally nothing, so ``Linear.forward`` applies
    again), also when the body raised. This object owns that one patch: it cannot be entered again
    until it has been left. Built for a model that :func:`output_projection` does not know, it
    raises ValueError.
    """

    def __init__(self, model: nn.Module):
        proj = output_projection(model)
        if proj is None:
            raise ValueError(f"{type(_unwrap(model)).__name__} has no plain vocabulary projection to defer")
        self.projection = proj
        self._saved = None  # while entered: the instance's own "forward" before, or _ABSENT

    def __enter__(self) -> nn.Linear:
        if self._saved is not None:
            raise RuntimeError("this ProjectionInput is already in use; leave it before entering it again")
        self._saved = self.projection.__dict__.get("forward", _ABSENT)
        self.projection.forward = _identity
        return self.projection

    def __exit__(self, *exc_info) -> bool:
        saved, self._saved = self._saved, None
        if saved is _ABSENT:
            del self.projection.forward
        else:
            self.projection.forward = saved
        return False  # exceptions propagate


def projection_input(model: nn.Module) -> ProjectionInput:
    """``with projection_input(model) as proj:``, see :class:`ProjectionInput`."""
    return ProjectionInput(model)
