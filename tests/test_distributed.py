"""Data-parallel training with torchrun on CPU (gloo): 2 processes x batch b match 1 process x 2b,
a killed 2-process run resumes exactly, a NaN on one rank is skipped by both, and a resume on
another world size re-shards the same global batches (or is refused when the global batch changes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .test_train import mlm_args, world  # noqa: F401  (the module-scoped fixture)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(world, tmp_path_factory):  # noqa: F811
    """A student wider than the teacher (so a hidden-state projection trains under DDP too), no
    dropout (so ranks and a single process draw nothing differently), token counts for MLM."""
    import numpy as np

    from distill.data.counts import count_tokens

    root = tmp_path_factory.mktemp("ddp")
    counts = root / "counts.npy"
    np.save(counts, count_tokens(world["root"] / "data_bert"))
    cfg = root / "student.json"
    cfg.write_text(json.dumps(dict(model_type="distilbert", vocab_size=world["V"], dim=48, n_layers=1, n_heads=4,
                                   hidden_dim=64, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0)))
    return {"world": world, "root": root, "counts": counts, "cfg": cfg}


def args(s, dump, batch_size, *extra):
    return mlm_args(s["world"], dump, "--student_config", str(s["cfg"]), "--token_counts", str(s["counts"]),
                    "--batch_size", str(batch_size), "--gradient_accumulation_steps", "2", "--max_steps", "8",
                    "--checkpoint_interval", "3", "--n_epoch", "3", "--learning_rate", "1e-3", *extra)


def launch(argv, nproc: int, **env_extra) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", DISTILL_FAULT="", DISTILL_NAN_AT="")
    env.update(env_extra)
    if nproc == 1:
        cmd = [sys.executable, str(ROOT / "train.py"), *argv]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "train.py"), *argv]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=ROOT)


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r


def metrics(dump: Path) -> dict[int, dict]:
    out = {}
    for line in (dump / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = {k: v for k, v in rec.items() if k.startswith("loss") or k in ("lr", "grad_norm")}
    return out


def weights(dump: Path) -> dict[str, torch.Tensor]:
    return load_file(dump / "model.safetensors")


def assert_close_runs(a: Path, b: Path, rtol: float, atol: float) -> None:
    ma, mb = metrics(a), metrics(b)
    assert ma.keys() == mb.keys()
    for step in ma:
        for k in ma[step]:
            assert ma[step][k] == pytest.approx(mb[step][k], rel=rtol, abs=atol), (step, k)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=rtol, atol=atol, msg=k)


@pytest.fixture(scope="module")
def finalization_probe(tmp_path_factory) -> dict:
    """An environment whose Python reports its finalization (an atexit handler in sitecustomize)."""
    folder = tmp_path_factory.mktemp("probe")
    (folder / "sitecustomize.py").write_text(
        "import atexit, os, sys\n"
        "rank = os.environ.get('RANK', 'none')\n"
        "atexit.register(lambda: print('finalized rank', rank, file=sys.stderr, flush=True))\n")
    return {"PYTHONPATH": str(folder)}


@pytest.fixture(scope="module")
def two_proc(setup, finalization_probe):
    dump = setup["root"] / "two"
    r = ok(launch(args(setup, dump, 2), 2, **finalization_probe))
    return dump, r


def test_two_processes_match_one_process_with_the_global_batch(setup, two_proc):
    dump2, r = two_proc
    assert "2 processes (gloo, cpu)" in r.stdout
    dump1 = setup["root"] / "one"
    ok(launch(args(setup, dump1, 4), 1))
    assert sorted(metrics(dump1)) == list(range(1, 9))
    assert_close_runs(dump1, dump2, rtol=1e-4, atol=1e-5)
    # only rank 0 wrote: one metrics line per step, one checkpoint series
    assert len((dump2 / "metrics.jsonl").read_text().splitlines()) == 8
    state = torch.load(dump2 / "checkpoints" / "step_00000006" / "state.pt", weights_only=False)
    assert state["world_size"] == 2 and len(state["ranks"]) == 2  # every rank's RNG state


def test_killed_two_process_run_resumes_exactly(setup, two_proc):
    straight, _ = two_proc
    dump = setup["root"] / "killed"
    r = launch(args(setup, dump, 2), 2, DISTILL_FAULT="after_step_5@1")  # rank 1 dies after step 5
    assert r.returncode != 0
    assert (dump / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    ok(launch(args(setup, dump, 2, "--resume"), 2))
    ma, mb = metrics(straight), metrics(dump)
    assert ma == mb  # bitwise the same losses, step by step
    wa, wb = weights(straight), weights(dump)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.heavy  # the fault matrix's "NaN loss on one rank of two" row (tests/test_faults.py)
def test_nan_on_one_rank_is_skipped_by_both(setup, two_proc):
    straight, _ = two_proc
    dump = setup["root"] / "nan"
    r = ok(launch(args(setup, dump, 2), 2, DISTILL_NAN_AT="1:3"))
    skipped = [ln for ln in r.stderr.splitlines() if "step 3: the loss is NaN or Inf" in ln]
    assert len(skipped) == 2, r.stderr[-3000:]  # rank 0's loss was finite, it skipped too
    m = metrics(dump)
    assert 3 not in m and sorted(m) == [1, 2, 4, 5, 6, 7, 8]
    assert m[2] == metrics(straight)[2]  # identical before the NaN
    assert all(v is not None and v == v for rec in m.values() for v in rec.values())  # finite afterwards
    wa, wb = weights(straight), weights(dump)
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)  # the skipped update is missing


def test_resume_on_another_world_size_reshards(setup, two_proc):
    straight, _ = two_proc
    dump = setup["root"] / "reshard"
    r = launch(args(setup, dump, 2), 2, DISTILL_FAULT="after_step_4")
    assert r.returncode != 0
    # another global batch is refused in one sentence, and nothing is touched
    before = sorted(p.name for p in (dump / "checkpoints").iterdir())
    r = launch(args(setup, dump, 2, "--resume"), 1)
    assert r.returncode == 2
    assert "the global batch would change from 2 x 2 to 1 x 2" in r.stderr
    assert sorted(p.name for p in (dump / "checkpoints").iterdir()) == before
    # the same global batch (1 x 4 instead of 2 x 2): the same data, re-sharded
    r = ok(launch(args(setup, dump, 4, "--resume"), 1))
    assert "resuming on 1 processes instead of 2" in r.stderr
    assert_close_runs(straight, dump, rtol=1e-4, atol=1e-5)


# The end of a torchrun worker (distill.distributed.exits_without_finalization).


def test_workers_end_without_pythons_finalization(two_proc, finalization_probe):
    """Both ranks of the 2-process run ended through os._exit: the probe's atexit handler, which
    Python runs at an ordinary exit (checked on a bare interpreter), never ran in them, and the run
    ended with 0 after saving the student. (Finalization with gloo's threads alive aborted 9 of 40
    two-process runs of a small script: distill/distributed.py.)"""
    _, r = two_proc
    assert "saved the student" in r.stdout
    assert "finalized rank 0" not in r.stderr and "finalized rank 1" not in r.stderr
    bare = subprocess.run([sys.executable, "-c", "pass"], env=dict(os.environ, **finalization_probe),
                          capture_output=True, text=True)
    assert "finalized rank none" in bare.stderr


@pytest.mark.parametrize("outcome, code, printed", [("return", 0, ""), ("none", 0, ""), ("exit2", 2, ""),
                                                    ("message", 1, "stopped here")])
def test_exits_without_finalization_under_torchrun(monkeypatch, capsys, outcome, code, printed):
    from distill import distributed

    class Exited(Exception):
        pass

    def fake_exit(c):
        raise Exited(c)

    @distributed.exits_without_finalization
    def main():
        print("ran")
        if outcome == "return":
            return 0
        if outcome == "exit2":
            raise SystemExit(2)
        if outcome == "message":
            raise SystemExit("stopped here")
        return None

    monkeypatch.setattr(distributed.os, "_exit", fake_exit)
    monkeypatch.setattr(distributed.logging, "shutdown", lambda: None)  # pytest's own handlers stay open
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    if outcome == "return":  # outside torchrun: an ordinary call
        assert main() == 0
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(Exited) as e:
        main()
    assert e.value.args == (code,)
    captured = capsys.readouterr()
    assert "ran" in captured.out and printed in captured.err


def test_exits_without_finalization_lets_a_crash_through(monkeypatch):
    """A bug's traceback is Python's to print: the decorator does not swallow it."""
    from distill import distributed

    @distributed.exits_without_finalization
    def main():
        raise RuntimeError("a bug")

    monkeypatch.setattr(distributed.os, "_exit", lambda c: pytest.fail("os._exit called"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="a bug"):
        main()
