"""Checkpoints and exact resume: a run killed with SIGKILL (or stopped by SIGTERM) and resumed ends
bitwise identical to a straight run, and logs the same losses after the resume point."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .test_train import mlm_args, world  # noqa: F401  (the module-scoped fixture)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def args_for(world, dump, *extra):  # noqa: F811
    # The wide student (dropout on, widths differ so a projection trains too), MLM masking on,
    # 2 micro-batches per step, a checkpoint every 4 steps.
    return mlm_args(world, dump, "--student_config", str(world["distilbert_wide_cfg"]), "--batch_size", "2",
                    "--gradient_accumulation_steps", "2", "--max_steps", "14", "--checkpoint_interval", "4",
                    "--n_epoch", "3", "--token_counts", str(world["counts"]), *extra)


def run(argv, fault=None, **kw):
    env = dict(os.environ, DISTILL_FAULT=fault or "")
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *argv], env=env, capture_output=True,
                          text=True, timeout=300, **kw)


def refused(argv, capsys) -> str:
    """train.py's refusal of ``argv``, in this process (a refusal comes before any training, and a
    process start costs more than the check): its stderr; the exit status must be 2."""
    from distill.cli import train

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def losses_by_step(dump: Path) -> dict[int, dict]:
    out = {}
    for line in (dump / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[r["step"]] = {k: v for k, v in r.items() if k.startswith("loss") or k in ("lr", "grad_norm")}
    return out


def assert_same_run(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert losses_by_step(a) == losses_by_step(b)


@pytest.fixture(scope="module")
def straight(world, tmp_path_factory):  # noqa: F811
    import numpy as np

    counts = tmp_path_factory.mktemp("counts") / "counts.npy"
    from distill.data.counts import count_tokens

    np.save(counts, count_tokens(world["root"] / "data_bert"))
    world["counts"] = counts
    dump = tmp_path_factory.mktemp("straight") / "run"
    r = run(args_for(world, dump))
    assert r.returncode == 0, r.stderr
    assert sorted(losses_by_step(dump)) == list(range(1, 15))
    return dump


# The README's path (an extracted student, dropout on) is killed at random steps and inside checkpoint
# writes in test_reproducibility.py and benchmarks/faults.py; these cover a student built from a config
# with a learned hidden-state projection.
# The fault matrix (tests/test_faults.py, in `make test`) kills the README's path inside a checkpoint
# write, stops it with SIGTERM and corrupts its latest checkpoint; here those run in `make test-all`.
@pytest.mark.parametrize("fault", ["after_step_6", pytest.param("during_checkpoint_write_8", marks=pytest.mark.heavy)])
def test_sigkill_then_resume_is_bitwise_identical(world, straight, tmp_path, fault):  # noqa: F811
    dump = tmp_path / "run"
    r = run(args_for(world, dump), fault=fault)
    assert r.returncode == -signal.SIGKILL
    assert not (dump / "model.safetensors").exists()
    if fault.startswith("during"):
        assert any(p.name.startswith(".tmp-") for p in (dump / "checkpoints").iterdir())  # the half-written one
        assert (dump / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    r = run(args_for(world, dump, "--resume"))
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout
    assert_same_run(straight, dump)


@pytest.mark.heavy  # the fault matrix's "SIGTERM (stop, then --resume)" row
def test_sigterm_saves_and_stops_cleanly_then_resumes(world, straight, tmp_path):  # noqa: F811
    dump = tmp_path / "run"
    env = dict(os.environ, DISTILL_FAULT="")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args_for(world, dump)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = dump / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    if "stopped by SIGTERM" not in out:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 0
    assert "--resume" in out
    r = run(args_for(world, dump, "--resume"))
    assert r.returncode == 0, r.stderr
    assert_same_run(straight, dump)


def test_resume_refusals_and_harmless_changes(world, straight, tmp_path, capsys):  # noqa: F811
    import shutil

    data = tmp_path / "data"  # a private copy, changed below
    shutil.copytree(world["root"] / "data_bert", data)
    teacher = tmp_path / "teacher"
    shutil.copytree(world["bert"], teacher)

    def argv_(*extra):
        a = args_for(world, tmp_path / "run", *extra)
        a[a.index("--data_file") + 1] = str(data)
        a[a.index("--teacher_name") + 1] = str(teacher)
        return a

    assert run(argv_(), fault="after_step_6").returncode == -signal.SIGKILL
    # starting again without --resume or --force is refused, and says how to resume
    err = refused(argv_(), capsys)
    assert "--resume" in err and "holds checkpoints" in err
    # an incompatible config
    err = refused(argv_("--resume", "--alpha_ce", "2.0"), capsys)
    assert "config differs" in err and "alpha_ce" in err
    # another teacher at the same path
    cfg = (teacher / "config.json").read_text()
    (teacher / "config.json").write_text(cfg.replace("{", '{"_note": "retrained",', 1))
    assert "not the teacher" in refused(argv_("--resume"), capsys)
    (teacher / "config.json").write_text(cfg)
    # the data changed under the same path
    meta = (data / "meta.json").read_text()
    (data / "meta.json").write_text(meta + "\n")
    assert "not the data" in refused(argv_("--resume"), capsys)
    (data / "meta.json").write_text(meta)
    # nothing was touched by the refusals: a harmless change resumes and still matches
    r = run(argv_("--resume", "--checkpoint_interval", "5"))
    assert r.returncode == 0, r.stderr
    assert "changed setting: checkpoint_interval" in r.stderr
    assert_same_run(straight, tmp_path / "run")


@pytest.mark.heavy  # the fault matrix's "corrupt latest checkpoint" and "truncated latest checkpoint" rows
def test_corrupt_latest_falls_back_to_the_one_before(world, straight, tmp_path):  # noqa: F811
    dump = tmp_path / "run"
    assert run(args_for(world, dump), fault="after_step_10").returncode == -signal.SIGKILL
    latest = dump / "checkpoints" / "step_00000008" / "state.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # truncated
    r = run(args_for(world, dump, "--resume"))
    assert r.returncode == 0, r.stderr
    assert "step_00000008 cannot be read" in r.stderr and "step_00000004" in r.stdout
    assert_same_run(straight, dump)


def test_keeps_the_last_k_checkpoints(world, straight, tmp_path):  # noqa: F811
    dump = tmp_path / "run"
    r = run(args_for(world, dump, "--checkpoint_interval", "2", "--keep_checkpoints", "2"))
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in (dump / "checkpoints").iterdir())
    assert names == ["latest", "step_00000012", "step_00000014"]
    meta = json.loads((dump / "checkpoints" / "step_00000014" / "meta.json").read_text())
    assert meta["config"]["alpha_cos"] == 1.0 and meta["data"]["tokens_bytes"] > 0 and "teacher" in meta


def test_resume_across_an_epoch_boundary(world, straight, tmp_path):  # noqa: F811
    # 76 examples / batch 2 / 2 micro-batches: an epoch is 19 steps. Kill at 21, after the end-of-epoch
    # checkpoint (19) and before the next interval one (24 is past the end).
    straight2 = tmp_path / "straight"
    extra = ("--max_steps", "23", "--checkpoint_interval", "10")
    assert run(args_for(world, straight2, *extra)).returncode == 0
    assert sorted(p.name for p in (straight2 / "checkpoints").iterdir()) == ["latest", "step_00000010",
                                                                            "step_00000019", "step_00000020"]
    dump = tmp_path / "run"
    assert run(args_for(world, dump, *extra), fault="after_step_21").returncode == -signal.SIGKILL
    r = run(args_for(world, dump, *extra, "--resume"))
    assert r.returncode == 0, r.stderr
    assert "at step 20 (epoch 1, batch 2)" in r.stdout
    assert_same_run(straight2, dump)
