"""What each further teacher costs: step time and memory with one and with two teachers.

    python benchmarks/teachers.py [--run_dir runs/demo-clm] [--combine probs|logits] [--bf16 auto|on|off]

On `make demo-clm`'s recipe (SmolLM2-135M-Instruct teacher, its 15-layer extracted student, ce + clm +
cos, 2 x 8 x 128 tokens a step). The second teacher is the first with Gaussian noise (std 0.01) added
to every weight, written once to ``<run_dir>/teacher_noisy``.

- **Speed**: both set-ups are built in this process and stepped alternately on the same
  micro-batches (one untimed step after each switch); the medians and their ratio.
- **Memory**: each set-up runs 3 steps in a fresh child process, which reports its peak RSS; and
  each teacher's parameter bytes in the dtype it is held in.

Prints one JSON record and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.teacher_cache import cpu_description, time_steps  # noqa: E402
from distill.demo import clm  # noqa: E402
from distill.optim import use_bf16  # noqa: E402


def noisy_teacher(teacher: Path, dest: Path, std: float = 0.01) -> Path:
    if (dest / "model.safetensors").is_file():
        return dest
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(teacher)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    tmp = dest.with_name(dest.name + ".tmp")
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(tmp)
    tmp.rename(dest)
    return dest


def recipe_args(run: Path, bf16: bool, teachers: list[Path], combine: str) -> list[str]:
    r = clm.FULL
    args = ["--dump_path", str(run / "teachers_bench" / f"t{len(teachers)}"), "--data_file", str(run / "data"),
            "--student_type", "llama", "--student_pretrained_weights", str(run / "student_init"),
            "--teacher_type", "llama", "--alpha_ce", str(r.alpha_ce), "--alpha_clm", str(r.alpha_clm),
            "--alpha_cos", str(r.alpha_cos), "--temperature", str(r.temperature),
            "--max_model_input_size", str(r.max_len), "--batch_size", str(r.batch_size),
            "--gradient_accumulation_steps", str(r.accumulation), "--learning_rate", str(r.learning_rate),
            "--n_gpu", "0", "--teacher_combine", combine] + (["--bf16"] if bf16 else [])
    for t in teachers:
        args += ["--teacher_name", str(t)]
    return args


def child(argv: list[str]) -> None:
    """Three steps of one set-up; prints the peak RSS."""
    times = time_steps({"x": argv}, rounds=1, steps=2)
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "step_seconds": times["x"]}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_dir", default="runs/demo-clm")
    p.add_argument("--assets_dir", default="assets")
    p.add_argument("--combine", choices=["probs", "logits"], default="probs")
    p.add_argument("--timing_rounds", type=int, default=3)
    p.add_argument("--timing_steps", type=int, default=3)
    p.add_argument("--bf16", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        child(args.child)
        return 0
    run, bf16 = Path(args.run_dir), use_bf16(args.bf16)
    clm.main(["--run_dir", str(run), "--assets_dir", args.assets_dir, "--quick", "--bf16", "on" if bf16 else "off"])
    teacher = run / "teacher"
    second = noisy_teacher(teacher, run / "teacher_noisy")
    setups = {"1 teacher": recipe_args(run, bf16, [teacher], args.combine),
              "2 teachers": recipe_args(run, bf16, [teacher, second], args.combine)}
    memory = {}
    for name, a in setups.items():
        r = subprocess.run([sys.executable, __file__, "--child", *a], capture_output=True, text=True,
                           env=dict(os.environ, OMP_NUM_THREADS=str(os.cpu_count())))
        if r.returncode != 0:
            raise SystemExit(r.stderr[-3000:])
        memory[name] = json.loads(r.stdout.strip().splitlines()[-1])["peak_rss_mb"]
        print(f"{name}: peak RSS {memory[name]:,.0f} MB", flush=True)
    times = time_steps(setups, args.timing_rounds, args.timing_steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    from distill.config import parse_config
    from distill.training import load_teacher

    cfg, _ = parse_config(setups["1 teacher"])
    loaded = load_teacher(cfg).model  # in the run's teacher dtype (bf16 with --bf16)
    param_mb = sum(t.numel() * t.element_size() for t in loaded.parameters()) / 2**20
    record = {**cpu_description(), "bf16": bf16, "combine": args.combine, "step_seconds": times,
              "median_step_seconds": med, "step_ratio": med["2 teachers"] / med["1 teacher"],
              "peak_rss_mb": memory, "rss_per_extra_teacher_mb": memory["2 teachers"] - memory["1 teacher"],
              "teacher_parameter_mb": param_mb, "teacher_dtype": str(next(loaded.parameters()).dtype)}
    print(json.dumps(record), flush=True)
    print("\n| set-up | median step (s) | x one teacher | peak RSS (MB) |\n| --- | --- | --- | --- |")
    for name in setups:
        print(f"| {name} | {med[name]:.2f} | {med[name] / med['1 teacher']:.2f} | {memory[name]:,.0f} |")
    print(f"\neach teacher's parameters: {param_mb:,.0f} MB ({record['teacher_dtype']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
