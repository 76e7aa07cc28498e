"""What every command needs from Hugging Face transformers: its chatter silenced, tokenizer files found."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# The files a folder's tokenizer is loaded from; AutoTokenizer does not fail on a folder without any
# of them (it returns a tiny default), so callers check for one first.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
                   "tokenizer.model", "spiece.model", "special_tokens_map.json")
# The ones that carry the vocabulary itself.
VOCAB_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


def has_tokenizer(folder: str | Path) -> bool:
    """``folder`` holds a vocabulary a tokenizer can be loaded from."""
    return any((Path(folder) / f).is_file() for f in VOCAB_FILES)


@contextmanager
def quiet_transformers(progress_bars: bool = False) -> Iterator[None]:
    """Silence transformers' load reports (the callers detect newly initialised weights and say so in
    one line) and, unless ``progress_bars``, its progress bars; restored on exit."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    if not progress_bars:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
