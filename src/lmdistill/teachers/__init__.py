"""Where teacher signal comes from, behind one small interface (the trainer never asks which):
``logits(input_ids)`` -> dense logits or a sparse top-k teacher."""

from lmdistill.teachers.live import LiveTeacher

__all__ = ["LiveTeacher"]
