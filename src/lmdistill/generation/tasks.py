"""Instruction-style tasks from the installed corpora, with references nobody here wrote.

============== ============================================ ===================================
task           prompt                                       response (the reference)
============== ============================================ ===================================
gcide_define   ``Define: telltale\\nDefinition:``            `` Telling tales; babbling. ...``
kjv_verse      ``Genesis 1:3\\n``                            ``And God said, Let there be light...``
kjv_continue   ``Genesis 1:3 And God said, Let there``       `` be light: and there was light.``
============== ============================================ ===================================

Every example is a prompt/response :class:`~lmdistill.data.documents.Document` (``text = prompt +
response``). Ids are chosen so that splits agree with the corpus documents they come from: a verse
has id ``kjv:Genesis:1#3`` and so shares the split of chapter document ``kjv:Genesis:1``; a
definition has id ``gcide:telltale#define`` and shares the split of every GCIDE entry of that
headword. A teacher pretrained on the training split of the plain corpus has therefore never seen a
test example's reference.

Responses start with a space and prompts do not end with one: byte-level BPE attaches a word's
leading space to the word, so the prompt/response boundary falls between tokens.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

from lmdistill.data.documents import SPLITS, Document, split_key, split_of
from lmdistill.errors import DataError
from lmdistill.generation.config import TaskConfig


def gcide_define_documents(entries: Iterable[Document], max_response_words: int | None = None) -> list[Document]:
    """``Define: WORD`` -> the first definition of the word's first dictionary entry.

    Only the first entry of each headword (``#1``) is used, so every prompt has one reference.
    Entries without a definition are skipped."""
    out: list[Document] = []
    for entry in entries:
        if not entry.doc_id.endswith("#1"):
            continue
        definitions = entry.meta.get("definitions") or []
        headword = (entry.meta.get("headword") or "").strip()
        if not definitions or not headword:
            continue
        definition = " ".join(definitions[0].split())
        if not definition or (max_response_words is not None and len(definition.split()) > max_response_words):
            continue
        out.append(
            Document.from_prompt_response(
                f"Define: {headword}\nDefinition:",
                " " + definition,
                doc_id=f"{split_key(entry.doc_id)}#define",
                source="task:gcide_define",
                meta={"headword": headword, "pos": entry.meta.get("pos"), "reference": definition},
            )
        )
    return out


def _verses(chapters: Iterable[Document]) -> Iterable[tuple[Document, int, str]]:
    for chapter in chapters:
        for number, text in chapter.meta["verses"]:
            yield chapter, int(number), " ".join(str(text).split())


def kjv_verse_documents(chapters: Iterable[Document], max_response_words: int | None = None) -> list[Document]:
    """``BOOK C:V`` (newline) -> the verse."""
    out = []
    for chapter, number, text in _verses(chapters):
        if not text or (max_response_words is not None and len(text.split()) > max_response_words):
            continue
        book, chap = chapter.meta["book"], chapter.meta["chapter"]
        out.append(
            Document.from_prompt_response(
                f"{book} {chap}:{number}\n",
                text,
                doc_id=f"{chapter.doc_id}#{number}",
                source="task:kjv_verse",
                meta={"book": book, "chapter": chap, "verse": number, "reference": text},
            )
        )
    return out


def kjv_continue_documents(
    chapters: Iterable[Document],
    prompt_words: int = 5,
    response_words: int | None = None,
    max_response_words: int | None = None,
) -> list[Document]:
    """``BOOK C:V`` + the verse's first ``prompt_words`` words -> the rest of the verse (or only its
    next ``response_words`` words). Verses with nothing left to continue are skipped."""
    out = []
    for chapter, number, text in _verses(chapters):
        words = text.split()
        if len(words) <= prompt_words:
            continue
        rest = words[prompt_words:]
        if response_words is not None:
            rest = rest[:response_words]
        if max_response_words is not None and len(rest) > max_response_words:
            continue
        book, chap = chapter.meta["book"], chapter.meta["chapter"]
        response = " " + " ".join(rest)
        out.append(
            Document.from_prompt_response(
                f"{book} {chap}:{number} " + " ".join(words[:prompt_words]),
                response,
                doc_id=f"{chapter.doc_id}#{number}",
                source="task:kjv_continue",
                meta={"book": book, "chapter": chap, "verse": number, "reference": response.strip()},
            )
        )
    return out


def file_task_documents(config: TaskConfig) -> list[Document]:
    """The user's own examples (``task.path``): prompt/response records with ``task.prompt_template`` applied to
    the prompt, or chat ``messages`` records (prompt rendered by the default chat template; see
    :func:`apply_chat_template` for the tokenizer's). Plain ``text`` records are refused: a task needs responses."""
    from pathlib import Path

    from lmdistill.data.userfiles import read_path

    out = []
    for doc in read_path(Path(config.path).expanduser()):
        if doc.response is None:
            where = f"{doc.meta.get('path', config.path)}" + (f":{doc.meta['line']}" if "line" in doc.meta else "")
            raise DataError(f"{where}: a task example needs a prompt and a response (or chat messages), got plain text",
                            hint="use data.corpus for plain text; give task.path records with prompt/response")
        if "messages" in doc.meta:
            out.append(doc)
            continue
        prompt = config.prompt_template.format(prompt=doc.prompt or "")
        out.append(Document.from_prompt_response(prompt, doc.response, doc_id=doc.doc_id, source=doc.source,
                                                 meta={**doc.meta, "reference": doc.response.strip()}))
    return out


def apply_chat_template(splits: dict[str, list[Document]], tokenizer: Any) -> dict[str, list[Document]]:
    """Chat examples re-rendered with the tokenizer's own chat template (``task.chat_template: tokenizer``): the
    prompt is the conversation before the last (assistant) message with the template's generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("task.chat_template: tokenizer, but the tokenizer has no chat template",
                        hint="use task.chat_template: default, or a tokenizer with a chat template")
    out: dict[str, list[Document]] = {}
    for split, docs in splits.items():
        out[split] = []
        for doc in docs:
            messages = doc.meta.get("messages")
            if messages is None:
                out[split].append(doc)
                continue
            prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
            out[split].append(Document.from_prompt_response(prompt, doc.response, doc_id=doc.doc_id, source=doc.source,
                                                            meta=doc.meta))
    return out


def task_documents(config: TaskConfig, source_docs: Iterable[Document] | None = None) -> list[Document]:
    """All examples of the task (every split), in corpus order. ``source_docs`` replaces the corpus
    reader (the KJV chapters or GCIDE entries), e.g. to reuse documents already in memory."""
    if config.path is not None:
        docs = file_task_documents(config)
        if not docs:
            raise DataError("task.path holds no usable examples", path=config.path)
        return docs
    if config.name == "gcide_define":
        if source_docs is None:
            from lmdistill.data.corpora import read_gcide

            source_docs = read_gcide()
        docs = gcide_define_documents(source_docs, config.max_response_words)
    else:
        if source_docs is None:
            from lmdistill.data.corpora import read_kjv

            source_docs = read_kjv()
        if config.name == "kjv_verse":
            docs = kjv_verse_documents(source_docs, config.max_response_words)
        else:
            docs = kjv_continue_documents(source_docs, config.prompt_words, config.response_words, config.max_response_words)
    if not docs:
        raise DataError(f"task {config.name} produced no examples", hint="loosen task.max_response_words / prompt_words")
    return docs


def build_task(config: TaskConfig, source_docs: Iterable[Document] | None = None) -> dict[str, list[Document]]:
    """The task's examples by split (deterministic: split by id hash, caps by a seeded sample that
    keeps corpus order)."""
    by_split: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for doc in task_documents(config, source_docs):
        by_split[split_of(doc.doc_id, config.split_fractions)].append(doc)
    for split, cap in config.max_examples.items():
        docs = by_split[split]
        if len(docs) > cap:
            keep = sorted(random.Random(f"{config.seed}:{split}").sample(range(len(docs)), cap))
            by_split[split] = [docs[i] for i in keep]
    return by_split


def reference_of(doc: Document) -> str:
    """The text a generated answer is scored against: the response without its leading space."""
    if doc.response is None:
        raise DataError(f"document {doc.doc_id!r} is not a prompt/response example")
    return doc.response.strip()
