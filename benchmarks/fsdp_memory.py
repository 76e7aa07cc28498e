"""Per-rank memory of the training state under DDP and under --fsdp, at 2 processes on the CPU (gloo).

    python benchmarks/fsdp_memory.py [--run_dir runs/demo-clm] [--nproc 2]

On `make demo-clm`'s models: SmolLM2-135M-Instruct teacher and its 15-layer extracted student
(about 100M parameters, 400 MB in fp32), ce + clm + cos, 2 sequences of 128 tokens, one step. For
each mode it launches ``torchrun --nproc_per_node N`` on this script; every rank runs one optimizer
step and sums the bytes of the tensors it holds (a DTensor's local shard):

- the student's parameters, its gradients (measured just before the optimizer step), and AdamW's
  state (exp_avg, exp_avg_sq, step) after it;
- the teacher's parameters.

Prints one JSON line per rank and mode, and a table with FSDP's share of DDP's per rank. The
acceptance of issue 17 asks for parameters + gradients + optimizer state under FSDP at most 60% of
DDP's at 2 ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from itertools import islice
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        if t is None:
            continue
        if hasattr(t, "to_local"):
            t = t.to_local()
        total += t.numel() * t.element_size()
    return total


def rank_main(argv: list[str]) -> None:
    from distill import distributed
    from distill.config import parse_config
    from distill.distiller import Distiller
    from distill.seeding import seed_everything
    from distill.training import build_run

    cfg, _ = parse_config(argv)
    env = distributed.init(use_gpu=False)
    seed_everything(cfg.seed)
    run = build_run(cfg, env.world_size)
    d = Distiller(cfg, run.student.model, run.teacher.model, run.dataset, run.collator, env.device,
                  student_objective=run.student.objective, layer_map=run.layer_map, projection=run.projection,
                  dist=env)
    seen = {}
    original = d.optimize

    def measured(loss_total):
        seen["grads"] = local_bytes(p.grad for p in d._params)
        return original(loss_total)

    d.optimize = measured
    d.sampler.set_epoch(0)
    micro = list(islice(iter(d.loader), cfg.gradient_accumulation_steps))
    res = d.step(micro)
    opt_state = [v for st in d.optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    record = {"rank": env.rank, "mode": "fsdp" if d.fsdp else "ddp", "skipped": res.skipped,
              "params": local_bytes(d._params), "grads": seen["grads"], "optimizer": local_bytes(opt_state),
              "teacher": local_bytes(d.teacher.parameters())}
    record["student_state"] = record["params"] + record["grads"] + record["optimizer"]
    print("RECORD " + json.dumps(record), flush=True)
    distributed.shutdown(env, finished=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_dir", default="runs/demo-clm")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--rank_main", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rank_main is not None:
        rank_main(args.rank_main)
        return 0
    run = Path(args.run_dir)
    for need in ("teacher", "data", "student_init"):
        if not (run / need).exists():
            raise SystemExit(f"{run / need} is missing: run `make demo-clm QUICK=1` first")
    base = ["--dump_path", str(run / "fsdp_memory"), "--data_file", str(run / "data"), "--student_type", "llama",
            "--student_pretrained_weights", str(run / "student_init"), "--teacher_type", "llama",
            "--teacher_name", str(run / "teacher"), "--alpha_ce", "5", "--alpha_clm", "2", "--alpha_cos", "1",
            "--max_model_input_size", "128", "--batch_size", "2", "--gradient_accumulation_steps", "1",
            "--n_gpu", "0", "--max_steps", "1"]
    results: dict[str, list[dict]] = {}
    for mode, extra in (("ddp", []), ("fsdp", ["--fsdp"])):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               __file__, "--rank_main", *base, *extra]
        r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        if r.returncode != 0:
            raise SystemExit(r.stderr[-4000:])
        results[mode] = sorted((json.loads(line[len("RECORD "):]) for line in r.stdout.splitlines()
                                if line.startswith("RECORD ")), key=lambda x: x["rank"])
        for rec in results[mode]:
            print(json.dumps(rec), flush=True)
    mb = 2**20
    print(f"\nper rank, {args.nproc} processes (MB):\n")
    print("| rank | mode | parameters | gradients | AdamW state | student total | teacher |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for mode in results:
        for rec in results[mode]:
            print(f"| {rec['rank']} | {mode} | {rec['params'] / mb:,.0f} | {rec['grads'] / mb:,.0f} | "
                  f"{rec['optimizer'] / mb:,.0f} | {rec['student_state'] / mb:,.0f} | {rec['teacher'] / mb:,.0f} |")
    ratios = [f["student_state"] / d["student_state"] for f, d in zip(results["fsdp"], results["ddp"])]
    t_ratios = [f["teacher"] / d["teacher"] for f, d in zip(results["fsdp"], results["ddp"])]
    print(f"\nFSDP / DDP per rank: student state {', '.join(f'{x:.1%}' for x in ratios)}; "
          f"teacher {', '.join(f'{x:.1%}' for x in t_ratios)}")
    print(json.dumps({"nproc": args.nproc, "fsdp_over_ddp_student_state": ratios, "fsdp_over_ddp_teacher": t_ratios}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
