"""Where teacher signal comes from, behind one small interface (:class:`TeacherSource`), so the trainer never
asks which teacher it has: a live model (:class:`LiveTeacher`, dense logits or hidden states) or an offline cache
(:mod:`lmdistill.teachers.cache`: low-rank codes, top-k or sampled entries). Each declares the signal kinds it
serves (:mod:`lmdistill.losses.signals`) and refuses, before training, an objective that cannot use them."""

from lmdistill.teachers.base import TeacherBase, TeacherSource
from lmdistill.teachers.live import LiveTeacher, load_live_teacher

__all__ = ["LiveTeacher", "TeacherBase", "TeacherSource", "load_live_teacher"]
