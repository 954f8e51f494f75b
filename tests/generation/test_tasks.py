"""Tasks from the real corpora: formats, references, deterministic splits that agree with the corpus."""

from __future__ import annotations

import pytest

from lmdistill.data.documents import split_of
from lmdistill.generation.config import TaskConfig
from lmdistill.generation.tasks import build_task, gcide_define_documents, kjv_continue_documents, kjv_verse_documents


def test_kjv_verse_task_gives_the_verse(kjv_chapters):
    docs = kjv_verse_documents(kjv_chapters)
    first = docs[0]
    assert first.prompt == "Genesis 1:1\n"
    assert first.response == "In the beginning God created the heaven and the earth."
    john = next(d for d in docs if d.prompt == "John 11:35\n")
    assert john.response == "Jesus wept."
    assert sum(len(c.meta["verses"]) for c in kjv_chapters) == len(docs) == 31102


def test_kjv_continue_splits_the_verse_at_a_word(kjv_chapters):
    docs = kjv_continue_documents(kjv_chapters[:3], prompt_words=4)
    verses = {f"{c.meta['book']} {c.meta['chapter']}:{n}": t for c in kjv_chapters[:3] for n, t in c.meta["verses"]}
    for doc in docs:
        ref, _, first_words = doc.prompt.partition(" ")[2].partition(" ")
        ref = f"{doc.meta['book']} {ref}"
        assert doc.response.startswith(" ") and not doc.prompt.endswith(" ")
        assert len(first_words.split()) == 4
        assert (first_words + doc.response).split() == verses[ref].split()
    # next-N-words variant: only the N words after the prompt
    short = kjv_continue_documents(kjv_chapters[:1], prompt_words=3, response_words=2)
    assert short[0].prompt == "Genesis 1:1 In the beginning"
    assert short[0].response == " God created"


def test_task_splits_follow_the_corpus_chapters(kjv_chapters):
    splits = build_task(TaskConfig(name="kjv_verse"), kjv_chapters)
    chapter_split = {c.doc_id: split_of(c.doc_id) for c in kjv_chapters}
    for split, docs in splits.items():
        for doc in docs[::97]:
            assert chapter_split[doc.doc_id.split("#")[0]] == split
    # deterministic, and caps are a seeded sample
    cfg = TaskConfig(name="kjv_verse", max_examples={"test": 50, "train": 100}, seed=3)
    a, b = build_task(cfg, kjv_chapters), build_task(cfg, kjv_chapters)
    assert [d.doc_id for d in a["test"]] == [d.doc_id for d in b["test"]]
    assert len(a["test"]) == 50 and len(a["train"]) == 100
    assert {d.doc_id for d in a["test"]} <= {d.doc_id for d in splits["test"]}
    other = build_task(cfg.model_copy(update={"seed": 4}), kjv_chapters)
    assert [d.doc_id for d in other["test"]] != [d.doc_id for d in a["test"]]


def test_response_length_filter(kjv_chapters):
    docs = kjv_verse_documents(kjv_chapters[:20], max_response_words=10)
    assert docs and all(len(d.response.split()) <= 10 for d in docs)


@pytest.fixture(scope="module")
def gcide_entries():
    from lmdistill.data.corpora import read_gcide

    return list(read_gcide())


def test_gcide_define_uses_the_first_definition_of_the_first_entry(gcide_entries):
    docs = gcide_define_documents(gcide_entries)
    by_head = {d.meta["headword"]: d for d in docs}
    first_entries = {e.meta["headword"]: e for e in gcide_entries if e.doc_id.endswith("#1") and e.meta["definitions"]}
    assert len(docs) == len(first_entries) > 50_000
    for head in ["Telltale", "Hauerite", "Dotted"]:
        doc = by_head[head]
        assert doc.prompt == f"Define: {head}\nDefinition:"
        assert doc.response == " " + " ".join(first_entries[head].meta["definitions"][0].split())
    # every sense of one headword shares a split with the task example
    telltale = [e for e in gcide_entries if e.meta["headword"] == "Telltale"]
    assert {split_of(e.doc_id) for e in telltale} == {split_of(by_head["Telltale"].doc_id)}
    # prompts are unique, and none crosses splits
    assert len({d.prompt for d in docs}) == len(docs)
