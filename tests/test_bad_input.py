"""The bad-input matrix: every command, given what a user gets wrong, answers with one sentence on
stderr and a non-zero exit, no traceback, and leaves every file that existed before unchanged.

Each case runs the command's ``main`` (the function the console script and scripts/*.py call) on a
shared tiny world whose files are hashed before and after.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from distill.testing import tiny

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """The README's world (teacher, data, counts, extracted student) and a few broken variants of it."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    root = tmp_path_factory.mktemp("bad_input")
    run = tiny.build(root / "world", "mlm")
    paths = {"root": root, "run": run, "corpus": root / "world" / "corpus.txt"}

    def put(name: str, data: bytes | str) -> Path:
        p = root / name
        p.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
        return p

    paths["empty"] = put("empty.txt", "")
    paths["blank"] = put("blank.txt", "\n   \n\t\n\n")
    paths["binary"] = put("binary.txt", bytes(range(256)) * 8)
    paths["latin1"] = put("latin1.txt", "caf\u00e9 cr\u00e8me br\u00fbl\u00e9e\n".encode("latin-1") * 5)
    paths["existing_file"] = put("a_file", "not a folder\n")
    paths["fake_gguf"] = put("model.gguf", b"GGUF" + os.urandom(200))
    # a dataset whose tokens.bin was cut short
    paths["truncated"] = root / "data_truncated"
    shutil.copytree(run.data, paths["truncated"])
    tokens = paths["truncated"] / "tokens.bin"
    tokens.write_bytes(tokens.read_bytes()[:100])
    # a dataset holding ids beyond the models' vocabulary (same tokenizer fingerprint otherwise)
    paths["big_ids"] = root / "data_big_ids"
    shutil.copytree(run.data, paths["big_ids"])
    meta = json.loads((run.data / "meta.json").read_text())
    ids = np.fromfile(paths["big_ids"] / "tokens.bin", dtype=meta["dtype"])
    ids[5] = 60000
    ids.tofile(paths["big_ids"] / "tokens.bin")
    big_meta = dict(meta, vocab_size=65536)
    (paths["big_ids"] / "meta.json").write_text(json.dumps(big_meta))
    # a dataset binarized with another tokenizer (the words in another order)
    other_tok = tiny.bert_tokenizer(root / "other_tok", list(reversed(tiny.corpus_words(paths["corpus"].read_text()))))
    paths["other_tok_data"] = root / "data_other_tok"
    from distill.data.binarize import binarize

    binarize(paths["corpus"], str(other_tok), paths["other_tok_data"], progress=False)
    # token counts of another vocabulary size
    paths["bad_counts"] = root / "counts_other.npy"
    np.save(paths["bad_counts"], np.ones(17, dtype=np.int64))
    # a teacher folder without weights, and a student with another vocabulary
    paths["no_weights"] = root / "teacher_no_weights"
    paths["no_weights"].mkdir()
    shutil.copy(run.teacher / "config.json", paths["no_weights"] / "config.json")
    for f in run.teacher.iterdir():
        if f.name.startswith("tokenizer") or f.name == "vocab.txt":
            shutil.copy(f, paths["no_weights"] / f.name)
    paths["big_vocab_student"] = root / "student_big_vocab"
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=500, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=64)).save_pretrained(
        paths["big_vocab_student"])
    paths["occupied"] = root / "occupied_run"  # a folder with the user's own file in it
    paths["occupied"].mkdir()
    (paths["occupied"] / "notes.txt").write_text("my notes\n")
    # GLUE folders: SST-2 with no dev.tsv, with a missing column, with a label outside the task's set
    glue = root / "glue"
    for name, dev in (("no_dev", None), ("no_column", "sentence\nfine film\nbad film\n"),
                      ("bad_label", "sentence\tlabel\nfine film\t7\nbad film\t0\n")):
        d = glue / name
        d.mkdir(parents=True)
        shutil.copy(FIXTURES / "glue" / "SST-2" / "train.tsv", d / "train.tsv")
        if dev is not None:
            (d / "dev.tsv").write_text(dev)
        paths[f"glue_{name}"] = d
    return paths


def train_argv(w, dump=None, *extra, **replace):
    """train.py's flags on the world, with ``replace`` swapping a flag's value (None drops the flag)."""
    run = w["run"]
    argv = run.train_args(Path(dump or w["root"] / "new_run"))
    for flag, value in replace.items():
        i = argv.index(f"--{flag}")
        if value is None:
            del argv[i:i + 2]
        else:
            argv[i + 1] = str(value)
    return argv + list(extra)


@contextlib.contextmanager
def read_only_folder(base: Path):
    """A folder nobody may write in, even root: a read-only tmpfs where mounting is allowed
    (root), else a folder without write permission (an unprivileged user)."""
    folder = base / "read_only"
    folder.mkdir(exist_ok=True)
    if os.geteuid() == 0:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True)
        if r.returncode != 0:
            pytest.skip("running as root where a read-only mount is not allowed")
        try:
            yield folder
        finally:
            subprocess.run(["umount", str(folder)], check=False)
    else:
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)


