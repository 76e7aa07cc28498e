"""Same seed, same student, on the path the README teaches: a student extracted with
scripts/extract.py, trained with --student_pretrained_weights, dropout on, 2 micro-batches a step.

For MLM and for CLM:
- two runs with the same flags give the same student, optimizer state and metrics.jsonl, bit for bit;
- a run killed with SIGKILL at a random step between checkpoints, or while writing a checkpoint,
  then resumed with --resume, gives the student of the uninterrupted run, bit for bit;
- the same under torchrun with 2 processes.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

MAX_STEPS, INTERVAL = 10, 4  # checkpoints at 4 and 8; the last steps (9, 10) come after the last one
TIMING = ("time", "tokens_per_s")


@pytest.fixture(scope="module")
def readme(tmp_path_factory):
    """The README's steps 1-3 for both objectives: binarize, count tokens, extract a student."""
    from transformers import AutoConfig

    from distill.testing import tiny

    root = tmp_path_factory.mktemp("readme")
    worlds = {kind: tiny.build(root / kind, kind) for kind in ("mlm", "clm")}
    for kind, w in worlds.items():
        config = AutoConfig.from_pretrained(w.student)
        assert (config.dropout if kind == "mlm" else config.resid_pdrop) == 0.1  # dropout on
    return root, worlds


def train_args(worlds: dict, kind: str, dump: Path, *extra: str) -> list[str]:
    return worlds[kind].train_args(dump, *extra, max_steps=MAX_STEPS, interval=INTERVAL)


def launch(argv: list[str], nproc: int = 1, fault: str = "", **env_extra) -> subprocess.CompletedProcess:
    env = dict(os.environ, DISTILL_FAULT=fault, DISTILL_NAN_AT="", OMP_NUM_THREADS="1")
    env.update(env_extra)
    if nproc == 1:
        cmd = [sys.executable, str(ROOT / "train.py"), *argv]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "train.py"), *argv]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r


def metrics_without_timing(dump: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(ln).items() if k not in TIMING}
            for ln in (dump / "metrics.jsonl").read_text().splitlines()]


def assert_same_student(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} of {len(wa)} tensors differ, e.g. {different[:3]}"
    assert metrics_without_timing(a) == metrics_without_timing(b)


def assert_same_tensors(a, b, where: str = "") -> None:
    """Nested dicts/lists of tensors and numbers, compared bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def random_step(kind: str) -> int:
    """A step between checkpoints, drawn afresh each run (the draw is printed on failure)."""
    seed = int(os.environ.get("DISTILL_TEST_SEED", time.time_ns() % 2**31))
    choices = [s for s in range(INTERVAL + 1, MAX_STEPS) if s % INTERVAL != 0]  # 5, 6, 7, 9
    step = random.Random(f"{seed}-{kind}").choice(choices)
    print(f"DISTILL_TEST_SEED={seed}: killing the {kind} run after step {step}")
    return step


@pytest.fixture(scope="module")
def straight(readme):
    root, paths = readme
    dumps = {}
    for kind in ("mlm", "clm"):
        dumps[kind] = root / f"straight_{kind}"
        ok(launch(train_args(paths, kind, dumps[kind])))
        assert [r["step"] for r in metrics_without_timing(dumps[kind])] == list(range(1, MAX_STEPS + 1))
    return dumps


@pytest.mark.parametrize("kind", ["mlm", "clm"])
def test_two_runs_give_the_same_student_optimizer_and_metrics(readme, straight, tmp_path, kind):
    _, paths = readme
    again = tmp_path / "again"
    ok(launch(train_args(paths, kind, again)))
    assert_same_student(straight[kind], again)
    ck = f"checkpoints/step_{2 * INTERVAL:08d}/state.pt"
    sa = torch.load(straight[kind] / ck, weights_only=False)
    sb = torch.load(again / ck, weights_only=False)
    assert_same_tensors(sa["optimizer"], sb["optimizer"], "optimizer")
    assert_same_tensors(sa["student"], sb["student"], "student")
    if kind == "mlm":  # another seed is another run: the comparison can tell runs apart
        other = tmp_path / "other_seed"
        ok(launch(train_args(paths, kind, other, "--seed", "8")))
        assert metrics_without_timing(other) != metrics_without_timing(straight[kind])


def test_a_divergence_run_is_reproducible_resumes_exactly_and_differs_from_kl(readme, straight, tmp_path):
    """The README's CLM path with --divergence jsd: two runs, and a kill after step 6 then --resume, give the
    same student; it is not forward KL's."""
    _, paths = readme
    flags = ("--divergence", "jsd", "--divergence_beta", "0.3")
    a, b = tmp_path / "a", tmp_path / "b"
    ok(launch(train_args(paths, "clm", a, *flags)))
    r = launch(train_args(paths, "clm", b, *flags), fault="after_step_6")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    ok(launch(train_args(paths, "clm", b, *flags, "--resume")))
    assert_same_student(a, b)
    assert metrics_without_timing(a) != metrics_without_timing(straight["clm"])


