"""GLUE metrics in numpy, as the benchmark defines them, and one score per task.

| task | metrics | score |
| --- | --- | --- |
| CoLA | Matthews correlation | it |
| SST-2, QNLI, RTE, WNLI | accuracy | it |
| MNLI | accuracy on dev_matched and dev_mismatched (``mm_accuracy``) | matched accuracy |
| MRPC, QQP | F1 of the positive class, accuracy | their mean |
| STS-B | Pearson and Spearman correlation | their mean |

Every metric is a fraction in [0, 1] (correlations in [-1, 1]). Where a correlation is undefined
(a constant input) it is 0.0, as scikit-learn's Matthews correlation does, so results stay valid
JSON (scipy returns nan there).
"""

from __future__ import annotations

import numpy as np

from distill.glue.tasks import Task, get_task


def accuracy(preds, labels) -> float:
    preds, labels = np.asarray(preds), np.asarray(labels)
    _same_length(preds, labels)
    return float((preds == labels).mean()) if len(labels) else 0.0


def f1_binary(preds, labels, positive=1) -> float:
    """F1 of the ``positive`` class: 2 tp / (2 tp + fp + fn); 0.0 when there is nothing to find."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    _same_length(preds, labels)
    tp = int(((preds == positive) & (labels == positive)).sum())
    fp = int(((preds == positive) & (labels != positive)).sum())
    fn = int(((preds != positive) & (labels == positive)).sum())
    denom = 2 * tp + fp + fn
    return 2 * tp / denom if denom else 0.0


def matthews_corrcoef(preds, labels) -> float:
    """Matthews correlation for any number of classes (Gorodkin's R_K); 0.0 where undefined."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    _same_length(preds, labels)
    classes, idx = np.unique(np.concatenate([labels, preds]), return_inverse=True)
    k, n = len(classes), len(labels)
    conf = np.zeros((k, k), dtype=np.float64)  # (true, predicted)
    np.add.at(conf, (idx[:n], idx[n:]), 1)
    t, p = conf.sum(axis=1), conf.sum(axis=0)  # true and predicted counts per class
    c, s = np.trace(conf), conf.sum()
    cov_ytyp = c * s - t @ p
    cov_ypyp = s * s - p @ p
    cov_ytyt = s * s - t @ t
    denom = np.sqrt(cov_ytyt * cov_ypyp)
    return float(cov_ytyp / denom) if denom > 0 else 0.0


def pearson(x, y) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    _same_length(x, y)
    xc, yc = x - x.mean(), y - y.mean()
    denom = np.sqrt((xc @ xc) * (yc @ yc))
    if not denom > 0:
        return 0.0
    return float(np.clip((xc @ yc) / denom, -1.0, 1.0))


def rank_average(x) -> np.ndarray:
    """Ranks 1..n, tied values sharing the mean of their ranks (scipy's rankdata 'average')."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # Start of each run of equal values in sorted order.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    mean_rank = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def spearman(x, y) -> float:
    """Pearson correlation of the average ranks."""
    _same_length(np.asarray(x), np.asarray(y))
    return pearson(rank_average(x), rank_average(y))


def compute_metrics(task: Task | str, preds, labels) -> dict[str, float]:
    """The task's metrics for one evaluation file: class ids (or scores, for STS-B) against the truth."""
    task = get_task(task) if isinstance(task, str) else task
    out = {}
    for name in task.metrics:
        if name == "f1":
            out[name] = f1_binary(preds, labels, positive=task.labels.index("1"))
        else:
            out[name] = _METRICS[name](preds, labels)
    return out


def task_score(task: Task | str, metrics: dict[str, float]) -> float:
    """One number per task (the GLUE convention): the mean of its metrics; MNLI: matched accuracy."""
    task = get_task(task) if isinstance(task, str) else task
    return float(np.mean([metrics[name] for name in task.metrics]))


_METRICS = {"accuracy": accuracy, "matthews_corrcoef": matthews_corrcoef, "pearson": pearson, "spearman": spearman}


def _same_length(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"predictions and labels must be 1-d of the same length, got {a.shape} and {b.shape}")