def _cases():
    from distill.cli import binarized_data, compare, extract, run_glue, token_counts, train

    B, T, E, R, G, C = (binarized_data.main, token_counts.main, extract.main, train.main, run_glue.main,
                        compare.main)

    def bin_(w, src, *extra, dump=None):
        return ["--file_path", str(src), "--tokenizer_name", str(w["run"].teacher), "--dump_file",
                str(dump or w["root"] / "new_data"), "--quiet", "--num_workers", "1", *extra]

    def glue(w, data_dir, *extra, model=None):
        return ["--task_name", "sst-2", "--data_dir", str(data_dir), "--model_name_or_path",
                str(model or w["run"].student), "--output_dir", str(w["root"] / "glue_out"), "--do_train",
                "--do_eval", "--max_steps", "1", "--max_seq_length", "32", *extra]

    def ex(w, model, *extra, dump=None):
        return ["--model_type", "bert", "--model_name", str(model), "--dump_checkpoint",
                str(dump or w["root"] / "new_student"), *extra]

    # (id, command, argv builder, words the sentence must hold)
    return [
        # -- binarize: the corpus
        ("binarize/corpus-missing", B, lambda w: bin_(w, w["root"] / "nope.txt"), "does not exist"),
        ("binarize/corpus-empty", B, lambda w: bin_(w, w["empty"]), "is empty"),
        ("binarize/corpus-blank-lines-only", B, lambda w: bin_(w, w["blank"]), "holds no text"),
        ("binarize/corpus-binary", B, lambda w: bin_(w, w["binary"]), "not"),
        ("binarize/corpus-not-utf8", B, lambda w: bin_(w, w["latin1"]), "UTF-8"),
        ("binarize/corpus-is-a-folder", B, lambda w: bin_(w, w["root"]), "directory"),
        ("binarize/tokenizer-missing", B,
         lambda w: bin_(w, w["corpus"])[:3] + [str(w["root"] / "no_tok")] + bin_(w, w["corpus"])[4:], "tokenizer"),
        ("binarize/dump-exists", B, lambda w: bin_(w, w["corpus"], dump=w["run"].data), "--overwrite"),
        ("binarize/dump-is-a-file", B, lambda w: bin_(w, w["corpus"], "--overwrite", dump=w["existing_file"]),
         "not a dataset folder"),
        ("binarize/workers-zero", B, lambda w: bin_(w, w["corpus"], "--num_workers", "0"), "--num_workers"),
        ("binarize/unknown-flag", B, lambda w: bin_(w, w["corpus"], "--shuffle_seed", "3"), "unrecognized"),
        # -- token counts
        ("counts/data-missing", T, lambda w: ["--data_file", str(w["root"] / "nope"), "--token_counts_dump",
                                              str(w["root"] / "c.npy")], "does not exist"),
        ("counts/tokens-truncated", T, lambda w: ["--data_file", str(w["truncated"]), "--token_counts_dump",
                                                  str(w["root"] / "c.npy")], "truncated"),
        ("counts/output-exists", T, lambda w: ["--data_file", str(w["run"].data), "--token_counts_dump",
                                               str(w["run"].counts)], "--overwrite"),
        ("counts/ids-outside-vocab", T, lambda w: ["--data_file", str(w["big_ids"]), "--token_counts_dump",
                                                   str(w["root"] / "c.npy"), "--vocab_size", "100"], "beyond"),
        # -- extract
        ("extract/teacher-without-weights", E, lambda w: ex(w, w["no_weights"]), "weights"),
        ("extract/gguf-not-a-model", E, lambda w: ex(w, w["fake_gguf"]), "gguf"),
        ("extract/teacher-missing", E, lambda w: ex(w, w["root"] / "nope"), "does not exist"),
        ("extract/dump-not-empty", E, lambda w: ex(w, w["run"].teacher, dump=w["occupied"]), "--force"),
        ("extract/layers-out-of-range", E, lambda w: ex(w, w["run"].teacher, "--layers", "0,9"), "layer"),
        # -- train: data
        ("train/data-missing", R, lambda w: train_argv(w, data_file=w["root"] / "nope"), "does not exist"),
        ("train/tokens-truncated", R, lambda w: train_argv(w, data_file=w["truncated"]), "truncated"),
        ("train/ids-outside-vocab", R, lambda w: train_argv(w, data_file=w["big_ids"]), "beyond"),
        ("train/meta-of-another-tokenizer", R, lambda w: train_argv(w, data_file=w["other_tok_data"]),
         "another tokenizer"),
        ("train/counts-of-another-vocab", R, lambda w: train_argv(w, token_counts=w["bad_counts"]), "17 ids"),
        # -- train: models
        ("train/student-other-vocab", R,
         lambda w: train_argv(w, student_pretrained_weights=w["big_vocab_student"], student_type="bert"),
         "vocabularies differ"),
        ("train/teacher-without-weights", R, lambda w: train_argv(w, teacher_name=w["no_weights"]), "weights"),
        ("train/teacher-gguf-not-a-model", R, lambda w: train_argv(w, teacher_name=w["fake_gguf"]), "gguf"),
        # -- train: flags
        ("train/input-size-over-positions", R, lambda w: train_argv(w, max_model_input_size=1000), "positions"),
        ("train/alpha-negative", R, lambda w: train_argv(w, alpha_ce=-1), "--alpha_ce"),
        ("train/alphas-all-zero", R, lambda w: train_argv(w, alpha_ce=0, alpha_mlm=0, alpha_cos=0), "zero"),
        ("train/alpha-nan", R, lambda w: train_argv(w, alpha_cos="nan"), "finite"),
        ("train/temperature-zero", R, lambda w: train_argv(w, None, "--temperature", "0"), "--temperature"),
        ("train/temperature-nan", R, lambda w: train_argv(w, None, "--temperature", "nan"), "finite"),
        ("train/learning-rate-zero", R, lambda w: train_argv(w, learning_rate=0), "--learning_rate"),
        ("train/learning-rate-nan", R, lambda w: train_argv(w, learning_rate="nan"), "finite"),
        ("train/accumulation-zero", R, lambda w: train_argv(w, gradient_accumulation_steps=0),
         "--gradient_accumulation_steps"),
        ("train/not-a-number", R, lambda w: train_argv(w, batch_size="two"), "--batch_size"),
        ("train/unknown-flag", R, lambda w: train_argv(w, None, "--alpha_kl", "1"), "unrecognized"),
        # -- train: outputs
        ("train/dump-not-empty", R, lambda w: train_argv(w, w["occupied"]), "--force"),
        ("train/dump-is-a-file", R, lambda w: train_argv(w, w["existing_file"]), "not a folder"),
        ("train/force-would-delete-inputs", R, lambda w: train_argv(w, w["root"], "--force"), "inside --dump_path"),
        ("train/resume-nothing", R, lambda w: train_argv(w, w["occupied"], "--resume"), "no checkpoint"),
        # -- GLUE
        ("glue/no-dev-tsv", G, lambda w: glue(w, w["glue_no_dev"]), "dev.tsv"),
        ("glue/missing-column", G, lambda w: glue(w, w["glue_no_column"]), "fields"),
        ("glue/label-outside-the-task", G, lambda w: glue(w, w["glue_bad_label"]), "label"),
        ("glue/output-not-empty", G,
         lambda w: glue(w, FIXTURES / "glue" / "SST-2", "--do_eval")[:7] + [str(w["occupied"]), "--do_train"],
         "--overwrite_output_dir"),
        ("glue/unknown-task", G, lambda w: ["--task_name", "sst-3"] + glue(w, w["glue_no_dev"])[2:], "sst-3"),
        # -- compare
        ("compare/teacher-dir-missing", C, lambda w: ["--teacher_dir", str(w["root"] / "nope"), "--student_dir",
                                                      str(w["run"].student), "--output", str(w["root"] / "cmp")],
         "nope"),
        ("compare/not-a-glue-output", C, lambda w: ["--teacher_dir", str(w["run"].teacher), "--student_dir",
                                                    str(w["run"].student), "--output", str(w["root"] / "cmp")],
         "fine-tuned on"),
    ]


