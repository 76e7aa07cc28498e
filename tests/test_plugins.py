"""The loss-term registry: the built-ins are registered terms, a plug-in file outside the package adds
a term that trains (its --alpha_<name> flag and the config file's losses: section come from the
registry), and a term the run cannot serve is refused with one sentence before any step."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from distill.config import LOSS_NAMES, TrainConfig, parse_config
from distill.errors import UserError
from distill.losses.terms import TERMS, LossTerm, Needs, check_needs, register
from tests.test_reproducibility import launch, metrics_without_timing, ok

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "embedding_cosine.py"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from distill.testing import tiny

    return tiny.build(tmp_path_factory.mktemp("plugins") / "clm", "clm")


def test_the_built_in_losses_are_registered_terms_in_their_logging_order():
    assert tuple(TERMS)[:len(LOSS_NAMES)] == LOSS_NAMES
    assert {k: TERMS[k].fused for k in LOSS_NAMES} == {"ce": "soft_target_ce", "mlm": "lm_ce", "clm": "lm_ce",
                                                         "mse": "logits_mse", "cos": None, "hidden_mse": None}


@pytest.mark.slow
def test_a_plug_in_file_outside_the_package_adds_a_term_that_trains(world, tmp_path):
    plugin = shutil.copy(EXAMPLE, tmp_path / "my_terms.py")
    args = world.train_args(tmp_path / "run", "--plugins", str(plugin), "--alpha_embedding_cosine", "2.0",
                            max_steps=4)
    r = ok(launch(args))
    assert "embedding_cosine=2.0" in r.stdout
    rows = metrics_without_timing(tmp_path / "run")
    assert all(row["loss_embedding_cosine"] > 0 for row in rows)
    parts = ("loss_ce", "loss_clm", "loss_cos")
    for row in rows:  # the logged loss is the weighted sum of its terms
        assert row["loss"] == pytest.approx(sum(row[k] for k in parts) + 2.0 * row["loss_embedding_cosine"], rel=1e-5)
    # The same from a config file's losses: section (built-in weights may be given there too).
    config = tmp_path / "run.yaml"
    config.write_text(f"plugins: [{plugin}]\nlosses:\n  embedding_cosine: 2.0\n  ce: 1.0\n")
    args2 = [a for a in world.train_args(tmp_path / "run2", max_steps=4)] + ["--config", str(config)]
    ok(launch(args2))
    assert metrics_without_timing(tmp_path / "run2") == rows


@pytest.mark.slow
def test_an_installed_package_adds_a_term_through_its_entry_point(world, tmp_path):
    """A package on the path that declares a ``distill.loss_terms`` entry point: its term is loaded in
    every run, with no --plugins flag, and trains like the file given with --plugins."""
    import os

    site = tmp_path / "site"
    pkg = site / "my_distill_terms"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(EXAMPLE.read_text().replace('"embedding_cosine"', '"pkg_embedding_cosine"'))
    info = site / "my_distill_terms-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-distill-terms\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[distill.loss_terms]\nembedding = my_distill_terms\n")
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    r = ok(launch(world.train_args(tmp_path / "run", "--alpha_pkg_embedding_cosine", "2.0", max_steps=4), **env))
    assert "pkg_embedding_cosine=2.0" in r.stdout
    rows = metrics_without_timing(tmp_path / "run")
    # The same term from the file: the same run, under the entry point's name.
    ok(launch(world.train_args(tmp_path / "file", "--plugins", str(EXAMPLE), "--alpha_embedding_cosine", "2.0",
                               max_steps=4)))
    renamed = [{k.replace("loss_embedding_cosine", "loss_pkg_embedding_cosine"): v for k, v in row.items()}
               for row in metrics_without_timing(tmp_path / "file")]
    assert rows == renamed
    # A broken entry point is one sentence.
    (pkg / "__init__.py").write_text("raise ImportError('missing dependency')\n")
    r = launch(world.train_args(tmp_path / "run2", max_steps=2), **env)
    assert r.returncode == 2 and "the loss-term entry point embedding (my_distill_terms) failed to load" in r.stderr


def test_a_term_is_computed_as_its_definition_says(world, tmp_path):
    """The plug-in's value in a Distiller step equals the same formula written out on the models."""
    from distill.distiller import Distiller
    from distill.seeding import seed_everything
    from distill.training import build_run

    cfg, _ = parse_config(world.train_args(tmp_path / "x", "--plugins", str(EXAMPLE), "--alpha_embedding_cosine",
                                           "1", "--alpha_cos", "0"))
    seed_everything(0)
    run = build_run(cfg)
    d = Distiller(cfg, run.student.model, run.teacher.model, run.dataset, run.collator, torch.device("cpu"),
                  student_objective="clm", layer_map=run.layer_map)
    d.student.eval()
    batch = run.collator([run.dataset[i] for i in range(3)])
    with torch.no_grad():
        sums = d.loss_sums(batch, d.masks(batch))
        s = d.student(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True)
        t = d.teacher(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True)
    a = batch["attention_mask"].unsqueeze(-1).float()
    ps, pt = (s.hidden_states[-1] * a).sum(1) / a.sum(1), (t.hidden_states[-1] * a).sum(1) / a.sum(1)
    want = (1 - torch.nn.functional.cosine_similarity(ps, pt, dim=-1)).sum()
    assert sums["embedding_cosine"].item() == pytest.approx(want.item(), rel=1e-5)
    assert d.loss_counts(d.masks(batch))["embedding_cosine"] == 3


