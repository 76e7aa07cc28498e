"""The teacher's signal computed once: top-k log-probabilities per position of a binarized dataset.

* :mod:`.store`: the folder's layout, its identity checks, and :class:`TeacherCache`, which reads it.
* :mod:`.write`: :func:`cache_teacher`, which runs the teacher and writes the folder (resumable).

The loss trained from it is in :mod:`distill.losses.cached`.
"""

from distill.teacher_cache.store import TeacherCache, bytes_per_position

__all__ = ["TeacherCache", "bytes_per_position"]
