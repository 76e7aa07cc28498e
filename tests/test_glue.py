"""GLUE: TSV layouts, metrics against scikit-learn/scipy, the feature cache, the task-distillation
loss, and tiny end-to-end fine-tuning, distillation and comparison runs."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.errors import UserError
from distill.glue import features as Fe
from distill.glue import metrics as Me
from distill.glue.losses import soft_target_loss, task_distillation_loss, task_loss
from distill.glue.tasks import get_task, read_split
from tests.conftest import FIXTURES, make_bert_tokenizer

GLUE = FIXTURES / "glue"

# ---------------------------------------------------------------------------------------------
# TSV layouts: small fixtures in the real GLUE format (headers, column positions, quotes).

FIRST = {
    "cola": ("Our friends won't buy this analysis, let alone the next one we propose.", None, "1", 3),
    "sst-2": ("hide new secretions from the parental units ", None, "0", 3),
    "mrpc": ('Amrozi accused his brother , whom he called " the witness " , of deliberately distorting his evidence .',
             'Referring to him as only " the witness " , Amrozi accused his brother of deliberately distorting his '
             "evidence .", "1", 2),
    "sts-b": ("A plane is taking off.", "An air plane is taking off.", 5.0, 2),
    "qqp": ("How is the life of a math student? Could you describe your own experiences?",
            "Which level of prepration is enough for the exam jlpt5?", "0", 2),  # the malformed line is skipped
    "mnli": ("Conceptually cream skimming has two basic dimensions - product and geography.",
             "Product and geography are what make cream skimming work. ", "neutral", 2),
    "qnli": ("When did the third Digimon series begin?", "Unlike the two seasons before it", "not_entailment", 2),
    "rte": ("No Weapons of Mass Destruction Found in Iraq Yet.", "Weapons of Mass Destruction Found in Iraq.",
            "not_entailment", 2),
    "wnli": ("I stuck a pin through a carrot. When I pulled the pin out, it had a hole.", "The carrot had a hole.",
             "1", 2),
}


@pytest.mark.parametrize("name", sorted(FIRST))
def test_task_layout(name):
    task = get_task(name)
    skipped = []
    examples = read_split(task, GLUE / task.folder_name, "train", on_skip=skipped.append)
    text_a, text_b, label, n = FIRST[name]
    assert len(examples) == n
    first = examples[0]
    assert first.text_a == text_a
    assert (first.text_b is None) if text_b is None else first.text_b.startswith(text_b)
    assert first.label == label
    assert all(e.label in task.labels for e in examples) if task.labels else True
    assert bool(skipped) == (name == "qqp")


def test_mnli_dev_files_and_aliases():
    task = get_task("MNLI")
    assert task.dev_splits == ("dev_matched", "dev_mismatched")
    (m,) = read_split(task, GLUE / "MNLI", "dev_matched")
    (mm,) = read_split(task, GLUE / "MNLI", "dev_mismatched")
    assert (m.text_a, m.label) == ("The new rights are nice enough", "neutral")  # gold_label, the last column
    assert mm.label == "contradiction"
    assert get_task("sst2").name == "sst-2" and get_task("STS-B").is_regression
    assert get_task("sts-b").num_labels == 1 and get_task("mnli").num_labels == 3


def test_bad_files_are_refused(tmp_path):
    with pytest.raises(UserError, match="unknown GLUE task"):
        get_task("squad")
    with pytest.raises(UserError, match="does not exist"):
        read_split("sst-2", tmp_path / "nowhere", "train")
    with pytest.raises(UserError, match="train.tsv does not exist"):
        read_split("sst-2", tmp_path, "train")
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n")
    with pytest.raises(UserError, match="holds no examples"):
        read_split("sst-2", tmp_path, "train")
    # SST-2's file read as CoLA: its header line has too few fields for a CoLA line
    with pytest.raises(UserError, match="right --task_name"):
        read_split("cola", GLUE / "SST-2", "train")
    with pytest.raises(UserError, match="label 'maybe'"):
        (tmp_path / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
        read_split("rte", tmp_path, "train")


# ---------------------------------------------------------------------------------------------
# Metrics against scikit-learn and scipy


def test_metrics_match_sklearn_and_scipy():
    from scipy import stats
    from sklearn import metrics as skm

    rng = np.random.default_rng(0)
    for n, k in ((50, 2), (200, 2), (77, 3)):
        y = rng.integers(0, k, n)
        p = np.where(rng.random(n) < 0.7, y, rng.integers(0, k, n))
        assert Me.accuracy(p, y) == pytest.approx(skm.accuracy_score(y, p))
        assert Me.matthews_corrcoef(p, y) == pytest.approx(skm.matthews_corrcoef(y, p), abs=1e-12)
        if k == 2:
            assert Me.f1_binary(p, y) == pytest.approx(skm.f1_score(y, p), abs=1e-12)
    # known values, and the degenerate cases sklearn defines as 0
    assert Me.matthews_corrcoef([1, 1, 0, 0], [1, 0, 1, 0]) == 0.0
    assert Me.matthews_corrcoef([1, 1, 1], [1, 0, 1]) == pytest.approx(skm.matthews_corrcoef([1, 0, 1], [1, 1, 1]))
    assert Me.f1_binary([0, 0], [0, 0]) == 0.0
    assert Me.f1_binary([1, 1, 0, 0], [1, 0, 1, 0]) == pytest.approx(0.5)
    x = rng.normal(size=100)
    y = 0.5 * x + rng.normal(size=100)
    xt = np.round(x * 2) / 2  # many ties: average ranks matter
    yt = np.round(y)
    assert Me.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert Me.spearman(xt, yt) == pytest.approx(stats.spearmanr(xt, yt)[0], abs=1e-12)
    assert np.array_equal(Me.rank_average(xt), stats.rankdata(xt))
    assert Me.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert Me.pearson([1, 1, 1], [1, 2, 3]) == 0.0  # constant input: undefined, reported as 0


def test_task_metrics_and_scores():
    y, p = np.array([1, 0, 1, 1]), np.array([1, 0, 0, 1])
    m = Me.compute_metrics("mrpc", p, y)
    assert set(m) == {"f1", "accuracy"}
    assert Me.task_score("mrpc", m) == pytest.approx((0.8 + 0.75) / 2)
    assert set(Me.compute_metrics("cola", p, y)) == {"matthews_corrcoef"}
    s = Me.compute_metrics("sts-b", np.array([0.1, 2.0, 3.5, 4.0]), np.array([0.0, 2.5, 3.0, 5.0]))
    assert Me.task_score("sts-b", s) == pytest.approx((s["pearson"] + s["spearman"]) / 2)
    assert Me.task_score("mnli", {"accuracy": 0.8, "mm_accuracy": 0.9}) == 0.8  # matched accuracy


# ---------------------------------------------------------------------------------------------
# Tiny models, tokenizers and a separable task

POS, NEG = ["good", "great", "fine"], ["bad", "awful", "poor"]
FILLER = ["the", "a", "film", "movie", "plot", "was", "is", "very", "quite", "story", "acting", "and", "it"]


def _sentence(rng: random.Random, positive: bool) -> str:
    words = rng.choices(FILLER, k=rng.randint(3, 7))
    words.insert(rng.randint(0, len(words)), rng.choice(POS if positive else NEG))
    return " ".join(words)


def write_sst(folder: Path, n_train: int = 128, n_dev: int = 40, pos_frac_dev: float = 0.65, seed: int = 0) -> Path:
    """A separable SST-2-format task: the label is whether a positive word occurs."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    train = [(_sentence(rng, i % 2 == 0), i % 2 == 0) for i in range(n_train)]
    n_pos = round(n_dev * pos_frac_dev)
    dev = [(_sentence(rng, i < n_pos), i < n_pos) for i in range(n_dev)]
    for name, rows in (("train.tsv", train), ("dev.tsv", dev)):
        (folder / name).write_text("sentence\tlabel\n" + "".join(f"{s} \t{int(y)}\n" for s, y in rows))
    return folder


