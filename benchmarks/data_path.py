"""The data path at two corpus sizes: binarization throughput and peak memory by --num_workers, and
training's peak memory.

    python benchmarks/data_path.py                  # the KJV Bible x1 and x10, 1 and 2 workers
    python benchmarks/data_path.py --mults 1 20 --workers 1 2 4

Each measurement runs in a fresh child process, so its peak RSS is its own: binarization is
``scripts/binarized_data.py`` as a user runs it (the figure is the largest process of the tree:
the parent or one of its tokenizer workers), training is ``benchmarks/throughput.py`` for a few
steps on the binarized corpus. Prints one JSON line per measurement, then a summary line with the
ratios that matter: tokens/s (the script's own figure, without the interpreter's start; the wall
time with it is there too) of the most workers over one worker, and peak RSS of the largest corpus
over the smallest.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import throughput  # noqa: E402  (the corpus packing and the packaged tokenizer)


def run_child(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MB of the child's process tree, stdout) of one command."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env={**os.environ, "PYTHONPATH": str(ROOT)})
        # wait4 reports the child's own usage merged with its reaped descendants' (the tokenizer
        # workers): ru_maxrss is the largest process of the tree.
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            raise SystemExit(f"error: {' '.join(cmd)} failed:\n{err.read()[-2000:]}")
        return wall, usage.ru_maxrss / 1024, out.read()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mults", type=int, nargs="+", default=[1, 10], help="corpus repetitions (default: 1 10)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="--num_workers values (default: 1 2)")
    p.add_argument("--corpus", default=None, help="text file (default: the KJV Bible)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the packaged MiniLM's)")
    p.add_argument("--train_steps", type=int, default=5, help="training steps per corpus size (0: skip)")
    p.add_argument("--work_dir", default=str(ROOT / "runs" / "bench"))
    args = p.parse_args(argv)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    tok = Path(args.tokenizer) if args.tokenizer else throughput.packaged_tokenizer()
    results = []
    for mult in args.mults:
        text = throughput.prepare_corpus(argparse.Namespace(corpus=args.corpus, corpus_mult=mult, pack_chars=0), work)
        size_mb = text.stat().st_size / 2**20
        for nw in args.workers:
            dump = work / f"dp_{text.stem}_w{nw}"
            wall, rss, out = run_child([sys.executable, str(ROOT / "scripts" / "binarized_data.py"),
                                        "--file_path", str(text), "--tokenizer_name", str(tok),
                                        "--dump_file", str(dump), "--num_workers", str(nw), "--overwrite",
                                        "--quiet"])
            meta = json.loads((dump / "meta.json").read_text())
            tokens = int(meta["num_tokens"])
            # the script's own rate: from reading the corpus to the renamed folder (no interpreter start)
            rate = re.search(r"\(([\d,]+) tokens/s\)", out)
            r = {"stage": "binarize", "corpus_mult": mult, "corpus_mb": round(size_mb, 1), "num_workers": nw,
                 "tokens": tokens, "tokens_per_s": int(rate.group(1).replace(",", "")) if rate else None,
                 "wall_s": round(wall, 2), "tokens_per_wall_s": round(tokens / wall), "peak_rss_mb": round(rss, 1)}
            print(json.dumps(r), flush=True)
            results.append(r)
        if args.train_steps > 0:
            _, rss, out = run_child([sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--data", str(dump),
                                     "--steps", str(args.train_steps), "--warmup", "1", "--split_steps", "0",
                                     "--matmul_size", "512"])
            bench = json.loads(out.strip().splitlines()[-1])
            r = {"stage": "train", "corpus_mult": mult, "corpus_tokens": bench["corpus_tokens"],
                 "steps": args.train_steps, "real_tokens_per_s": bench["real_tokens_per_s"],
                 "peak_rss_mb": bench["peak_rss_mb"]}
            print(json.dumps(r), flush=True)
            results.append(r)

    def pick(stage, **kw):
        return [r for r in results if r["stage"] == stage and all(r[k] == v for k, v in kw.items())]

    lo, hi = min(args.mults), max(args.mults)
    w1, wn = min(args.workers), max(args.workers)
    summary = {"stage": "summary", "corpus_ratio": hi / lo}
    for mult in (lo, hi):
        a, b = pick("binarize", corpus_mult=mult, num_workers=w1), pick("binarize", corpus_mult=mult, num_workers=wn)
        summary[f"x{mult}_speedup_{wn}_over_{w1}_workers"] = round(b[0]["tokens_per_s"] / a[0]["tokens_per_s"], 2)
    for nw in (w1, wn):
        a, b = pick("binarize", corpus_mult=lo, num_workers=nw), pick("binarize", corpus_mult=hi, num_workers=nw)
        summary[f"binarize_rss_x{hi}_over_x{lo}_{nw}_workers"] = round(b[0]["peak_rss_mb"] / a[0]["peak_rss_mb"], 2)
    if args.train_steps > 0:
        a, b = pick("train", corpus_mult=lo), pick("train", corpus_mult=hi)
        summary[f"train_rss_x{hi}_over_x{lo}"] = round(b[0]["peak_rss_mb"] / a[0]["peak_rss_mb"], 2)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
