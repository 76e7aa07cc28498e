"""train.py and the Distiller on tiny models: losses fall, accumulation is exact, NaN steps are
skipped, the student reloads, and every refusal of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer, BertConfig, BertForMaskedLM,
                          BertModel, GPT2Config, GPT2LMHeadModel)

from distill.cli import train
from distill.config import TrainConfig, parse_config
from distill.data.binarize import binarize
from distill.data.collate import Collator, mlm_token_probs
from distill.data.dataset import LMSeqsDataset
from distill.distiller import Distiller
from distill.errors import UserError

from .conftest import make_bert_tokenizer, prose_words

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="module")
def world(tmp_path_factory, bert_tok_dir, gpt2_style_tok_dir, prose_file):
    """Teachers, student configs and binarized data, built once for the module."""
    root = tmp_path_factory.mktemp("world")
    torch.manual_seed(0)
    V = len(AutoTokenizer.from_pretrained(bert_tok_dir))
    w = {"root": root, "V": V}

    def with_tok(folder, tok_dir):
        AutoTokenizer.from_pretrained(tok_dir).save_pretrained(folder)
        return folder

    BertForMaskedLM(BertConfig(vocab_size=V, **TINY)).save_pretrained(root / "bert")
    w["bert"] = with_tok(root / "bert", bert_tok_dir)
    BertModel(BertConfig(vocab_size=V, **TINY)).save_pretrained(root / "bert_headless")
    w["bert_headless"] = with_tok(root / "bert_headless", bert_tok_dir)
    BertForMaskedLM(BertConfig(vocab_size=V + 3, **TINY)).save_pretrained(root / "bert_bigvocab")
    w["bert_bigvocab"] = with_tok(root / "bert_bigvocab", bert_tok_dir)
    Vg = len(AutoTokenizer.from_pretrained(gpt2_style_tok_dir))
    GPT2LMHeadModel(GPT2Config(vocab_size=Vg, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                               embd_pdrop=0.0, attn_pdrop=0.0)).save_pretrained(root / "gpt2")
    w["gpt2"] = with_tok(root / "gpt2", gpt2_style_tok_dir)

    def cfg_file(name, d):
        p = root / f"{name}.json"
        p.write_text(json.dumps(d))
        return p

    w["distilbert_cfg"] = cfg_file("distilbert", dict(model_type="distilbert", vocab_size=V, dim=32, n_layers=1,
                                                      n_heads=4, hidden_dim=64, max_position_embeddings=64,
                                                      dropout=0.0, attention_dropout=0.0))
    w["distilbert_wide_cfg"] = cfg_file("distilbert_wide", dict(model_type="distilbert", vocab_size=V, dim=48,
                                                                n_layers=1, n_heads=4, hidden_dim=64,
                                                                max_position_embeddings=64))
    w["gpt2_cfg"] = cfg_file("gpt2s", dict(model_type="gpt2", vocab_size=Vg, n_embd=32, n_layer=1, n_head=4,
                                           n_positions=64))
    # A longer corpus: the prose repeated, so an epoch has a few steps.
    text = root / "corpus.txt"
    text.write_text(prose_file.read_text(encoding="utf-8") * 4, encoding="utf-8")
    binarize(text, str(bert_tok_dir), root / "data_bert", progress=False)
    binarize(text, str(gpt2_style_tok_dir), root / "data_gpt2", progress=False)
    other = make_bert_tokenizer(root / "other_tok", [x for x in reversed(prose_words()) if not x.startswith("s")])
    binarize(text, str(other), root / "data_other_tok", progress=False)
    return w


def mlm_args(w, dump, *extra):
    return ["--dump_path", str(dump), "--data_file", str(w["root"] / "data_bert"), "--student_type", "distilbert",
            "--student_config", str(w["distilbert_cfg"]), "--teacher_type", "bert", "--teacher_name", str(w["bert"]),
            "--mlm", "--alpha_mlm", "1.0", "--alpha_ce", "1.0", "--alpha_cos", "1.0", "--batch_size", "4",
            "--gradient_accumulation_steps", "1", "--max_model_input_size", "64", "--log_interval", "1",
            "--learning_rate", "3e-3", "--warmup_prop", "0.0", *extra]


def clm_args(w, dump, *extra):
    return ["--dump_path", str(dump), "--data_file", str(w["root"] / "data_gpt2"), "--student_type", "gpt2",
            "--student_config", str(w["gpt2_cfg"]), "--teacher_type", "gpt2", "--teacher_name", str(w["gpt2"]),
            "--alpha_clm", "1.0", "--alpha_ce", "1.0", "--alpha_cos", "1.0", "--batch_size", "4",
            "--gradient_accumulation_steps", "1", "--max_model_input_size", "64", "--log_interval", "1",
            "--learning_rate", "3e-3", "--warmup_prop", "0.0", *extra]


def metrics(dump: Path) -> list[dict]:
    return [json.loads(x) for x in (dump / "metrics.jsonl").read_text().splitlines()]


def first_last(values: list[float], k: int = 3) -> tuple[float, float]:
    return float(np.mean(values[:k])), float(np.mean(values[-k:]))


# ---------------------------------------------------------------------------------------------
# End to end


def test_mlm_run_loss_falls_and_student_reloads(world, tmp_path):
    dump = tmp_path / "run"
    assert train.main(mlm_args(world, dump, "--n_epoch", "8")) == 0
    m = metrics(dump)
    first, last = first_last([r["loss_mlm"] for r in m])
    assert last < first - 0.5
    assert {"loss_ce", "loss_cos", "lr", "grad_norm", "tokens_per_s"} <= set(m[0])
    for name in ("parameters.json", "git_log.json", "config.json", "model.safetensors", "tokenizer.json"):
        assert (dump / name).is_file(), name
    assert list((dump / "tensorboard").iterdir())
    params = json.loads((dump / "parameters.json").read_text())
    assert params["alpha_cos"] == 1.0 and params["mlm"] is True
    # from_pretrained reproduces the student's logits, and fill-mask runs
    student, info = AutoModelForMaskedLM.from_pretrained(dump, output_loading_info=True)
    assert not info["missing_keys"]
    from safetensors.torch import load_file

    state = load_file(dump / "model.safetensors")
    for k, v in student.state_dict().items():
        if k in state:
            assert torch.equal(v, state[k])
    from transformers import pipeline

    fill = pipeline("fill-mask", model=str(dump), tokenizer=str(dump))
    assert len(fill("the river lay under a [MASK] mist")) == 5


def test_clm_run_loss_falls(world, tmp_path):
    dump = tmp_path / "run"
    assert train.main(clm_args(world, dump, "--n_epoch", "8")) == 0
    first, last = first_last([r["loss_clm"] for r in metrics(dump)])
    assert last < first - 0.5
    model = AutoModelForCausalLM.from_pretrained(dump)
    assert model.config.n_layer == 1


def test_git_log_outside_a_checkout(monkeypatch):
    import git

    def boom(*a, **k):
        raise git.InvalidGitRepositoryError("no")

    monkeypatch.setattr(git, "Repo", boom)
    from distill.training import git_info

    assert git_info()["repo_id"] is None


# ---------------------------------------------------------------------------------------------
# The Distiller's step


def make_distiller(world, accumulation, batch_size, **cfg_over):
    torch.manual_seed(0)
    cfg = TrainConfig(dump_path="x", data_file=str(world["root"] / "data_bert"), student_type="distilbert",
                      student_config=str(world["distilbert_cfg"]), teacher_type="bert",
                      teacher_name=str(world["bert"]), mlm=True, alpha_mlm=1.0, alpha_ce=2.0, alpha_cos=1.0,
                      alpha_mse=0.5, batch_size=batch_size, gradient_accumulation_steps=accumulation,
                      max_model_input_size=64, warmup_prop=0.0, max_grad_norm=0.0, **cfg_over)
    ds = LMSeqsDataset(cfg.data_file, max_model_input_size=64)
    teacher = BertForMaskedLM.from_pretrained(world["bert"]).eval()
    from distill.models import build_model

    torch.manual_seed(1)
    student = build_model("distilbert", str(world["distilbert_cfg"]))
    special = ds.meta["special_token_ids"]
    probs = mlm_token_probs(np.ones(ds.meta["vocab_size"]), 0.7, list(special.values()))
    coll = Collator(special["pad_token"], mlm=True, mask_id=special["mask_token"], token_probs=probs, seed=3)
    from distill.losses import default_layer_map

    return Distiller(cfg, student, teacher, ds, coll, torch.device("cpu"), student_objective="mlm",
                     layer_map=default_layer_map(1, 2)), ds, coll


def test_accumulation_matches_one_big_batch(world):
    d_big, ds, coll = make_distiller(world, accumulation=1, batch_size=8)
    d_acc, _, _ = make_distiller(world, accumulation=4, batch_size=2)
    # ragged lengths: examples of different sizes
    _, first = np.unique(ds.lengths, return_index=True)
    idx = list(first[:8])
    assert len(idx) == 8 and len({int(ds.lengths[i]) for i in idx}) == 8
    examples = [ds[int(i)] for i in idx]
    big = d_big.step([coll(examples)])
    acc = d_acc.step([coll(examples[i:i + 2]) for i in range(0, 8, 2)])
    assert torch.allclose(big.loss, acc.loss, atol=1e-6)
    for k in big.parts:
        assert torch.allclose(big.parts[k], acc.parts[k], atol=1e-6), k
    for (n, p), (_, q) in zip(d_big.student.named_parameters(), d_acc.student.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), n
    # and the update did something
    d_ref, _, _ = make_distiller(world, accumulation=1, batch_size=8)
    moved = [not torch.equal(p, q) for p, q in zip(d_big.student.parameters(), d_ref.student.parameters())]
    assert any(moved)


def test_nan_step_is_skipped_and_training_continues(world, caplog):
    d, _, _ = make_distiller(world, accumulation=1, batch_size=4, n_epoch=2, log_interval=1)
    logged = []
    d.on_log = logged.append
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += 1
        if calls["n"] == 3:  # the third forward: optimizer step 3
            output.logits = output.logits * float("nan")
        return output

    d.student.register_forward_hook(poison)
    snapshots = {}
    orig_step = d.step

    def step(micro):
        before = [p.detach().clone() for p in d.student.parameters()]
        res = orig_step(micro)
        snapshots[d.global_step + 1] = (res.skipped, all(torch.equal(a, b) for a, b in
                                                         zip(before, d.student.parameters())))
        return res

    d.step = step
    d.train(progress=False)
    assert snapshots[3] == (True, True)  # skipped, weights untouched
    assert snapshots[2][0] is False and snapshots[4] == (False, False)  # before and after: real updates
    assert d.global_step == d.total_steps and d.global_step > 4
    assert "step 3" in caplog.text and "NaN" in caplog.text
    assert all(np.isfinite(r["loss"]) for r in logged)


def test_too_many_bad_steps_stop_the_run_with_the_student_saved(world, tmp_path, capsys, monkeypatch):
    real_step = Distiller.step

    def always_nan(self, micro):
        res = real_step(self, micro)
        if self.global_step >= 2:
            self.optimizer.zero_grad(set_to_none=True)
            res.skipped = True
        return res

    monkeypatch.setattr(Distiller, "step", always_nan)
    dump = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main(mlm_args(world, dump, "--n_epoch", "20", "--max_bad_steps", "4"))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "4 consecutive steps had a NaN or Inf loss" in err
    assert (dump / "student_at_stop" / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# Refusals: one sentence, exit 2, nothing touched


def refused(argv, capsys, match: str, dump: Path | None = None):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and match in lines[0], err
    assert "Traceback" not in err
    if dump is not None:
        assert not dump.exists() or not any(dump.iterdir())


def test_refuses_different_vocabularies(world, tmp_path, capsys):
    argv = mlm_args(world, tmp_path / "r")
    argv[argv.index("--teacher_name") + 1] = str(world["bert_bigvocab"])
    refused(argv, capsys, "vocabularies differ", tmp_path / "r")


def test_refuses_data_beyond_the_vocabulary(world, tmp_path, capsys):
    cfg = json.loads(Path(world["distilbert_cfg"]).read_text())
    small = tmp_path / "small.json"
    small.write_text(json.dumps({**cfg, "vocab_size": 20}))
    teacher = tmp_path / "t"
    BertForMaskedLM(BertConfig(vocab_size=20, **TINY)).save_pretrained(teacher)
    argv = mlm_args(world, tmp_path / "r", "--student_config", str(small))
    argv[argv.index("--teacher_name") + 1] = str(teacher)
    refused(argv, capsys, "beyond the models' 20 ids", tmp_path / "r")


def test_refuses_data_from_another_tokenizer(world, tmp_path, capsys):
    argv = mlm_args(world, tmp_path / "r")
    argv[argv.index("--data_file") + 1] = str(world["root"] / "data_other_tok")
    refused(argv, capsys, "another tokenizer", tmp_path / "r")


def test_refuses_ce_with_a_headless_teacher(world, tmp_path, capsys):
    argv = mlm_args(world, tmp_path / "r")
    argv[argv.index("--teacher_name") + 1] = str(world["bert_headless"])
    refused(argv, capsys, "needs the teacher's LM head", tmp_path / "r")
    # without alpha_ce the headless teacher is fine for MLM + cosine
    argv += ["--alpha_ce", "0", "--n_epoch", "1"]
    assert train.main(argv) == 0


def test_refuses_different_widths_without_projection_and_projects_otherwise(world, tmp_path, capsys):
    argv = mlm_args(world, tmp_path / "r", "--student_config", str(world["distilbert_wide_cfg"]),
                    "--hidden_projection", "none")
    refused(argv, capsys, "hidden sizes differ", tmp_path / "r")
    argv = mlm_args(world, tmp_path / "r2", "--student_config", str(world["distilbert_wide_cfg"]), "--n_epoch", "1")
    assert train.main(argv) == 0


def test_refuses_mlm_with_causal_and_clm_with_masked(world, tmp_path, capsys):
    refused(clm_args(world, tmp_path / "r", "--mlm"), capsys, "--mlm needs a masked LM student")
    argv = [a for a in mlm_args(world, tmp_path / "r") if a != "--mlm"]
    refused(argv, capsys, "is a masked LM: pass --mlm")


def test_refuses_all_zero_weights_and_bad_layer_maps(world, tmp_path, capsys):
    refused(mlm_args(world, tmp_path / "r", "--alpha_mlm", "0", "--alpha_ce", "0", "--alpha_cos", "0"), capsys,
            "all loss weights are zero")
    refused(mlm_args(world, tmp_path / "r", "--layer_map", "1:9"), capsys, "--layer_map")


def test_refuses_a_non_empty_dump_path_without_force(world, tmp_path, capsys):
    dump = tmp_path / "r"
    dump.mkdir()
    (dump / "precious.txt").write_text("keep me")
    refused(mlm_args(world, dump), capsys, "is not empty")
    assert (dump / "precious.txt").read_text() == "keep me"
    # --force never deletes the inputs themselves
    argv = mlm_args(world, world["root"], "--force")
    refused(argv, capsys, "lies inside --dump_path")
    assert (world["root"] / "data_bert" / "tokens.bin").exists()


def test_refuses_missing_inputs(world, tmp_path, capsys):
    argv = mlm_args(world, tmp_path / "r")
    argv[argv.index("--data_file") + 1] = str(tmp_path / "nope")
    refused(argv, capsys, "does not exist")
    argv = mlm_args(world, tmp_path / "r", "--token_counts", str(tmp_path / "nope.npy"))
    refused(argv, capsys, "token counts file")


# ---------------------------------------------------------------------------------------------
# Config


# The flags every config needs (validation checks their presence, not the files).
REQUIRED = ["--dump_path", "d", "--data_file", "x", "--student_type", "distilbert", "--teacher_type", "bert",
            "--teacher_name", "t", "--student_config", "c"]


def test_config_file_is_overridden_by_the_command_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("temperature: 3\nalpha_ce: 0.25\nmlm: true\n")
    cfg, given = parse_config(["--config", str(f), "--alpha_ce", "0.75", *REQUIRED])
    assert cfg.temperature == 3.0 and cfg.alpha_ce == 0.75 and cfg.mlm is True
    assert cfg.batch_size == 5 and cfg.gradient_accumulation_steps == 50  # the original's defaults
    assert {"temperature", "alpha_ce", "mlm", "config"} <= given
    f.write_text('{"temprature": 3}')
    bad = tmp_path / "c.json"
    bad.write_text('{"temprature": 3}')
    with pytest.raises(UserError, match="unknown keys: temprature"):
        parse_config(["--config", str(bad), *REQUIRED])


def test_grouping_flags_and_compat_notes(world, tmp_path, capsys):
    cfg, _ = parse_config(["--no_group_by_size", *REQUIRED])
    assert cfg.group_by_size is False
    cfg, _ = parse_config(REQUIRED)
    assert cfg.group_by_size is True
    assert train.main(mlm_args(world, tmp_path / "r", "--n_epoch", "1", "--fp16_opt_level", "O2",
                               "--group_by_size", "--freeze_token_type_embds", "--freeze_pos_embs")) == 0
    err = capsys.readouterr().err
    assert "--fp16_opt_level is apex's" in err
    assert "on by default" in err
    assert "--freeze_token_type_embds has no effect" in err
    student = AutoModelForMaskedLM.from_pretrained(tmp_path / "r")
    assert student.config.model_type == "distilbert"


def test_freeze_pos_embs_keeps_them(world, tmp_path):
    assert train.main(mlm_args(world, tmp_path / "r", "--n_epoch", "1", "--freeze_pos_embs")) == 0
    torch.manual_seed(0)
    from transformers import set_seed

    from distill.models import build_model

    set_seed(56)
    fresh = build_model("distilbert", {**json.loads(Path(world["distilbert_cfg"]).read_text()),
                                       "initializer_range": 0.02})
    trained = AutoModelForMaskedLM.from_pretrained(tmp_path / "r")
    pe = "distilbert.embeddings.position_embeddings.weight"
    assert torch.equal(trained.state_dict()[pe], fresh.state_dict()[pe])
    we = "distilbert.embeddings.word_embeddings.weight"
    assert not torch.equal(trained.state_dict()[we], fresh.state_dict()[we])


def test_bf16_run_on_cpu(world, tmp_path):
    dump = tmp_path / "run"
    assert train.main(mlm_args(world, dump, "--n_epoch", "8", "--bf16")) == 0
    first, last = first_last([r["loss_mlm"] for r in metrics(dump)])
    assert np.isfinite(last) and last < first - 0.3
    # the student is kept in fp32 (autocast only), so it saves and reloads as fp32
    assert AutoModelForMaskedLM.from_pretrained(dump).dtype == torch.float32


def test_fp16_needs_a_gpu(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    refused(mlm_args(world, tmp_path / "r", "--fp16"), capsys, "--fp16 needs a GPU")
    refused(mlm_args(world, tmp_path / "r", "--fp16", "--bf16"), capsys, "choose one of --fp16 and --bf16")


def test_log_and_checkpoint_intervals_count_optimizer_steps(world, tmp_path):
    dump = tmp_path / "run"
    assert train.main(mlm_args(world, dump, "--gradient_accumulation_steps", "2", "--batch_size", "2",
                               "--max_steps", "6", "--log_interval", "3", "--checkpoint_interval", "4")) == 0
    assert [r["step"] for r in metrics(dump)] == [3, 6]
    assert sorted(p.name for p in (dump / "checkpoints").iterdir()) == ["latest", "step_00000004"]


def test_nan_gradient_with_a_finite_loss_is_dropped(world):
    d, ds, coll = make_distiller(world, accumulation=1, batch_size=4)
    before = [p.detach().clone() for p in d.student.parameters()]
    hook = next(d.student.parameters()).register_hook(lambda g: g * float("nan"))
    res = d.step([coll([ds[i] for i in range(4)])])
    assert res.skipped and torch.isfinite(res.loss)
    assert all(torch.equal(a, b) for a, b in zip(before, d.student.parameters()))
    hook.remove()
    assert not d.step([coll([ds[i] for i in range(4)])]).skipped


def test_config_file_types_are_checked(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("learning_rate: 5e-4\n")  # YAML reads this as a string
    assert parse_config(["--config", str(f), *REQUIRED])[0].learning_rate == 5e-4
    for bad, match in (("temperature: two", "must be a number"), ("max_steps: 2.5", "must be an integer"),
                       ("mlm: 1", "true or false"), ("dump_path: [1]", "must be a string")):
        f.write_text(bad + "\n")
        with pytest.raises(UserError, match=match):
            parse_config(["--config", str(f), *REQUIRED[2:]])  # the file's dump_path is the bad one


def test_more_refusals(world, tmp_path, capsys):
    refused(mlm_args(world, tmp_path / "r", "--batch_size", "100000"), capsys, "fewer than one batch",
            tmp_path / "r")
    refused(mlm_args(world, tmp_path / "r", "--num_workers", "-1"), capsys, "--num_workers must not be negative")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model_type": "distilbert", "dim": 33, "n_heads": 4, "vocab_size": world["V"]}))
    refused(mlm_args(world, tmp_path / "r", "--student_config", str(bad)), capsys, "not a valid distilbert config")
    dump = tmp_path / "r2"
    dump.mkdir()
    (dump / "my.yaml").write_text("temperature: 2.0\n")
    refused(mlm_args(world, dump, "--force", "--config", str(dump / "my.yaml")), capsys, "lies inside")
    assert (dump / "my.yaml").exists()


@pytest.mark.parametrize("bf16", [False, True])
def test_fused_projection_matches_materialised_logits(world, monkeypatch, bf16):
    """The Distiller's default path (vocabulary projection left to the fused losses) gives the losses
    and student update of the plain path, where the models compute their (B, L, V) logits."""
    from distill import losses as L

    d_fused, ds, coll = make_distiller(world, accumulation=2, batch_size=3, bf16=bf16)
    assert L.output_projection(d_fused.student) is not None and L.output_projection(d_fused.teacher) is not None
    batches = [coll([ds[i] for i in range(j, j + 3)]) for j in (0, 3)]
    fused = d_fused.step(batches)
    with monkeypatch.context() as m:
        m.setattr(L, "output_projection", lambda model: None)  # every head computes its logits
        d_plain, _, _ = make_distiller(world, accumulation=2, batch_size=3, bf16=bf16)
        plain = d_plain.step(batches)
    tol = dict(rtol=2e-2, atol=2e-2) if bf16 else dict(rtol=1e-5, atol=1e-5)
    assert fused.parts.keys() == plain.parts.keys() and {"ce", "mlm", "mse", "cos"} <= set(fused.parts)
    for k in fused.parts:
        torch.testing.assert_close(fused.parts[k], plain.parts[k], **tol, msg=k)
    for (n, p), (_, q) in zip(d_fused.student.named_parameters(), d_plain.student.named_parameters()):
        torch.testing.assert_close(p, q, **tol, msg=n)
