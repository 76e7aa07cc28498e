"""The whole recipe as one command: a user's teacher, corpus and task in, a report of what each step adds out.

    distill-pipeline --teacher DIR --corpus FILE --task_dir DIR --task_name sst-2 --student_layers 3 \
        --output_dir runs/x

:mod:`.config` holds the settings and their checks, :mod:`.stages` the steps (each reused when
finished, the distillations resumed when interrupted), :mod:`.report` the table and plots, and
:mod:`.run` the order they run in. ``make demo`` is this command on the packaged assets.
"""

from distill.pipeline.config import FULL, QUICK, Budget, PipelineConfig
from distill.pipeline.run import run_pipeline

__all__ = ["Budget", "FULL", "QUICK", "PipelineConfig", "run_pipeline"]
