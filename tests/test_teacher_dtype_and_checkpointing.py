"""--teacher_dtype: the teachers are loaded and kept in that dtype, with no gradients; and
--gradient_checkpointing: the student's activations are recomputed in backward, with the same results."""

from __future__ import annotations

import pytest
import torch

from distill.config import TrainConfig, parse_config
from tests.test_reproducibility import assert_same_student, launch, ok


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    from distill.testing import tiny

    root = tmp_path_factory.mktemp("memory_options")
    return {kind: tiny.build(root / kind, kind) for kind in ("clm", "mlm")}


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(dump_path="d", data_file="x", student_type="gpt2", student_pretrained_weights="s",
                       teacher_type="gpt2", teacher_name="t", **kw)


def test_the_teacher_dtype_defaults_to_fp32_on_the_cpu_unless_bf16():
    assert _cfg().teacher_torch_dtype(cuda=False) == torch.float32
    assert _cfg(bf16=True).teacher_torch_dtype(cuda=False) == torch.bfloat16
    assert _cfg(teacher_dtype="fp16").teacher_torch_dtype(cuda=False) == torch.float16
    assert _cfg(bf16=True, teacher_dtype="fp32").teacher_torch_dtype(cuda=False) == torch.float32


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_the_teacher_is_held_in_its_dtype_without_gradients_or_optimizer_state(worlds, tmp_path, dtype):
    from distill.distiller import Distiller
    from distill.training import build_run

    w = worlds["clm"]
    cfg, _ = parse_config(w.train_args(tmp_path / "x", "--teacher_dtype", dtype))
    run = build_run(cfg)
    d = Distiller(cfg, run.student.model, run.teacher.model, run.dataset, run.collator, torch.device("cpu"),
                  student_objective="clm", layer_map=run.layer_map)
    want = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    assert {p.dtype for p in d.teacher.parameters()} == {want}
    assert not any(p.requires_grad for p in d.teacher.parameters())
    assert {p.dtype for p in d.student.parameters()} == {torch.float32}
    teacher_ids = {id(p) for p in d.teacher.parameters()}
    stepped = [p for g in d.optimizer.param_groups for p in g["params"]]
    assert stepped and not teacher_ids & {id(p) for p in stepped}
    res = d.step([run.collator([run.dataset[i] for i in range(2)])])
    assert not res.skipped and torch.isfinite(res.loss)
    assert all(p.grad is None for p in d.teacher.parameters()) and not d.optimizer.state.keys() & teacher_ids


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["clm", "mlm"])
def test_gradient_checkpointing_gives_the_same_student(worlds, tmp_path, kind):
    """The README's path (an extracted student, dropout on), with and without checkpointing: the first
    step's losses bit for bit (the recomputed layers draw the same dropout masks), and the same losses
    and student after it up to float rounding (the backward adds the recomputed layers' gradients in
    another order: the weights differ by a few ulps after the first update)."""
    from safetensors.torch import load_file

    from tests.test_reproducibility import metrics_without_timing

    w = worlds[kind]
    ok(launch(w.train_args(tmp_path / "plain", max_steps=4)))
    ok(launch(w.train_args(tmp_path / "ckpt", "--gradient_checkpointing", max_steps=4)))
    losses = [[{k: v for k, v in row.items() if k.startswith("loss")} for row in metrics_without_timing(tmp_path / d)]
              for d in ("plain", "ckpt")]
    assert losses[0][0] == losses[1][0] and len(losses[0]) == len(losses[1]) == 4
    for x, y in zip(losses[0], losses[1]):
        assert x.keys() == y.keys() and all(y[k] == pytest.approx(x[k], rel=1e-4) for k in x)
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("plain", "ckpt"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-5 * float(a[k].abs().max())), k
    # Checkpointing is not a no-op: the same run twice with it is bit for bit.
    ok(launch(w.train_args(tmp_path / "ckpt2", "--gradient_checkpointing", max_steps=4)))
    assert_same_student(tmp_path / "ckpt", tmp_path / "ckpt2")


def test_gradient_checkpointing_is_on_in_the_student(worlds, tmp_path):
    from distill.training import build_run

    w = worlds["mlm"]
    cfg, _ = parse_config(w.train_args(tmp_path / "x", "--gradient_checkpointing"))
    student = build_run(cfg).student.model
    assert getattr(student, "is_activation_checkpointing", None) or student.is_gradient_checkpointing


def test_gradient_checkpointing_on_a_model_without_it_is_one_sentence():
    from distill.errors import UserError
    from distill.training import freeze

    with pytest.raises(UserError, match="Linear does not support gradient checkpointing"):
        freeze(_cfg(gradient_checkpointing=True), torch.nn.Linear(2, 2))
