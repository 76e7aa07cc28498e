"""MiniLM-style self-attention relation distillation (MiniLMv2), a registered loss term.

For one layer of each model (the student's last, the teacher's ``teacher_layer``, by default its
last), the queries, keys and values of the self-attention are taken from the q/k/v projections
(forward hooks: nothing in the models changes). Each is split into ``R`` relation heads, whatever
the models' own head counts and widths, and each head gives a relation over the sequence:
``softmax(A_h A_h^T / sqrt(d_h))``, one row per query position, padded keys masked out. The loss is
the KL divergence from the teacher's relation rows to the student's. It is averaged over the heads
and summed over the relation types (q-q, k-k, v-v: MiniLMv2's) and over the attended positions,
which are its count. MiniLM's attention-distribution transfer is the q-k relation (``relations =
("qk",)``), when both models have the same number of heads.

Subclass to choose: ``relations``, ``teacher_layer``, ``student_layer``, ``heads``.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.losses.terms import LossTerm, Needs, register

# The q, k, v projections of a layer's self-attention, by family: (module name suffixes), or a fused one.
_QKV = (("query", "key", "value"), ("q_lin", "k_lin", "v_lin"), ("q_proj", "k_proj", "v_proj"))
_FUSED = ("c_attn",)  # GPT-2: one projection to q, k, v side by side
_LAYER = re.compile(r"(?:^|\.)(?:layer|layers|h)\.(\d+)\.")


def _unwrap(model: nn.Module) -> nn.Module:
    while type(model).__name__ in ("DistributedDataParallel", "OptimizedModule"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def qkv_modules(model: nn.Module, layer: int) -> tuple[list[nn.Module], bool]:
    """The q, k, v projection modules of transformer layer ``layer`` (0-based; negative counts from
    the end), and whether they are one fused module."""
    found: dict[int, dict[str, nn.Module]] = {}
    for name, module in _unwrap(model).named_modules():
        m = _LAYER.search(name + ".")
        if m is None:
            continue
        found.setdefault(int(m.group(1)), {})[name.rsplit(".", 1)[-1]] = module
    if not found:
        raise ValueError(f"{type(model).__name__} has no numbered transformer layers")
    index = sorted(found)[layer]
    names = found[index]
    for triple in _QKV:
        if all(n in names for n in triple):
            return [names[n] for n in triple], False
    for fused in _FUSED:
        if fused in names:
            return [names[fused]], True
    raise ValueError(f"no q/k/v projections found in layer {index} of {type(model).__name__}")


class _Capture:
    """Forward hooks keeping the last outputs of a layer's q, k, v projections."""

    def __init__(self, model: nn.Module, layer: int):
        modules, self.fused = qkv_modules(model, layer)
        self.out: list[Tensor | None] = [None] * len(modules)
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules)]

    def _hook(self, i: int):
        def hook(module, inputs, output):
            self.out[i] = output

        return hook

    def qkv(self) -> tuple[Tensor, Tensor, Tensor]:
        if self.fused:
            q, k, v = self.out[0].chunk(3, dim=-1)
            return q, k, v
        return tuple(self.out)  # type: ignore[return-value]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def relation_rows(a: Tensor, b: Tensor, heads: int, key_mask: Tensor) -> Tensor:
    """log softmax(a_h b_h^T / sqrt(d_h)) per relation head: (B, heads, L, L), fp32; keys where
    ``key_mask`` (B, L) is False get -inf."""
    B, L, D = a.shape
    if D % heads or b.shape[-1] % heads:
        raise ValueError(f"{heads} relation heads do not divide widths {D} and {b.shape[-1]}")
    ah = a.float().view(B, L, heads, -1).transpose(1, 2)  # (B, h, L, d)
    bh = b.float().view(B, L, heads, -1).transpose(1, 2)
    scores = ah @ bh.transpose(-1, -2) / math.sqrt(ah.shape[-1])
    scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return F.log_softmax(scores, dim=-1)


def relation_kl(t_rel: Tensor, s_rel: Tensor, key_mask: Tensor) -> Tensor:
    """KL(teacher row || student row) (B, h, L), 0 over masked keys."""
    keep = key_mask[:, None, None, :]
    p = t_rel.exp()
    return torch.where(keep, p * (t_rel - s_rel), torch.zeros((), device=p.device)).sum(-1)


class AttentionRelations(LossTerm):
    name = "attention_relation"
    help = ("MiniLMv2: KL between the teacher's and the student's q-q, k-k and v-v self-attention relations "
            "(teacher's last layer, student's last layer)")
    needs = Needs(teacher_forward=True)
    relations: tuple[str, ...] = ("qq", "kk", "vv")
    teacher_layer: int = -1
    student_layer: int = -1
    heads: int | None = None  # relation heads; None: the largest divisor of every width, at most 12

    def prepare(self, student: nn.Module, teacher: nn.Module | None) -> None:
        self._s = _Capture(student, self.student_layer)
        self._t = _Capture(teacher, self.teacher_layer)

    def check(self, student, teacher):
        if teacher is None:
            return "needs the teacher's attention layers, which a teacher cache does not hold"
        for who, m, layer in (("student", student.model, self.student_layer), ("teacher", teacher.model,
                                                                                 self.teacher_layer)):
            try:
                qkv_modules(m, layer)
            except (ValueError, IndexError) as e:
                return f"cannot find the {who}'s attention projections ({e})"
        return None

    def relation_heads(self, widths: list[int]) -> int:
        if self.heads is not None:
            return self.heads
        return max(h for h in range(1, 13) if all(w % h == 0 for w in widths))

    def compute(self, ctx):
        attn = ctx.batch["attention_mask"].bool()
        sq, sk, sv = self._s.qkv()
        tq, tk, tv = (x.clone() for x in self._t.qkv())  # inference tensors -> ordinary ones
        pick = {"q": (sq, tq), "k": (sk, tk), "v": (sv, tv)}
        total = torch.zeros((), device=attn.device)
        rows = attn  # query positions that count
        for rel in self.relations:
            (sa, ta), (sb, tb) = pick[rel[0]], pick[rel[1]]
            heads = self.relation_heads([sa.shape[-1], sb.shape[-1], ta.shape[-1], tb.shape[-1]])
            kl = relation_kl(relation_rows(ta, tb, heads, attn), relation_rows(sa, sb, heads, attn), attn)
            total = total + kl.mean(1)[rows].sum()  # mean over heads, sum over attended query rows
        return total


register(AttentionRelations)
