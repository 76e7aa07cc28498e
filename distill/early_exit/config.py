"""The config of an early-exit run: every GLUE flag, plus the exits', the recipes', the policy's and the sweep's.

The reference's flag names are kept as public API: ``--early_exit_entropy`` (DeeBERT's threshold,
-1: never exit), ``--eval_highway`` (evaluate with early exit), ``--eval_each_highway`` (each
exit's own score), ``--eval_after_first_stage``.
"""

from __future__ import annotations

from dataclasses import dataclass

from distill.early_exit.model import POOLINGS
from distill.early_exit.policies import NEVER, POLICIES, ExitPolicy
from distill.early_exit.recipes import RECIPES
from distill.errors import UserError
from distill.glue.config import GlueConfig, _f, build_parser, parse_config

PROG = "run_glue_deebert.py"


@dataclass
class EarlyExitConfig(GlueConfig):
    recipe: str = _f("two_stage,self_distill",
                     f"how the exits learn, one or several comma-separated: {', '.join(RECIPES)}. two_stage "
                     "(DeeBERT): stage 1 fine-tunes the model, stage 2 trains only the exits on the labels; "
                     "self_distill: stage 2's exits learn the final classifier's (or --teacher_name_or_path's) soft "
                     "targets; joint (PABEE): model and exits together, weighted by layer")
    exit_layers: str | None = _f(None, "comma-separated 1-based layers that get an exit (default: every layer but "
                                       "the last, which keeps the model's own classifier)")
    exit_pooling: str = _f("cls", "what an exit reads of its layer: cls (DeeBERT: the [CLS] vector) or mean (the mean "
                                  "over attended tokens, for encoders trained for mean pooling such as sentence "
                                  "transformers)")
    skip_first_stage: bool = _f(False, "the model is already fine-tuned on the task (a run_glue output): train only "
                                       "the exits")
    exit_epochs: float = _f(10.0, "epochs of stage 2 (the exits alone, on cached backbone features: an epoch costs "
                                  "no backbone pass)")
    exit_learning_rate: float = _f(3e-3, "AdamW learning rate of the exits: stage 2's, and the exits' in joint "
                                         "training (where the model learns at --learning_rate)")
    exit_alpha_ce: float = _f(0.0, "self_distill: weight of the labels' loss next to the soft targets (0: no "
                                   "labels needed)")
    exit_policy: str = _f("entropy", f"the exit rule at inference: {', '.join(POLICIES)}")
    exit_threshold: float | None = _f(None, "the policy's threshold: entropy below it, max probability at least it, "
                                            "or the patience in exits; with --eval_highway, or saved into the model")
    early_exit_entropy: float | None = _f(None, "DeeBERT's flag: --exit_policy entropy with this threshold "
                                                "(-1: never exit)")
    patience_tolerance: float = _f(0.1, "patience on a regression task: a change below this counts as unchanged")
    eval_highway: bool = _f(False, "evaluate with early exit at the given policy and threshold")
    eval_each_highway: bool = _f(False, "evaluate each exit alone, as if every sample left there")
    eval_after_first_stage: bool = _f(False, "evaluate the final classifier after stage 1")
    do_sweep: bool = _f(False, "sweep each policy's threshold on the dev set, time chosen points, and save the "
                               "fastest within --max_metric_drop into the model")
    max_metric_drop: float = _f(1.0, "the sweep's tolerance: points (metric x 100) below the full model")
    timing_examples: int = _f(256, "dev sentences timed per point")
    timing_batch_sizes: str = _f("1,32", "batch sizes at which points are timed")
    timing_repeats: int = _f(3, "interleaved timed passes per point (the median is kept)")
    timing_points: int = _f(5, "points timed per policy and recipe")

    ACTIONS = ("do_train", "do_eval", "do_sweep")

    def validate(self) -> None:
        super().validate()
        recipes = self.recipes()
        if self.skip_first_stage and not self.do_train:
            raise UserError("--skip_first_stage needs --do_train")
        if self.skip_first_stage and recipes == ["joint"]:
            raise UserError("--skip_first_stage has no first stage to skip with --recipe joint")
        for name in ("exit_epochs", "exit_learning_rate"):
            if not getattr(self, name) > 0:
                raise UserError(f"--{name} must be positive, got {getattr(self, name)}")
        for name in ("exit_alpha_ce", "max_metric_drop", "patience_tolerance"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name} must not be negative, got {getattr(self, name)}")
        for name in ("timing_examples", "timing_repeats", "timing_points"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1, got {getattr(self, name)}")
        self.batch_sizes()
        if self.exit_pooling not in POOLINGS:
            raise UserError(f"--exit_pooling must be one of {', '.join(POOLINGS)}, got {self.exit_pooling!r}")
        if self.exit_policy not in POLICIES:
            raise UserError(f"--exit_policy must be one of {', '.join(POLICIES)}, got {self.exit_policy!r}")
        if self.early_exit_entropy is not None and self.exit_threshold is not None:
            raise UserError("give either --early_exit_entropy or --exit_threshold, not both")
        if self.eval_highway and self.policy() is None:
            raise UserError("--eval_highway needs a threshold: --early_exit_entropy or --exit_policy and "
                            "--exit_threshold")
        if not self.temperature > 0:
            raise UserError(f"--temperature must be positive, got {self.temperature}")

    def recipes(self) -> list[str]:
        names = [r for r in self.recipe.replace(" ", "").split(",") if r]
        bad = [r for r in names if r not in RECIPES]
        if bad or not names:
            raise UserError(f"--recipe takes {', '.join(RECIPES)} (comma-separated), got {self.recipe!r}")
        if len(set(names)) != len(names):
            raise UserError(f"--recipe names a recipe twice: {self.recipe!r}")
        return names

    def batch_sizes(self) -> list[int]:
        try:
            sizes = [int(x) for x in self.timing_batch_sizes.replace(" ", "").split(",") if x]
        except ValueError:
            sizes = []
        if not sizes or min(sizes) < 1:
            raise UserError(f"--timing_batch_sizes takes comma-separated positive sizes, got "
                            f"{self.timing_batch_sizes!r}")
        return sizes

    def policy(self) -> ExitPolicy | None:
        """The policy the flags name (None when no threshold was given)."""
        if self.early_exit_entropy is not None:
            return ExitPolicy("entropy", float(self.early_exit_entropy), self.patience_tolerance)
        if self.exit_threshold is not None:
            return ExitPolicy(self.exit_policy, float(self.exit_threshold), self.patience_tolerance)
        return None


def parse_early_exit_config(argv: list[str] | None = None, prog: str = PROG) -> EarlyExitConfig:
    parser = build_parser(prog, EarlyExitConfig, "Train exit heads on a GLUE classifier (DeeBERT, self-distilled "
                          "or PABEE-style), evaluate with early exit, and sweep exit thresholds against measured "
                          "speed.")
    return parse_config(argv, parser, EarlyExitConfig)


__all__ = ["EarlyExitConfig", "parse_early_exit_config", "NEVER"]