def test_terms_asking_for_attentions_get_eager_attention(world):
    from distill import models as M

    class AttentionEntropy(LossTerm):
        name = "attention_entropy_test"
        needs = Needs(student_outputs=("attentions",))

        def compute(self, ctx):
            return sum((-a * a.clamp_min(1e-9).log()).sum() for a in ctx.student.attentions)

    student = M.load_model("gpt2", world.student)
    assert student.model.config._attn_implementation != "eager"
    assert check_needs(AttentionEntropy(), student, None) is None
    assert student.model.config._attn_implementation == "eager"
    with torch.no_grad():
        out = student.model(input_ids=torch.tensor([[3, 4, 5]]), output_attentions=True)
    assert out.attentions[0].shape[-2:] == (3, 3)


def _one_sentence(argv, capsys, match):
    from distill.cli import train

    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and match in err[0], err


def test_unknown_terms_bad_weights_and_unservable_needs_are_refused_before_any_step(world, tmp_path, capsys):
    dump = tmp_path / "run"
    base = world.train_args(dump, max_steps=2)
    config = tmp_path / "c.yaml"
    config.write_text("losses:\n  attention_transfer: 1.0\n")
    _one_sentence(base + ["--config", str(config)], capsys, "unknown loss term 'attention_transfer'")
    _one_sentence(base + ["--alpha_attention_transfer", "1"], capsys, "--alpha_attention_transfer")
    for bad in ("-1", "nan", "inf"):
        config.write_text(f"plugins: [{EXAMPLE}]\nlosses:\n  embedding_cosine: {bad}\n")
        _one_sentence(base + ["--config", str(config)], capsys, "finite non-negative")
    _one_sentence(base + ["--plugins", str(tmp_path / "missing.py")], capsys, "does not exist")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('no')\n")
    _one_sentence(base + ["--plugins", str(broken)], capsys, "failed to load (RuntimeError: no)")
    assert not dump.exists()


def test_a_term_needing_the_teachers_hidden_states_is_refused_with_a_teacher_cache(world, tmp_path, capsys):
    from tests.test_teacher_cache import cached_args, write

    cache = write(world, tmp_path / "cache").folder
    argv = cached_args(world, tmp_path / "run", cache, "--plugins", str(EXAMPLE), "--alpha_embedding_cosine", "1")
    _one_sentence(argv, capsys, "needs the teacher's outputs, which a teacher cache does not hold")


def test_register_refuses_a_second_term_of_the_same_name_and_bad_names():
    class Clash(LossTerm):
        name = "ce"

        def compute(self, ctx):
            return torch.zeros(())

    with pytest.raises(ValueError, match="registered already"):
        register(Clash)

    class Bad(LossTerm):
        name = "not a name"

        def compute(self, ctx):
            return torch.zeros(())

    class NoCompute(LossTerm):
        name = "no_compute"

    with pytest.raises(TypeError, match="abstract"):
        register(NoCompute)

    with pytest.raises(ValueError, match="identifier"):
        register(Bad)
    with pytest.raises(UserError, match="built-in loss ce is weighted by --alpha_ce"):
        TrainConfig(dump_path="d", data_file="d", student_type="gpt2", student_config="c", teacher_type="gpt2",
                    teacher_name="t", losses={"ce": 1.0})
    assert json.dumps(TrainConfig(dump_path="d", data_file="d", student_type="gpt2", student_config="c",
                                  teacher_type="gpt2", teacher_name="t").to_dict())  # still JSON for checkpoints


