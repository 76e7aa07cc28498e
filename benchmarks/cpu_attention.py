"""The student's attention under bf16 on the CPU: bf16 against fp32 (distill.attention), the attention alone and in
whole training steps.

    python benchmarks/cpu_attention.py            # the attention alone, forward and backward, a few shapes
    python benchmarks/cpu_attention.py --steps 9  # and the demo-clm cached step, alternating the two

1. For each shape (heads, head size, tokens a sequence), :func:`distill.attention.measure`'s timing of one
   forward and backward in bf16 and in fp32 (inputs cast up, output cast down), about 4,096 tokens, with a
   padding mask: what the per-machine choice measures.
2. With ``--steps N``: the teacher-cache benchmark's cached set-up (`make demo-clm`'s recipe in bf16, SmolLM2's
   15-layer student from the quick demo's assets, which `python benchmarks/teacher_cache.py --train_chapters 60
   --timing_only` builds), one Distiller, N optimizer steps with the student's attention in bf16, then the same N
   micro-batches with it in fp32, for ``--rounds`` rounds (each round starts with one untimed step). Reports the
   ratio of the total times.

Prints the CPU and its flags, and one JSON record.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
from distill import attention  # noqa: E402

SHAPES = ((9, 64, 128), (9, 64, 512), (12, 64, 128), (12, 64, 512), (6, 64, 256))  # SmolLM2's student, BERT's, MiniLM's


def cached_steps(run: Path, steps: int, rounds: int) -> dict:
    from distill.config import parse_config
    from distill.distiller import Distiller
    from distill.seeding import seed_everything
    from distill.training import build_run

    cache = run / "teacher_cache_k64_s50_ch60"
    if not cache.exists():
        raise SystemExit(f"{cache} is missing: run python benchmarks/teacher_cache.py --train_chapters 60 "
                         f"--timing_only first")
    argv = ["--bf16", "--data_file", str(run / "data_ch60"), "--student_type", "llama",
            "--student_pretrained_weights", str(run / "student_init"), "--teacher_cache", str(cache),
            "--alpha_ce", "5", "--alpha_clm", "2", "--alpha_cos", "0", "--temperature", "2",
            "--max_model_input_size", "128", "--batch_size", "8", "--gradient_accumulation_steps", "2",
            "--learning_rate", "5e-4", "--n_gpu", "0", "--dump_path", str(run / "attention_bench")]
    cfg, _ = parse_config(argv)
    seed_everything(cfg.seed)
    r = build_run(cfg)
    d = Distiller(cfg, r.student.model, None, r.dataset, r.collator, torch.device("cpu"),
                  student_objective=r.student.objective, layer_map=r.layer_map, projection=r.projection)
    d.sampler.set_epoch(0)
    batches = iter(d.loader)
    micro = [list(islice(batches, cfg.gradient_accumulation_steps)) for _ in range(steps + 1)]
    attention.register()
    times = {"bf16": [], "fp32": []}
    for _ in range(rounds):
        for name in times:
            r.student.model.set_attn_implementation(attention.FP32_SDPA if name == "fp32" else "sdpa")
            d.step(micro[0])  # untimed
            for m in micro[1:]:
                t0 = time.perf_counter()
                d.step(m)
                times[name].append(time.perf_counter() - t0)
    return {"step_seconds": times, "median_step_seconds": {k: statistics.median(v) for k, v in times.items()},
            "speedup": sum(times["bf16"]) / sum(times["fp32"]),
            "pairs_fp32_faster": sum(a > b for a, b in zip(times["bf16"], times["fp32"])),
            "shapes": [[tuple(b["input_ids"].shape) for b in m] for m in micro[1:]]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=0, help="timed steps a round of the cached step (0: kernel only)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--run_dir", default=str(ROOT / "runs" / "demo-clm"))
    args = p.parse_args(argv)
    record = {**cpu_description(), "threads": torch.get_num_threads(), "torch": torch.__version__, "attention": []}
    print(f"{record['cpu']}, {record['cores']} cores, {' '.join(record['isa'])}; torch {torch.__version__}")
    print("heads  head size  tokens  bf16 ms  fp32 ms  bf16 / fp32")
    for heads, dim, length in SHAPES:
        t = attention.measure(heads, dim, length)
        record["attention"].append({"heads": heads, "head_dim": dim, "seq_len": length, **t})
        print(f"{heads:5d}  {dim:9d}  {length:6d}  {t['bf16'] * 1e3:7.1f}  {t['fp32'] * 1e3:7.1f}  "
              f"{t['bf16'] / t['fp32']:11.2f}")
    if args.steps:
        record["cached_step"] = s = cached_steps(Path(args.run_dir), args.steps, args.rounds)
        print(f"cached step, bf16: attention in bf16 {s['median_step_seconds']['bf16']:.2f} s, in fp32 "
              f"{s['median_step_seconds']['fp32']:.2f} s (medians); {s['speedup']:.3f}x by totals; fp32 faster in "
              f"{s['pairs_fp32_faster']} of {len(s['step_seconds']['fp32'])} pairs")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
