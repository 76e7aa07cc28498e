"""The threshold sweep: every exit run once over the dev set, each policy simulated over a grid of
thresholds, chosen points timed for real, and the fastest point within the tolerance picked.

Simulation is exact, not an estimate: the policies' decision rule is the one inference uses, applied
to each exit's saved logits, so a simulated threshold's metric is the metric real early-exit
inference gets. What simulation cannot give is time: the layer-count speed-up ignores the exits'
own cost and what a smaller batch saves, so chosen points are timed for real, at each batch size,
side by side with the full model (interleaved rounds, median) in this one process.

Metrics are ×100 (points); "drop" is the full model's metric minus the policy's.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from distill import optim as O
from distill.early_exit.model import EarlyExitClassifier
from distill.early_exit.policies import POLICIES, ExitPolicy, grid, simulate
from distill.glue.features import Features, batch_indices
from distill.glue.metrics import compute_metrics, task_score
from distill.glue.modeling import takes_token_types
from distill.glue.trainer import device_batch, map_batches
from distill.glue.tasks import Task


def all_exit_logits(ee: EarlyExitClassifier, feats: Features, *, batch_size: int, device: torch.device, pad_id: int,
                    bf16: bool = False) -> torch.Tensor:
    """(N, E + 1, C) float32: every exit's and the final classifier's logits on every example, one pass."""
    ee.to(device).eval()
    return torch.cat(map_batches(
        lambda b: ee.exit_logits(b["input_ids"], b["attention_mask"], b.get("token_type_ids")).float().cpu(), feats,
        batch_size=batch_size, device=device, pad_id=pad_id, bf16=bf16))


def score(task: Task, logits: torch.Tensor, labels: np.ndarray) -> float:
    """The task's score ×100 from (N, C) logits."""
    x = logits.numpy()
    preds = x[:, 0] if task.is_regression else x.argmax(axis=1)
    return 100.0 * task_score(task, compute_metrics(task, preds, labels))


def each_exit_scores(task: Task, logits: torch.Tensor, labels: np.ndarray, layers: list[int]) -> list[dict]:
    """Each exit's own score, as if every sample left there (DeeBERT's --eval_each_highway)."""
    return [{"layer": layer, "score": score(task, logits[:, e], labels)} for e, layer in enumerate(layers)]


def simulate_point(task: Task, policy: ExitPolicy, logits: torch.Tensor, labels: np.ndarray,
                   layers: list[int], full_score: float) -> dict:
    where = simulate(policy, logits)
    chosen = logits[torch.arange(len(logits)), where]
    run = torch.tensor(layers, dtype=torch.float64)[where]
    mean_layers = float(run.mean()) if len(run) else float(layers[-1])
    s = score(task, chosen, labels)
    return {"policy": policy.name, "threshold": policy.threshold, "tolerance": policy.tolerance, "score": s,
            "drop": full_score - s,
            "mean_exit_layer": mean_layers, "layer_speedup": layers[-1] / mean_layers,
            "exited_early": float((where < len(layers) - 1).float().mean())}


def simulate_grid(task: Task, logits: torch.Tensor, labels: np.ndarray, layers: list[int], *,
                  policies: tuple[str, ...] = POLICIES, tolerance: float = 0.1) -> tuple[float, list[dict]]:
    """The full model's score and one row per (policy, threshold) of the grid."""
    full = score(task, logits[:, -1], labels)
    rows = []
    for name in policies:
        if task.is_regression and name != "patience":
            continue
        for t in grid(name, num_labels=logits.shape[2], num_exits=len(layers) - 1):
            rows.append(simulate_point(task, ExitPolicy(name, t, tolerance), logits, labels, layers, full))
    return full, rows


def points_to_time(rows: list[dict], max_drop: float, per_policy: int, min_speedup: float = 1.05) -> list[dict]:
    """For each policy, up to ``per_policy`` grid rows to time: the fastest within ``max_drop`` (by layer
    count), then the rows nearest to evenly spaced speed-ups between ``min_speedup`` and the policy's
    largest. Rows that barely exit (layer speed-up below ``min_speedup``) are not worth a timing."""
    picked = []
    for name in dict.fromkeys(r["policy"] for r in rows):
        mine = [r for r in rows if r["policy"] == name and r["layer_speedup"] >= min_speedup]
        if not mine:
            continue
        ok = [r for r in mine if r["drop"] <= max_drop]
        chosen = [max(ok, key=lambda r: (r["layer_speedup"], -r["drop"]))] if ok else []
        top = max(r["layer_speedup"] for r in mine)
        n = max(0, per_policy - len(chosen))
        targets = [min_speedup + (top - min_speedup) * (i + 1) / n for i in range(n)] if n else []
        for t in targets:
            near = min(mine, key=lambda r: (abs(r["layer_speedup"] - t), r["drop"]))
            if near not in chosen:
                chosen.append(near)
        picked += [r for r in chosen if r not in picked]
    return picked


