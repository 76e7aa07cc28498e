"""The loss terms a run weights, as a registry that a user extends without editing the Distiller.

A term is a :class:`LossTerm`: its name (its weight is ``--alpha_<name>``), what it needs from the
forward passes (:class:`Needs`), how many positions its sum is divided by over a step
(:meth:`LossTerm.count`), and its computation (:meth:`LossTerm.compute`, a sum over those
positions). The Distiller asks the enabled terms for their needs, runs the teacher and the student
once with exactly those outputs, and adds the weighted terms, each divided once per step by its
count summed over micro-batches and ranks.

The built-in terms (``ce``, ``mlm``, ``clm``, ``mse``, ``cos``, ``hidden_mse``) are registered here.
The vocabulary terms among them say which sum of the fused projection-and-loss kernel they are
(:attr:`LossTerm.fused`), so that all of them share one pass over the vocabulary. A user's term is a
subclass registered with :func:`register`, in a file given to ``train.py --plugins my_terms.py`` or
in a package exposing it under the ``distill.loss_terms`` entry point. See docs/plugins.md.
"""

from __future__ import annotations

import abc
import importlib
import importlib.util
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from distill.errors import UserError

ENTRY_POINT_GROUP = "distill.loss_terms"


@dataclass(frozen=True)
class Needs:
    """What a term reads from the step's forward passes."""

    teacher_logits: bool = False  # the teacher's vocabulary logits (or its cached top-k)
    hidden_states: bool = False  # both models' hidden states (the layer map pairs them)
    teacher_forward: bool = False  # the teacher must run (a term reading it through hooks, say)
    student_outputs: tuple[str, ...] = ()  # further model outputs asked for by name, e.g. "attentions"
    teacher_outputs: tuple[str, ...] = ()


@dataclass
class TermContext:
    """One micro-batch's forward passes, as the terms see them.

    ``masks`` are the Distiller's CPU masks (``attn``, ``labels``, ``ce``); ``student``/``teacher``
    the models' outputs (``teacher`` None when a cache stands for it); ``student_logits`` the
    materialised logits when the fused path did not take the vocabulary terms; ``teacher_logits``
    the teacher's (materialised, or :class:`~distill.losses.cached.CachedTargets`).
    """

    cfg: Any
    batch: dict
    masks: dict
    student: Any
    teacher: Any
    student_logits: Tensor | None
    teacher_logits: Any
    teacher_hidden: tuple | None
    layer_map: list[tuple[int, int]] | None
    projection: Any
    divergence: Any
    extra: dict = field(default_factory=dict)


class LossTerm(abc.ABC):
    """A loss term. Subclass it, set the class attributes, implement :meth:`compute`, and
    :func:`register` it (a subclass without ``compute`` cannot be registered)."""

    name: str = ""
    help: str = ""
    objective: str | None = None  # "mlm" or "clm": weighted only under that objective
    fused: str | None = None  # built-in vocabulary terms: their sum in projected_vocab_losses
    needs: Needs = Needs()

    def prepare(self, student, teacher) -> None:
        """Called once by the Distiller with the two modules (``teacher`` None with a teacher cache)
        before any step: a term reading them through forward hooks installs them here."""

    def count(self, masks: dict) -> int:
        """Positions the term's sum covers in one micro-batch (from the CPU masks); by default every
        attended token."""
        return int(masks["attn"].sum())

    @abc.abstractmethod
    def compute(self, ctx: TermContext) -> Tensor:
        """The term's sum over the positions :meth:`count` counts, as a 0-dim float32 tensor."""

    def check(self, student, teacher) -> str | None:
        """Why the term cannot train with these models (a sentence), or None; ``teacher`` is a
        distill.models.LoadedModel, or None for a teacher cache."""
        return None


TERMS: dict[str, LossTerm] = {}


def register(term: LossTerm | type) -> Any:
    """Add a term to the registry; usable as a class decorator. Its name must be a new identifier."""
    obj = term() if isinstance(term, type) else term
    name = obj.name
    if not name or not name.isidentifier():
        raise ValueError(f"a loss term needs a name that is an identifier, got {name!r}")
    if name in TERMS and type(TERMS[name]) is not type(obj):
        raise ValueError(f"a loss term named {name!r} is registered already ({type(TERMS[name]).__name__})")
    TERMS[name] = obj
    return term


def check_needs(term: LossTerm, student, teacher) -> str | None:
    """Why ``term`` cannot run with these models (a sentence), or None. ``student``/``teacher`` are
    distill.models.LoadedModel (``teacher`` None for a teacher cache). Models asked for attention
    weights are switched to eager attention (SDPA computes none); one that cannot be is refused."""
    needs = term.needs
    if teacher is None and (needs.hidden_states or needs.teacher_outputs or needs.teacher_forward):
        return "needs the teacher's outputs, which a teacher cache does not hold"
    for who, loaded, outputs in (("student", student, needs.student_outputs),
                                 ("teacher", teacher, needs.teacher_outputs)):
        if loaded is None or "attentions" not in outputs:
            continue
        model = loaded.model
        if getattr(model.config, "_attn_implementation", "eager") != "eager":
            try:
                model.set_attn_implementation("eager")
            except Exception as e:  # a model with no eager attention
                return (f"needs the {who}'s attention weights, which {type(model).__name__} computes with "
                        f"{model.config._attn_implementation} only ({type(e).__name__})")
    return term.check(student, teacher)


