"""Text classification for active distillation: tasks built from the installed corpora, and the student.

Tasks (:func:`build_class_task`):

* ``fortunes``: which fortune file a fortune comes from (the files are categories: computers, politics, science,
  ...); a multi-class task on real, short, stylistically varied text;
* ``gcide_pos``: the part of speech of a GCIDE headword from its definitions (noun, verb, adjective, adverb).

Documents are split by a hash of their id (:func:`~lmdistill.data.documents.split_of`, with the task's own
fractions, 80/10/10 by default: the classes are small), so train, validation and test never share a document (nor,
for fortunes, a text that appears in two files). From the training split come a small seed set (the labelled data
the student starts with) and the remaining *pool* (not used by the loop itself; a benchmark teacher may draw on
it); validation guides the loop (hard examples, early stopping); test is only reported.

The student (:class:`StudentClassifier`) is a frozen text encoder (MiniLM ``minilm``, any sentence-transformers or
transformers encoder directory, or a causal LM directory: mean-pooled last hidden states) with a linear softmax
head trained from a seeded initialisation by full-batch AdamW, so retraining on the same data gives the same
classifier.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from lmdistill.config import Section
from lmdistill.data.documents import split_of
from lmdistill.errors import ConfigError, DataError

TaskName = Literal["fortunes", "gcide_pos"]
FORTUNE_LABELS = ("computers", "definitions", "politics", "science", "songs-poems", "work")
POS_LABELS = {"n.": "noun", "n. pl.": "noun", "v. t.": "verb", "v. i.": "verb", "v. t. & i.": "verb", "v.": "verb",
              "a.": "adjective", "adj.": "adjective", "adv.": "adverb"}


@dataclass(frozen=True)
class Labelled:
    """One labelled text; ``origin`` says where it came from (a corpus document id, or ``teacher:<store key>``)."""

    text: str
    label: str
    origin: str


def normalize_text(text: str) -> str:
    """Whitespace collapsed and case folded: the identity used to drop duplicates and leaked evaluation texts."""
    return " ".join(text.split()).casefold()


class ClassTaskConfig(Section):
    name: TaskName = Field("fortunes", description="fortunes: the fortune's file; gcide_pos: a headword's part of speech")
    labels: list[str] | None = Field(None, description="fortunes: the files used as classes (default: six of them)")
    seed_per_class: int = Field(8, ge=1, description="labelled training examples per class the student starts with")
    validation_per_class: int = Field(30, ge=1)
    test_per_class: int = Field(50, ge=1)
    max_chars: int = Field(300, ge=20, description="texts are cut to this many characters")
    split_fractions: tuple[float, float, float] = Field(
        (0.8, 0.1, 0.1), description="train / validation / test shares of the hash split (by document id)")
    seed: int = 0

    @model_validator(mode="after")
    def _fractions(self) -> ClassTaskConfig:
        if abs(sum(self.split_fractions) - 1.0) > 1e-6 or min(self.split_fractions) < 0:
            raise ValueError("task.split_fractions must be three non-negative numbers summing to 1")
        return self


def _rank(seed: int, origin: str) -> bytes:
    return hashlib.blake2b(f"{seed}\x00{origin}".encode("utf-8", "surrogatepass"), digest_size=8).digest()


def _raw_task(cfg: ClassTaskConfig) -> tuple[list[str], list[tuple[str, str, str]]]:
    """(labels, [(text, label, doc id)]) of the whole corpus."""
    if cfg.name == "fortunes":
        from lmdistill.data.corpora import read_fortunes

        labels = list(cfg.labels or FORTUNE_LABELS)
        docs = [d for d in read_fortunes() if d.meta["category"] in labels]
        missing = sorted(set(labels) - {d.meta["category"] for d in docs})
        if missing:
            raise ConfigError(f"task.labels: no fortune file named {', '.join(missing)} "
                              f"(the files are in /usr/share/games/fortunes)")
        return labels, [(" ".join(d.text.split()), d.meta["category"], d.doc_id) for d in docs]
    if cfg.labels is not None:
        raise ConfigError("task.labels applies to the fortunes task; gcide_pos has the labels noun, verb, adjective, adverb")
    from lmdistill.data.corpora import read_gcide

    rows = []
    for d in read_gcide():
        label = POS_LABELS.get(d.meta["pos"] or "")
        if label is not None and d.meta["definitions"]:
            rows.append(("; ".join(d.meta["definitions"]), label, d.doc_id))
    return ["noun", "verb", "adjective", "adverb"], rows


def build_class_task(cfg: ClassTaskConfig) -> dict[str, Any]:
    """``{"labels", "seed", "pool", "validation", "test"}``: the capped, seeded splits of the task (see the module
    docstring). Each class contributes the same number of examples to seed, validation and test."""
    labels, rows = _raw_task(cfg)
    by: dict[str, dict[str, list[Labelled]]] = {s: {lab: [] for lab in labels} for s in ("train", "validation", "test")}
    seen: set[str] = set()
    for text, label, doc_id in sorted(rows, key=lambda r: _rank(cfg.seed, r[2])):
        key = normalize_text(text)
        if len(key) < 3 or key in seen:  # a text in two files (or two entries) would be ambiguous
            continue
        seen.add(key)
        by[split_of(doc_id, cfg.split_fractions)][label].append(Labelled(text[: cfg.max_chars], label, doc_id))
    need = {"train": cfg.seed_per_class, "validation": cfg.validation_per_class, "test": cfg.test_per_class}
    for split, per_label in by.items():
        short = [f"{lab} ({len(v)})" for lab, v in per_label.items() if len(v) < need[split]]
        if short:
            raise DataError(f"task {cfg.name}: too few {split} examples for {', '.join(short)}",
                            hint=f"lower task.{'seed' if split == 'train' else split}_per_class or choose other labels")
    out: dict[str, Any] = {"labels": labels}
    out["seed"] = [x for lab in labels for x in by["train"][lab][: cfg.seed_per_class]]
    out["pool"] = [x for lab in labels for x in by["train"][lab][cfg.seed_per_class:]]
    out["validation"] = [x for lab in labels for x in by["validation"][lab][: cfg.validation_per_class]]
    out["test"] = [x for lab in labels for x in by["test"][lab][: cfg.test_per_class]]
    return out


# ------------------------------------------------------------------------------------------- the student
class StudentConfig(Section):
    encoder: str = Field("minilm", description="'minilm', an encoder directory, or a causal LM directory (frozen)")
    epochs: int = Field(300, ge=1, description="full-batch AdamW steps of the linear head")
    lr: float = Field(0.05, gt=0)
    weight_decay: float = Field(1e-3, ge=0)
    batch_size: int = Field(32, ge=1, description="texts per encoder batch")
    max_seq_length: int = Field(128, ge=8)
    seed: int = 0


@dataclass
class ClassReport:
    """A classifier's results on a labelled set."""

    accuracy: float
    macro_f1: float
    loss: float
    per_class: dict[str, dict[str, float]]
    confusion: list[list[int]]  # [true][predicted]
    predictions: list[int]
    confidence: list[float]  # probability of the predicted class

    def summary(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "macro_f1": self.macro_f1, "loss": self.loss, "per_class": self.per_class}


