"""How close a student's sentence embeddings are to its teacher's, on text neither was trained on.

all-MiniLM-L6-v2 (the demo's teacher) is a sentence encoder: its product is the mean of its last
hidden states over a sentence's tokens. A student distilled from its hidden states should give
nearly the same vectors; a student only extracted from its layers does not. The figure here is the
mean, over sentences, of the cosine between the student's and the teacher's mean-pooled embeddings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from distill.hf import quiet_transformers


def mean_pooled(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L, H) hidden states, (B, L) mask -> (B, H) mean over the attended positions (fp32)."""
    m = attention_mask.to(torch.float32).unsqueeze(-1)  # (B, L, 1)
    return (hidden.float() * m).sum(1) / m.sum(1).clamp_min(1.0)


@torch.inference_mode()
def sentence_embeddings(model: torch.nn.Module, tokenizer, sentences: Sequence[str], max_length: int = 128,
                        batch_size: int = 64) -> torch.Tensor:
    """(N, H) mean-pooled last hidden states of ``model`` (a base model or one with a head)."""
    model.eval()
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(list(sentences[i:i + batch_size]), padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        res = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], output_hidden_states=True)
        out.append(mean_pooled(res.hidden_states[-1], enc["attention_mask"]))
    return torch.cat(out)


def embedding_similarity(teacher_dir: str | Path, student_dirs: dict[str, str | Path], sentences: Sequence[str],
                         max_length: int = 128) -> dict[str, float]:
    """Mean cosine between each student's sentence embeddings and the teacher's, by student name.

    Every folder is loaded with ``AutoModel`` (a student saved with an MLM head loads its encoder);
    all use the teacher's tokenizer, which is what the students were extracted and distilled with.
    """
    from transformers import AutoTokenizer

    if not sentences:
        raise ValueError("no sentences to embed")
    tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    with quiet_transformers(progress_bars=True):  # the MLM head a student has and AutoModel drops is expected
        teacher = sentence_embeddings(_load_encoder(teacher_dir), tokenizer, sentences, max_length)
        result = {}
        for name, folder in student_dirs.items():
            emb = sentence_embeddings(_load_encoder(folder), tokenizer, sentences, max_length)
            result[name] = float(torch.nn.functional.cosine_similarity(emb, teacher, dim=-1).mean())
    return result


def _load_encoder(folder: str | Path) -> torch.nn.Module:
    from transformers import AutoModel

    model, info = AutoModel.from_pretrained(str(folder), output_loading_info=True)
    # newly initialised weights would give a meaningless figure (a pooler is not used here)
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith("pooler."))
    if missing:
        raise ValueError(f"{folder}: the encoder's weights {missing[:3]} are missing")
    return model