WORDS = POS + NEG + FILLER + ["no", "yes", "dog", "cat", "runs", "sleeps", "two", "men", "play"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return make_bert_tokenizer(tmp_path_factory.mktemp("glue_tok"), WORDS)


def _bert_config(vocab: int):
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)


def _save_with_tok(model, tok_dir: Path, folder: Path) -> Path:
    from transformers import AutoTokenizer

    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bare_bert(tmp_path_factory, tok_dir) -> Path:
    """A headless BertModel folder with its tokenizer (like all-MiniLM-L6-v2)."""
    from transformers import BertModel

    torch.manual_seed(0)
    return _save_with_tok(BertModel(_bert_config(len(WORDS) + 5)), tok_dir, tmp_path_factory.mktemp("m") / "bare_bert")


@pytest.fixture(scope="module")
def mlm_student(tmp_path_factory, tok_dir) -> Path:
    """A DistilBertForMaskedLM folder with the teacher's tokenizer, as train.py writes a student."""
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    torch.manual_seed(1)
    cfg = DistilBertConfig(vocab_size=len(WORDS) + 5, dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                           max_position_embeddings=64, dropout=0.0, attention_dropout=0.0)
    return _save_with_tok(DistilBertForMaskedLM(cfg), tok_dir, tmp_path_factory.mktemp("m") / "student")


