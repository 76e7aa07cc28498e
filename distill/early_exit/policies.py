"""When a sample leaves the network: the exit policies, one decision rule each.

A policy sees the logits of one exit for the rows still in the batch, plus the state it carried
from the earlier exits for those rows, and says which rows stop here. The same rule drives real
early-exit inference (rows leave the batch) and the sweep's simulation on every exit's saved
logits, so both give the same decisions.

- ``entropy`` (DeeBERT): stop when the entropy of the exit's softmax is below the threshold.
  Computed from ``log_softmax`` (max subtracted), in fp32, so bf16/fp16 logits cannot overflow.
- ``max_prob``: stop when the largest class probability is at least the threshold.
- ``patience`` (PABEE): stop when the prediction has not changed for ``threshold`` consecutive
  exits. Works for regression too: "unchanged" there means within ``tolerance`` of the last one.

The final classifier always stops what is left.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from distill.errors import UserError

POLICIES = ("entropy", "max_prob", "patience")
NEVER = -1.0  # --early_exit_entropy -1, as in DeeBERT: no early exit


@dataclass(frozen=True)
class ExitPolicy:
    name: str
    threshold: float
    tolerance: float = 0.1  # patience on regression: a change below this counts as "unchanged"

    def validate(self, *, num_labels: int, num_exits: int, regression: bool) -> None:
        """Refuse a policy the task cannot use or a threshold outside its range, in one sentence."""
        if self.name not in POLICIES:
            raise UserError(f"unknown exit policy {self.name!r}; expected one of: {', '.join(POLICIES)}")
        t = self.threshold
        if not math.isfinite(t):
            raise UserError(f"the {self.name} threshold must be a finite number, got {t}")
        if regression and self.name != "patience":
            raise UserError(f"the {self.name} exit policy needs class probabilities, and this task is a "
                            "regression; use --exit_policy patience")
        if self.name == "entropy":
            top = math.log(num_labels)
            if t != NEVER and not 0 <= t <= top:
                raise UserError(f"an entropy threshold must lie in [0, ln {num_labels} = {top:.4f}] (or be -1: "
                                f"never exit), got {t}")
        elif self.name == "max_prob":
            if not 1 / num_labels <= t <= 1:
                raise UserError(f"a max_prob threshold must lie in [1/{num_labels}, 1], got {t}")
        else:
            if t != int(t) or not 1 <= t <= max(num_exits, 1):
                raise UserError(f"a patience must be a whole number of exits from 1 to {max(num_exits, 1)}, "
                                f"got {t}")
            if not self.tolerance >= 0:
                raise UserError(f"the patience tolerance must not be negative, got {self.tolerance}")

    def start(self, n: int, device: torch.device) -> dict[str, torch.Tensor]:
        """The state for ``n`` rows before the first exit."""
        if self.name != "patience":
            return {}
        return {"last": torch.full((n,), float("nan"), device=device),
                "count": torch.zeros(n, dtype=torch.long, device=device)}

    def decide(self, logits: torch.Tensor, state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """(R, C) logits of one exit for R rows -> (R,) bool "stop here", and the rows' new state."""
        x = logits.float()
        if self.name == "entropy":
            if self.threshold == NEVER:
                return torch.zeros(len(x), dtype=torch.bool, device=x.device), state
            return entropy(x) < self.threshold, state
        if self.name == "max_prob":
            return x.softmax(-1).amax(-1) >= self.threshold, state
        pred = x[:, 0] if x.shape[1] == 1 else x.argmax(-1).float()
        last = state["last"]
        same = (pred - last).abs() <= self.tolerance if x.shape[1] == 1 else pred == last
        count = torch.where(same, state["count"] + 1, torch.zeros_like(state["count"]))
        return count >= self.threshold, {"last": pred, "count": count}

    def label(self) -> str:
        if self.name == "patience":
            return f"patience {int(self.threshold)}"
        return f"{self.name} {self.threshold:.4g}"


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim, (R, C) -> (R,), stable for any logit range."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def subset(state: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[keep] for k, v in state.items()}


def simulate(policy: ExitPolicy, exit_logits: torch.Tensor) -> torch.Tensor:
    """Where each row stops, given every exit's logits (N, E + 1, C) (the last is the final classifier).

    Returns (N,) the index of the exit each row leaves at (E: it ran the whole model).
    """
    n, stops = exit_logits.shape[0], exit_logits.shape[1]
    where = torch.full((n,), stops - 1, dtype=torch.long)
    open_ = torch.ones(n, dtype=torch.bool)
    state = policy.start(n, exit_logits.device)
    for e in range(stops - 1):
        stop, state = policy.decide(exit_logits[:, e], state)
        now = stop & open_
        where[now] = e
        open_ &= ~stop
    return where


def grid(name: str, *, num_labels: int, num_exits: int, points: int = 40) -> list[float]:
    """The thresholds the sweep tries for a policy, from "never exits" to "exits as soon as possible"."""
    if name == "entropy":
        top = math.log(num_labels)
        return [0.0] + [top * (i / points) ** 2 for i in range(1, points + 1)]  # denser near 0
    if name == "max_prob":
        low = 1 / num_labels
        return [1.0] + [1 - (1 - low) * (i / points) ** 2 for i in range(1, points + 1)]
    return [float(k) for k in range(num_exits, 0, -1)]
