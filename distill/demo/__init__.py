"""The project's two end-to-end demos, each on real packaged models and public-domain texts.

- :mod:`distill.demo.mlm` (``make demo``, ``python -m distill.demo``): distil the all-MiniLM-L6-v2
  sentence encoder into a 3-layer DistilBERT student on the King James Bible, then compare the
  teacher, the distilled student and an undistilled one on a movie-review sentiment task;
- :mod:`distill.demo.clm` (``make demo-clm``, ``python -m distill.demo.clm``): distil
  SmolLM2-135M-Instruct (a GGUF file) into a 15-layer student and score all three on held-out text.

Beside them: :mod:`~distill.demo.assets` (where the models and texts come from),
:mod:`~distill.demo.similarity` (sentence-embedding similarity to the teacher),
:mod:`~distill.demo.report` (the MLM demo's report) and :mod:`~distill.demo.stages` (the stage runner
both demos share: timed stages, reused once finished). Importing this package imports neither demo.
"""
