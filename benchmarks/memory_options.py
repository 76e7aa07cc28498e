"""Memory of the options that trade it away: --teacher_dtype and --gradient_checkpointing.

    python benchmarks/memory_options.py [--run_dir runs/demo-clm] [--batch_size 8]

On `make demo-clm`'s set-up (SmolLM2-135M-Instruct teacher, its 15-layer extracted student, ce + clm +
cos, 128-token sequences, one micro-batch a step), without autocast. Each set-up runs in a fresh
child process: one warm-up step, then two measured ones. Per set-up:

- ``teacher_mb``: the teacher's parameter bytes, in the dtype it is held in;
- ``saved_for_backward_mb``: the bytes autograd keeps for the backward pass during one step's forward
  (every tensor saved, counted once per storage, through ``torch.autograd.graph.saved_tensors_hooks``):
  the activation memory gradient checkpointing removes;
- ``peak_rss_mb``: the child's peak resident memory;
- ``step_s``: the median of the two steps (one child after another: indicative only).

Prints one JSON line per set-up and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.teacher_cache import cpu_description  # noqa: E402
from benchmarks.teachers import recipe_args  # noqa: E402

SETUPS = {
    "fp32 teacher": [],
    "--teacher_dtype bf16": ["--teacher_dtype", "bf16"],
    "--gradient_checkpointing": ["--gradient_checkpointing"],
    "both": ["--teacher_dtype", "bf16", "--gradient_checkpointing"],
}


class SavedBytes:
    """Bytes of the distinct storages autograd saves for backward while active."""

    def __init__(self):
        self.seen: set[int] = set()
        self.bytes = 0

    def pack(self, t: torch.Tensor):
        if torch._C._current_graph_task_id() != -1:  # a checkpointed layer recomputed in backward: transient
            return t
        try:
            key = t.untyped_storage().data_ptr()
            size = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            key, size = id(t), t.numel() * t.element_size()
        if key not in self.seen:
            self.seen.add(key)
            self.bytes += size
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def child(argv: list[str]) -> None:
    from distill.config import parse_config
    from distill.distiller import Distiller
    from distill.seeding import seed_everything
    from distill.training import build_run

    cfg, _ = parse_config(argv)
    seed_everything(cfg.seed)
    run = build_run(cfg)
    d = Distiller(cfg, run.student.model, run.teacher.model, run.dataset, run.collator, torch.device("cpu"),
                  student_objective=run.student.objective, layer_map=run.layer_map, projection=run.projection)
    d.sampler.set_epoch(0)
    batches = iter(d.loader)
    micro = [list(islice(batches, cfg.gradient_accumulation_steps)) for _ in range(3)]
    d.step(micro[0])
    saved = SavedBytes()
    times = []
    for i, m in enumerate(micro[1:]):
        t0 = time.perf_counter()
        if i == 0:
            with saved.hooks():
                d.step(m)
        else:
            d.step(m)
        times.append(time.perf_counter() - t0)
    teacher = d.teacher
    print(json.dumps({"teacher_mb": sum(p.numel() * p.element_size() for p in teacher.parameters()) / 2**20,
                      "teacher_dtype": str(next(teacher.parameters()).dtype).replace("torch.", ""),
                      "saved_for_backward_mb": saved.bytes / 2**20,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "step_s": statistics.median(times)}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_dir", default="runs/demo-clm")
    p.add_argument("--assets_dir", default="assets")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        child(args.child)
        return 0
    from distill.demo import clm

    run = Path(args.run_dir)
    clm.main(["--run_dir", str(run), "--assets_dir", args.assets_dir, "--quick", "--bf16", "off"])
    base = recipe_args(run, False, [run / "teacher"], "probs")
    base = _set(base, "--batch_size", str(args.batch_size))
    base = _set(base, "--gradient_accumulation_steps", "1")
    records = {}
    for name, extra in SETUPS.items():
        r = subprocess.run([sys.executable, __file__, "--child", *base, *extra], capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(r.stderr[-3000:])
        records[name] = json.loads(r.stdout.strip().splitlines()[-1])
        print(json.dumps({"setup": name, **records[name]}), flush=True)
    print(json.dumps({**cpu_description(), "batch_size": args.batch_size, "setups": records}))
    first = records["fp32 teacher"]
    print(f"\nbatch {args.batch_size} x 128 tokens, fp32 student, no autocast\n")
    print("| set-up | teacher (MB) | saved for backward (MB) | peak RSS (MB) | step (s) |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in records.items():
        print(f"| {name} | {r['teacher_mb']:,.0f} ({r['teacher_dtype']}) | {r['saved_for_backward_mb']:,.0f} "
              f"({r['saved_for_backward_mb'] / first['saved_for_backward_mb']:.0%}) | {r['peak_rss_mb']:,.0f} | "
              f"{r['step_s']:.2f} |")
    return 0


def _set(args: list[str], flag: str, value: str) -> list[str]:
    out = list(args)
    out[out.index(flag) + 1] = value
    return out


if __name__ == "__main__":
    raise SystemExit(main())
