"""The teacher cache on `make demo-clm`'s recipe: disk, cache-writing speed, step speed-up, held-out perplexity.

    python benchmarks/teacher_cache.py                 # the full recipe (120 steps of 2 x 8 x 128 tokens)
    python benchmarks/teacher_cache.py --max_steps 8   # a short check

1. Runs `python -m distill.demo.clm --quick` for its teacher, data and extracted student (reused).
2. Caches the teacher (SmolLM2-135M) over the demo's whole binarized corpus (or its first
   `--train_chapters`) at k = 64, with 50 tail samples and q8 log-probabilities (the defaults), at
   the recipe's temperature (`scripts/cache_teacher.py`; reused when it exists), and reports bytes
   per position and the writing speed in tokens/s.
3. Distils the extracted student with the recipe's flags and seed, for the same steps: online (the
   teacher's full vocabulary, every step), and from the cache once per `--tail_samples` value (by
   default 0, the top k and the tail bucket alone, read from the same files, and 50). All use
   ce + clm: the recipe's cosine loss needs the teacher's hidden states, which a cache does not
   hold, so it is off in every run.
4. Scores the students, the teacher and the extracted student on the demo's held-out windows.
5. Times optimizer steps of the online and the sampled set-ups side by side in this process,
   alternating, on the same micro-batches: each round runs one untimed step of a set-up (switching
   refills the caches), then its timed steps. Reports the median step times, and as the speed-up the
   ratio of the total times over those same steps (the micro-batches differ in length).

`--temperature 1` runs all of it at T = 1 (its own cache and students); `--seed N` trains both students
with train.py's `--seed N` on the same cache. Prints one JSON record and a
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


def bucket_view(cache_dir: Path, view: Path) -> Path:
    """The cache without its tail samples: the same top-k files (linked), read as a cache written with
    ``--tail_samples 0``, so that both variants train on identical top-k rows."""
    if (view / "meta.json").is_file():
        return view
    view.mkdir(parents=True, exist_ok=True)
    for name in ("ids.bin", "logprobs.bin", "tail.bin", "offsets.npy", "tokenizer"):
        if (cache_dir / name).exists() and not (view / name).exists():
            (view / name).symlink_to((cache_dir / name).resolve())
    meta = json.loads((cache_dir / "meta.json").read_text())
    meta["tail_samples"] = 0
    write_atomic(view / "meta.json", json.dumps(meta, indent=2) + "\n")
    return view


def subset_data(run: Path, chapters: int, teacher: Path, assets_dir: Path) -> Path:
    """The first ``chapters`` chapters of the demo's corpus, binarized with the teacher's tokenizer."""
    data = run / f"data_ch{chapters}"
    if (data / "meta.json").is_file():
        return data
    (_, _, corpus, _), _ = clm.get_assets(assets_dir)
    lines = corpus.read_text(encoding="utf-8").splitlines(keepends=True)[:chapters]
    text = run / f"corpus_ch{chapters}.txt"
    write_atomic(text, "".join(lines))
    clm.binarize_corpus(text, teacher, data)
    return data


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_dir", default="runs/demo-clm")
    p.add_argument("--assets_dir", default="assets")
    p.add_argument("--max_steps", type=int, default=None, help="override the full recipe's steps")
    p.add_argument("--batch_size", type=int, default=None, help="override the full recipe's micro-batch (8)")
    p.add_argument("--accumulation", type=int, default=None, help="override the full recipe's accumulation (2)")
    p.add_argument("--eval_tokens", type=int, default=None, help="override the full recipe's held-out tokens (4096)")
    p.add_argument("--train_chapters", type=int, default=None,
                   help="train (and cache) on the corpus's first N chapters only, where the whole corpus is too slow")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--logprob_dtype", default=None,
                   help="the cache's stored log-probabilities (default: the cache's, q8 with tail samples)")
    p.add_argument("--tail_samples", default="0,50",
                   help="comma-separated: a cached run per value, from one cache with the largest (default: 0,50; "
                        "0 is the top k and the tail bucket alone)")
    p.add_argument("--temperature", type=float, default=None,
                   help="the soft-target temperature of both runs (default: the recipe's, 2)")
    p.add_argument("--seed", type=int, default=None,
                   help="train.py's --seed for the online and cached students (default: train.py's); their "
                        "folders and the record are named with it, the cache is the same")
    p.add_argument("--timing_rounds", type=int, default=3)
    p.add_argument("--timing_steps", type=int, default=3, help="timed steps per set-up and round (0: no timing)")
    p.add_argument("--timing_only", action="store_true",
                   help="only the step timing (on the cache and data of an earlier run with the same flags)")
    p.add_argument("--bf16", choices=["auto", "on", "off"], default="auto")
    args = p.parse_args(argv)
    run, bf16 = Path(args.run_dir), use_bf16(args.bf16)
    clm.main(["--run_dir", str(run), "--assets_dir", args.assets_dir, "--quick", "--bf16", "on" if bf16 else "off"])
    recipe = replace(clm.FULL, alpha_cos=0.0)
    for field, value in (("max_steps", args.max_steps), ("temperature", args.temperature),
                         ("batch_size", args.batch_size), ("accumulation", args.accumulation),
                         ("eval_tokens", args.eval_tokens)):
        if value is not None:
            recipe = replace(recipe, **{field: value})
    teacher, data, student_init = run / "teacher", run / "data", run / "student_init"
    if args.train_chapters is not None:
        data = subset_data(run, args.train_chapters, teacher, Path(args.assets_dir))
    sizes = sorted({int(x) for x in args.tail_samples.split(",")})
    tag = (f"_t{recipe.temperature:g}" if recipe.temperature != clm.FULL.temperature else "") + \
        (f"_ch{args.train_chapters}" if args.train_chapters is not None else "") + \
        (f"_b{recipe.accumulation}x{recipe.batch_size}"
         if (recipe.batch_size, recipe.accumulation) != (8, 2) else "") + \
        (f"_{args.logprob_dtype}" if args.logprob_dtype is not None else "")
    cache_dir = run / f"teacher_cache_k{args.k}_s{sizes[-1]}{tag}"
    seed_flags = () if args.seed is None else ("--seed", str(args.seed))
    tag += "" if args.seed is None else f"_seed{args.seed}"  # the students and the record, not the cache
    if not (cache_dir / "meta.json").is_file():
        print(f"\n== caching the teacher into {cache_dir}", flush=True)
        cache_teacher(teacher_type="llama", teacher_name=str(teacher), data_file=str(data), out=cache_dir,
                      k=args.k, temperature=recipe.temperature, max_model_input_size=recipe.max_len, bf16=bf16,
                      tail_samples=sizes[-1], logprob_dtype=args.logprob_dtype)
    cache = TeacherCache(cache_dir)
    du = sum(f.stat().st_blocks * 512 for f in cache_dir.rglob("*") if f.is_file())
    cache_record = {"k": cache.k, "tail_samples": cache.tail_samples, "logprob_dtype": cache.logprob_dtype,
                    "positions": cache.positions,
                    "bytes": cache.meta["bytes"],
                    "bytes_per_position": cache.meta["bytes"] / cache.positions, "disk_usage_bytes": du,
                    "writing_tokens_per_s": cache.meta["last_run"]["tokens_per_s"],
                    "writing_seconds": cache.meta["last_run"]["seconds"], "teacher_bf16": cache.meta["bf16"],
                    "mean_top_k_mass": cache.meta["last_run"].get("mean_top_k_mass")}
    print(json.dumps({"cache": cache_record}), flush=True)
    caches = {S: cache_dir if S == cache.tail_samples else bucket_view(cache_dir, run / f"{cache_dir.name}_as_s0")
              for S in sizes}
    if any(S not in (0, cache.tail_samples) for S in sizes):
        raise SystemExit("--tail_samples: only 0 and one other value are compared in a run")

    bench = run / "teacher_cache_runs"
    record = {**cpu_description(), "bf16": bf16, "recipe": recipe.__dict__, "train_chapters": args.train_chapters,
              "seed": args.seed,
              "cache": cache_record}
    if args.timing_only:
        return timing(args, recipe, bf16, data, teacher, student_init, caches[sizes[-1]], bench, record, cache,
                      run / f"teacher_cache{tag}_timing.json")
    (_, _, _, held_out), _ = clm.get_assets(Path(args.assets_dir))
    windows = clm.held_out_windows(teacher, held_out, recipe)
    online = bench / f"online_{recipe.max_steps}{tag}"
    print("\n== online", flush=True)
    clm.distil(recipe, data, teacher, student_init, online, bf16, extra=seed_flags)
    students = {"teacher": teacher, "extracted": student_init, "online": online}
    for S, folder in caches.items():
        dump = bench / f"cached_k{args.k}_s{S}_{recipe.max_steps}{tag}"
        print(f"\n== from the cache, {S} tail samples", flush=True)
        clm.distil(recipe, data, teacher, student_init, dump, bf16, extra=("--teacher_cache", str(folder), *seed_flags))
        students[f"cached, k = {args.k}" + (f", {S} tail samples" if S else ", tail bucket only")] = dump
    scores = {label: clm.score_model(folder, windows)["perplexity"] for label, folder in students.items()}
    cached_labels = [label for label in scores if label.startswith("cached")]
    record.update(perplexity=scores, perplexity_ratio={label: {n: scores[label][n] / scores["online"][n]
                                                               for n in windows} for label in cached_labels})
    names = list(windows)
    lines = ["| student | " + " | ".join(clm.HELD_OUT_TITLES.get(n, n) for n in names) + " |",
             "|---" * (1 + len(names)) + "|"]
    for label in scores:
        cells = []
        for n in names:
            ratio = "" if label not in cached_labels else f" ({scores[label][n] / scores['online'][n] - 1:+.1%})"
            cells.append(f"{scores[label][n]:,.2f}{ratio}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    print(f"\nHeld-out perplexity after {recipe.max_steps} steps of {recipe.accumulation} x {recipe.batch_size} x "
          f"{recipe.max_len} tokens ({'bf16' if bf16 else 'fp32'}), T = {recipe.temperature:g}, ce + clm:\n\n"
          + "\n".join(lines), flush=True)
    write_atomic(run / f"teacher_cache{tag}.json", json.dumps(record, indent=2) + "\n")
    if args.timing_steps < 1:
        return 0
    return timing(args, recipe, bf16, data, teacher, student_init, caches[sizes[-1]], bench, record, cache,
                  run / f"teacher_cache{tag}.json")


def timing(args, recipe, bf16: bool, data: Path, teacher: Path, student_init: Path, cache_dir: Path, bench: Path,
           record: dict, cache: TeacherCache, out: Path) -> int:
    """Step 5 of the module docstring; adds the timing to ``record`` and writes it to ``out``."""
    from distill.losses import native

    record["loss_kernel"] = "native" if native.available() else f"eager ({native.unavailable_reason()})"
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
    # Both set-ups time the same micro-batches, which differ in length: the speed-up is the ratio of
    # the total times (medians taken apart would pair one set-up's step with another's).
    pairs = [a / b for a, b in zip(times["online"], times["cached"])]
    record.update(step_seconds=times, median_step_seconds=med, total_seconds={k: sum(v) for k, v in times.items()},
                  step_speedups=pairs, speedup=sum(times["online"]) / sum(times["cached"]))
    print(json.dumps(record), flush=True)
    c = record["cache"]
    print(f"\ncache: k = {cache.k}, {cache.tail_samples} tail samples, {c['bytes_per_position']:.0f} "
          f"bytes a position, written at {c['writing_tokens_per_s']:,.0f} tokens/s; step: online "
          f"{med['online']:.2f}s, cached {med['cached']:.2f}s (medians); {record['speedup']:.2f}x over the same "
          f"{len(pairs)} steps, {min(pairs):.2f}-{max(pairs):.2f}x step by step")
    write_atomic(out, json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
