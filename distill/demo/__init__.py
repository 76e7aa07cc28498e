"""The project's two end-to-end demos, each on real packaged models and public-domain texts.

- :mod:`distill.demo.mlm` (``make demo``, ``python -m distill.demo``): ``distill-pipeline`` on the
  all-MiniLM-L6-v2 sentence encoder, the King James Bible and a movie-review sentiment task: a
  3-layer DistilBERT student, four rows (extracted or distilled, fine-tuned or task-distilled) over
  three seeds against the fine-tuned teacher, and exit heads on the teacher;
- :mod:`distill.demo.clm` (``make demo-clm``, ``python -m distill.demo.clm``): distil
  SmolLM2-135M-Instruct (a GGUF file) into a 15-layer student and score all three on held-out text.

Beside them: :mod:`~distill.demo.assets` (where the models and texts come from),
:mod:`~distill.demo.similarity` (sentence-embedding similarity to the teacher),
:mod:`~distill.demo.report` (plots and the early-exit section the pipeline's report uses) and
:mod:`~distill.demo.stages` (the stage runner both demos share: timed stages, reused once finished). Importing this package imports neither demo.
"""
