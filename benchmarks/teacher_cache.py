"""The teacher cache on `make demo-clm`'s recipe: disk, cache-writing speed, step speed-up, held-out perplexity.

    python benchmarks/teacher_cache.py                 # the full recipe (120 steps of 2 x 8 x 128 tokens)
    python benchmarks/teacher_cache.py --max_steps 8   # a short check

1. Runs `python -m distill.demo.clm --quick` for its teacher, data and extracted student (reused).
2. Caches the teacher (SmolLM2-135M) over the demo's whole binarized corpus at k = 64 and the recipe's
   temperature (`scripts/cache_teacher.py`; reused when it exists) and reports bytes per position and
   the writing speed in tokens/s.
3. Distils the extracted student twice with the recipe's flags and seed, for the same steps: online
   (the teacher's full vocabulary, every step) and from the cache. Both use ce + clm: the recipe's
   cosine loss needs the teacher's hidden states, which a cache does not hold, so it is off in both.
4. Scores both students, the teacher and the extracted student on the demo's held-out windows.
5. Times optimizer steps of both set-ups side by side in this process, alternating, on the same
   micro-batches: each round runs one untimed step of a set-up (switching refills the caches), then
   its timed steps. Reports the median step times and their ratio.

`--temperature 1` runs all of it at T = 1 (its own cache and students). Prints one JSON record and a
Markdown table; writes `<run_dir>/teacher_cache[_t<T>].json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from itertools import islice
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from distill.demo import clm  # noqa: E402
from distill.fileio import write_atomic  # noqa: E402
from distill.optim import use_bf16  # noqa: E402
from distill.teacher_cache import TeacherCache  # noqa: E402
from distill.teacher_cache.write import cache_teacher  # noqa: E402


def cpu_description() -> dict:
    flags = set()
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"})
    return {"cpu": model, "cores": os.cpu_count(), "isa": isa}


def time_steps(argvs: dict[str, list[str]], rounds: int, steps: int) -> dict[str, list[float]]:
    """Seconds per optimizer step of each set-up, built in this process, stepped alternately."""
    from distill.config import parse_config
    from distill.distiller import Distiller
    from distill.seeding import seed_everything
    from distill.training import build_run

    distillers = {}
    for name, argv in argvs.items():
        cfg, _ = parse_config(argv)
        seed_everything(cfg.seed)
        run = build_run(cfg)
        d = Distiller(cfg, run.student.model, None if run.teacher is None else run.teacher.model, run.dataset,
                      run.collator, torch.device("cpu"), student_objective=run.student.objective,
                      layer_map=run.layer_map, projection=run.projection,
                      extra_teachers=[m.model for m in run.extra_teachers])
        d.sampler.set_epoch(0)
        batches = iter(d.loader)
        micro = [list(islice(batches, cfg.gradient_accumulation_steps)) for _ in range(steps + 1)]
        distillers[name] = (d, micro)
    times = {name: [] for name in argvs}
    for _ in range(rounds):
        for name, (d, micro) in distillers.items():
            d.step(micro[0])  # untimed: the first step after the other set-up ran refills the caches
            for m in micro[1:]:
                t0 = time.perf_counter()
                d.step(m)
                times[name].append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_dir", default="runs/demo-clm")
    p.add_argument("--assets_dir", default="assets")
    p.add_argument("--max_steps", type=int, default=None, help="override the full recipe's steps")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--tail_samples", type=int, default=None,
                   help="tail samples per position in the cache (default: the writer's, 16; 0 for buckets only)")
    p.add_argument("--temperature", type=float, default=None,
                   help="the soft-target temperature of both runs (default: the recipe's, 2)")
    p.add_argument("--timing_rounds", type=int, default=3)
    p.add_argument("--timing_steps", type=int, default=3, help="timed steps per set-up and round")
    p.add_argument("--bf16", choices=["auto", "on", "off"], default="auto")
    args = p.parse_args(argv)
    run, bf16 = Path(args.run_dir), use_bf16(args.bf16)
    clm.main(["--run_dir", str(run), "--assets_dir", args.assets_dir, "--quick", "--bf16", "on" if bf16 else "off"])
    recipe = replace(clm.FULL, alpha_cos=0.0)
    if args.max_steps is not None:
        recipe = replace(recipe, max_steps=args.max_steps)
    if args.temperature is not None:
        recipe = replace(recipe, temperature=args.temperature)
    teacher, data, student_init = run / "teacher", run / "data", run / "student_init"
    t_tag = f"_t{recipe.temperature:g}" if recipe.temperature != clm.FULL.temperature else ""
    s_tag = "" if args.tail_samples is None else f"_s{args.tail_samples}"
    cache_dir = run / f"teacher_cache_k{args.k}{s_tag}{t_tag}"
    if not (cache_dir / "meta.json").is_file():
        print(f"\n== caching the teacher into {cache_dir}", flush=True)
        cache_teacher(teacher_type="llama", teacher_name=str(teacher), data_file=str(data), out=cache_dir,
                      k=args.k, temperature=recipe.temperature, max_model_input_size=recipe.max_len, bf16=bf16,
                      tail_samples=args.tail_samples)
    cache = TeacherCache(cache_dir)
    du = sum(f.stat().st_blocks * 512 for f in cache_dir.rglob("*") if f.is_file())
    cache_record = {"k": cache.k, "tail_samples": cache.tail_samples, "positions": cache.positions,
                    "bytes": cache.meta["bytes"],
                    "bytes_per_position": cache.meta["bytes"] / cache.positions, "disk_usage_bytes": du,
                    "writing_tokens_per_s": cache.meta["last_run"]["tokens_per_s"],
                    "writing_seconds": cache.meta["last_run"]["seconds"], "teacher_bf16": cache.meta["bf16"],
                    "mean_top_k_mass": cache.meta["last_run"].get("mean_top_k_mass")}
    print(json.dumps({"cache": cache_record}), flush=True)

    (_, _, _, held_out), _ = clm.get_assets(Path(args.assets_dir))
    windows = clm.held_out_windows(teacher, held_out, recipe)
    bench = run / "teacher_cache_runs"
    online = bench / f"online_{recipe.max_steps}{t_tag}"
    cached = bench / f"cached_k{args.k}{s_tag}_{recipe.max_steps}{t_tag}"
    print("\n== online", flush=True)
    clm.distil(recipe, data, teacher, student_init, online, bf16)
    print("\n== from the cache", flush=True)
    clm.distil(recipe, data, teacher, student_init, cached, bf16, extra=("--teacher_cache", str(cache_dir)))
    scores = {label: clm.score_model(folder, windows)["perplexity"]
              for label, folder in (("teacher", teacher), ("extracted", student_init), ("online", online),
                                    ("cached", cached))}

    print("\n== step timing, alternating", flush=True)
    base = ["--data_file", str(data), "--student_type", "llama", "--student_pretrained_weights", str(student_init),
            "--alpha_ce", str(recipe.alpha_ce), "--alpha_clm", str(recipe.alpha_clm), "--alpha_cos", "0",
            "--temperature", str(recipe.temperature), "--max_model_input_size", str(recipe.max_len),
            "--batch_size", str(recipe.batch_size), "--gradient_accumulation_steps", str(recipe.accumulation),
            "--learning_rate", str(recipe.learning_rate), "--n_gpu", "0"] + (["--bf16"] if bf16 else [])
    times = time_steps({"online": base + ["--dump_path", str(bench / "t_on"), "--teacher_type", "llama",
                                          "--teacher_name", str(teacher)],
                        "cached": base + ["--dump_path", str(bench / "t_off"), "--teacher_cache", str(cache_dir)]},
                       args.timing_rounds, args.timing_steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    record = {**cpu_description(), "bf16": bf16, "recipe": recipe.__dict__, "cache": cache_record,
              "perplexity": scores, "step_seconds": times, "median_step_seconds": med,
              "speedup": med["online"] / med["cached"],
              "perplexity_ratio": {n: scores["cached"][n] / scores["online"][n] for n in windows}}
    print(json.dumps(record), flush=True)
    names = list(windows)
    lines = ["| student | " + " | ".join(clm.HELD_OUT_TITLES.get(n, n) for n in names) + " |",
             "|---" * (1 + len(names)) + "|"]
    for label in scores:
        lines.append(f"| {label} | " + " | ".join(f"{scores[label][n]:,.2f}" for n in names) + " |")
    print(f"\nHeld-out perplexity after {recipe.max_steps} steps of {recipe.accumulation} x {recipe.batch_size} x "
          f"{recipe.max_len} tokens ({'bf16' if bf16 else 'fp32'}), ce + clm:\n\n" + "\n".join(lines))
    print(f"\ncache: k = {cache.k}, {cache.tail_samples} tail samples, {cache_record['bytes_per_position']:.0f} "
          f"bytes a position, written at "
          f"{cache_record['writing_tokens_per_s']:,.0f} tokens/s; step: online {med['online']:.2f}s, cached "
          f"{med['cached']:.2f}s ({record['speedup']:.2f}x)")
    write_atomic(run / f"teacher_cache{s_tag}{t_tag}.json", json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
