"""lmdistill: knowledge distillation for language models.

One flow, one package per stage: ``data`` (corpus -> documents -> tokenized blocks -> batches),
``models`` (loading, presets, tokenizers), ``teachers`` (where teacher signal comes from),
``losses`` (pure objectives), ``train`` (the one trainer), ``generation``, ``selection``, ``embed``,
``eval`` and ``report``; ``cli`` is a thin layer over them.
"""

from lmdistill.errors import ConfigError, DataError, LmdistillError

__version__ = "0.1.0"
__all__ = ["ConfigError", "DataError", "LmdistillError", "__version__"]
