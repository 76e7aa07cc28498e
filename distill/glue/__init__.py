"""GLUE fine-tuning and evaluation of teachers and students, with task-specific distillation.

| module | what |
| --- | --- |
| ``tasks`` | the nine tasks, their labels and TSV layouts; reading a split |
| ``metrics`` | Matthews correlation, accuracy, F1, Pearson, Spearman (numpy); one score per task |
| ``features`` | tokenising a split once, the cache next to the data, dynamic-padding batches |
| ``modeling`` | loading any model folder as a classifier (new head reported), the teacher, the tokenizer |
| ``losses`` | the task loss and the task-distillation loss (pure functions) |
| ``config`` | the one config of a run (the command line is built from it) |
| ``trainer`` | the fine-tuning loop and evaluation |
| ``run`` | one run_glue job: the checks, fine-tuning or task distillation, evaluation, the output folder |
| ``compare`` | teacher and students side by side: parameters, speed measured in one run, metrics |

Their command lines are ``distill.cli.run_glue`` (``distill-glue``) and ``distill.cli.compare``
(``distill-compare``).
"""

from distill.glue.metrics import compute_metrics, task_score
from distill.glue.tasks import TASKS, Example, Task, get_task, read_split

__all__ = ["TASKS", "Example", "Task", "compute_metrics", "get_task", "read_split", "task_score"]
