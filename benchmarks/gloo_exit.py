"""How often a torchrun worker on gloo aborts at exit when the process group outlives
``destroy_process_group``, and that ending the worker with ``os._exit`` avoids it
(``distill.distributed.exits_without_finalization``, which ``train.py`` uses).

    python benchmarks/gloo_exit.py --launches 40

Each launch is ``torchrun --standalone --nproc_per_node 2`` of a small worker: 50 all-reduces of
Python tensors, one more, a barrier and ``destroy_process_group``. Three variants, launched in turn:

* ``held``: the worker keeps a reference to the group, as FSDP2's module state does, and exits as
  Python does (finalization with gloo's worker threads still alive);
* ``freed``: nothing else holds the group, so ``destroy_process_group`` joins its threads;
* ``held+os._exit``: as ``held``, ended through ``exits_without_finalization``.

A launch fails when a rank's exit code is not 0; the one failure seen is the abort "terminate called
without an active exception" (a gloo worker thread ended inside a C++ destructor while taking the
GIL during finalization). The rate depends on the machine's load, so the variants alternate.
Prints one JSON record.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = """
import sys
sys.path.insert(0, {root!r})
import torch
import torch.distributed as dist
from distill import distributed

VARIANT = {variant!r}


def main():
    dist.init_process_group("gloo")
    if VARIANT != "freed":
        held.append(dist.group.WORLD)
    for _ in range(50):
        dist.all_reduce(torch.ones(4096))
    t = torch.ones(10)
    dist.all_reduce(t)
    del t
    dist.barrier()
    dist.destroy_process_group()
    return 0


held = []
if VARIANT == "held+os._exit":
    main = distributed.exits_without_finalization(main)
main()
"""

VARIANTS = ("held", "freed", "held+os._exit")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--launches", type=int, default=40, help="launches of each variant")
    args = p.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    failed = {v: 0 for v in VARIANTS}
    aborts = {v: 0 for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        scripts = {}
        for v in VARIANTS:
            scripts[v] = Path(tmp) / f"worker_{VARIANTS.index(v)}.py"
            scripts[v].write_text(WORKER.format(root=str(ROOT), variant=v))
        for i in range(args.launches):
            for v in VARIANTS:
                r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    "--nproc_per_node=2", str(scripts[v])], env=env, capture_output=True, text=True,
                                   timeout=300, cwd=tmp)
                failed[v] += r.returncode != 0
                aborts[v] += "terminate called without an active exception" in r.stderr
            print(f"{i + 1}/{args.launches}: failed {failed}", file=sys.stderr, flush=True)
    print(json.dumps({"launches": args.launches, "failed": failed, "aborts": aborts,
                      "torch": __import__("torch").__version__}))


if __name__ == "__main__":
    main()
