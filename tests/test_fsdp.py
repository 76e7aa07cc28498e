"""--fsdp under torchrun on CPU (gloo): FSDP2 with 2 processes trains the same student as DDP with 2
processes and as one process with the global batch; a killed FSDP run resumes exactly; its checkpoint
resumes on 1 process; the configuration errors are one sentence each."""

from __future__ import annotations

import json

import pytest
import torch

from .test_distributed import args, assert_close_runs, launch, metrics, ok, setup, weights  # noqa: F401
from .test_train import world  # noqa: F401  (the module-scoped fixture)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fsdp_run(setup):  # noqa: F811
    dump = setup["root"] / "fsdp"
    r = ok(launch(args(setup, dump, 2, "--fsdp"), 2))
    return dump, r


def test_fsdp_trains_the_student_of_ddp_and_of_one_process(setup, fsdp_run):  # noqa: F811
    dump_fsdp, r = fsdp_run
    assert "2 processes (gloo, cpu, FSDP2: student and teacher sharded)" in r.stdout
    dump_ddp, dump_one = setup["root"] / "ddp_ref", setup["root"] / "one_ref"
    ok(launch(args(setup, dump_ddp, 2), 2))
    ok(launch(args(setup, dump_one, 4), 1))
    # The final student is ordinary safetensors that from_pretrained loads, with every tensor whole.
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(dump_fsdp)
    assert {k: tuple(v.shape) for k, v in weights(dump_fsdp).items()} == \
        {k: tuple(v.shape) for k, v in weights(dump_one).items()}
    assert sum(p.numel() for p in model.parameters()) > 0
    for other in (dump_ddp, dump_one):  # per tensor, relative 1e-4
        assert_close_runs(dump_fsdp, other, rtol=1e-4, atol=1e-5)
    # The checkpoint: each rank's shards (torch.distributed.checkpoint), checksummed in meta.json; the rest
    # (schedule, counters, every rank's RNG state) in state.pt.
    folder = dump_fsdp / "checkpoints" / "step_00000006"
    state = torch.load(folder / "state.pt", weights_only=False)
    assert state["sharded"] and state["student"] is None and len(state["ranks"]) == 2
    meta = json.loads((folder / "meta.json").read_text())
    files = sorted(meta["shards_sha256"])
    assert "shards/.metadata" in files and sum(f.endswith(".distcp") for f in files) == 2
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(str(folder / "shards"))
    stored = reader.read_metadata().state_dict_metadata
    assert any(k.startswith("model.student.") for k in stored)
    assert any(k.startswith("model.projection.") for k in stored)
    assert any(k.startswith("optim.state.student.") and k.endswith("exp_avg") for k in stored)


def test_a_killed_fsdp_run_resumes_exactly_and_across_one_and_two_processes(setup, fsdp_run):  # noqa: F811
    straight, _ = fsdp_run
    dump = setup["root"] / "fsdp_killed"
    r = launch(args(setup, dump, 2, "--fsdp"), 2, DISTILL_FAULT="after_step_5@1")  # rank 1 dies after step 5
    assert r.returncode != 0
    assert (dump / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    ok(launch(args(setup, dump, 2, "--fsdp", "--resume"), 2))
    assert metrics(straight) == metrics(dump)  # bitwise the same losses, step by step
    wa, wb = weights(straight), weights(dump)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    # The same 2-process checkpoint resumed by one process with the same global batch (1 x 4), no FSDP.
    one = setup["root"] / "fsdp_to_one"
    r = launch(args(setup, one, 2, "--fsdp"), 2, DISTILL_FAULT="after_step_4")
    assert r.returncode != 0
    r = ok(launch(args(setup, one, 4, "--resume"), 1))
    assert "resuming on 1 processes instead of 2" in r.stderr and "fsdp: True -> False" in r.stderr
    assert_close_runs(straight, one, rtol=1e-4, atol=1e-5)
    # And the other way: a one-process checkpoint of whole tensors resumed by 2 FSDP processes (2 x 2).
    back = setup["root"] / "one_to_fsdp"
    r = launch(args(setup, back, 4), 1, DISTILL_FAULT="after_step_4")
    assert r.returncode != 0
    r = ok(launch(args(setup, back, 2, "--fsdp", "--resume"), 2))
    assert "resuming on 2 processes instead of 1" in r.stderr and "fsdp: False -> True" in r.stderr
    assert_close_runs(straight, back, rtol=1e-4, atol=1e-5)
    # A damaged shard is caught by its checksum, and the checkpoint before it is used.
    latest = one / "checkpoints" / (one / "checkpoints" / "latest").read_text().strip()
    assert not (latest / "shards").exists()  # the one-process run wrote whole tensors
    ckpts = sorted((dump / "checkpoints").glob("step_*"))
    shard = next((ckpts[-1] / "shards").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-8] + b"\0" * 8)
    r = ok(launch(args(setup, dump, 2, "--fsdp", "--resume"), 2))
    assert f"checkpoint {ckpts[-1].name} cannot be read (CorruptCheckpoint)" in r.stderr


def test_fsdp_configuration_errors_are_one_sentence(setup, tmp_path):  # noqa: F811
    r = launch(args(setup, tmp_path / "one", 4, "--fsdp"), 1)
    assert r.returncode == 2 and "--fsdp shards the models over processes: launch train.py with torchrun" in r.stderr
    assert not (tmp_path / "one").exists()
    # A student whose blocks are not in a list named like transformer layers.
    from distill.distributed import transformer_layers
    from distill.errors import UserError

    with pytest.raises(UserError, match="cannot find the transformer layers of Sequential"):
        transformer_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    cfg = json.loads(setup["cfg"].read_text())
    assert cfg["dropout"] == 0.0  # the equality above needs dropout off