@dataclass
class TimingSet:
    """Pre-collated dev batches of one size, on the device."""

    batch_size: int
    batches: list[dict]
    n: int


def timing_sets(feats: Features, batch_sizes: list[int], pad_id: int, device: torch.device) -> list[TimingSet]:
    out = []
    for bs in batch_sizes:
        batches = [device_batch(feats, idx, pad_id, device) for idx in batch_indices(len(feats), bs)]
        out.append(TimingSet(bs, batches, len(feats)))
    return out


@torch.inference_mode()
def time_points(models: dict[str, EarlyExitClassifier], reference: str, points: list[dict], sets: list[TimingSet], *,
                repeats: int, device: torch.device, bf16: bool, log: Callable[[str], None] = print) -> list[dict]:
    """Measured seconds per pass and speed-up over the full model for each point, at each batch size.

    ``points`` carry ``recipe``, ``policy`` and ``threshold``; ``models`` maps a recipe to its model.
    The full model is the ``reference`` recipe's Hugging Face classifier, its own forward (no exits).
    Every round times the full model and each point once, in a rotating order; the median is kept.
    """
    any_model = models[reference]
    types = takes_token_types(any_model.model)
    for m in models.values():
        m.to(device).eval()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run_full(ts: TimingSet):
        for b in ts.batches:
            kwargs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
            if types and "token_type_ids" in b:
                kwargs["token_type_ids"] = b["token_type_ids"]
            any_model.model(**kwargs)

    def run_point(p: dict, ts: TimingSet):
        ee, pol = models[p["recipe"]], ExitPolicy(p["policy"], p["threshold"], p["tolerance"])
        for b in ts.batches:
            ee.infer(b["input_ids"], b["attention_mask"], b.get("token_type_ids") if types else None, policy=pol)

    results = [dict(p) for p in points]
    for ts in sets:
        jobs = [("full", None)] + [("point", i) for i in range(len(points))]
        with O.autocast(device, torch.bfloat16 if bf16 else None):
            for kind, i in jobs:  # warm-up
                run_full(ts) if kind == "full" else run_point(points[i], ts)
            times: dict = {j: [] for j in range(len(jobs))}
            for r in range(repeats):
                order = list(range(len(jobs)))
                order = order[r % len(order):] + order[:r % len(order)]
                for j in order:
                    kind, i = jobs[j]
                    sync()
                    t0 = time.perf_counter()
                    run_full(ts) if kind == "full" else run_point(points[i], ts)
                    sync()
                    times[j].append(time.perf_counter() - t0)
        full = statistics.median(times[0])
        for j in range(1, len(jobs)):
            t = statistics.median(times[j])
            res = results[jobs[j][1]]
            res[f"seconds_b{ts.batch_size}"] = t
            res[f"full_seconds_b{ts.batch_size}"] = full
            res[f"speedup_b{ts.batch_size}"] = full / t
            res[f"spread_b{ts.batch_size}"] = (max(times[j]) - min(times[j])) / t
        log(f"timed {len(points)} points at batch {ts.batch_size} on {ts.n} dev examples: full model "
            f"{ts.n / full:.1f} sentences/s")
    return results


def choose(timed: list[dict], max_drop: float, batch_sizes: list[int]) -> dict | None:
    """The measured point with the largest speed-up that holds at every batch size (the smallest of its
    measured speed-ups), among those within ``max_drop`` points of the full model; None if none is."""
    ok = [p for p in timed if p["drop"] <= max_drop]
    if not ok:
        return None
    return max(ok, key=lambda p: min(p[f"speedup_b{b}"] for b in batch_sizes))


