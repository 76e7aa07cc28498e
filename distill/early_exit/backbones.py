"""The encoder families that take exit heads, and how to run one of them a layer at a time.

A family says where the encoder's layers are, how its embeddings are called, and what its own
classifier computes from the last layer's [CLS] vector. Every sequence classifier here reads only
that vector (BERT: pooler -> dropout -> linear; DistilBERT: pre-classifier -> ReLU -> dropout ->
linear; RoBERTa: dense -> tanh -> linear on position 0), so an exit, the final classifier and the
cached features of stage 2 all work on ``(B, H)`` [CLS] vectors.

Adding a family is one entry in :data:`FAMILIES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from distill.errors import UserError


@dataclass(frozen=True)
class Family:
    name: str
    base: str  # attribute of the classifier that holds the encoder
    layers: Callable[[nn.Module], nn.ModuleList]  # encoder -> its layers
    final_head: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (classifier, cls (B, H)) -> logits (B, C)
    pooler: Callable[[nn.Module], nn.Module | None]  # the encoder's pooler (dense + tanh), if it has one
    token_types: bool  # the embeddings take token_type_ids


def _bert_head(model: nn.Module, cls: torch.Tensor) -> torch.Tensor:
    pooled = model.bert.pooler.activation(model.bert.pooler.dense(cls))
    return model.classifier(model.dropout(pooled))


def _distilbert_head(model: nn.Module, cls: torch.Tensor) -> torch.Tensor:
    return model.classifier(model.dropout(torch.relu(model.pre_classifier(cls))))


def _roberta_head(model: nn.Module, cls: torch.Tensor) -> torch.Tensor:
    return model.classifier(cls[:, None, :])  # RobertaClassificationHead reads position 0 itself


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("bert", "bert", lambda enc: enc.encoder.layer, _bert_head, lambda enc: enc.pooler, True),
        Family("distilbert", "distilbert", lambda enc: enc.transformer.layer, _distilbert_head, lambda enc: None,
               False),
        Family("roberta", "roberta", lambda enc: enc.encoder.layer, _roberta_head, lambda enc: enc.pooler, True),
    )
}


def family_of(model: nn.Module) -> Family:
    """The family of a sequence classifier; a UserError for a model without exit support."""
    model_type = getattr(model.config, "model_type", None)
    fam = FAMILIES.get(model_type)
    if fam is None or not hasattr(model, fam.base):
        raise UserError(f"early exit supports {', '.join(FAMILIES)} sequence classifiers, not "
                        f"{type(model).__name__} (model type {model_type!r})")
    return fam


class LayerRunner:
    """Runs a classifier's encoder one layer at a time, exactly as its own forward does."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.family = family_of(model)
        self.encoder = getattr(model, self.family.base)
        self.layers = self.family.layers(self.encoder)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        """(B, L) ids -> (B, L, H) embeddings."""
        if self.family.token_types:
            return self.encoder.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        return self.encoder.embeddings(input_ids)

    def mask(self, attention_mask: torch.Tensor, hidden: torch.Tensor):
        """The mask the layers take, built as the encoder's own forward builds it (None: no padding)."""
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(config=self.encoder.config, inputs_embeds=hidden,
                                         attention_mask=attention_mask)

    def layer(self, i: int, hidden: torch.Tensor, mask) -> torch.Tensor:
        """Layer ``i`` (0-based) on (B, L, H) hidden states."""
        return self.layers[i](hidden, mask)

    def final_logits(self, cls: torch.Tensor) -> torch.Tensor:
        """The model's own classifier on the last layer's [CLS] vectors (B, H) -> (B, C)."""
        return self.family.final_head(self.model, cls)

    def pooler(self) -> nn.Module | None:
        return self.family.pooler(self.encoder)
