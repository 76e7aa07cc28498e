"""A loss term of your own, outside the package: ``train.py --plugins examples/embedding_cosine.py
--alpha_embedding_cosine 1.0 ...`` (see docs/plugins.md).

1 - cos between the mean-pooled last hidden states of student and teacher: the sentence embedding a
model like all-MiniLM-L6-v2 is used for, matched directly.
"""

import torch.nn.functional as F

from distill.losses.terms import LossTerm, Needs, register


@register
class EmbeddingCosine(LossTerm):
    name = "embedding_cosine"
    help = "1 - cos between the mean-pooled last hidden states of student and teacher"
    needs = Needs(hidden_states=True)

    def count(self, masks):
        return masks["attn"].shape[0]  # the sum is over sequences: one each

    def compute(self, ctx):
        attn = ctx.batch["attention_mask"].unsqueeze(-1).float()  # (B, L, 1)
        s = (ctx.student.hidden_states[-1].float() * attn).sum(1) / attn.sum(1)  # (B, H)
        t = (ctx.teacher_hidden[-1].float() * attn).sum(1) / attn.sum(1)
        return (1 - F.cosine_similarity(s, t, dim=-1)).sum()

    def check(self, student, teacher):
        if student.model.config.hidden_size != teacher.model.config.hidden_size:
            return "compares hidden states of one width, and these differ"
        return None
