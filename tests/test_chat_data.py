"""The Hugging Face front door: `datasets` inputs binarize to the ids of the same text, chat and
prompt/completion data carry a completion mask that matches the chat template token by token, the
losses cover only completion tokens, --report_to sends the same scalars to every tracker, and bad
input is one sentence."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from distill.cli import binarized_data
from distill.data import chat
from distill.data.binarize import binarize, open_tokens
from distill.data.dataset import LMSeqsDataset, bits_of, count_bits
from distill.errors import UserError
from distill.testing import tiny

FIXTURES = Path(__file__).parent / "fixtures"


def sequences(folder: Path) -> list[list[int]]:
    tokens, offsets, _ = open_tokens(folder)
    return [tokens[offsets[i]:offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]


@pytest.fixture(scope="module")
def prose_lines() -> list[str]:
    return [ln.strip() for ln in (FIXTURES / "prose.txt").read_text().splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory) -> Path:
    """The tiny word-level tokenizer with ChatML and a template that marks the assistant's output."""
    words = tiny.corpus_words((FIXTURES / "prose.txt").read_text())
    return tiny.chat_tokenizer(tmp_path_factory.mktemp("chat_tok"), words, tiny.CHATML_MARKED)


@pytest.fixture(scope="module")
def conversations() -> list[dict]:
    rows = tiny.chat_rows((FIXTURES / "prose.txt").read_text(), turns=2)
    rows[1]["messages"].insert(0, {"role": "system", "content": "Answer with the next sentence."})
    rows[2]["messages"] = rows[2]["messages"][:3]  # ends on a user turn
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- datasets inputs


