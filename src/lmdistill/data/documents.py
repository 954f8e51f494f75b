"""Documents: the unit every corpus reader yields and every later stage consumes.

A document is either plain text (language modelling: every token is a target) or a prompt/response
pair (instruction data: only the response is a target). Splits into train/validation/test are a pure
function of the document id, so every consumer (pretraining, distillation, evaluation, selection)
sees the same split without sharing any state.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from lmdistill.errors import ConfigError

Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.9, 0.05, 0.05)
DEFAULT_SALT = "lmdistill"


@dataclass(frozen=True)
class Document:
    """One document.

    ``text`` is always the full text. For prompt/response documents ``text == prompt + response``
    exactly, so a consumer that only knows about plain text (e.g. a tokenizer trainer) still sees
    everything, while the packer uses the boundary to mask the prompt out of the loss.

    ``doc_id`` is stable across runs and machines (it never depends on hash randomisation or on
    where a file lives); ``source`` names the corpus or the user file; ``meta`` carries structure
    (GCIDE headword and definitions, KJV book and chapter, ...).
    """

    text: str
    doc_id: str
    source: str
    meta: Mapping[str, Any] = field(default_factory=dict)
    prompt: str | None = None
    response: str | None = None

    def __post_init__(self) -> None:
        if (self.prompt is None) != (self.response is None):
            raise ValueError(f"document {self.doc_id!r}: give both prompt and response, or neither")
        if self.prompt is not None and self.text != self.prompt + self.response:  # type: ignore[operator]
            raise ValueError(f"document {self.doc_id!r}: text must equal prompt + response exactly")

    @property
    def is_prompt_response(self) -> bool:
        return self.prompt is not None

    @classmethod
    def from_prompt_response(
        cls, prompt: str, response: str, doc_id: str, source: str, meta: Mapping[str, Any] | None = None
    ) -> Document:
        """Build a prompt/response document with ``text = prompt + response``."""
        return cls(
            text=prompt + response,
            doc_id=doc_id,
            source=source,
            meta=dict(meta or {}),
            prompt=prompt,
            response=response,
        )


def split_key(doc_id: str) -> str:
    """The part of a document id that decides its split: everything before the first ``#``.

    Readers use ``group#member`` ids when several documents must share a split to avoid leakage
    between train and test: the senses of one GCIDE headword (``gcide:affect#2``), or the copies of
    one fortune that appears in several fortune files. Ids without ``#`` are their own group.
    """
    return doc_id.split("#", 1)[0]


def _check_fractions(fractions: tuple[float, float, float] | list[float]) -> tuple[float, float, float]:
    if len(fractions) != 3:
        raise ConfigError(f"split fractions must be three numbers (train, validation, test), got {list(fractions)}")
    values = tuple(float(f) for f in fractions)
    if any(not math.isfinite(f) or f < 0 for f in values) or abs(sum(values) - 1.0) > 1e-6:
        raise ConfigError(f"split fractions must be non-negative and sum to 1, got {list(fractions)}")
    return values  # type: ignore[return-value]


def split_unit(doc_id: str, salt: str = DEFAULT_SALT) -> float:
    """A number in [0, 1) derived from the id by BLAKE2b (stable across processes, unlike ``hash()``)."""
    digest = hashlib.blake2b(f"{salt}\x00{split_key(doc_id)}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def split_of(
    doc_id: str, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS, salt: str = DEFAULT_SALT
) -> Split:
    """Deterministic train/validation/test assignment of a document id.

    The id's group (see :func:`split_key`) is hashed with BLAKE2b (salted, so an experiment can draw a
    different but still deterministic split) to a uniform number u in [0, 1); u < f_train is train,
    u < f_train + f_val is validation, the rest test.
    """
    train, validation, _ = _check_fractions(fractions)
    u = split_unit(doc_id, salt)
    if u < train:
        return "train"
    if u < train + validation:
        return "validation"
    return "test"


def filter_split(
    docs: Iterable[Document],
    split: Split,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    salt: str = DEFAULT_SALT,
) -> list[Document]:
    """The documents of ``docs`` that fall in ``split`` (order kept)."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    _check_fractions(fractions)
    return [doc for doc in docs if split_of(doc.doc_id, fractions, salt) == split]