@pytest.mark.parametrize("kind", ["mlm", "clm"])
def test_bf16_with_the_fp32_attention_is_reproducible_and_resumes_exactly(readme, tmp_path, kind):
    """--bf16 on the CPU with the student's attention in fp32 (distill.attention, pinned here as a machine's
    file would pin it): two runs, and a kill after step 6 then --resume, give the same student."""
    _, paths = readme
    a, b = tmp_path / "a", tmp_path / "b"
    fp32 = {"DISTILL_CPU_ATTENTION": "fp32"}
    r = ok(launch(train_args(paths, kind, a, "--bf16"), **fp32))
    assert "the student's attention runs in fp32 (env)" in r.stdout + r.stderr
    r = launch(train_args(paths, kind, b, "--bf16"), fault="after_step_6", **fp32)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    ok(launch(train_args(paths, kind, b, "--bf16", "--resume"), **fp32))
    assert_same_student(a, b)
    # (Here the bf16 attention gave the same bits: DistilBERT's and GPT-2's queries, keys and values
    # are bf16 already, and PyTorch's CPU kernel accumulates in fp32 either way; tests/test_attention.py
    # checks that the fp32 attention is the one that runs.)


@pytest.mark.parametrize("kind", ["mlm", "clm"])
def test_sigkill_at_a_random_step_then_resume_gives_the_same_student(readme, straight, tmp_path, kind):
    _, paths = readme
    step = random_step(kind)
    dump = tmp_path / "run"
    r = launch(train_args(paths, kind, dump), fault=f"after_step_{step}")
    assert r.returncode == -signal.SIGKILL, f"step {step}: {r.stderr[-2000:]}"
    assert not (dump / "model.safetensors").exists()
    r = ok(launch(train_args(paths, kind, dump, "--resume")))
    assert f"at step {(step // INTERVAL) * INTERVAL} " in r.stdout, r.stdout
    assert_same_student(straight[kind], dump)


@pytest.mark.parametrize("kind", ["mlm", "clm"])
def test_sigkill_during_a_checkpoint_write_then_resume_gives_the_same_student(readme, straight, tmp_path, kind):
    _, paths = readme
    dump = tmp_path / "run"
    r = launch(train_args(paths, kind, dump), fault=f"during_checkpoint_write_{2 * INTERVAL}")
    assert r.returncode == -signal.SIGKILL
    assert (dump / "checkpoints" / "latest").read_text().strip() == f"step_{INTERVAL:08d}"
    assert any(p.name.startswith(".tmp-") for p in (dump / "checkpoints").iterdir())  # the half-written one
    r = ok(launch(train_args(paths, kind, dump, "--resume")))
    assert f"at step {INTERVAL} " in r.stdout
    assert_same_student(straight[kind], dump)


@pytest.mark.parametrize("kind", ["mlm", "clm"])
def test_two_processes_killed_and_resumed_give_the_same_student(readme, tmp_path, kind):
    _, paths = readme
    straight2 = tmp_path / "straight"
    ok(launch(train_args(paths, kind, straight2), nproc=2))
    step = random_step(kind)
    dump = tmp_path / "killed"
    r = launch(train_args(paths, kind, dump), nproc=2, fault=f"after_step_{step}@1")  # rank 1 dies
    assert r.returncode != 0
    ok(launch(train_args(paths, kind, dump, "--resume"), nproc=2))
    assert_same_student(straight2, dump)


def test_seed_everything_seeds_every_generator():
    from distill.seeding import seed_everything

    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    seed_everything(3)
    first = draws()
    seed_everything(3)
    assert draws() == first
    seed_everything(3, rank=1)
    assert all(a != b for a, b in zip(draws(), first))


def test_extract_from_a_headless_teacher_is_reproducible(tmp_path, bert_tok_dir):
    """The demo's teacher has no MLM head: the student's head is drawn at random, from --seed."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from distill.cli import extract

    torch.manual_seed(0)
    teacher = tmp_path / "headless"
    BertModel(BertConfig(vocab_size=len(AutoTokenizer.from_pretrained(bert_tok_dir)), hidden_size=32,
                         num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         max_position_embeddings=64)).save_pretrained(teacher)
    AutoTokenizer.from_pretrained(bert_tok_dir).save_pretrained(teacher)

    def student(name, *extra):
        torch.manual_seed(len(name))  # whatever the generators held before, --seed decides
        assert extract.main(["--model_type", "bert", "--model_name", str(teacher), "--dump_checkpoint",
                             str(tmp_path / name), *extra]) == 0
        return load_file(tmp_path / name / "model.safetensors")

    a, b, c = student("a"), student("bb"), student("c", "--seed", "3")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the head differs with another seed