@pytest.fixture(scope="module")
def sst_dir(tmp_path_factory) -> Path:
    return write_sst(tmp_path_factory.mktemp("data") / "SST-2")


def _args(data, model, out, *extra) -> list[str]:
    return ["--task_name", "sst-2", "--data_dir", str(data), "--model_name_or_path", str(model), "--output_dir",
            str(out), "--max_seq_length", "32", "--per_device_train_batch_size", "16", "--learning_rate", "3e-3",
            "--seed", "0", "--logging_steps", "4", "--disable_tqdm", *extra]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, sst_dir, bare_bert) -> Path:
    """The headless BERT fine-tuned on the separable task (the teacher of the later tests)."""
    from distill.cli.run_glue import main

    out = tmp_path_factory.mktemp("runs") / "teacher"
    assert main(_args(sst_dir, bare_bert, out, "--do_train", "--do_eval", "--num_train_epochs", "6")) == 0
    return out


# ---------------------------------------------------------------------------------------------
# Features and the cache


def test_cache_key_reuse_and_stale_refusal(tmp_path, tok_dir):
    from transformers import AutoTokenizer

    data = write_sst(tmp_path / "SST-2", n_train=20, n_dev=8)
    task = get_task("sst-2")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    logs: list[str] = []
    path = Fe.cache_path(data, "train", "runs/my_model/", 32, task)
    assert path == data / "cached_train_my_model_32_sst-2.npz"  # split, model name, max length, task
    f1 = Fe.load_features(task, data, "train", tok, "runs/my_model", 32, log=logs.append)
    assert path.is_file() and not f1.reused and len(f1) == 20
    assert Fe.cache_path(data, "dev", "my_model", 32, task) != path
    assert Fe.cache_path(data, "train", "my_model", 64, task) != path
    f2 = Fe.load_features(task, data, "train", tok, "runs/my_model", 32, log=logs.append)
    assert f2.reused and np.array_equal(f1.input_ids, f2.input_ids) and np.array_equal(f1.labels, f2.labels)

    # The same folder name with another tokenizer (another vocabulary order): refused, not reused.
    other_dir = make_bert_tokenizer(tmp_path / "other_tok", list(reversed(WORDS)))
    other = AutoTokenizer.from_pretrained(other_dir)
    with pytest.raises(UserError, match="another tokenizer.*--overwrite_cache"):
        Fe.load_features(task, data, "train", other, "elsewhere/my_model", 32, log=logs.append)
    f3 = Fe.load_features(task, data, "train", other, "elsewhere/my_model", 32, overwrite_cache=True,
                          log=logs.append)
    assert not f3.reused and not np.array_equal(f3.input_ids, f1.input_ids)

    # An edited data file: the cache is for another version of it.
    with open(data / "train.tsv", "a") as f:
        f.write("good film \t1\n")
    with pytest.raises(UserError, match="another version of train.tsv"):
        Fe.load_features(task, data, "train", other, "elsewhere/my_model", 32, log=logs.append)
    assert not list(data.glob(".*tmp*"))


