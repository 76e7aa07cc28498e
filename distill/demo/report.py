"""What the pipeline's report (:mod:`distill.pipeline.report`) draws from here: the distillation's loss
curves and the early-exit section, as PNG plots (matplotlib, no display needed) and Markdown."""

from __future__ import annotations

import json
from pathlib import Path

from distill.fileio import atomic_path

LOSS_PNG = "loss_curves.png"
EARLY_EXIT_PNG = "early_exit.png"
COMPARISON_PNG = "comparison.png"
REPORT_MD = "report.md"


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(records: list[dict], path: Path) -> bool:
    """One panel per logged loss against the optimizer step; False when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k in (records[0] if records else {}) if k.startswith("loss")]
    if not names:
        return False
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        ax.plot(steps, [r[name] for r in records], lw=1.4)
        ax.set_title("total (weighted)" if name == "loss" else name.removeprefix("loss_"))
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.suptitle("distillation losses (each normalised per token)")
    fig.tight_layout()
    _save(fig, path)
    return True


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:  # the temporary name has no image suffix: name the format
        fig.savefig(tmp, dpi=110, format=path.suffix.lstrip("."))
    plt.close(fig)


def early_exit_section(sweep: dict, rows: list[dict], png: Path) -> list[str]:
    """The sweep's timed points, the plot with the teacher and the students on the same axes, and which
    is better at equal speed: a distilled student or the teacher with exits."""
    from distill.early_exit.sweep import confirmed, markdown, plot

    batch = 32 if 32 in sweep["timing_batch_sizes"] else sweep["timing_batch_sizes"][-1]
    students = [{"name": r["name"], "speedup": r["speedup"], "score": 100 * r["score"]} for r in rows[1:]]
    with atomic_path(png) as tmp:
        drawn = plot(sweep, tmp, extra_points=students, batch_size=batch, image_format="png")
    table = markdown(sweep)
    timed_part = table[table.index("## Each exit alone"):table.index("## Simulated grid")].replace("## ", "### ")
    what = {"two_stage": "two_stage (DeeBERT: exits on the labels, the backbone frozen)",
            "self_distill": "self_distill (exits on the final classifier's soft targets, the backbone frozen)",
            "joint": "joint (PABEE: model and exits trained together, layer-weighted)"}
    recipes = list(dict.fromkeys(p["recipe"] for p in sweep.get("timed", [])))
    lines = ["## Early exit on the fine-tuned teacher", "",
             f"Exit heads after layers 1-{sweep['num_layers'] - 1} of the fine-tuned teacher, trained as "
             + "; ".join(what.get(r, r) for r in recipes) + ". Then every policy's threshold is swept on the dev "
             "set and chosen points are timed against the full teacher in one process (`early_exit/sweep.md` has "
             "the whole grid).", ""]
    c = sweep.get("chosen")
    if c:
        bs = sweep["timing_batch_sizes"]
        lines += [f"**Chosen** (saved into the model's config): {c['recipe']}, {c['policy']} {c['threshold']:.4g}: "
                  f"dev {c['score']:.1f} against {sweep['full_score']:.1f} for the full teacher, mean exit layer "
                  f"{c['mean_exit_layer']:.2f} of {sweep['num_layers']}; measured again against the full teacher: "
                  + confirmed(c, bs) + ".", ""]
    lines += [verdict(sweep, students, batch), "", timed_part.strip(), ""]
    if drawn:
        lines += [f"![early exit]({png.name})", ""]
    return lines


def verdict(sweep: dict, students: list[dict], batch: int) -> str:
    """One line: at each student's speed, the best early-exit point against the student."""
    parts = []
    for st in students:
        faster = [p for p in sweep["timed"] if p[f"speedup_b{batch}"] >= st["speedup"]]
        if not faster:
            best = max(sweep["timed"], key=lambda p: p[f"speedup_b{batch}"], default=None)
            reach = f"{best[f'speedup_b{batch}']:.2f}x" if best else "no"
            parts.append(f"{st['name']} ({st['speedup']:.2f}x, {st['score']:.1f}) is faster than any exit point "
                         f"(at most {reach})")
            continue
        best = max(faster, key=lambda p: p["score"])
        winner = st["name"] if st["score"] > best["score"] else "the teacher with exits"
        parts.append(f"at {st['name']}'s speed ({st['speedup']:.2f}x, {st['score']:.1f}) the best exit point scores "
                     f"{best['score']:.1f} ({best['recipe']}, {best['policy']} {best['threshold']:.3g}, "
                     f"{best[f'speedup_b{batch}']:.2f}x): {winner} is better")
    return f"**At equal speed (batch {batch}):** " + "; ".join(parts) + "."
