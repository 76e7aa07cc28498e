"""Binarization: stored ids equal the tokenizer's, round trips, dtypes, formats, determinism, bad input."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from distill.cli import binarized_data, token_counts
from distill.data.binarize import binarize, open_tokens
from distill.data.counts import count_tokens

from .conftest import make_bert_tokenizer


def lines_of(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def sequences(folder: Path) -> list[list[int]]:
    tokens, offsets, _ = open_tokens(folder)
    return [tokens[offsets[i]:offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]


def check_round_trip(text_file: Path, tok_dir: Path, out: Path, **kw) -> None:
    res = binarize(text_file, str(tok_dir), out, progress=False, shuffle=False, **kw)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    lines = lines_of(text_file)
    seqs = sequences(out)
    assert res.num_sequences == len(lines) == len(seqs)
    start = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
    end = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
    expected = [[start] + tok(ln, add_special_tokens=False)["input_ids"] + [end] for ln in lines]
    assert seqs == expected  # in order, without shuffling
    for ln, seq in zip(lines, seqs):
        decoded = tok.decode(seq[1:-1])
        reference = tok.decode(tok(ln, add_special_tokens=False)["input_ids"])
        assert decoded == reference


def test_round_trip_tiny_bert(tmp_path, prose_file, bert_tok_dir):
    check_round_trip(prose_file, bert_tok_dir, tmp_path / "ds")
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert meta["dtype"] == "uint16"
    assert meta["num_sequences"] == len(lines_of(prose_file))
    assert meta["num_tokens"] == sum(len(s) for s in sequences(tmp_path / "ds"))
    assert meta["source"]["name"] == "prose.txt" and meta["source"]["size"] == prose_file.stat().st_size
    assert meta["special_token_ids"]["mask_token"] == 4 and meta["start_id"] == 2 and meta["end_id"] == 3


def test_round_trip_bos_eos_tokenizer(tmp_path, prose_file, gpt2_style_tok_dir):
    # Without cls/sep the sequences are wrapped in bos ... eos (GPT-2's <|endoftext|> on both sides).
    check_round_trip(prose_file, gpt2_style_tok_dir, tmp_path / "ds")
    seq = sequences(tmp_path / "ds")[0]
    assert seq[0] == seq[-1] == 0


@pytest.mark.real
def test_round_trip_real_tokenizer(tmp_path, prose_file, real_bert_dir):
    check_round_trip(prose_file, real_bert_dir, tmp_path / "ds")
    tok = AutoTokenizer.from_pretrained(real_bert_dir)
    seq = sequences(tmp_path / "ds")[0]
    assert tok.decode(seq, skip_special_tokens=True) == lines_of(prose_file)[0].lower()


def test_large_vocabulary_gets_uint32(tmp_path):
    words = [f"w{i}" for i in range(70_000)]
    tok_dir = make_bert_tokenizer(tmp_path / "tok", words)
    text = tmp_path / "big.txt"
    text.write_text("w69999 w0 w65535 w65536\nw12 w69998\n")
    binarize(text, str(tok_dir), tmp_path / "ds", progress=False, shuffle=False)
    tokens, _, meta = open_tokens(tmp_path / "ds")
    assert meta["dtype"] == "uint32" and tokens.dtype == np.uint32
    tok = AutoTokenizer.from_pretrained(tok_dir)
    assert max(sequences(tmp_path / "ds")[0]) == tok.convert_tokens_to_ids("w69999") > 65_535
    assert sequences(tmp_path / "ds")[0][1:-1] == tok("w69999 w0 w65535 w65536", add_special_tokens=False)["input_ids"]


def test_gzip_and_jsonl_inputs(tmp_path, prose_file, bert_tok_dir):
    lines = prose_file.read_text(encoding="utf-8").splitlines()
    gz = tmp_path / "c.txt.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    jl = tmp_path / "c.jsonl"
    jl.write_text("".join(json.dumps({"text": ln, "id": i}) + "\n" for i, ln in enumerate(lines) if ln.strip()))
    binarize(prose_file, str(bert_tok_dir), tmp_path / "plain", progress=False, shuffle=False)
    binarize(gz, str(bert_tok_dir), tmp_path / "gz", progress=False, shuffle=False)
    binarize(jl, str(bert_tok_dir), tmp_path / "jl", progress=False, shuffle=False)
    plain = (tmp_path / "plain" / "tokens.bin").read_bytes()
    assert (tmp_path / "gz" / "tokens.bin").read_bytes() == plain
    assert (tmp_path / "jl" / "tokens.bin").read_bytes() == plain


def test_shuffle_is_a_seeded_permutation_and_workers_do_not_matter(tmp_path, prose_file, bert_tok_dir):
    binarize(prose_file, str(bert_tok_dir), tmp_path / "a", progress=False, seed=1, batch_lines=3)
    binarize(prose_file, str(bert_tok_dir), tmp_path / "b", progress=False, seed=1, num_workers=2, batch_lines=3)
    binarize(prose_file, str(bert_tok_dir), tmp_path / "c", progress=False, seed=2)
    binarize(prose_file, str(bert_tok_dir), tmp_path / "plain", progress=False, shuffle=False)
    a, b, c, plain = (sequences(tmp_path / n) for n in ("a", "b", "c", "plain"))
    assert a == b  # deterministic for a seed, whatever the number of workers
    assert a != c and a != plain
    key = lambda s: tuple(s)  # noqa: E731
    assert sorted(a, key=key) == sorted(c, key=key) == sorted(plain, key=key)  # same multiset of sequences


def test_max_lines(tmp_path, prose_file, bert_tok_dir):
    res = binarize(prose_file, str(bert_tok_dir), tmp_path / "ds", progress=False, max_lines=5)
    assert res.num_sequences == 5


def test_token_counts_match_a_python_count(tmp_path, prose_file, bert_tok_dir):
    binarize(prose_file, str(bert_tok_dir), tmp_path / "ds", progress=False)
    expected = Counter(t for s in sequences(tmp_path / "ds") for t in s)
    counts = count_tokens(tmp_path / "ds", block=7)  # tiny blocks exercise the streaming
    assert counts.dtype == np.int64 and len(counts) == len(AutoTokenizer.from_pretrained(bert_tok_dir))
    assert {i: int(c) for i, c in enumerate(counts) if c} == dict(expected)
    assert token_counts.main(["--data_file", str(tmp_path / "ds"), "--token_counts_dump",
                              str(tmp_path / "counts.npy")]) == 0
    assert np.array_equal(np.load(tmp_path / "counts.npy"), counts)


def test_cli_writes_and_refuses_to_overwrite(tmp_path, prose_file, bert_tok_dir, capsys):
    args = ["--file_path", str(prose_file), "--tokenizer_name", str(bert_tok_dir), "--dump_file",
            str(tmp_path / "ds"), "--num_workers", "1", "--quiet"]
    assert binarized_data.main(args) == 0
    out = capsys.readouterr().out
    assert "sequences" in out and "tokens/s" in out and str(tmp_path / "ds") in out
    before = (tmp_path / "ds" / "tokens.bin").read_bytes()
    with pytest.raises(SystemExit) as e:
        binarized_data.main(args)
    assert e.value.code == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "ds" / "tokens.bin").read_bytes() == before
    assert binarized_data.main(args + ["--overwrite", "--seed", "3"]) == 0
    assert json.loads((tmp_path / "ds" / "meta.json").read_text())["seed"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temporary folder left behind


@pytest.mark.parametrize("case", ["missing", "empty", "blank", "directory", "binary", "bad_tokenizer", "bad_jsonl"])
def test_bad_input_is_one_sentence_and_leaves_nothing(tmp_path, bert_tok_dir, case, capsys):
    tok = str(bert_tok_dir)
    src = tmp_path / "in.txt"
    if case == "empty":
        src.write_text("")
    elif case == "blank":
        src.write_text("\n   \n\n")
    elif case == "directory":
        src.mkdir()
    elif case == "binary":
        src.write_bytes(bytes(range(256)) * 8)
    elif case == "bad_tokenizer":
        src.write_text("hello there\n")
        tok = str(tmp_path / "no_such_tokenizer")
    elif case == "bad_jsonl":
        src = tmp_path / "in.jsonl"
        src.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        binarized_data.main(["--file_path", str(src), "--tokenizer_name", tok, "--dump_file", str(out), "--quiet"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary left


@pytest.mark.real
def test_real_corpus_counts(tmp_path, kjv_text, real_bert_dir):
    res = binarize(kjv_text, str(real_bert_dir), tmp_path / "kjv", progress=False, num_workers=2, max_lines=2000)
    assert res.num_sequences == 2000
    counts = count_tokens(tmp_path / "kjv")
    tok = AutoTokenizer.from_pretrained(real_bert_dir)
    assert counts[tok.cls_token_id] == counts[tok.sep_token_id] == 2000
    assert counts[tok.convert_tokens_to_ids("god")] > 100