def test_a_dataset_in_any_format_binarizes_to_the_ids_of_the_same_text(tmp_path, prose_lines, gpt2_style_tok_dir):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    txt = tmp_path / "corpus.txt"
    txt.write_text("\n".join(prose_lines) + "\n")
    table = pa.table({"text": prose_lines, "id": list(range(len(prose_lines)))})
    pq.write_table(table, tmp_path / "corpus.parquet")
    write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in prose_lines])
    datasets.Dataset.from_dict({"body": prose_lines}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "shards").mkdir()
    for i in range(2):  # a folder of parquet files, read in name order
        pq.write_table(table.slice(i * (len(prose_lines) // 2), len(prose_lines) // 2 + i * len(prose_lines)),
                       tmp_path / "shards" / f"part-{i}.parquet")
    ref = binarize(txt, str(gpt2_style_tok_dir), tmp_path / "ref", progress=False)
    want = sequences(ref.path)
    for name, kw in (("parquet", {"dataset": str(tmp_path / "corpus.parquet")}),
                     ("jsonl", {"dataset": str(tmp_path / "corpus.jsonl")}),
                     ("saved", {"dataset": str(tmp_path / "saved"), "text_column": "body"}),
                     ("shards", {"dataset": str(tmp_path / "shards")})):
        res = binarize(None, str(gpt2_style_tok_dir), tmp_path / f"out_{name}", progress=False, **kw)
        assert sequences(res.path) == want, name
        assert (res.path / "tokens.bin").read_bytes() == (ref.path / "tokens.bin").read_bytes()
        assert res.meta["kind"] == "text" and not res.meta["loss_mask"] and res.meta["wrapped"]


# --------------------------------------------------------------------------- masks


def test_the_completion_mask_is_what_the_template_marks_as_the_assistants(chat_tok, conversations):
    """Prefix renders of the unmarked layout give the tokens the template's {% generation %} marks:
    every assistant turn's content and its <|im_end|>, across system, multi-turn and user-final rows."""
    tok = AutoTokenizer.from_pretrained(chat_tok)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for row in conversations[:12]:
        marked_ids, marked = chat.encode_conversation(tok, row["messages"], use_marks=True)
        ids, mask = chat.encode_conversation(tok, row["messages"], use_marks=False)
        assert ids == marked_ids
        assert mask == marked, row
        n_assistant = sum(m["role"] == "assistant" for m in row["messages"])
        assert sum(1 for i, b in zip(ids, mask) if b and i == im_end) == n_assistant
        assert sum(mask) > n_assistant


def test_binarized_chat_data_keeps_each_tokens_bit_through_shuffling_and_chunking(tmp_path, chat_tok, conversations):
    tok = AutoTokenizer.from_pretrained(chat_tok)
    data = write_jsonl(tmp_path / "chats.jsonl", conversations + [{"messages": [{"role": "user", "content": "hi"}]}])
    res = binarize(None, str(chat_tok), tmp_path / "data", dataset=str(data), progress=False, seed=3)
    meta = res.meta
    assert meta["kind"] == "messages" and meta["loss_mask"] and not meta["wrapped"]
    assert meta["dropped_no_completion"] == 1  # the user-only conversation
    want = {tuple(ids): mask for ids, mask in (chat.encode_conversation(tok, r["messages"]) for r in conversations)}
    tokens, offsets, _ = open_tokens(res.path)
    packed = np.fromfile(res.path / "mask.bin", dtype=np.uint8)
    for i in range(len(offsets) - 1):
        ids = tuple(tokens[offsets[i]:offsets[i + 1]].tolist())
        assert bits_of(packed, int(offsets[i]), len(ids)).tolist() == want[ids]  # shuffled, but aligned
    assert meta["completion_tokens"] == sum(sum(m) for m in want.values())
    # Cut into chunks of 16 tokens: each token keeps its bit, and chunks with nothing to predict are dropped.
    ds = LMSeqsDataset(str(res.path), max_model_input_size=16, min_length=2)
    assert ds.stats.dropped_no_completion > 0
    for i in range(len(ds)):
        item = ds[i]
        s = int(ds.starts[i])
        assert item["input_ids"].tolist() == tokens[s:s + len(item["input_ids"])].tolist()
        assert item["loss_mask"].tolist() == bits_of(packed, s, len(item["input_ids"])).tolist()
        assert item["loss_mask"][1:].any()


def test_count_bits_counts_ranges_across_byte_and_block_boundaries():
    rng = np.random.default_rng(0)
    bits = (rng.random(1000) < 0.3).astype(np.uint8)
    packed = np.packbits(bits, bitorder="little")
    starts = rng.integers(0, 990, 50)
    lens = rng.integers(0, 10, 50)
    want = [int(bits[s:s + n].sum()) for s, n in zip(starts, lens)]
    assert count_bits(packed, starts, lens, block=3).tolist() == want


def test_prompt_completion_pairs_with_and_without_the_template(tmp_path, chat_tok):
    tok = AutoTokenizer.from_pretrained(chat_tok)
    rows = [{"prompt": "the old man said", "completion": "nothing at all."}, {"prompt": "and", "completion": "then"}]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    templated = binarize(None, str(chat_tok), tmp_path / "t", dataset=str(data), progress=False, shuffle=False)
    plain = binarize(None, str(chat_tok), tmp_path / "p", dataset=str(data), progress=False, shuffle=False,
                     chat_template="none")
    ids, mask = chat.encode_conversation(tok, chat.prompt_completion_messages(rows[0]["prompt"],
                                                                              rows[0]["completion"], "row 0"))
    assert sequences(templated.path)[0] == ids and not templated.meta["wrapped"]
    p = tok(rows[0]["prompt"], add_special_tokens=False)["input_ids"]
    c = tok(rows[0]["completion"], add_special_tokens=False)["input_ids"]
    eot = tok.eos_token_id
    assert sequences(plain.path)[0] == [eot, *p, *c, eot] and plain.meta["wrapped"]
    packed = np.fromfile(plain.path / "mask.bin", dtype=np.uint8)
    assert bits_of(packed, 0, len(p) + len(c) + 2).tolist() == [0] * (1 + len(p)) + [1] * (len(c) + 1)


# --------------------------------------------------------------------------- the losses


@pytest.fixture(scope="module")
def chat_world(tmp_path_factory, chat_tok, conversations):
    """A tiny GPT-2 teacher on the chat tokenizer, chat data binarized with it, an extracted student."""
    from distill.cli import extract

    root = tmp_path_factory.mktemp("chat_world")
    teacher = tiny.teacher("clm", root / "teacher", chat_tok)
    data = write_jsonl(root / "chats.jsonl", conversations * 3)
    binarize(None, str(teacher), root / "data", dataset=str(data), progress=False)
    extract.main(["--model_type", "gpt2", "--model_name", str(teacher), "--dump_checkpoint", str(root / "student")])
    return root


def _distiller(world: Path, loss_on: str):
    from distill.config import TrainConfig
    from distill.distiller import Distiller
    from distill.seeding import seed_everything
    from distill.training import build_run

    cfg = TrainConfig(dump_path=str(world / "unused"), data_file=str(world / "data"), student_type="gpt2",
                      student_pretrained_weights=str(world / "student"), teacher_type="gpt2",
                      teacher_name=str(world / "teacher"), alpha_ce=1.0, alpha_clm=1.0, temperature=2.0,
                      max_model_input_size=64, batch_size=4, loss_on=loss_on)
    seed_everything(0)
    run = build_run(cfg)
    d = Distiller(cfg, run.student.model, run.teacher.model, run.dataset, run.collator, torch.device("cpu"),
                  student_objective="clm")
    d.student.eval()  # the same forward twice
    return d, run


def test_completion_only_losses_are_zero_on_prompt_positions_and_unchanged_on_completions(chat_world):
    d, run = _distiller(chat_world, "completion")
    examples = [run.dataset[i] for i in range(4)]
    batch = run.collator(examples)
    ids, attn = batch["input_ids"], batch["attention_mask"].bool()
    with torch.no_grad():
        s = d.student(input_ids=ids, attention_mask=attn.long()).logits.float()
        t = d.teacher(input_ids=ids, attention_mask=attn.long()).logits.float()
    T = 2.0
    kl = (torch.softmax(t / T, -1) * (torch.log_softmax(t / T, -1) - torch.log_softmax(s / T, -1))).sum(-1) * T * T
    ce = torch.nn.functional.cross_entropy(s[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")  # (B, L-1)
    target = torch.zeros_like(attn)  # positions whose next token is a completion token
    for b, e in enumerate(examples):
        n = len(e["input_ids"])
        target[b, :n - 1] = torch.from_numpy(e["loss_mask"][1:].astype(bool))
    assert 0 < int(target.sum()) < int(attn.sum())
    assert torch.equal(batch["target_mask"], target)
    with torch.no_grad():
        sums = d.loss_sums(batch, d.masks(batch))
    # fp32 sums of small KLs (the fused kernel takes them as differences of log-sum-exps) agree to about
    # 1e-4; the prompt positions left out carry far more than that.
    assert kl[attn & ~target].sum() > 0.1 * kl[target].sum() and ce[~target[:, :-1] & attn[:, 1:]].sum() > 1
    assert sums["ce"].item() == pytest.approx(kl[target].sum().item(), rel=1e-3)
    assert sums["clm"].item() == pytest.approx(ce[target[:, :-1]].sum().item(), rel=1e-5)
    counts = d.loss_counts(d.masks(batch))
    assert counts["ce"] == counts["clm"] == int(target.sum())
    d_all, _ = _distiller(chat_world, "all")
    batch_all = d_all.collator(examples)
    with torch.no_grad():
        sums_all = d_all.loss_sums(batch_all, d_all.masks(batch_all))
    assert sums_all["ce"].item() == pytest.approx(kl[attn].sum().item(), rel=1e-3)
    assert "target_mask" not in batch_all


@pytest.mark.slow
def test_training_on_chat_data_end_to_end_is_reproducible(chat_world, tmp_path):
    from tests.test_reproducibility import assert_same_student, launch, ok

    def args(dump):
        return ["--dump_path", str(dump), "--data_file", str(chat_world / "data"), "--student_type", "gpt2",
                "--student_pretrained_weights", str(chat_world / "student"), "--teacher_type", "gpt2",
                "--teacher_name", str(chat_world / "teacher"), "--alpha_ce", "1", "--alpha_clm", "1",
                "--alpha_cos", "1", "--max_model_input_size", "64", "--batch_size", "2",
                "--gradient_accumulation_steps", "2", "--max_steps", "4", "--log_interval", "1",
                "--checkpoint_interval", "4", "--seed", "3", "--report_to", "none"]

    r = ok(launch(args(tmp_path / "a")))
    assert "dropped for having no completion token" in r.stdout or "examples" in r.stdout
    ok(launch(args(tmp_path / "b")))
    assert_same_student(tmp_path / "a", tmp_path / "b")
    assert not (tmp_path / "a" / "tensorboard").exists()  # --report_to none


# --------------------------------------------------------------------------- trackers


def test_every_tracker_gets_the_same_scalars(tmp_path, monkeypatch):
    from distill import trackers

    logged = []

    class FakeRun:
        def log(self, values, step):
            logged.append((step, values))

        def finish(self):
            logged.append("finished")

    fake = types.SimpleNamespace(init=lambda **kw: logged.append(("init", kw)) or FakeRun())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    names = trackers.parse_report_to("tensorboard,wandb")
    opened = trackers.open_trackers(names, tmp_path / "run_a", {"seed": 1}, None)
    record = {"step": 3, "epoch": 0, "loss": 1.5, "loss_ce": 0.5, "lr": 1e-3, "grad_norm": None, "time": 0.0}
    for t in opened:
        t.log(trackers.scalars(record), 3)
        t.close()
    init = logged[0][1]
    assert init["name"] == "run_a" and init["config"] == {"seed": 1}
    assert logged[1] == (3, {"loss": 1.5, "loss_ce": 0.5, "train/lr": 1e-3}) and logged[2] == "finished"
    assert __import__("os").environ["WANDB_MODE"] == "offline"
    assert list((tmp_path / "run_a" / "tensorboard").iterdir())
    assert trackers.parse_report_to(["tensorboard", "wandb,tensorboard"]) == ["tensorboard", "wandb"]
    assert trackers.parse_report_to("none") == []


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("case", ["missing_column", "bad_messages", "no_template", "no_split", "no_such_path"])
def test_bad_dataset_input_is_one_sentence_and_leaves_nothing(case, tmp_path, chat_tok, gpt2_style_tok_dir, capsys):
    tok = str(chat_tok)
    if case == "missing_column":
        data = write_jsonl(tmp_path / "d.jsonl", [{"body": "a b c"}])
        extra, want = ["--dataset", str(data)], "has no 'text' column (its columns: body)"
    elif case == "bad_messages":
        data = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "hi"}]},
                                                  {"messages": [{"speaker": "user", "text": "hi"}]}])
        extra, want = ["--dataset", str(data)], "row 1 of"
    elif case == "no_template":
        data = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
        extra, want, tok = ["--dataset", str(data)], "has no chat template", str(gpt2_style_tok_dir)
    elif case == "no_split":
        import datasets

        datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a b"]})}).save_to_disk(
            str(tmp_path / "saved"))
        extra, want = ["--dataset", str(tmp_path / "saved"), "--split", "test"], "split 'test' does not exist"
    else:
        extra, want = ["--dataset", "someone/some_dataset"], "pass --allow_download"
    out = tmp_path / "out"
    capsys.readouterr()  # what setting up the input printed
    with pytest.raises(SystemExit) as e:
        binarized_data.main(["--tokenizer_name", tok, "--dump_file", str(out), "--quiet", *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and want in err[0], err
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_report_to_wandb_without_wandb_and_loss_on_completion_without_a_mask_are_refused(tmp_path, monkeypatch):
    import importlib.util

    from distill.config import TrainConfig

    base = dict(dump_path=str(tmp_path / "d"), data_file=str(tmp_path), student_type="gpt2", student_config="c",
                teacher_type="gpt2", teacher_name="t")
    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real_find(name, *a))
    with pytest.raises(UserError, match="needs the wandb package, which is not installed"):
        TrainConfig(**base, report_to="tensorboard,wandb")
    with pytest.raises(UserError, match="not a tracker"):
        TrainConfig(**base, report_to="mlflow")
    with pytest.raises(UserError, match="not --mlm"):
        TrainConfig(**base, mlm=True, alpha_mlm=1.0, loss_on="completion")


def test_loss_on_completion_needs_a_mask(tmp_path):
    from distill.testing import tiny as t

    w = t.build(tmp_path / "w", "clm")
    from distill.config import TrainConfig
    from distill.training import build_run

    cfg = TrainConfig(dump_path=str(tmp_path / "d"), data_file=str(w.data), student_type="gpt2",
                      student_pretrained_weights=str(w.student), teacher_type="gpt2", teacher_name=str(w.teacher),
                      max_model_input_size=64, loss_on="completion")
    with pytest.raises(UserError, match="needs data with a completion mask"):
        build_run(cfg)


@pytest.mark.slow
def test_report_to_wandb_and_tensorboard_together_offline(tmp_path):
    """With the wandb extra installed: an offline W&B run under --dump_path/wandb, named after it, and the
    TensorBoard events too (the scalars each gets are checked with a stand-in above)."""
    pytest.importorskip("wandb")
    from tests.test_reproducibility import launch, ok

    w = tiny.build(tmp_path / "w", "clm")
    dump = tmp_path / "run"
    env = {"WANDB_MODE": "offline", "WANDB_DISABLE_GIT": "true"}
    ok(launch(w.train_args(dump, "--report_to", "tensorboard", "--report_to", "wandb", max_steps=2), **env))
    runs = list((dump / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and next(runs[0].glob("run-*.wandb")).stat().st_size > 0
    assert list((dump / "tensorboard").iterdir())
    assert json.loads((dump / "parameters.json").read_text())["report_to"] == "tensorboard,wandb"
