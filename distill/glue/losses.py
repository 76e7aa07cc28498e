"""The fine-tuning losses: the task's own loss, and task-specific distillation from a fine-tuned teacher.

Pure functions, float32 inside whatever the input dtype, means over the batch (every example
carries a loss, so the mean is the once-per-step normalisation). An empty batch gives an exact
0.0 still connected to the student's logits.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def task_loss(logits: Tensor, labels: Tensor, *, regression: bool) -> Tensor:
    """Cross-entropy on the class logits, or squared error on the score for regression (STS-B).

    Args:
        logits: (B, C) student outputs; C = 1 for regression.
        labels: (B,) class ids (int64), or float scores for regression.

    Returns:
        0-dim float32 mean over the batch.
    """
    logits = logits.float()
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    if regression:
        return F.mse_loss(logits.squeeze(-1), labels.float())
    return F.cross_entropy(logits, labels.long())


def soft_target_loss(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float,
                     regression: bool) -> Tensor:
    """What the student learns from the teacher's outputs on the same batch.

    Classification: ``T**2 * KL(softmax(t / T) || softmax(s / T))`` averaged over the batch
    (``KLDivLoss(reduction="batchmean")``, as DistilBERT). Regression has no distribution to
    soften: the squared error between the student's and the teacher's predicted scores, averaged
    over the batch (the temperature is not used).

    Args:
        student_logits: (B, C).
        teacher_logits: (B, C), any float dtype; receives no gradient.

    Returns:
        0-dim float32 mean over the batch.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs "
                         f"{tuple(teacher_logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    s, t = student_logits.float(), teacher_logits.detach().float()
    if s.shape[0] == 0:
        return s.sum() * 0.0
    if regression:
        return F.mse_loss(s.squeeze(-1), t.squeeze(-1))
    log_ps = F.log_softmax(s / temperature, dim=-1)
    log_pt = F.log_softmax(t / temperature, dim=-1)
    return F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True) * temperature**2


def task_distillation_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *, temperature: float,
                           alpha_ce: float, alpha_task: float, regression: bool) -> tuple[Tensor, dict[str, Tensor]]:
    """``alpha_task * task_loss + alpha_ce * soft_target_loss``, and the two parts (detached).

    Args:
        student_logits: (B, C); teacher_logits: (B, C); labels: (B,).
    """
    parts = {"loss_task": task_loss(student_logits, labels, regression=regression),
             "loss_ce": soft_target_loss(student_logits, teacher_logits, temperature=temperature,
                                         regression=regression)}
    total = alpha_task * parts["loss_task"] + alpha_ce * parts["loss_ce"]
    return total, {k: v.detach() for k, v in parts.items()}
