"""``lmdistill select miniplm CONFIG``: score a corpus split with a teacher and a reference model, keep
the top fraction (MiniPLM difference sampling, arXiv:2410.17215; see :mod:`lmdistill.selection.miniplm`).

Config (YAML; unknown keys are errors)::

    output_dir: runs/miniplm-kjv
    data: {corpus: kjv, split_fractions: [0.9, 0.05, 0.05]}
    teacher: {path: runs/teacher/final}
    reference: {path: runs/reference/final}       # a small LM pretrained on (part of) the corpus
    selection: {fraction: 0.5, normalize: token, window: null, stride: null, batch_size: 16, split: train}

Writes to ``output_dir``:

* ``refined.jsonl``: the kept documents of the split, in corpus order, one JSON object per line with
  ``id`` (the corpus's document id), ``text`` (or ``prompt`` and ``response``) and ``score``;
* ``scores.jsonl``: every scored document: id, score, both models' log-likelihoods and token counts,
  UTF-8 bytes, kept or not;
* ``summary.json``: counts, tokens, score statistics, settings.

Only the chosen split (default: train) is scored and refined; validation and test stay untouched, so a
student trained on the refined corpus is evaluated on the full corpus's validation split.
:func:`load_refined_documents` reads ``refined.jsonl`` back as documents that keep their corpus ids.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, ValidationError, field_validator, model_validator

from lmdistill.config import DataConfig, Section, require_existing
from lmdistill.data.documents import Document
from lmdistill.errors import DataError


class SelectionData(Section):
    corpus: str = Field("kjv", description="corpus name or a data file (.txt/.jsonl/.parquet/.csv)")
    split_fractions: tuple[float, float, float] = (0.9, 0.05, 0.05)

    @model_validator(mode="after")
    def _check(self) -> SelectionData:
        # the very checks of a training run's data section (corpus exists, fractions sum to 1), so the
        # selection and the run that trains on its output accept the same data sections
        try:
            DataConfig(corpus=self.corpus, split_fractions=self.split_fractions)
        except ValidationError as exc:
            raise ValueError("; ".join(str(e["ctx"].get("error", e["msg"])) if "ctx" in e else e["msg"]
                                       for e in exc.errors())) from None
        return self


class ScoringModel(Section):
    path: str = Field(..., description="local directory (save_pretrained) or hub id; its own tokenizer is used")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    _path_exists = field_validator("path")(lambda v: require_existing(v, "model path"))


class SelectionSettings(Section):
    fraction: float = Field(0.5, gt=0, le=1, description="share of documents kept (the paper's r = 0.5)")
    normalize: Literal["token", "byte"] = Field(
        "token", description="token: mean log-prob per each model's tokens (paper); byte: difference per UTF-8 byte"
    )
    window: int | None = Field(None, ge=2, description="tokens per scoring window; default: the model's context")
    stride: int | None = Field(None, ge=1, description="new tokens per window; default: window // 2")
    batch_size: int = Field(16, ge=1)
    split: Literal["train", "validation", "test"] = "train"


class MiniPLMConfig(Section):
    output_dir: str = "runs/miniplm"
    data: SelectionData = SelectionData()
    teacher: ScoringModel
    reference: ScoringModel
    selection: SelectionSettings = SelectionSettings()


def _write_lines(path: Path, records: list[dict[str, Any]]) -> None:
    """JSON lines through a temporary file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _scores_for(model_cfg: ScoringModel, texts: list[str], settings: SelectionSettings, desc: str, show_progress: bool):
    from lmdistill.data.tokenizer import load_tokenizer, tokenizer_fingerprint
    from lmdistill.models.loading import load_causal_lm
    from lmdistill.selection.miniplm import sequence_logprobs

    tokenizer = load_tokenizer(model_cfg.path)
    model = load_causal_lm(model_cfg.path, dtype=model_cfg.dtype)
    start = time.perf_counter()
    scores = sequence_logprobs(
        model, tokenizer, texts, window=settings.window, stride=settings.stride,
        batch_size=settings.batch_size, show_progress=show_progress, desc=desc,
    )
    seconds = time.perf_counter() - start
    del model
    return scores, tokenizer_fingerprint(tokenizer), seconds


