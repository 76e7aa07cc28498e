"""The pipeline's report: the four rows over their seeds (mean ± sd, % of the teacher), the speeds with
their spread, the plots, the stage times (``report.md``, ``report.json``, PNGs)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from distill.demo.report import (
    COMPARISON_PNG,
    EARLY_EXIT_PNG,
    LOSS_PNG,
    REPORT_MD,
    _save,
    early_exit_section,
    plot_losses,
    read_metrics,
)
from distill.fileio import write_atomic
from distill.pipeline.config import ROWS


def spread(pass_seconds: list[float]) -> float:
    """The timed passes' spread: their interquartile range over their median (0.02 = 2%)."""
    if len(pass_seconds) < 2:
        return 0.0
    q = statistics.quantiles(pass_seconds, n=4, method="inclusive")
    return (q[2] - q[0]) / statistics.median(pass_seconds)


def summarise(compared: list[dict], scores: dict[str, dict], seeds: list[int]) -> list[dict]:
    """One row per model: the teacher, then each of the four rows with its score over the seeds."""
    by_name = {r["name"]: r for r in compared}
    teacher = by_name["teacher"]
    out = [{"name": "teacher", "what": "the teacher, fine-tuned (one seed)", "parameters": teacher["parameters"],
            "sentences_per_s": teacher["sentences_per_s"], "speed_spread": spread(teacher["pass_seconds"]),
            "speedup": 1.0, "scores": {str(seeds[0]): teacher["score"]}, "mean": teacher["score"], "sd": 0.0,
            "pct_of_teacher": 100.0}]
    for name, what, _, _ in ROWS:
        r, values = by_name[name], [float(v) for v in scores[name].values()]
        mean = statistics.mean(values)
        out.append({"name": name, "what": what, "parameters": r["parameters"], "sentences_per_s": r["sentences_per_s"],
                    "speed_spread": spread(r["pass_seconds"]), "speedup": r["speedup"],
                    "scores": {str(k): float(v) for k, v in scores[name].items()}, "mean": mean,
                    "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "pct_of_teacher": 100.0 * mean / teacher["score"] if teacher["score"] > 0 else None,
                    # for early_exit_section: the row's speed and its mean score
                    "score": mean})
    return out


def table(rows: list[dict]) -> str:
    head = ["model", "parameters", "sentences/s (spread)", "speed-up", "dev score, mean ± sd", "per seed",
            "% of teacher"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    for r in rows:
        pct = "n/a" if r["pct_of_teacher"] is None else f"{r['pct_of_teacher']:.1f}%"
        speed = f"{r['sentences_per_s']:.1f} (±{100 * r['speed_spread'] / 2:.1f}%)"
        lines.append("| " + " | ".join([
            r["what"], f"{r['parameters'] / 1e6:.2f}M", speed,
            f"{r['speedup']:.2f}x", f"{100 * r['mean']:.2f} ± {100 * r['sd']:.2f}",
            ", ".join(f"{100 * v:.1f}" for v in r["scores"].values()), pct]) + " |")
    return "\n".join(lines)


def gains(rows: list[dict]) -> list[str]:
    """What each step adds, in points of mean dev score over the naive route."""
    by = {r["name"]: r for r in rows}
    base = by["extracted_finetuned"]["mean"]
    lines = ["What each step adds over fine-tuning the extracted student (points of mean dev score):", ""]
    for name, what, _, _ in ROWS[1:]:
        lines.append(f"- {what}: {100 * (by[name]['mean'] - base):+.2f}")
    students = [r["sentences_per_s"] for r in rows[1:]]
    lines += ["", f"The four students share one architecture; their measured speeds lie within "
                  f"{100 * (max(students) - min(students)) / statistics.mean(students):.1f}% of each other "
                  "(the spread in the table is half the interquartile range of the timed passes)."]
    return lines


def plot_comparison(rows: list[dict], path: Path) -> None:
    """Bars with error bars: the mean dev score ± sd over seeds, the speed ± half its interquartile range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"].replace("_", "\n") for r in rows]
    panels = [("dev score (x100), mean ± sd over seeds", [100 * r["mean"] for r in rows],
               [100 * r["sd"] for r in rows], "{:.1f}"),
              ("inference, sentences/s", [r["sentences_per_s"] for r in rows],
               [r["sentences_per_s"] * r["speed_spread"] / 2 for r in rows], "{:.0f}"),
              ("parameters (millions)", [r["parameters"] / 1e6 for r in rows], None, "{:.1f}")]
    colours = ["#4c72b0", "#8c8c8c", "#dd8452", "#55a868", "#c44e52"][: len(rows)]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (title, values, err, fmt) in zip(axes, panels):
        bars = ax.bar(names, values, yerr=err, capsize=4, color=colours)
        for b, v in zip(bars, values):
            ax.annotate(fmt.format(v), (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                        fontsize=8, xytext=(8, 2), textcoords="offset points")
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=7)
        ax.margins(y=0.15)
    if rows:  # the score panel: zoom on the range where the rows differ
        lo = min(100 * (r["mean"] - r["sd"]) for r in rows)
        axes[0].set_ylim(max(0.0, lo - 5), min(100.0, max(100 * (r["mean"] + r["sd"]) for r in rows) + 2))
    fig.tight_layout()
    _save(fig, path)


def write_report(folder: Path, compared: list[dict], metrics_path: Path, stage_seconds: dict[str, float],
                 extra: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = summarise(compared, extra["scores"], extra["seeds"])
    records = read_metrics(metrics_path)
    has_losses = plot_losses(records, folder / LOSS_PNG)
    plot_comparison(rows, folder / COMPARISON_PNG)
    td = extra["task_distillation"]
    lines = [f"# {extra.get('title') or 'distill pipeline report'}", "", *extra.get("describe", []), "",
             f"Task: {extra['task_name']}. Every student row is fine-tuned with seeds "
             f"{', '.join(map(str, extra['seeds']))}; task distillation learns from the fine-tuned teacher's outputs "
             f"at temperature {td['temperature']:g} with alpha_ce {td['alpha_ce']:g} (the labels get "
             f"{1 - td['alpha_ce']:g})."
             + (" The toolkit's recipe distils on the task's training sentences first (the "
                f"{extra['in_domain_teacher']} teacher's hidden states)." if extra.get("in_domain") else ""), "",
             table(rows), "", *gains(rows), "", f"![comparison]({COMPARISON_PNG})", ""]
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
        lines += ["## General distillation", "",
                  f"{last['step']} optimizer steps; loss {first['loss']:.3f} at step {first['step']} -> "
                  f"{last['loss']:.3f} at step {last['step']}.", "", f"![losses]({LOSS_PNG})", ""]
    sweep = extra.get("early_exit")
    if sweep:
        lines += early_exit_section(sweep, rows, folder / EARLY_EXIT_PNG)
    lines += ["## Wall time per stage", "", "| stage | this run, s | when it did its work, s |", "| --- | --- | --- |"]
    done = extra.get("stage_seconds_of_the_work", {})
    lines += [f"| {name} | {secs:.1f} | {done.get(name, secs):.1f} |" for name, secs in stage_seconds.items()]
    lines += ["", f"bf16: {extra.get('bf16')}; quick: {extra.get('quick')}.", ""]
    path = folder / REPORT_MD
    write_atomic(path, "\n".join(lines))
    write_atomic(folder / "report.json", json.dumps({"rows": rows, "compared": compared,
                                                     "stage_seconds": stage_seconds, **extra},
                                                    indent=2, default=str) + "\n")
    return path
