"""A tiny world on the README's path, built offline in seconds: a word-level tokenizer over a small
corpus, a 4-layer teacher with dropout on, the corpus binarized with the teacher's tokenizer, token
counts, and a student extracted from the teacher with scripts/extract.py's code.

The reproducibility tests and ``benchmarks/faults.py`` train on it through ``train.py`` itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CORPUS = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "prose.txt"


@dataclass
class TinyRun:
    """The inputs of one objective's training run (every path is the user's: a run must not touch them)."""

    kind: str  # "mlm" or "clm"
    teacher: Path
    data: Path
    counts: Path
    student: Path
    student_type: str
    teacher_type: str

    def inputs(self) -> list[Path]:
        return [self.teacher, self.data, self.counts, self.student]

    def train_args(self, dump: Path, *extra: str, max_steps: int = 10, interval: int = 4, seed: int = 7) -> list[str]:
        """train.py's flags: the README's command on the tiny world, 2 micro-batches of 2 a step."""
        args = ["--dump_path", str(dump), "--data_file", str(self.data), "--student_type", self.student_type,
                "--student_pretrained_weights", str(self.student), "--teacher_type", self.teacher_type,
                "--teacher_name", str(self.teacher), "--batch_size", "2", "--gradient_accumulation_steps", "2",
                "--max_steps", str(max_steps), "--checkpoint_interval", str(interval), "--log_interval", "1",
                "--max_model_input_size", "64", "--learning_rate", "1e-3", "--warmup_prop", "0.1",
                "--seed", str(seed), "--alpha_ce", "1.0", "--alpha_cos", "1.0"]
        if self.kind == "mlm":
            args += ["--mlm", "--alpha_mlm", "1.0", "--token_counts", str(self.counts)]
        else:
            args += ["--alpha_clm", "1.0"]
        return args + list(extra)


def corpus_words(text: str) -> list[str]:
    return sorted(set(re.findall(r"\w+|[^\w\s]", text.lower())))


def bert_tokenizer(folder: Path, words: list[str]) -> Path:
    """A WordPiece BERT tokenizer over ``words``, saved so that AutoTokenizer loads it."""
    from transformers import BertTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + [w for w in words if w not in SPECIALS])}
    BertTokenizerFast(vocab=vocab).save_pretrained(folder)
    return folder


def gpt2_style_tokenizer(folder: Path, words: list[str]) -> Path:
    """A lower-casing word-level tokenizer with only bos/eos (like GPT-2's <|endoftext|>)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<|endoftext|>", "<unk>"] + words
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.normalizer = normalizers.Lowercase()
    PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            unk_token="<unk>").save_pretrained(folder)
    return folder


# A ChatML template (SmolLM2's layout, without its default system prompt); the second one marks the
# assistant's output, end-of-turn token included, for transformers' return_assistant_tokens_mask.
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CHATML_MARKED = ("{% for message in messages %}{% if message['role'] == 'assistant' %}"
                 "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}"
                 "{% endgeneration %}{{ '\\n' }}{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + "
                 "message['content'] + '<|im_end|>' + '\\n' }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def chat_tokenizer(folder: Path, words: list[str], template: str = CHATML) -> Path:
    """The word-level tokenizer of :func:`gpt2_style_tokenizer` with ChatML's special tokens and a chat
    template; bos and eos are <|endoftext|>, as in SmolLM2."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    roles = [r for r in ("system", "user", "assistant") if r not in words]
    vocab = ["<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>"] + roles + list(words)
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.normalizer = normalizers.Lowercase()
    core.add_special_tokens([AddedToken(t, special=True) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  unk_token="<unk>")
    tok.chat_template = template
    tok.save_pretrained(folder)
    return folder


def chat_rows(text: str, turns: int = 2) -> list[dict]:
    """Multi-turn conversations from a text, one sentence a turn: the user says a sentence, the
    assistant answers with the next one, ``turns`` times per conversation."""
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
    rows = []
    for i in range(0, len(sentences) - 2 * turns, 2 * turns):
        msgs = []
        for t in range(turns):
            msgs.append({"role": "user", "content": sentences[i + 2 * t]})
            msgs.append({"role": "assistant", "content": sentences[i + 2 * t + 1]})
        rows.append({"messages": msgs})
    return rows


def teacher(kind: str, folder: Path, tok_dir: Path, dropout: float = 0.1) -> Path:
    """A 4-layer, 32-wide BERT (mlm) or GPT-2 (clm) with dropout, saved with its tokenizer."""
    import torch
    from transformers import (AutoTokenizer, BertConfig, BertForMaskedLM, GPT2Config,
                              GPT2LMHeadModel)

    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    if kind == "mlm":
        model = BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=4,
                                           num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                           hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=4, n_head=4, n_positions=64,
                                           resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def build(root: Path, kind: str, corpus: Path = CORPUS, repeat: int = 4) -> TinyRun:
    """Steps 1-3 of the README for one objective, in ``root``: binarize, count, extract."""
    from distill.cli import binarized_data, extract, token_counts

    root.mkdir(parents=True, exist_ok=True)
    text = corpus.read_text(encoding="utf-8")
    corpus_file = root / "corpus.txt"
    corpus_file.write_text(text * repeat, encoding="utf-8")
    make_tok = bert_tokenizer if kind == "mlm" else gpt2_style_tokenizer
    tok_dir = make_tok(root / f"tok_{kind}", corpus_words(text))
    t = teacher(kind, root / f"teacher_{kind}", tok_dir)
    data, counts, student = root / f"data_{kind}", root / f"counts_{kind}.npy", root / f"student_{kind}"
    binarized_data.main(["--file_path", str(corpus_file), "--tokenizer_name", str(t), "--dump_file", str(data),
                         "--num_workers", "1", "--quiet"])
    token_counts.main(["--data_file", str(data), "--token_counts_dump", str(counts)])
    teacher_type, student_type = ("bert", "distilbert") if kind == "mlm" else ("gpt2", "gpt2")
    extract.main(["--model_type", teacher_type, "--model_name", str(t), "--dump_checkpoint", str(student),
                  "--student_type", student_type])
    return TinyRun(kind, t, data, counts, student, student_type, teacher_type)


def tree_hashes(paths: list[Path]) -> dict[str, str]:
    """sha256 of every file under ``paths``: what a run must leave unchanged."""
    import hashlib

    out = {}
    for p in paths:
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()) if p.exists() else []
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out