def run_miniplm_selection(config: MiniPLMConfig, *, show_progress: bool = True) -> dict[str, Any]:
    """Score the split with both models, keep the top fraction, write the refined corpus (see module doc)."""
    from lmdistill.data.corpora import load_documents
    from lmdistill.data.documents import split_of
    from lmdistill.selection.miniplm import difference_scores, select_top_fraction

    s = config.selection
    docs = [d for d in load_documents(config.data.corpus) if split_of(d.doc_id, config.data.split_fractions) == s.split]
    if not docs:
        raise DataError(f"the {s.split} split of '{config.data.corpus}' has no documents", hint="check data.split_fractions")
    texts = [d.text for d in docs]
    n_bytes = np.array([len(t.encode("utf-8")) for t in texts], dtype=np.int64)
    teacher, teacher_fp, teacher_s = _scores_for(config.teacher, texts, s, "teacher scores", show_progress)
    reference, reference_fp, reference_s = _scores_for(config.reference, texts, s, "reference scores", show_progress)
    scores = difference_scores(teacher, reference, n_bytes=n_bytes, normalize=s.normalize)
    kept = select_top_fraction(scores, s.fraction)
    kept_mask = np.zeros(len(docs), dtype=bool)
    kept_mask[kept] = True

    out = Path(config.output_dir)
    refined = []
    for i in kept:
        d = docs[int(i)]
        record: dict[str, Any] = {"id": d.doc_id}
        if d.prompt is not None:
            record.update(prompt=d.prompt, response=d.response)
        else:
            record["text"] = d.text
        record["score"] = float(scores[i])
        refined.append(record)
    _write_lines(out / "refined.jsonl", refined)
    _write_lines(out / "scores.jsonl", [
        {
            "id": d.doc_id,
            "score": float(scores[i]),
            "teacher_logprob": float(teacher.logprob[i]),
            "teacher_tokens": int(teacher.n_targets[i]),
            "reference_logprob": float(reference.logprob[i]),
            "reference_tokens": int(reference.n_targets[i]),
            "bytes": int(n_bytes[i]),
            "kept": bool(kept_mask[i]),
        }
        for i, d in enumerate(docs)
    ])
    summary = {
        "output_dir": str(out),
        "corpus": config.data.corpus,
        "split": s.split,
        "documents": len(docs),
        "kept": int(kept.size),
        "fraction": s.fraction,
        "normalize": s.normalize,
        "same_tokenizer": teacher_fp == reference_fp,
        "bytes_total": int(n_bytes.sum()),
        "bytes_kept": int(n_bytes[kept_mask].sum()),
        "teacher_tokens_total": int(teacher.n_targets.sum()),
        "teacher_tokens_kept": int(teacher.n_targets[kept_mask].sum()),
        "score_mean": float(scores.mean()),
        "score_threshold": float(scores[kept].min()),
        "teacher_nats_per_token": float(teacher.logprob.sum() / -max(1, teacher.n_targets.sum())),
        "reference_nats_per_token": float(reference.logprob.sum() / -max(1, reference.n_targets.sum())),
        "teacher_seconds": round(teacher_s, 2),
        "reference_seconds": round(reference_s, 2),
        "teacher": config.teacher.path,
        "reference": config.reference.path,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return summary


def load_refined_documents(path: str | Path) -> list[Document]:
    """The documents of a ``refined.jsonl`` written by :func:`run_miniplm_selection`, with their corpus
    ids kept (a generic ``.jsonl`` reader would prefix ids with the file name and re-split them)."""
    path = Path(path)
    docs = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                doc_id = record["id"]
                meta = {"miniplm_score": record.get("score")}
                if "prompt" in record:
                    docs.append(Document.from_prompt_response(record["prompt"], record["response"], doc_id=doc_id,
                                                              source="miniplm", meta=meta))
                else:
                    docs.append(Document(text=record["text"], doc_id=doc_id, source="miniplm", meta=meta))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataError(f"not a refined-corpus record: {exc}", path=path, line=line_no) from None
    return docs
