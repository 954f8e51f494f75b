"""Sequence-level KD data: a teacher's answers to a task's prompts, stored on disk, resumable.

Sequence-level knowledge distillation (Kim & Rush 2016, "Sequence-Level Knowledge Distillation",
arXiv 1606.07947) trains the student with the ordinary next-token loss on sequences the TEACHER
generated (beam/greedy search or sampling) instead of on the references. The teacher runs once;
its answers are a dataset (a :class:`~lmdistill.generation.store.ResponseStore`): a local model
(:func:`fill_store_local`) or any OpenAI-compatible endpoint
(:class:`~lmdistill.generation.blackbox.BlackBoxTeacher`) writes it, and :func:`documents_from_store`
turns it back into prompt/response documents for :class:`~lmdistill.generation.batching.PromptResponseSource`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lmdistill.data.documents import Document
from lmdistill.errors import DataError
from lmdistill.generation.batching import encode_prompts, pad_id_of
from lmdistill.generation.blackbox import StoreReport
from lmdistill.generation.sampling import SamplingParams, generate, strip_eos
from lmdistill.generation.store import ResponseStore, request_key


def local_teacher_id(path: str | Path) -> str:
    return f"local:{Path(path).expanduser().resolve()}"


def sampling_params_dict(params: SamplingParams, seed: int) -> dict[str, Any]:
    out: dict[str, Any] = {"max_new_tokens": params.max_new_tokens, "greedy": params.greedy}
    if not params.greedy:
        out.update(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, seed=seed)
    return out


@torch.no_grad()
def fill_store_local(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    store: ResponseStore,
    *,
    teacher_id: str,
    params: SamplingParams,
    batch_size: int = 32,
    seed: int = 0,
    doc_ids: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> StoreReport:
    """Generate the answers of a local teacher for the prompts not yet in ``store``; every batch's
    answers are stored as soon as it is done. Sampling is seeded per batch from ``seed`` and the
    batch's first key, so a rerun with the same store reproduces the same answers."""
    settings = sampling_params_dict(params, seed)
    report = StoreReport()
    todo: dict[str, tuple[str, str | None]] = {}
    for i, prompt in enumerate(prompts):
        key = request_key(prompt, teacher_id, settings)
        if key in store:
            report.already_stored += 1
        elif key not in todo:
            todo[key] = (prompt, doc_ids[i] if doc_ids is not None else None)
    items = list(todo.items())
    eos, pad = tokenizer.eos_token_id, pad_id_of(tokenizer)
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        ids = encode_prompts(tokenizer, [prompt for _, (prompt, _) in chunk])
        gen_seed = int.from_bytes(hashlib.sha256(f"{seed}:{chunk[0][0]}".encode()).digest()[:8], "big") >> 1
        outputs = generate(model, ids, eos_token_id=eos, pad_token_id=pad, params=params,
                           generator=torch.Generator().manual_seed(gen_seed), vocab_size=len(tokenizer))
        for (key, (prompt, doc_id)), out in zip(chunk, outputs):
            store.add({
                "key": key, "prompt": prompt, "response": tokenizer.decode(strip_eos(out, eos), skip_special_tokens=True),
                "finish_reason": "stop" if out and out[-1] == eos else "length", "teacher": teacher_id,
                "params": settings, "doc_id": doc_id,
            })
            report.requested += 1
        if progress is not None:
            progress(min(start + batch_size, len(items)), len(items))
    return report


def documents_from_store(docs: Sequence[Document], store: ResponseStore | str | Path, *, teacher: str | None = None) -> list[Document]:
    """The task documents with their responses replaced by the stored teacher answers (matched by
    prompt; ids, split and metadata kept, the reference moved to ``meta['reference']``).

    A prompt without a stored answer is an error naming how many are missing (run the generation
    again: it resumes). With answers from several teachers in one store, pass ``teacher``."""
    if not isinstance(store, ResponseStore):
        store = ResponseStore(store)
    answers: dict[str, str] = {}
    sources: dict[str, str] = {}
    for record in store.records():
        if teacher is not None and record.get("teacher") != teacher:
            continue
        prompt = record.get("prompt")
        if prompt in answers and sources[prompt] != record.get("teacher"):
            raise DataError(
                f"the store holds answers from several teachers for the same prompt ({sources[prompt]!r}, "
                f"{record.get('teacher')!r})", path=store.path, hint="pass the teacher id to use",
            )
        answers.setdefault(prompt, record["response"])
        sources.setdefault(prompt, record.get("teacher"))
    out, missing = [], []
    for doc in docs:
        if doc.prompt not in answers:
            missing.append(doc.doc_id)
            continue
        meta = dict(doc.meta)
        meta.setdefault("reference", (doc.response or "").strip())
        out.append(Document.from_prompt_response(doc.prompt, answers[doc.prompt], doc.doc_id, doc.source, meta))
    if missing:
        raise DataError(
            f"{len(missing)} of {len(docs)} prompts have no teacher answer in the store (e.g. {', '.join(missing[:3])})",
            path=store.path, hint="run `lmdistill generate` with the same task and store: it only asks for the missing ones",
        )
    return out