class StudentClassifier:
    """A frozen encoder's embeddings (computed once per text) and a linear head retrained from scratch by
    :meth:`fit` (seeded: the same data give the same head)."""

    def __init__(self, cfg: StudentConfig, labels: list[str], encoder: Any = None) -> None:
        self.cfg = cfg
        self.labels = list(labels)
        self.index = {lab: i for i, lab in enumerate(self.labels)}
        self.encoder = encoder if encoder is not None else load_encoder(cfg)
        self._cache: dict[str, torch.Tensor] = {}
        self.head: torch.nn.Linear | None = None

    def features(self, texts: list[str]) -> torch.Tensor:
        todo = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if todo:
            emb = self.encoder.encode(todo, batch_size=self.cfg.batch_size, convert_to_tensor=True)
            for t, e in zip(todo, emb):
                self._cache[t] = e.float()
        return torch.stack([self._cache[t] for t in texts])

    def fit(self, examples: list[Labelled]) -> None:
        x = self.features([e.text for e in examples])
        y = torch.tensor([self.index[e.label] for e in examples])
        gen = torch.Generator().manual_seed(self.cfg.seed)
        head = torch.nn.Linear(x.shape[1], len(self.labels))
        with torch.no_grad():
            bound = 1.0 / math.sqrt(x.shape[1])
            head.weight.copy_(torch.rand(head.weight.shape, generator=gen) * 2 * bound - bound)
            head.bias.zero_()
        opt = torch.optim.AdamW(head.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        # classes weighted by inverse frequency: teacher-written data need not be balanced
        counts = torch.bincount(y, minlength=len(self.labels)).double().clamp_min(1)
        weight = (counts.sum() / (len(self.labels) * counts)).float()
        for _ in range(self.cfg.epochs):
            opt.zero_grad()
            F.cross_entropy(head(x), y, weight=weight).backward()
            opt.step()
        self.head = head.eval()

    @torch.no_grad()
    def probabilities(self, texts: list[str]) -> torch.Tensor:
        if self.head is None:
            raise ConfigError("the student classifier has not been trained (call fit first)")
        return F.softmax(self.head(self.features(texts)), dim=-1)

    def evaluate(self, examples: list[Labelled]) -> ClassReport:
        return class_report(self.probabilities([e.text for e in examples]), [self.index[e.label] for e in examples],
                            self.labels)


def class_report(probs: torch.Tensor, truth: list[int], labels: list[str]) -> ClassReport:
    """Accuracy, macro F1, mean cross-entropy, per-class precision/recall/F1/support and the confusion matrix."""
    pred = probs.argmax(-1).tolist()
    n = len(labels)
    confusion = [[0] * n for _ in range(n)]
    for t, p in zip(truth, pred):
        confusion[t][p] += 1
    per_class: dict[str, dict[str, float]] = {}
    f1s = []
    for i, lab in enumerate(labels):
        tp = confusion[i][i]
        predicted = sum(confusion[r][i] for r in range(n))
        support = sum(confusion[i])
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[lab] = {"precision": precision, "recall": recall, "f1": f1, "support": float(support)}
        f1s.append(f1)
    truth_t = torch.tensor(truth)
    loss = float(-torch.log(probs[torch.arange(len(truth)), truth_t].clamp_min(1e-12)).mean()) if truth else 0.0
    return ClassReport(
        accuracy=sum(int(t == p) for t, p in zip(truth, pred)) / max(1, len(truth)), macro_f1=float(np.mean(f1s)),
        loss=loss, per_class=per_class, confusion=confusion, predictions=pred,
        confidence=probs.max(-1).values.tolist(),
    )


def load_encoder(cfg: StudentConfig) -> Any:
    from lmdistill.embed.config import resolve_model_path
    from lmdistill.embed.encoder import TextEncoder

    encoder = TextEncoder.from_pretrained(resolve_model_path(cfg.encoder), max_seq_length=cfg.max_seq_length)
    if encoder.tokenizer.pad_token is None:  # causal LM tokenizers may lack one; padding is masked anyway
        encoder.tokenizer.pad_token = encoder.tokenizer.eos_token
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder


def label_counts(examples: list[Labelled]) -> dict[str, int]:
    return dict(Counter(e.label for e in examples))


__all__ = [
    "ClassReport", "ClassTaskConfig", "Labelled", "StudentClassifier", "StudentConfig", "build_class_task",
    "class_report", "label_counts", "load_encoder", "normalize_text",
]
