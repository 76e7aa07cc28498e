"""Chat data in, a distilled chat student out (docs/chat.md): SmolLM2-135M-Instruct's own chat
template, the loss on the assistant's tokens only, held-out perplexity on completions.

Shares ``make demo-clm``'s run folder: its teacher (the GGUF file converted once) and its extracted
15-layer student are reused. Stages:
1. the chat sets, written from packaged text: conversations of two turns, in which the user quotes a
   verse of the King James Bible and the assistant answers with the next one, then the one after. The
   Old Testament is for training, the New Testament is held out;
2. binarize the training set with ``--dataset`` (a ``messages`` column: the teacher's chat template,
   and a completion mask of the assistant turns);
3. distil the extracted student on it (ce + clm + cos, ``--loss_on completion``, the default with a mask);
4. perplexity on the held-out conversations' completion tokens, for the teacher, the extracted and
   the distilled student.

    python -m distill.demo.chat --run_dir runs/demo-clm [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from distill import models as M
from distill.demo import assets, clm
from distill.demo.stages import Stages, offline_environment
from distill.errors import UserError, cli_entry
from distill.fileio import write_atomic
from distill.hf import quiet_transformers
from distill.optim import use_bf16

PROG = "python -m distill.demo.chat"
TRAIN_RANGE, HELD_OUT_RANGE = clm.CORPUS_RANGE, clm.HELD_OUT_RANGE


@dataclass(frozen=True)
class ChatRecipe:
    max_steps: int
    held_out: int  # held-out conversations scored
    batch_size: int = 8
    accumulation: int = 2
    max_len: int = 256  # a conversation with SmolLM2's default system prompt is 151 tokens on average


FULL = ChatRecipe(max_steps=60, held_out=256)
QUICK = ChatRecipe(max_steps=8, held_out=48, batch_size=4)


def conversations(verses: list[str], limit: int | None = None) -> list[dict]:
    """Two-turn conversations over consecutive verses (three a conversation, none shared)."""
    rows = []
    for i in range(0, len(verses) - 2, 3):
        rows.append({"messages": [
            {"role": "user", "content": f"Continue the verse: {verses[i]}"},
            {"role": "assistant", "content": verses[i + 1]},
            {"role": "user", "content": "And the next one?"},
            {"role": "assistant", "content": verses[i + 2]}]})
        if limit is not None and len(rows) >= limit:
            break
    return rows


def write_chat_sets(assets_dir: Path, run_dir: Path):
    train_v = assets.kjv_verses(assets_dir / "kjv_ot_verses.txt", TRAIN_RANGE).read_text().splitlines()
    held_v = assets.kjv_verses(assets_dir / "kjv_nt_verses.txt", HELD_OUT_RANGE).read_text().splitlines()
    paths = {}
    for name, verses in (("chat_train", train_v), ("chat_held_out", held_v)):
        path = run_dir / f"{name}.jsonl"
        if not path.is_file():
            write_atomic(path, "".join(json.dumps(r) + "\n" for r in conversations(verses)))
        paths[name] = path
    n = {k: sum(1 for _ in open(p, encoding="utf-8")) for k, p in paths.items()}
    print(f"   {n['chat_train']:,} training conversations ({TRAIN_RANGE}) in {paths['chat_train']}; "
          f"{n['chat_held_out']:,} held out ({HELD_OUT_RANGE}) in {paths['chat_held_out']}")
    return paths, True


@torch.inference_mode()
def completion_perplexity(model, tok, rows: list[dict], batch_size: int = 8) -> dict:
    """exp of the mean NLL of the completion tokens (each predicted from the whole conversation before
    it), fp32, in eval mode; the conversations rendered with the tokenizer's chat template."""
    from distill.data.chat import encode_conversation

    model.eval()
    encoded = [encode_conversation(tok, r["messages"]) for r in rows]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    nll, count = 0.0, 0
    for b in range(0, len(encoded), batch_size):
        part = encoded[b:b + batch_size]
        L = max(len(ids) for ids, _ in part)
        ids = torch.full((len(part), L), pad, dtype=torch.int64)
        attn = torch.zeros((len(part), L), dtype=torch.int64)
        target = torch.zeros((len(part), L), dtype=torch.bool)
        for i, (x, m) in enumerate(part):
            ids[i, :len(x)] = torch.tensor(x)
            attn[i, :len(x)] = 1
            target[i, :len(x)] = torch.tensor(m, dtype=torch.bool)
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()
        losses = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (B, L-1)
        keep = target[:, 1:]
        nll += float(losses[keep].sum())
        count += int(keep.sum())
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count}


