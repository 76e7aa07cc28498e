"""Binarize a text corpus or a dataset into token ids (the first step of the pipeline).

    python scripts/binarized_data.py --file_path corpus.txt --tokenizer_type bert \
        --tokenizer_name path/to/teacher --dump_file data/corpus
    python scripts/binarized_data.py --dataset chats.parquet --tokenizer_name path/to/teacher \
        --dump_file data/chats          # 'messages' or 'prompt'/'completion' columns: a completion mask too

Flags follow DistilBERT's original script; --dump_file names the dataset folder that
--data_file takes everywhere else.
"""

from __future__ import annotations

import argparse
import os

from distill.data.binarize import binarize
from distill.errors import ArgumentParser, cli_entry


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--file_path", default=None,
                   help="corpus: plain text with one document per line (.txt, .gz) or .jsonl with a 'text' field")
    p.add_argument("--dataset", default=None,
                   help="instead of --file_path: a datasets save_to_disk folder, or parquet, jsonl, json, csv or "
                        "arrow files (a file or a folder of them); rows with 'text', chat 'messages', or "
                        "'prompt'/'completion' columns")
    p.add_argument("--split", default=None, help="the split of --dataset (default: train)")
    p.add_argument("--text_column", default=None, help="the column of --dataset holding the text (default: text)")
    p.add_argument("--allow_download", action="store_true",
                   help="let --dataset name a dataset on the Hugging Face Hub (nothing is downloaded without it)")
    p.add_argument("--chat_template", choices=["auto", "none"], default="auto",
                   help="prompt/completion rows: rendered with the tokenizer's chat template (auto, when it has "
                        "one) or joined plain (none)")
    p.add_argument("--tokenizer_type", default="bert", choices=["bert", "roberta", "gpt2", "auto"],
                   help="recorded in meta.json (DistilBERT's flag); the tokenizer of --tokenizer_name decides "
                        "everything, including the start/end tokens each line is wrapped in (cls/sep where "
                        "defined, else bos/eos)")
    p.add_argument("--tokenizer_name", required=True,
                   help="a local folder with tokenizer files (e.g. the teacher's), loaded offline")
    p.add_argument("--dump_file", required=True, help="dataset folder to write (tokens.bin, offsets.npy, meta.json)")
    p.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="tokenizer processes (default: min(4, cores))")
    p.add_argument("--seed", type=int, default=56, help="seed of the stored sequence order")
    p.add_argument("--no_shuffle", action="store_true", help="keep the corpus order instead of shuffling")
    p.add_argument("--max_lines", type=int, default=None, help="stop after this many non-blank lines")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --dump_file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if (args.file_path is None) == (args.dataset is None):
        p.error("give one of --file_path (a text file) and --dataset")
    if args.num_workers < 1:
        p.error("--num_workers must be at least 1")
    if args.max_lines is not None and args.max_lines < 1:
        p.error("--max_lines must be at least 1")
    return args


@cli_entry
def main(argv=None) -> int:
    args = parse_args(argv)
    res = binarize(args.file_path, args.tokenizer_name, args.dump_file, dataset=args.dataset, split=args.split,
                   text_column=args.text_column, allow_download=args.allow_download,
                   chat_template=args.chat_template, tokenizer_type=args.tokenizer_type,
                   num_workers=args.num_workers, seed=args.seed, shuffle=not args.no_shuffle,
                   max_lines=args.max_lines, overwrite=args.overwrite, progress=not args.quiet)
    rate = res.num_tokens / max(res.seconds, 1e-9)
    print(f"wrote {res.num_sequences:,} sequences, {res.num_tokens:,} tokens in {res.seconds:.1f}s "
          f"({rate:,.0f} tokens/s) to {res.path}")
    if res.meta.get("loss_mask"):
        print(f"completion mask: {res.meta['completion_tokens']:,} completion tokens; "
              f"{res.meta['dropped_no_completion']:,} examples without one dropped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