CASES = _cases()


def assert_one_sentence(main, argv, capsys, words: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code not in (0, None), err
    assert "Traceback" not in err, err
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, err
    assert words.lower() in errors[0].lower(), errors[0]
    return errors[0]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_sentence_and_changes_nothing(w, case, capsys):
    _, main, build, words = case
    argv = build(w)
    before = tiny.tree_hashes([w["root"]])
    assert_one_sentence(main, argv, capsys, words)
    after = tiny.tree_hashes([w["root"]])
    assert {k: after.get(k) for k in before} == before, "a file that existed before was changed or removed"


@pytest.mark.parametrize("command", ["binarize", "train"])
def test_read_only_output_folder(w, command, capsys, tmp_path):
    from distill.cli import binarized_data, train

    with read_only_folder(tmp_path) as ro:
        before = tiny.tree_hashes([w["root"]])
        if command == "binarize":
            argv = ["--file_path", str(w["corpus"]), "--tokenizer_name", str(w["run"].teacher), "--dump_file",
                    str(ro / "data"), "--quiet", "--num_workers", "1"]
            assert_one_sentence(binarized_data.main, argv, capsys, "read-only")
        else:
            assert_one_sentence(train.main, train_argv(w, ro / "run"), capsys, "read-only")
        assert tiny.tree_hashes([w["root"]]) == before


def test_the_matrix_has_at_least_30_cases():
    commands = {c[0].split("/")[0] for c in CASES}
    assert len(CASES) + 2 >= 30 and commands == {"binarize", "counts", "extract", "train", "glue", "compare"}