def check_weight(name: str, value: Any) -> float:
    """A term's weight as a float, or a UserError unless it is a finite non-negative number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"the weight of loss term {name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise UserError(f"the weight of loss term {name} must be a finite non-negative number, got {value}")
    return float(value)


def load_plugins(specs: list[str]) -> None:
    """Import each plug-in (a .py file, or a module name) so that its terms register; then the
    modules of the ``distill.loss_terms`` entry points."""
    for spec in specs:
        path = Path(spec)
        if spec.endswith(".py"):
            if not path.is_file():
                raise UserError(f"--plugins {spec} does not exist")
            mod_name = f"distill_plugin_{path.stem}"
            if mod_name in sys.modules:
                continue
            module_spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[mod_name] = module
            try:
                module_spec.loader.exec_module(module)
            except Exception as e:
                del sys.modules[mod_name]
                raise UserError(f"--plugins {spec} failed to load ({type(e).__name__}: {e})") from None
        else:
            try:
                importlib.import_module(spec)
            except ImportError as e:
                raise UserError(f"--plugins {spec} is neither a .py file nor an importable module ({e})") from None
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as e:
            raise UserError(f"the loss-term entry point {ep.name} ({ep.value}) failed to load "
                            f"({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------- the built-in terms


class _SoftTarget(LossTerm):
    name = "ce"
    help = "the soft-target loss: the divergence (default KL) between softmax(logits / T) of teacher and student, x T^2"
    fused = "soft_target_ce"
    needs = Needs(teacher_logits=True)

    def count(self, masks):
        return int(masks["ce"].sum())

    def compute(self, ctx):
        from distill.losses.cached import CachedTargets, cached_soft_target
        from distill.losses.pointwise import soft_target_ce

        if isinstance(ctx.teacher_logits, CachedTargets):
            return cached_soft_target(ctx.student_logits, ctx.teacher_logits, ctx.cfg.temperature,
                                      mask=ctx.masks["ce"], divergence=ctx.divergence)
        return soft_target_ce(ctx.student_logits, ctx.teacher_logits, ctx.cfg.temperature, mask=ctx.masks["ce"],
                              divergence=ctx.divergence)

    def check(self, student, teacher):
        if teacher is not None and teacher.lm_head_initialized:
            return "needs the teacher's LM head"
        return None


class _LogitMSE(_SoftTarget):
    name = "mse"
    help = "the squared error between teacher and student logits, summed over the vocabulary"
    fused = "logits_mse"

    def compute(self, ctx):
        from distill.losses.pointwise import logits_mse

        return logits_mse(ctx.student_logits, ctx.teacher_logits, mask=ctx.masks["ce"])


class _MaskedLM(LossTerm):
    name = "mlm"
    help = "cross-entropy of the student on the masked tokens (with --mlm)"
    objective = "mlm"
    fused = "lm_ce"

    def count(self, masks):
        return int(masks["labels"].sum())

    def compute(self, ctx):
        from distill.losses.pointwise import lm_ce

        return lm_ce(ctx.student_logits, ctx.batch["labels"], label_mask=ctx.masks["labels"])


class _CausalLM(_MaskedLM):
    name = "clm"
    help = "the student's next-token cross-entropy (without --mlm)"
    objective = "clm"

    def count(self, masks):
        return int(masks["labels"][:, 1:].sum())

    def compute(self, ctx):
        from distill.losses.pointwise import clm_ce

        return clm_ce(ctx.student_logits, ctx.batch["labels"], label_mask=ctx.masks["labels"])


class _HiddenCosine(LossTerm):
    name = "cos"
    help = "1 - cos between hidden states, averaged over the layer pairs"
    needs = Needs(hidden_states=True)

    def compute(self, ctx):
        from distill.losses.hidden import multi_layer_cosine

        return multi_layer_cosine(ctx.student.hidden_states, ctx.teacher_hidden, ctx.layer_map, ctx.masks["attn"],
                                  ctx.projection)


class _HiddenMSE(_HiddenCosine):
    name = "hidden_mse"
    help = "squared error between hidden states, mean over the width"

    def compute(self, ctx):
        from distill.losses.hidden import multi_layer_mse

        return multi_layer_mse(ctx.student.hidden_states, ctx.teacher_hidden, ctx.layer_map, ctx.masks["attn"],
                               ctx.projection)


for _term in (_SoftTarget, _MaskedLM, _CausalLM, _LogitMSE, _HiddenCosine, _HiddenMSE):
    register(_term)
BUILTIN = tuple(TERMS)  # ("ce", "mlm", "clm", "mse", "cos", "hidden_mse"): DistilBERT's flags and ours

# The terms shipped as plug-ins: weighted by --alpha_<name> like a user's, registered with the package.
from distill.losses import relations  # noqa: E402,F401  (MiniLM attention relations)