def test_tokenize_pairs_and_dynamic_padding(tok_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    task = get_task("rte")
    (tmp_path / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\tthe dog runs\ta dog\tentailment\n"
                                        "1\tcat\tthe cat sleeps and runs\tnot_entailment\n")
    feats = Fe.load_features(task, tmp_path, "train", tok, "m", 6, log=lambda m: None)
    assert feats.lengths.tolist() == [6, 6]  # truncated to --max_seq_length
    assert feats.labels.tolist() == [0, 1]
    batch = Fe.collate(feats, np.array([0, 1]), tok.pad_token_id, token_types=True)
    assert batch["input_ids"].shape == (2, 6) and batch["token_type_ids"][0].tolist()[-2:] == [1, 1]
    short = Fe.load_features(get_task("sst-2"), write_sst(tmp_path / "s", 4, 4), "train", tok, "m", 32,
                             log=lambda m: None)
    b = Fe.collate(short, np.arange(4), tok.pad_token_id, token_types=False)
    lengths = short.lengths
    assert b["input_ids"].shape == (4, lengths.max()) and "token_type_ids" not in b
    assert b["attention_mask"].sum(1).tolist() == lengths.tolist()
    assert (b["input_ids"][b["attention_mask"] == 0] == tok.pad_token_id).all()


# ---------------------------------------------------------------------------------------------
# Losses against hand computations


def test_task_distillation_loss_by_hand():
    s = torch.tensor([[1.0, -0.5, 0.2], [0.3, 0.8, -1.2]], requires_grad=True)
    t = torch.tensor([[2.0, 0.1, -0.4], [-0.2, 1.5, 0.0]])
    y = torch.tensor([0, 2])
    T, a_ce, a_task = 2.0, 0.7, 0.4

    def softmax(v):
        e = [math.exp(x) for x in v]
        return [x / sum(e) for x in e]

    kl = 0.0
    ce = 0.0
    for i in range(2):
        ps = softmax([x / T for x in s[i].tolist()])
        pt = softmax([x / T for x in t[i].tolist()])
        kl += sum(q * (math.log(q) - math.log(p)) for p, q in zip(ps, pt))
        ce += -math.log(softmax(s[i].tolist())[y[i]])
    want_ce, want_task = T * T * kl / 2, ce / 2
    total, parts = task_distillation_loss(s, t, y, temperature=T, alpha_ce=a_ce, alpha_task=a_task, regression=False)
    assert parts["loss_ce"].item() == pytest.approx(want_ce, rel=1e-5)
    assert parts["loss_task"].item() == pytest.approx(want_task, rel=1e-5)
    assert total.item() == pytest.approx(a_ce * want_ce + a_task * want_task, rel=1e-5)
    total.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    # identical logits: no soft-target loss
    assert soft_target_loss(t, t, temperature=3.0, regression=False).item() == pytest.approx(0.0, abs=1e-7)

    # Regression (STS-B): squared error to the teacher's scores, the temperature plays no part.
    rs, rt, ry = torch.tensor([[1.0], [3.0]]), torch.tensor([[2.0], [2.5]]), torch.tensor([1.5, 4.0])
    total, parts = task_distillation_loss(rs, rt, ry, temperature=5.0, alpha_ce=1.0, alpha_task=2.0, regression=True)
    assert parts["loss_ce"].item() == pytest.approx(((1 - 2) ** 2 + (3 - 2.5) ** 2) / 2)
    assert parts["loss_task"].item() == pytest.approx(((1 - 1.5) ** 2 + (3 - 4) ** 2) / 2)
    assert total.item() == pytest.approx(0.625 + 2 * 0.625)
    # an empty batch: exactly 0, still differentiable
    e = torch.zeros(0, 3, requires_grad=True)
    loss = task_loss(e, torch.zeros(0, dtype=torch.long), regression=False)
    loss.backward()
    assert loss.item() == 0.0


# ---------------------------------------------------------------------------------------------
# End to end


def test_fine_tune_beats_majority_and_saves_a_loadable_folder(teacher_dir, sst_dir, tmp_path, capsys):
    from distill.cli.run_glue import main
    from distill.glue.run import run_glue

    results = json.loads((teacher_dir / "eval_results.json").read_text())
    majority = 0.65  # the dev file's positive share
    assert results["task_name"] == "sst-2" and results["metrics"]["accuracy"] >= majority + 0.2
    assert results["score"] == results["metrics"]["accuracy"]
    assert "accuracy = " in (teacher_dir / "eval_results.txt").read_text()
    saved = json.loads((teacher_dir / "glue_args.json").read_text())
    assert saved["task_name"] == "sst-2" and saved["labels"] == ["0", "1"]
    assert sorted(saved["new_weights"]) == ["classifier.bias", "classifier.weight"]
    assert (teacher_dir / "train_log.jsonl").is_file() and (teacher_dir / "tokenizer.json").is_file()
    assert not [p for p in teacher_dir.parent.iterdir() if p.name.startswith(".")]  # no staging left
    assert (sst_dir / "cached_train_bare_bert_32_sst-2.npz").is_file()

    # The saved folder evaluates to the same score: from the Python API, in another folder.
    again = run_glue({"task_name": "sst-2", "data_dir": str(sst_dir), "model_name_or_path": str(teacher_dir),
                      "output_dir": str(tmp_path / "eval"), "do_eval": True, "max_seq_length": 32,
                      "disable_tqdm": True})
    assert again["score"] == pytest.approx(results["score"])
    capsys.readouterr()
    # ... and into its own folder (evaluation only touches the results files there)
    before = {p.name for p in teacher_dir.iterdir()}
    argv = _args(sst_dir, teacher_dir, teacher_dir, "--do_eval")
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "--overwrite_output_dir" in capsys.readouterr().err
    assert main(argv + ["--overwrite_output_dir"]) == 0
    assert {p.name for p in teacher_dir.iterdir()} == before
    assert "newly initialised" not in capsys.readouterr().err  # the head is now in the checkpoint


def test_output_dir_rules(sst_dir, bare_bert, tmp_path, capsys):
    from distill.cli.run_glue import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        main(_args(sst_dir, bare_bert, out, "--do_train", "--max_steps", "1"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: --output_dir") and err.count("\n") == 1
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite_output_dir never deletes an input that lies inside the folder
    inner = out / "data"
    write_sst(inner, 8, 4)
    with pytest.raises(SystemExit):
        main(_args(inner, bare_bert, out, "--do_train", "--overwrite_output_dir", "--max_steps", "1"))
    assert "would delete it" in capsys.readouterr().err and (inner / "train.tsv").is_file()
    assert main(_args(sst_dir, bare_bert, out, "--do_train", "--overwrite_output_dir", "--max_steps", "1")) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert not (out / "eval_results.json").exists()  # no --do_eval


@pytest.mark.parametrize("argv, message", [
    (["--task_name", "squad"], "unknown GLUE task"),
    (["--bogus_flag"], "unrecognized arguments"),
    (["--no_do"], "nothing to do"),
    (["--data_dir", "MISSING"], "does not exist"),
    (["--learning_rate", "-1"], "--learning_rate must be positive"),
])
def test_bad_command_lines_end_in_one_sentence(argv, message, sst_dir, bare_bert, tmp_path, capsys):
    from distill.cli.run_glue import main

    base = {"--task_name": "sst-2", "--data_dir": str(sst_dir), "--model_name_or_path": str(bare_bert),
            "--output_dir": str(tmp_path / "o")}
    extra = ["--do_eval"]
    if argv[0] in base:
        base[argv[0]] = argv[1] if argv[1] != "MISSING" else str(tmp_path / "missing")
    elif argv == ["--no_do"]:
        extra = []
    else:
        extra += argv
    with pytest.raises(SystemExit) as e:
        main([x for kv in base.items() for x in kv] + extra)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_model_folder_refusals(sst_dir, bare_bert, tmp_path):
    from transformers import BertModel

    from distill.glue.run import run_glue

    cfg = {"task_name": "sst-2", "data_dir": str(sst_dir), "output_dir": str(tmp_path / "o"), "do_eval": True,
           "max_seq_length": 32, "disable_tqdm": True}
    no_tok = tmp_path / "no_tok"
    BertModel(_bert_config(len(WORDS) + 5)).save_pretrained(no_tok)
    with pytest.raises(UserError, match="no tokenizer files"):
        run_glue({**cfg, "model_name_or_path": str(no_tok)})
    small = tmp_path / "small_vocab"
    BertModel(_bert_config(10)).save_pretrained(small)
    for f in bare_bert.glob("tokenizer*"):
        (small / f.name).write_bytes(f.read_bytes())
    with pytest.raises(UserError, match="only 10 embedding rows"):
        run_glue({**cfg, "model_name_or_path": str(small)})
    with pytest.raises(UserError, match="exceeds the 64 positions"):
        run_glue({**cfg, "model_name_or_path": str(bare_bert), "max_seq_length": 100})
    with pytest.raises(UserError, match="no trained classification head"):  # a teacher must be fine-tuned
        run_glue({**cfg, "model_name_or_path": str(bare_bert), "do_train": True,
                  "teacher_name_or_path": str(bare_bert)})
    assert not (tmp_path / "o").exists()


def test_task_distillation_into_an_mlm_student(teacher_dir, mlm_student, sst_dir, tmp_path, capsys):
    from distill.cli.run_glue import main

    out = tmp_path / "distilled"
    assert main(_args(sst_dir, mlm_student, out, "--do_train", "--do_eval", "--num_train_epochs", "2",
                      "--teacher_name_or_path", str(teacher_dir), "--alpha_ce", "0.5", "--alpha_task", "0.5",
                      "--temperature", "2")) == 0
    err = capsys.readouterr().err
    # one line names the new head (and the MLM head left unused)
    (line,) = [ln for ln in err.splitlines() if "newly initialised" in ln]
    assert "classifier.weight" in line and "pre_classifier.weight" in line and "vocab_projector" in line
    log = [json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines()]
    assert {"loss", "loss_ce", "loss_task", "lr"} <= set(log[-1])
    assert json.loads((out / "config.json").read_text())["architectures"] == ["DistilBertForSequenceClassification"]
    assert json.loads((out / "eval_results.json").read_text())["metrics"]["accuracy"] > 0

    # A teacher fine-tuned on another task, or with another number of outputs, is refused.
    with pytest.raises(SystemExit):
        main(["--task_name", "mnli"] + _args(sst_dir, mlm_student, tmp_path / "x", "--do_train",
                                              "--teacher_name_or_path", str(teacher_dir))[2:])
    assert "fine-tuned on sst-2, not mnli" in capsys.readouterr().err


def _write_tiny(folder: Path, header: str, rows: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.tsv").write_text(header + "".join(rows))


def test_regression_and_two_dev_files(bare_bert, tmp_path):
    from distill.glue.run import run_glue

    base = {"model_name_or_path": str(bare_bert), "do_train": True, "do_eval": True, "max_steps": 3,
            "max_seq_length": 32, "per_device_train_batch_size": 4, "disable_tqdm": True, "learning_rate": 1e-3}
    sts = tmp_path / "STS-B"
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    rows = [f"{i}\tmain-captions\tMSRvid\t2012test\t{i:04d}\tnone\tnone\tthe dog runs\t{s}\t{v:.3f}\n"
            for i, (s, v) in enumerate([("the dog runs", 5), ("a dog", 3.8), ("the cat sleeps", 0.5),
                                        ("two men play", 0.0), ("the dog sleeps", 2.4), ("a cat", 0.2)])]
    _write_tiny(sts, head, rows)
    (sts / "dev.tsv").write_text(head + "".join(rows))
    r = run_glue({**base, "task_name": "sts-b", "data_dir": str(sts), "output_dir": str(tmp_path / "sts")})
    assert set(r["metrics"]) == {"pearson", "spearman"} and -1 <= r["score"] <= 1
    assert json.loads((tmp_path / "sts" / "config.json").read_text())["problem_type"] == "regression"

    mnli = tmp_path / "MNLI"
    head = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
            "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n")
    rows = [f"{i}\t1\t1e\tfiction\t( x )\t( y )\t(ROOT x)\t(ROOT y)\tthe dog runs\t{s}\t{lab}\t{lab}\n"
            for i, (s, lab) in enumerate([("a dog runs", "entailment"), ("no dog", "contradiction"),
                                          ("the cat", "neutral"), ("the dog is fine", "entailment")])]
    _write_tiny(mnli, head, rows)
    dev_head = head.replace("label1\tgold_label", "label1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label")
    dev_rows = [r.replace(f"\t{lab}\t{lab}\n", f"\t{lab}\t{lab}\t{lab}\t{lab}\t{lab}\t{lab}\n")
                for r, lab in zip(rows, ["entailment", "contradiction", "neutral", "entailment"])]
    (mnli / "dev_matched.tsv").write_text(dev_head + "".join(dev_rows))
    (mnli / "dev_mismatched.tsv").write_text(dev_head + "".join(dev_rows[:3]))
    r = run_glue({**base, "task_name": "mnli", "data_dir": str(mnli), "output_dir": str(tmp_path / "mnli")})
    assert set(r["metrics"]) == {"accuracy", "mm_accuracy"} and r["score"] == r["metrics"]["accuracy"]
    assert r["splits"]["dev_mismatched"]["num_examples"] == 3


def test_compare_teacher_and_students(teacher_dir, mlm_student, sst_dir, tmp_path, capsys):
    from distill.cli.compare import main
    from distill.cli.run_glue import main as glue
    from distill.glue.compare import compare

    students = {}
    for name, extra in (("distilled", ["--teacher_name_or_path", str(teacher_dir)]), ("plain", [])):
        students[name] = tmp_path / name
        assert glue(_args(sst_dir, mlm_student, students[name], "--do_train", "--do_eval", "--max_steps", "4",
                          *extra)) == 0
    out = tmp_path / "cmp"
    rows = compare(teacher_dir, students, sst_dir, "sst-2", output=out, batch_size=8, num_examples=16, repeats=2,
                   disable_tqdm=True)
    assert [r["name"] for r in rows] == ["teacher", "distilled", "plain"]
    for r in rows:
        assert r["parameters"] > 0 and r["sentences_per_s"] > 0 and set(r["metrics"]) == {"accuracy"}
        assert r["pct_of_teacher"] == pytest.approx(100 * r["score"] / rows[0]["score"])
    assert rows[0]["parameters"] > rows[1]["parameters"]  # 2 BERT layers vs 1 DistilBERT layer
    md = (out / "comparison.md").read_text()
    assert "% of teacher" in md and "sentences/s" in md and "| distilled (student) |" in md
    assert json.loads((out / "comparison.json").read_text())["rows"][1]["name"] == "distilled"
    # The command line: metrics evaluated here instead of read, earlier results not replaced silently
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["--teacher_dir", str(teacher_dir), "--student_dir", str(students["plain"]), "--output", str(out)])
    assert "--overwrite" in capsys.readouterr().err
    assert main(["--teacher_dir", str(teacher_dir), "--student_dir", f"p={students['plain']}", "--output", str(out),
                 "--overwrite", "--evaluate", "--num_examples", "8", "--repeats", "1", "--disable_tqdm"]) == 0
    report = json.loads((out / "comparison.json").read_text())
    assert report["task_name"] == "sst-2" and report["rows"][1]["metrics_source"] == "evaluated here"
    assert report["rows"][1]["score"] == pytest.approx(rows[2]["score"])
    with pytest.raises(UserError, match="no classification head trained"):
        compare(teacher_dir, [mlm_student], sst_dir, "sst-2", disable_tqdm=True)


@pytest.mark.real
def test_packaged_minilm_loads_as_a_classifier(real_bert_dir):
    from distill.glue.modeling import load_classifier, load_tokenizer

    clf = load_classifier(real_bert_dir, get_task("mnli"))
    assert clf.model.config.num_labels == 3 and len(load_tokenizer(real_bert_dir)) <= 30522
    assert sorted(clf.new_weights) == ["classifier.bias", "classifier.weight"]
    assert "newly initialised: classifier.bias, classifier.weight" in clf.loading_report()


def test_fine_tuning_is_reproducible_with_dropout(tmp_path, sst_dir, tok_dir):
    """The same flags and --seed give the same classifier bit for bit, dropout on (the new head, dropout
    and the shuffle all draw from seeded generators); another seed gives another one."""
    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel

    from distill.cli.run_glue import main

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)  # dropout 0.1
    model = _save_with_tok(BertModel(cfg), tok_dir, tmp_path / "bert_dropout")

    def run(name, seed):
        torch.manual_seed(len(name))  # whatever the generators held before, --seed decides
        out = tmp_path / name
        args = _args(sst_dir, model, out, "--do_train", "--max_steps", "6")
        args[args.index("--seed") + 1] = str(seed)
        assert main(args) == 0
        log = [{k: v for k, v in json.loads(ln).items() if k != "time"}
               for ln in (out / "train_log.jsonl").read_text().splitlines()]
        return load_file(out / "model.safetensors"), log

    (a, log_a), (b, log_b), (c, _) = run("a", 0), run("bb", 0), run("c", 1)
    assert all(torch.equal(a[k], b[k]) for k in a) and log_a == log_b
    assert any(not torch.equal(a[k], c[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# The teacher's outputs, computed once


def test_cached_teacher_logits_train_as_the_online_teacher(teacher_dir, mlm_student, sst_dir):
    """fp32: a student task-distilled from the teacher's precomputed logits ends where one distilled from a
    forward pass of the teacher on every batch ends (the teacher is frozen and in eval mode)."""
    from distill.glue.config import GlueConfig
    from distill.glue.features import load_features
    from distill.glue.modeling import (
        load_classifier,
        load_teacher,
        load_tokenizer,
        set_padding,
    )
    from distill.glue.tasks import get_task
    from distill.glue.trainer import fine_tune, predict
    from distill.seeding import seed_everything

    task = get_task("sst-2")
    cfg = GlueConfig(task_name="sst-2", data_dir=str(sst_dir), model_name_or_path=str(mlm_student), output_dir="x",
                     do_train=True, max_seq_length=32, per_device_train_batch_size=16, learning_rate=3e-3,
                     num_train_epochs=2, teacher_name_or_path=str(teacher_dir), alpha_ce=0.7, alpha_task=0.3)
    tok = load_tokenizer(mlm_student)
    feats = load_features(task, sst_dir, split="train", tok=tok, model_name_or_path=mlm_student, max_seq_length=32,
                          log=lambda s: None)
    teacher = load_teacher(teacher_dir, task)
    pad = set_padding(teacher, tok)
    logits = predict(teacher.model, feats, batch_size=64, device=torch.device("cpu"), pad_id=pad)
    finals = []
    for kw in ({"teacher": teacher.model}, {"teacher_logits": logits}):
        seed_everything(0)
        clf = load_classifier(mlm_student, task)
        pad = set_padding(clf, tok)
        summary = fine_tune(clf.model, feats, task, cfg, torch.device("cpu"), pad_id=pad, **kw)
        finals.append((summary["loss"], {k: v.clone() for k, v in clf.model.state_dict().items()}))
    assert finals[0][0] == pytest.approx(finals[1][0], rel=1e-5)
    for k, v in finals[0][1].items():
        torch.testing.assert_close(v, finals[1][1][k], rtol=1e-4, atol=1e-5, msg=k)


def test_teacher_logits_are_cached_and_reused_until_the_teacher_changes(teacher_dir, mlm_student, sst_dir, tmp_path):
    from distill.glue.run import run_glue
    from distill.glue.tasks import get_task
    from distill.glue.teacher_outputs import cache_path

    data = tmp_path / "SST-2"
    shutil.copytree(sst_dir, data, ignore=shutil.ignore_patterns("cached_*"))
    base = {"task_name": "sst-2", "data_dir": str(data), "model_name_or_path": str(mlm_student), "do_train": True,
            "do_eval": True, "max_seq_length": 32, "per_device_train_batch_size": 16, "learning_rate": 3e-3,
            "max_steps": 4, "seed": 3, "disable_tqdm": True, "teacher_name_or_path": str(teacher_dir)}
    logs: list[str] = []
    first = run_glue({**base, "output_dir": str(tmp_path / "a")}, log=logs.append)
    cached = cache_path(data, "train", teacher_dir, 32, get_task("sst-2"))
    assert cached.is_file() and any("cached in" in s for s in logs)
    logs.clear()
    second = run_glue({**base, "output_dir": str(tmp_path / "b")}, log=logs.append)
    assert any("reusing " + str(cached) in s for s in logs)
    assert first["score"] == second["score"]  # the same seed and the same teacher outputs: the same run
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    # another teacher in a folder of the same name: its outputs are computed again, not reused
    other = tmp_path / "o" / teacher_dir.name
    shutil.copytree(teacher_dir, other)
    from safetensors.torch import load_file, save_file

    w = load_file(other / "model.safetensors")
    name = next(k for k in w if k.endswith("classifier.weight"))
    w[name] = w[name] * 2
    save_file(w, other / "model.safetensors", metadata={"format": "pt"})
    logs.clear()
    run_glue({**base, "output_dir": str(tmp_path / "c"), "teacher_name_or_path": str(other)}, log=logs.append)
    assert not any("reusing " + str(cached) in s for s in logs) and any("cached in" in s for s in logs)
