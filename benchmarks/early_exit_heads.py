"""What an exit should read of its layer: each exit's own dev score, [CLS] against the mean of the tokens.

    python benchmarks/early_exit_heads.py --model runs/demo/glue/teacher --data_dir assets/movie_sentiment

Takes a classifier fine-tuned by run_glue (the demo's teacher by default) and its SST-2-format task.
For each pooling (``cls``: DeeBERT's [CLS] vector; ``mean``: the mean over attended tokens) it computes
the backbone's layer features of the train and dev sets once, trains the exits alone on them as stage
2 does (two_stage, the labels), with the heads' dense layer initialised from the model's pooler
(DeeBERT) and fresh, and prints each exit's dev score alone. One JSON line per setting, then a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from distill.early_exit import model as EM  # noqa: E402
from distill.early_exit import recipes as R  # noqa: E402
from distill.early_exit.backbones import LayerRunner  # noqa: E402
from distill.early_exit.config import EarlyExitConfig  # noqa: E402
from distill.early_exit.sweep import score  # noqa: E402
from distill.glue.features import load_features  # noqa: E402
from distill.glue.modeling import load_classifier, load_tokenizer, set_padding  # noqa: E402
from distill.glue.tasks import get_task  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/demo/glue/teacher")
    p.add_argument("--data_dir", default="assets/movie_sentiment")
    p.add_argument("--task_name", default="sst-2")
    p.add_argument("--max_seq_length", type=int, default=64)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args(argv)
    task = get_task(args.task_name)
    tok = load_tokenizer(args.model)
    clf = load_classifier(args.model, task)
    pad = set_padding(clf, tok)
    device = torch.device("cpu")
    feats = {s: load_features(task, args.data_dir, s, tok, args.model, args.max_seq_length, log=lambda m: None)
             for s in ("train", task.dev_splits[0])}
    cfg = EarlyExitConfig(task_name=task.name, data_dir=args.data_dir, model_name_or_path=args.model,
                          output_dir="-", do_train=True, seed=args.seed, bf16=args.bf16, disable_tqdm=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.model}: "
          f"{len(feats['train'])} train, {len(feats[task.dev_splits[0]])} dev", flush=True)
    rows = []
    for pooling in EM.POOLINGS:
        layers = EM.parse_exit_layers(None, LayerRunner(clf.model).num_layers)
        probe = EM.EarlyExitClassifier(clf.model, EM.ExitSettings(exit_layers=layers, pooling=pooling),
                                       init_from_pooler=False)
        t0 = time.perf_counter()
        states = {s: R.layer_features(probe, f, batch_size=128, device=device, pad_id=pad, bf16=args.bf16)
                  for s, f in feats.items()}
        feat_s = time.perf_counter() - t0
        labels = torch.from_numpy(feats["train"].labels)
        dev = feats[task.dev_splits[0]]
        for init in (True, False):
            for lr, epochs in ((1e-3, 3.0), (3e-3, 10.0)):
                torch.manual_seed(args.seed)
                ee = EM.EarlyExitClassifier(clf.model, dataclasses.replace(probe.settings), init_from_pooler=init)
                hyper = dataclasses.replace(cfg, exit_learning_rate=lr, exit_epochs=epochs)
                s2 = R.train_exits(ee, states["train"], labels, hyper, device, recipe="two_stage", regression=False)
                ee.eval()
                with torch.no_grad():
                    logits = ee.logits_from_states(states[task.dev_splits[0]])
                scores = [round(score(task, logits[:, e], dev.labels), 2) for e in range(logits.shape[1])]
                row = {"pooling": pooling, "init": "pooler" if init else "fresh", "exit_learning_rate": lr,
                       "exit_epochs": epochs, "each_exit_score": scores, "stage2_seconds": s2["seconds"],
                       "features_seconds": round(feat_s, 2)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\n| pooling | dense init | lr, epochs | " + " | ".join(f"layer {i + 1}" for i in
                                                                 range(len(rows[0]["each_exit_score"]))) + " |")
    print("|---" * (3 + len(rows[0]["each_exit_score"])) + "|")
    for r in rows:
        print(f"| {r['pooling']} | {r['init']} | {r['exit_learning_rate']:g}, {r['exit_epochs']:g} | "
              + " | ".join(f"{x:.1f}" for x in r["each_exit_score"]) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