# --------------------------------------------------------------------------- MiniLM attention relations


@pytest.fixture(scope="module")
def mlm_world(tmp_path_factory):
    from distill.testing import tiny

    return tiny.build(tmp_path_factory.mktemp("relations") / "mlm", "mlm")


def _relations_direct(s_qkv, t_qkv, attn, heads):
    """MiniLMv2's loss written out: per relation, per head, KL of the teacher's row softmax to the student's."""
    total = 0.0
    for a, b in ("qq", "kk", "vv"):
        per = []
        for (q, k, v) in (t_qkv, s_qkv):
            x, y = {"q": q, "k": k, "v": v}[a], {"q": q, "k": k, "v": v}[b]
            B, L, D = x.shape
            xh = x.reshape(B, L, heads, D // heads).permute(0, 2, 1, 3)
            yh = y.reshape(B, L, heads, D // heads).permute(0, 2, 1, 3)
            scores = xh @ yh.transpose(-1, -2) / (D // heads) ** 0.5
            scores = scores.masked_fill(~attn[:, None, None, :], float("-inf"))
            per.append(torch.softmax(scores, -1))
        t, s = per
        kl = torch.where(attn[:, None, None, :], t * (torch.log(t) - torch.log(s)), torch.zeros(()))
        total += kl.sum(-1).mean(1)[attn].sum()
    return total


def test_attention_relations_match_a_direct_computation_across_widths_and_head_counts(mlm_world, tmp_path):
    """A 48-wide, 6-head DistilBERT student against the 32-wide, 4-head BERT teacher: 8 relation heads."""
    from distill.distiller import Distiller
    from distill.seeding import seed_everything
    from distill.training import build_run

    V = json.loads((mlm_world.teacher / "config.json").read_text())["vocab_size"]
    student_cfg = tmp_path / "student.json"
    student_cfg.write_text(json.dumps(dict(model_type="distilbert", vocab_size=V, dim=48, n_layers=2, n_heads=6,
                                           hidden_dim=64, max_position_embeddings=64, dropout=0.0,
                                           attention_dropout=0.0)))
    cfg = TrainConfig(dump_path=str(tmp_path / "d"), data_file=str(mlm_world.data), student_type="distilbert",
                      student_config=str(student_cfg), teacher_type="bert", teacher_name=str(mlm_world.teacher),
                      mlm=True, alpha_mlm=1.0, alpha_ce=0.0, token_counts=str(mlm_world.counts),
                      max_model_input_size=64, losses={"attention_relation": 1.0})
    seed_everything(0)
    run = build_run(cfg)
    d = Distiller(cfg, run.student.model, run.teacher.model, run.dataset, run.collator, torch.device("cpu"),
                  student_objective="mlm")
    d.student.eval()
    batch = run.collator([run.dataset[i] for i in range(3)])
    with torch.no_grad():
        got = d.loss_sums(batch, d.masks(batch))["attention_relation"]
        ids, attn = batch["input_ids"], batch["attention_mask"]
        s_h = d.student(input_ids=ids, attention_mask=attn, output_hidden_states=True).hidden_states[-2]
        t_h = d.teacher(input_ids=ids, attention_mask=attn, output_hidden_states=True).hidden_states[-2]
        sl = d.student.distilbert.transformer.layer[-1].attention
        tl = d.teacher.bert.encoder.layer[-1].attention.self
        s_qkv = (sl.q_lin(s_h), sl.k_lin(s_h), sl.v_lin(s_h))
        t_qkv = (tl.query(t_h), tl.key(t_h), tl.value(t_h))
    want = _relations_direct(s_qkv, t_qkv, attn.bool(), heads=8)
    assert got.item() == pytest.approx(float(want), rel=1e-5)
    assert d.loss_counts(d.masks(batch))["attention_relation"] == int(attn.sum())
    assert float(want) > 0


@pytest.mark.slow
def test_attention_relation_distillation_trains_on_the_readme_path(mlm_world, tmp_path):
    dump = tmp_path / "run"
    args = mlm_world.train_args(dump, "--alpha_attention_relation", "1.0", "--alpha_cos", "0", max_steps=6)
    ok(launch(args))
    rows = metrics_without_timing(dump)
    assert len(rows) == 6 and all(r["loss_attention_relation"] > 0 for r in rows)
    for r in rows:  # the extracted student's last layer is a copy of the teacher's: a small, live term
        assert r["loss"] == pytest.approx(r["loss_ce"] + r["loss_mlm"] + r["loss_attention_relation"], rel=1e-5)
