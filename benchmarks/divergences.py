"""The soft-target divergences side by side on `make demo-clm`'s recipe: one run per divergence, held-out perplexity.

    python benchmarks/divergences.py                  # the QUICK recipe (8 steps of 4 x 2 x 128 tokens)
    python benchmarks/divergences.py --max_steps 40   # longer runs

Runs `python -m distill.demo.clm --quick` first (its teacher, data and extracted student are reused;
it also distils the forward-KL student), then distils the same extracted student with the same recipe
and seed once per divergence (`--divergence`; JSD with beta 0.5, skew KL with alpha 0.1) into
`<run_dir>/divergences/`, and scores every student on the demo's held-out windows. Prints one JSON
line per divergence and a Markdown table; writes `<run_dir>/divergences.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from distill.demo import clm  # noqa: E402
from distill.fileio import write_atomic  # noqa: E402
from distill.optim import use_bf16  # noqa: E402

RUNS = [("kl", []), ("reverse_kl", []), ("jsd", ["--divergence_beta", "0.5"]), ("tvd", []),
        ("skew_kl", ["--divergence_alpha", "0.1"])]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_dir", default="runs/demo-clm")
    p.add_argument("--assets_dir", default="assets")
    p.add_argument("--max_steps", type=int, default=None, help="override the quick recipe's steps")
    p.add_argument("--bf16", choices=["auto", "on", "off"], default="auto")
    args = p.parse_args(argv)
    run, bf16 = Path(args.run_dir), use_bf16(args.bf16)
    clm.main(["--run_dir", str(run), "--assets_dir", args.assets_dir, "--quick", "--bf16", "on" if bf16 else "off"])
    recipe = clm.QUICK if args.max_steps is None else replace(clm.QUICK, max_steps=args.max_steps)
    (_, _, _, held_out), _ = clm.get_assets(Path(args.assets_dir))
    teacher, data, student_init = run / "teacher", run / "data", run / "student_init"
    windows = clm.held_out_windows(teacher, held_out, recipe)
    rows = {}
    for name, extra in RUNS:
        dump = run / "divergences" / f"{name}_{recipe.max_steps}"
        clm.distil(recipe, data, teacher, student_init, dump, bf16, extra=("--divergence", name, *extra))
        scored = clm.score_model(dump, windows)
        rows[name] = {"flags": ["--divergence", name, *extra], "perplexity": scored["perplexity"],
                      "steps": recipe.max_steps}
        print(json.dumps({"divergence": name, **rows[name]}), flush=True)
    base = clm.score_model(student_init, windows)["perplexity"]
    teacher_ppl = clm.score_model(teacher, windows)["perplexity"]
    names = list(windows)
    lines = ["| divergence | " + " | ".join(clm.HELD_OUT_TITLES.get(n, n) for n in names) + " |",
             "|---" * (1 + len(names)) + "|",
             "| (teacher) | " + " | ".join(f"{teacher_ppl[n]:,.2f}" for n in names) + " |",
             "| (extracted, not distilled) | " + " | ".join(f"{base[n]:,.2f}" for n in names) + " |"]
    for name, r in rows.items():
        lines.append(f"| `{' '.join(r['flags'])}` | " + " | ".join(f"{r['perplexity'][n]:,.2f}" for n in names) + " |")
    table = "\n".join(lines)
    print(f"\nHeld-out perplexity after {recipe.max_steps} steps of {recipe.accumulation} x {recipe.batch_size} x "
          f"{recipe.max_len} tokens ({'bf16' if bf16 else 'fp32'}):\n\n{table}")
    write_atomic(run / "divergences.json", json.dumps({"recipe": recipe.__dict__, "bf16": bf16, "teacher": teacher_ppl,
                                                       "extracted": base, "runs": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
