"""Data-level distillation: which data the student sees. :mod:`~lmdistill.selection.miniplm` (difference sampling
of a pre-training corpus), :mod:`~lmdistill.selection.ddk` (domain weights from student/teacher perplexity
ratios), :mod:`~lmdistill.selection.active` (performance-guided active distillation with a teacher that writes
new labelled examples)."""
