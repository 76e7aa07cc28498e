"""Sentence-embedding similarity of students to their teacher (the demo's held-out measure)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (AutoTokenizer, BertConfig, BertForMaskedLM, BertModel, DistilBertConfig,
                          DistilBertForMaskedLM)

from distill.demo.similarity import embedding_similarity, mean_pooled

from .conftest import prose_words

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64)


def test_mean_pooling_by_hand():
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 6.0], [0.0, 0.0], [0.0, 0.0]]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(mean_pooled(h, m), torch.tensor([[2.0, 3.0], [5.0, 6.0]]))
    assert mean_pooled(h.bfloat16(), m).dtype == torch.float32


@pytest.fixture(scope="module")
def models(tmp_path_factory, bert_tok_dir):
    root = tmp_path_factory.mktemp("sim")
    V = len(AutoTokenizer.from_pretrained(bert_tok_dir))
    torch.manual_seed(0)
    teacher = BertModel(BertConfig(vocab_size=V, **TINY))
    teacher.save_pretrained(root / "teacher")
    AutoTokenizer.from_pretrained(bert_tok_dir).save_pretrained(root / "teacher")
    same = BertForMaskedLM(BertConfig(vocab_size=V, **TINY))  # the teacher's encoder under an MLM head
    same.bert.load_state_dict(teacher.state_dict(), strict=False)
    same.save_pretrained(root / "same")
    torch.manual_seed(1)
    DistilBertForMaskedLM(DistilBertConfig(vocab_size=V, dim=32, n_layers=1, n_heads=4, hidden_dim=64,
                                           max_position_embeddings=64)).save_pretrained(root / "other")
    broken = root / "broken"  # its config asks for a layer its weights do not have
    teacher.save_pretrained(broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (broken / "config.json").write_text(json.dumps(cfg))
    return root


def test_the_teachers_own_encoder_scores_one_and_another_less(models):
    sentences = [" ".join(prose_words()[i:i + 6]) for i in range(0, 60, 6)]
    cos = embedding_similarity(models / "teacher", {"same": models / "same", "other": models / "other"}, sentences)
    assert cos["same"] == pytest.approx(1.0, abs=1e-5)
    assert -1.0 <= cos["other"] < 0.99


def test_missing_weights_are_refused(models):
    with pytest.raises(ValueError, match="missing"):
        embedding_similarity(models / "teacher", {"broken": models / "broken"}, ["a few words"])
    with pytest.raises(ValueError, match="no sentences"):
        embedding_similarity(models / "teacher", {"same": models / "same"}, [])
