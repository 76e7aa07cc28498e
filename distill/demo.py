"""The embedded default run (``make demo``): the data pipeline on a real packaged corpus.

Stages, each timed and each reused on a second run:
1. assets: the all-MiniLM-L6-v2 teacher (its tokenizer) and the King James Bible corpus;
2. binarize the corpus with the teacher's tokenizer;
3. count tokens for MLM smoothing;
4. load it as the trainer will: chunking/filtering report, padding with and without length
   grouping, and one masked batch decoded.

    python -m distill.demo --run_dir runs/demo [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from distill import assets
from distill.data.binarize import binarize, read_meta
from distill.data.collate import Collator, mlm_token_probs
from distill.data.counts import count_tokens
from distill.data.dataset import LMSeqsDataset
from distill.data.sampler import LengthGroupedBatchSampler, padding_fraction
from distill.errors import cli_entry


class Stages:
    """Prints each stage's name and wall time, and keeps them for the summary."""

    def __init__(self):
        self.times: dict[str, float] = {}

    def run(self, name: str, fn, *args, **kwargs):
        print(f"\n== {name}", flush=True)
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.times[name] = time.perf_counter() - t0
        print(f"   ({self.times[name]:.1f}s)", flush=True)
        return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_dir", default="runs/demo", help="where the demo writes its outputs")
    p.add_argument("--assets_dir", default="assets", help="cache of the fetched corpus")
    p.add_argument("--quick", action="store_true", help="the few-minute variant (a slice of the corpus)")
    p.add_argument("--max_model_input_size", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=8)
    return p.parse_args(argv)


@cli_entry
def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    stages = Stages()

    def get_assets():
        teacher = assets.minilm_teacher_dir()
        corpus = assets.kjv_corpus(Path(args.assets_dir) / "kjv.txt")
        print(f"   teacher: all-MiniLM-L6-v2 at {teacher}")
        print(f"   corpus:  King James Bible, {corpus.stat().st_size / 1e6:.1f} MB at {corpus}")
        return teacher, corpus

    teacher, corpus = stages.run("assets", get_assets)
    data = run_dir / ("data_quick" if args.quick else "data")
    max_lines = 3000 if args.quick else None

    def do_binarize():
        if data.exists():
            meta = read_meta(data)
            print(f"   reusing {data}: {meta['num_sequences']:,} sequences, {meta['num_tokens']:,} tokens")
            return
        res = binarize(corpus, str(teacher), data, tokenizer_type="bert", num_workers=min(4, os.cpu_count() or 1),
                       max_lines=max_lines)
        print(f"   wrote {res.num_sequences:,} sequences, {res.num_tokens:,} tokens in {res.seconds:.1f}s "
              f"({res.num_tokens / res.seconds:,.0f} tokens/s) to {res.path}")

    stages.run("binarize", do_binarize)
    counts_file = run_dir / ("token_counts_quick.npy" if args.quick else "token_counts.npy")

    def do_counts():
        counts = count_tokens(data)
        with open(counts_file, "wb") as f:
            np.save(f, counts)
        print(f"   {int(counts.sum()):,} tokens, {int((counts > 0).sum()):,} distinct ids -> {counts_file}")
        return counts

    counts = stages.run("token counts", do_counts)

    def do_load():
        ds = LMSeqsDataset(str(data), max_model_input_size=args.max_model_input_size)
        print(f"   {ds.stats.summary()}")
        report = {}
        for group in (True, False):
            s = LengthGroupedBatchSampler(ds.lengths, args.batch_size, seed=0, group_by_size=group)
            report["grouped" if group else "ungrouped"] = pf = padding_fraction(ds.lengths, s.global_batches(0))
            print(f"   padding over an epoch, batch {args.batch_size}, "
                  f"{'with' if group else 'without'} length grouping: {pf:.1%}")
        meta = ds.meta
        specials = sorted(set(meta["special_token_ids"].values()))
        collate = Collator(meta["special_token_ids"]["pad_token"], mlm=True,
                           mask_id=meta["special_token_ids"]["mask_token"],
                           token_probs=mlm_token_probs(counts, 0.7, specials), seed=0)
        batch = collate([ds[i] for i in next(iter(LengthGroupedBatchSampler(ds.lengths, 2, seed=0)))])
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(teacher)
        print("   a masked batch:")
        for row, attn in zip(batch["input_ids"], batch["attention_mask"]):
            print("     " + tok.decode(row[attn.bool()]))
        return {"dataset": ds.stats.__dict__, "padding_fraction": report}

    report = stages.run("load, group and mask", do_load)
    report["stage_seconds"] = stages.times
    (run_dir / "data_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\ndone in {sum(stages.times.values()):.1f}s; report in {run_dir / 'data_report.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
