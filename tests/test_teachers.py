"""Several teachers (--teacher_name repeated): the soft targets combine them by a weighted average of
the probabilities or of the logits, exactly as written out by hand; they must share the student's
vocabulary; a run with two teachers trains through train.py and is reproducible."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from distill.config import TrainConfig, parse_config
from distill.errors import UserError
from distill.losses.ensemble import TeacherEnsemble
from tests.test_plugins import _one_sentence
from tests.test_reproducibility import assert_same_student, launch, ok


def noisy_copy(teacher: Path, dest: Path, std: float = 0.05, seed: int = 1) -> Path:
    """``teacher`` with Gaussian noise added to every weight, saved with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    cls = AutoModelForMaskedLM if "bert" in (teacher / "config.json").read_text() else AutoModelForCausalLM
    model = cls.from_pretrained(teacher)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(dest)
    return dest


def _world(tmp_path_factory, kind: str):
    from distill.testing import tiny

    root = tmp_path_factory.mktemp(f"teachers_{kind}")
    w = tiny.build(root, kind)
    noisy_copy(w.teacher, root / "teacher_noisy")
    return w


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The GPT-2 world, and a second teacher: its teacher with noise added."""
    return _world(tmp_path_factory, "clm")


@pytest.fixture(scope="module")
def mlm_world(tmp_path_factory):
    return _world(tmp_path_factory, "mlm")


def _distiller(world, tmp_path, *extra):
    from distill.distiller import Distiller
    from distill.seeding import seed_everything
    from distill.training import build_run

    second = str(world.teacher.parent / "teacher_noisy")
    cfg, _ = parse_config(world.train_args(tmp_path / "x", "--teacher_name", second, *extra))
    seed_everything(0)
    run = build_run(cfg)
    d = Distiller(cfg, run.student.model, run.teacher.model, run.dataset, run.collator, torch.device("cpu"),
                  student_objective=world.kind, layer_map=run.layer_map,
                  extra_teachers=[m.model for m in run.extra_teachers])
    for m in (d.student, d.teacher, *d.extra_teachers):
        m.eval()  # the same forwards by hand
    return d, run


@pytest.mark.parametrize("kind", ["clm", "mlm"])
@pytest.mark.parametrize("combine", ["probs", "logits"])
def test_two_teachers_loss_equals_the_hand_computation(request, kind, tmp_path, combine):
    """The second teacher is the first with noise added; weights 1 : 3; GPT-2 and BERT."""
    world = request.getfixturevalue("world" if kind == "clm" else "mlm_world")
    extra = ["--teacher_weights", "1,3", "--teacher_combine", combine, "--temperature", "2.0"]
    if combine == "logits":
        extra += ["--alpha_mse", "1.0"]
    d, run = _distiller(world, tmp_path, *extra)
    assert d.teacher_weights == (0.25, 0.75)
    batch = run.collator([run.dataset[i] for i in range(4)])
    masks = d.masks(batch)
    with torch.no_grad():
        sums = d.loss_sums(batch, masks)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        s = d.student(**inputs).logits.double()
        z1, z2 = (t(**inputs).logits.double() for t in (d.teacher, d.extra_teachers[0]))
    assert (z1 - z2).abs().max() > 0.05  # the teachers differ
    T, rows = 2.0, masks["ce"]
    if combine == "probs":
        p = 0.25 * torch.softmax(z1 / T, -1) + 0.75 * torch.softmax(z2 / T, -1)
    else:
        p = torch.softmax((0.25 * z1 + 0.75 * z2) / T, -1)
    kl = (p * (p.log() - torch.log_softmax(s / T, -1))).sum(-1) * T * T
    assert sums["ce"].item() == pytest.approx(kl[rows].sum().item(), rel=1e-4)
    # Not what either teacher alone gives.
    for z in (z1, z2):
        alone = (torch.softmax(z / T, -1) * (torch.log_softmax(z / T, -1) - torch.log_softmax(s / T, -1))).sum(-1)
        assert abs((alone * T * T)[rows].sum().item() - sums["ce"].item()) > 1e-2 * sums["ce"].item()
    if combine == "logits":
        mse = ((s - (0.25 * z1 + 0.75 * z2)) ** 2).sum(-1)
        assert sums["mse"].item() == pytest.approx(mse[rows].sum().item(), rel=1e-4)


def test_the_ensemble_with_one_member_is_that_teacher_and_combines_blocks_at_any_scale():
    torch.manual_seed(0)
    z = [torch.randn(5, 11) * 3 for _ in range(3)]
    for combine in ("probs", "logits"):
        one = TeacherEnsemble([z[0]], (1.0,), combine, 2.0).materialize()
        assert torch.allclose(torch.log_softmax(one / 2, -1), torch.log_softmax(z[0] / 2, -1), atol=1e-5)
        ens = TeacherEnsemble(z, (0.2, 0.3, 0.5), combine, 2.0)
        full = ens.materialize()
        for scale in (1.0, 0.5):  # the fused path hands blocks already multiplied by 1 / T
            assert torch.allclose(ens.combine_blocks([x * scale for x in z], scale), full * scale, atol=1e-5)
    with pytest.raises(ValueError, match="sum to 1"):
        TeacherEnsemble(z[:2], (0.5, 0.6))


@pytest.mark.slow
def test_two_teachers_train_through_train_py_reproducibly(world, tmp_path):
    second = noisy_copy(world.teacher, tmp_path / "second")
    runs = []
    for name in ("a", "b"):
        args = world.train_args(tmp_path / name, "--teacher_name", str(second), "--teacher_weights", "2,1",
                                max_steps=4)
        r = ok(launch(args))
        runs.append(tmp_path / name)
    assert "2 teachers, probs averaged with weights 0.667, 0.333" in r.stdout
    assert_same_student(*runs)
    # A resume checks both teachers' files (weight sizes, config hash): another second teacher is refused.
    config = json.loads((second / "config.json").read_text())
    (second / "config.json").write_text(json.dumps({**config, "resid_pdrop": 0.0}))
    args = world.train_args(tmp_path / "a", "--teacher_name", str(second), "--teacher_weights", "2,1", max_steps=6)
    r = launch(args + ["--resume"])
    assert r.returncode == 2 and "is not the teacher the checkpoint was trained with" in r.stderr, r.stderr[-500:]


def test_bad_teacher_sets_are_refused_with_one_sentence(world, tmp_path, capsys):
    from distill.testing import tiny

    dump = tmp_path / "run"
    noisy = str(world.teacher.parent / "teacher_noisy")
    base = world.train_args(dump, max_steps=2)
    _one_sentence(base + ["--teacher_name", noisy, "--teacher_weights", "1,2,3"], capsys, "3 weights for 2 teacher")
    _one_sentence(base + ["--teacher_name", noisy, "--teacher_weights", "1,0"], capsys, "finite positive")
    _one_sentence(base + ["--teacher_name", noisy, "--alpha_mse", "1"], capsys, "--teacher_combine logits")
    _one_sentence(base + ["--teacher_name", str(world.teacher)], capsys, "is given twice")
    _one_sentence(base + ["--teacher_name", str(tmp_path / "missing")], capsys, "does not exist")
    no_soft = [a if a != "1.0" or base[i - 1] != "--alpha_ce" else "0" for i, a in enumerate(base)]
    _one_sentence(no_soft + ["--teacher_name", noisy], capsys, "serves only the soft-target losses")
    # Another vocabulary: a teacher over other words.
    tok = tiny.gpt2_style_tokenizer(tmp_path / "tok", ["other", "words", "only"])
    foreign = tiny.teacher("clm", tmp_path / "foreign", tok)
    _one_sentence(base + ["--teacher_name", str(foreign)], capsys, "does not share the student's vocabulary")
    # The same size, another tokenizer.
    words = tiny.corpus_words((world.data.parent / "corpus.txt").read_text())
    shuffled = tiny.gpt2_style_tokenizer(tmp_path / "tok2", list(reversed(words)))
    same_size = tiny.teacher("clm", tmp_path / "same_size", shuffled)
    _one_sentence(base + ["--teacher_name", str(same_size)], capsys, "another tokenizer than the first teacher's")
    assert not dump.exists()


def test_several_teachers_in_a_config_file_and_with_a_cache(world, tmp_path):
    noisy = str(world.teacher.parent / "teacher_noisy")
    config = tmp_path / "run.yaml"
    config.write_text(f"teacher_name: [{world.teacher}, {noisy}]\nteacher_weights: [1, 3]\nteacher_combine: logits\n")
    args = [a for a in world.train_args(tmp_path / "r") if True]
    i = args.index("--teacher_name")
    del args[i:i + 2]
    cfg, _ = parse_config(args + ["--config", str(config)])
    assert cfg.teacher_names() == [str(world.teacher), noisy]
    assert cfg.teacher_weight_list() == (0.25, 0.75) and cfg.teacher_combine == "logits"
    with pytest.raises(UserError, match="one teacher's top-k"):
        TrainConfig(dump_path="d", data_file="x", student_type="gpt2", student_pretrained_weights="s",
                    teacher_type="gpt2", teacher_name=[str(world.teacher), noisy], teacher_cache="c")
    shutil.rmtree(tmp_path / "r", ignore_errors=True)