def score(folders: dict[str, Path], held_out: Path, recipe: ChatRecipe, report_file: Path):
    from transformers import AutoTokenizer

    rows = [json.loads(line) for line in open(held_out, encoding="utf-8")][:recipe.held_out]
    previous = json.loads(report_file.read_text()) if report_file.is_file() else {}
    results, did_work = {}, False
    with quiet_transformers():
        tok = AutoTokenizer.from_pretrained(folders["teacher"], local_files_only=True)
    for label, folder in folders.items():
        key = {**clm._model_key(folder, clm.QUICK), "held_out": recipe.held_out}
        old = previous.get("models", {}).get(label)
        if old is not None and old.get("key") == key:
            results[label] = old
            print(f"   {label}: reusing its scores")
            continue
        t0 = time.perf_counter()
        with quiet_transformers():
            model = M.load_model("llama", folder).model
        results[label] = {"key": key, **completion_perplexity(model, tok, rows),
                          "parameters": sum(p.numel() for p in model.parameters()),
                          "seconds": time.perf_counter() - t0}
        did_work = True
        print(f"   {label}: {results[label]['perplexity']:,.2f} on {results[label]['tokens']:,} completion tokens")
    return {"models": results, "held_out": {"path": str(held_out), "conversations": len(rows)}}, did_work


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_dir", default="runs/demo-clm", help="make demo-clm's run folder (teacher, student reused)")
    p.add_argument("--assets_dir", default="assets")
    p.add_argument("--quick", action="store_true", help=f"the few-minute variant ({QUICK.max_steps} steps)")
    p.add_argument("--max_steps", type=int, default=None)
    p.add_argument("--held_out", type=int, default=None, help="held-out conversations scored")
    p.add_argument("--bf16", choices=["auto", "on", "off"], default="auto")
    return p.parse_args(argv)


@cli_entry
def main(argv=None) -> int:
    args = parse_args(argv)
    offline_environment()
    recipe = QUICK if args.quick else FULL
    if args.max_steps is not None:
        if args.max_steps < 1:
            raise UserError("--max_steps must be at least 1")
        recipe = replace(recipe, max_steps=args.max_steps)
    if args.held_out is not None:
        if args.held_out < 1:
            raise UserError("--held_out must be at least 1")
        recipe = replace(recipe, held_out=args.held_out)
    bf16 = use_bf16(args.bf16)
    run_dir, assets_dir = Path(args.run_dir), Path(args.assets_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    stages = Stages(run_dir / f"chat_stage_seconds{suffix}.json")
    teacher_dir, student_init = run_dir / "teacher", run_dir / "student_init"
    data, dump = run_dir / "chat_data", run_dir / f"chat_student{suffix}"

    gguf_folder, gguf_name, _, _ = stages.run("assets", clm.get_assets, assets_dir)
    stages.run("teacher: GGUF -> safetensors", clm.get_teacher, gguf_folder, gguf_name, teacher_dir)
    stages.run("extract the student", clm.extract_student, teacher_dir, student_init)
    paths = stages.run("chat sets from the KJV", write_chat_sets, assets_dir, run_dir)
    stages.run("binarize (messages -> the chat template, completion mask)", clm.binarize_corpus, paths["chat_train"],
               teacher_dir, data, "conversations", True)
    train_recipe = replace(clm.QUICK if args.quick else clm.FULL, max_steps=recipe.max_steps,
                           batch_size=recipe.batch_size, accumulation=recipe.accumulation, max_len=recipe.max_len,
                           checkpoint_interval=max(1, recipe.max_steps // 2))
    stages.run("distil on the completions", clm.distil, train_recipe, data, teacher_dir, student_init, dump, bf16)
    report_file = run_dir / f"chat_perplexity{suffix}.json"
    report = stages.run("perplexity on held-out completions", score,
                        {"teacher": teacher_dir, "extracted student": student_init, "distilled student": dump},
                        paths["chat_held_out"], recipe, report_file)
    report.update({"recipe": asdict(recipe), "train_recipe": asdict(train_recipe), "bf16": bf16,
                   "stage_seconds": stages.done})
    write_atomic(report_file, json.dumps(report, indent=2) + "\n")
    lines = ["| model | parameters | perplexity on held-out completions |", "|---|---|---|"]
    for label, r in report["models"].items():
        lines.append(f"| {label} | {r['parameters'] / 1e6:.1f}M | {r['perplexity']:,.2f} |")
    tokens = next(iter(report["models"].values()))["tokens"]
    table = (f"Held-out completions: {report['held_out']['conversations']} New Testament conversations, {tokens:,} "
             f"completion tokens; {recipe.max_steps} steps\n\n" + "\n".join(lines) + "\n")
    (run_dir / f"chat_perplexity{suffix}.md").write_text(table)
    print("\n" + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
