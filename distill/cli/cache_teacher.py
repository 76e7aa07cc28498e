"""Run a causal-LM teacher once over a binarized dataset and cache its top-k log-probabilities, for
``train.py --teacher_cache`` (which then never loads the teacher). See docs/teacher_cache.md.

    python scripts/cache_teacher.py --teacher_type llama --teacher_name runs/demo-clm/teacher \\
        --data_file runs/demo-clm/data --max_model_input_size 128 --temperature 2 --k 64 \\
        --dump_path runs/demo-clm/teacher_cache

A killed run resumes where it stopped when the same command is run again.
"""

from __future__ import annotations

import argparse
import os

from distill.errors import ArgumentParser, cli_entry, say
from distill.seeding import seed_everything
from distill.teacher_cache.store import LOGPROB_DTYPES
from distill.teacher_cache.write import cache_teacher, human_bytes


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="cache_teacher.py", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher_type", required=True, help="teacher family: gpt2, llama or auto")
    p.add_argument("--teacher_name", required=True, help="the teacher: a local model folder or a .gguf file")
    p.add_argument("--data_file", required=True, help="dataset folder written by scripts/binarized_data.py")
    p.add_argument("--dump_path", required=True, help="the cache folder to write")
    p.add_argument("--k", type=int, default=64, help="tokens kept per position (default: 64)")
    p.add_argument("--temperature", type=float, default=2.0,
                   help="the soft-target temperature training will use (default: 2.0, train.py's)")
    p.add_argument("--max_model_input_size", type=int, default=512,
                   help="the training run's --max_model_input_size: the cache follows its cut of the data "
                        "(default: 512)")
    p.add_argument("--logprob_dtype", choices=list(LOGPROB_DTYPES), default=None,
                   help="stored dtype of the top-k log-probabilities: q8 (one byte, each probability within 3.2%%; "
                        "the default with tail samples, whose bytes it pays for), fp16 (the default without), "
                        "bf16, or fp32 (for exact comparisons)")
    p.add_argument("--batch_tokens", type=int, default=8192, help="padded tokens per teacher batch (default: 8192)")
    p.add_argument("--shard_positions", type=int, default=1 << 16,
                   help="positions per shard, the unit of resuming (default: 65536)")
    p.add_argument("--tail_samples", type=int, default=None,
                   help="tokens drawn per position from the teacher's distribution outside the top k, which give "
                        "forward KL an unbiased estimate of the tail's shape (default: 50, 2 bytes each; 0 for the "
                        "top k and one tail bucket only; none when --k is the vocabulary)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tail samples (default: 0)")
    p.add_argument("--bf16", action="store_true", help="run the teacher under bf16 autocast")
    p.add_argument("--force", action="store_true",
                   help="replace an existing cache (the old one stays until the new one is complete)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


@cli_entry
def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    seed_everything(args.seed)  # the teacher runs in eval mode; the tail samples have their own generator
    res = cache_teacher(teacher_type=args.teacher_type, teacher_name=args.teacher_name, data_file=args.data_file,
                        out=args.dump_path, k=args.k, temperature=args.temperature,
                        max_model_input_size=args.max_model_input_size, logprob_dtype=args.logprob_dtype,
                        batch_tokens=args.batch_tokens, shard_positions=args.shard_positions, bf16=args.bf16,
                        force=args.force, progress=not args.no_progress, tail_samples=args.tail_samples,
                        seed=args.seed)
    say(f"wrote {res.positions:,} positions ({human_bytes(res.bytes)}, {res.bytes / res.positions:.0f} bytes a "
        f"position) to {res.folder}; {res.positions_written:,} written now at {res.tokens_per_s:,.0f} tokens/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