def markdown(summary: dict) -> str:
    """The sweep's tables: each exit's own score, the timed points, and the simulated grid."""
    bs = summary["timing_batch_sizes"]
    lines = [f"# Early exit on {summary['task_name']}: threshold sweep", "",
             f"Full model (no exits): score {summary['full_score']:.2f}. Tolerance: {summary['max_metric_drop']} "
             f"points. Timing: {summary['timing_examples']} dev sentences, median of {summary['timing_repeats']} "
             f"interleaved passes, on {summary['device']}{' with bf16' if summary['bf16'] else ''}.", ""]
    c = summary.get("chosen")
    if c:
        lines += [f"**Chosen:** {c['recipe']}, {c['policy']} {c['threshold']:.4g}: score {c['score']:.2f} "
                  f"({-c['drop']:+.2f}), mean exit layer {c['mean_exit_layer']:.2f} of {summary['num_layers']}; "
                  "measured again on its own against the full model: " + confirmed(c, bs) + ".", ""]
    else:
        lines += ["**Chosen:** none: no timed point is within the tolerance; the model keeps no exit policy.", ""]
    lines += ["## Each exit alone", "", "| recipe | " + " | ".join(f"layer {e['layer']}" for e in
                                                                      next(iter(summary['each_exit'].values()))) + " |",
              "|---" * (1 + len(next(iter(summary['each_exit'].values())))) + "|"]
    for recipe, exits in summary["each_exit"].items():
        lines.append(f"| {recipe} | " + " | ".join(f"{e['score']:.2f}" for e in exits) + " |")
    head = ["recipe", "policy", "threshold", "score", "change", "mean exit layer", "layer speed-up"]
    head += [f"measured speed-up, batch {b}" for b in bs]
    lines += ["", "## Timed points", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for p in sorted(summary["timed"], key=lambda p: (p["recipe"], p["policy"], -p["layer_speedup"])):
        cells = [p["recipe"], p["policy"], f"{p['threshold']:.4g}", f"{p['score']:.2f}", f"{-p['drop']:+.2f}",
                 f"{p['mean_exit_layer']:.2f}", f"{p['layer_speedup']:.2f}x"]
        cells += [f"{p[f'speedup_b{b}']:.2f}x (±{50 * p[f'spread_b{b}']:.0f}%)" for b in bs]
        lines.append("| " + " | ".join(cells) + " |")
    head = ["recipe", "policy", "threshold", "score", "change", "mean exit layer", "layer speed-up", "exited early"]
    lines += ["", "## Simulated grid (exact metrics; speed-up by layer count)", "", "| " + " | ".join(head) + " |",
              "|---" * len(head) + "|"]
    for p in summary["grid"]:
        lines.append("| " + " | ".join([p["recipe"], p["policy"], f"{p['threshold']:.4g}", f"{p['score']:.2f}",
                                        f"{-p['drop']:+.2f}", f"{p['mean_exit_layer']:.2f}",
                                        f"{p['layer_speedup']:.2f}x", f"{100 * p['exited_early']:.0f}%"]) + " |")
    return "\n".join(lines) + "\n"


def confirmed(c: dict, batch_sizes: list[int]) -> str:
    """The chosen point's re-timed speed-ups, e.g. ``2.41x at batch 1 (±6%), 2.02x at batch 32 (±3%)``."""
    again = c.get("confirmed", c)
    return ", ".join(f"{again[f'speedup_b{b}']:.2f}x at batch {b} (±{50 * again[f'spread_b{b}']:.0f}%)"
                     for b in batch_sizes)


def plot(summary: dict, path, extra_points: list[dict] | None = None, batch_size: int | None = None,
         image_format: str | None = None) -> bool:
    """Score against measured speed-up, one curve per (recipe, policy); ``extra_points`` (name, speedup,
    score) are drawn as labelled markers on the same axes. False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = batch_size or summary["timing_batch_sizes"][0]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    curves: dict[tuple, list] = {}
    for p in summary["timed"]:
        curves.setdefault((p["recipe"], p["policy"]), []).append(p)
    for (recipe, policy), pts in sorted(curves.items()):
        pts = sorted(pts, key=lambda p: p[f"speedup_b{b}"])
        ax.plot([1.0] + [p[f"speedup_b{b}"] for p in pts], [summary["full_score"]] + [p["score"] for p in pts],
                marker="o", ms=3.5, lw=1.2, label=f"{recipe}, {policy}")
    ax.scatter([1.0], [summary["full_score"]], marker="*", s=120, color="black", zorder=5, label="full model")
    for e in extra_points or []:
        ax.scatter([e["speedup"]], [e["score"]], marker="D", s=40, zorder=5)
        ax.annotate(e["name"], (e["speedup"], e["score"]), textcoords="offset points", xytext=(5, -10), fontsize=8)
    c = summary.get("chosen")
    if c:
        ax.scatter([c[f"speedup_b{b}"]], [c["score"]], marker="o", s=90, facecolors="none", edgecolors="red",
                   zorder=6, label="chosen")
    ax.axhline(summary["full_score"] - summary["max_metric_drop"], ls="--", lw=0.8, color="grey")
    ax.set_xlabel(f"measured speed-up over the full model (batch {b})")
    ax.set_ylabel(f"{summary['task_name']} dev score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format=image_format)
    plt.close(fig)
    return True
