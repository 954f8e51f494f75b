"""The GCIDE retrieval tasks: relevance from the dictionary, deterministic splits, real-data build."""

from __future__ import annotations

import random

import pytest

from lmdistill.data.documents import Document, split_of
from lmdistill.embed.task import RetrievalTask, build_task, entries_from_documents, load_gcide_task
from lmdistill.errors import DataError


def fake_documents(n_headwords: int = 60) -> list[Document]:
    docs = []
    for i in range(n_headwords):
        word = f"Word{i}"
        senses = 2 if i % 7 == 0 else 1  # some headwords have two entries (e.g. noun and verb)
        for s in range(senses):
            defs = [f"meaning number {j} of word {i} sense {s} here" for j in range(2 + (i + s) % 3)]
            docs.append(Document(text="", doc_id=f"gcide:word{i}#{s + 1}", source="gcide",
                                 meta={"headword": word, "pos": "n.", "definitions": defs}))
    # Not usable: one definition only, or definitions shorter than three words.
    docs.append(Document(text="", doc_id="gcide:lonely#1", source="gcide",
                         meta={"headword": "Lonely", "pos": None, "definitions": ["only one definition here"]}))
    docs.append(Document(text="", doc_id="gcide:terse#1", source="gcide",
                         meta={"headword": "Terse", "pos": None, "definitions": ["See Curt.", "Short."]}))
    return docs


def alternate_split(doc_id: str) -> str:
    return "test" if int(doc_id.split("word")[1].split("#")[0]) % 2 else "train"


@pytest.fixture
def entries():
    docs = [d for d in fake_documents() if d.doc_id.startswith("gcide:word")]
    return entries_from_documents(docs, alternate_split)


def test_unusable_entries_are_dropped():
    kept = {e.entry_id for e in entries_from_documents(fake_documents(), lambda _: "train")}
    assert "gcide:lonely#1" not in kept and "gcide:terse#1" not in kept
    assert len(kept) == len(fake_documents()) - 2


def test_def2word_relevance_and_texts(entries):
    task = build_task(entries, train_size=100, eval_queries=20, eval_corpus=100, max_definitions=4)
    by_id = {e.entry_id: e for e in entries}
    assert len(task.queries) == 20
    for qid, text in task.queries.items():
        entry = by_id[qid.removeprefix("q:")]
        assert entry.split == "test"
        assert text == entry.definitions[entry.query_index]
        # Relevant = every corpus entry of the same headword, and nothing else.
        expected = {d for d in task.corpus if by_id[d].group == entry.group}
        assert task.qrels[qid] == expected and entry.entry_id in expected
        own = task.corpus[entry.entry_id]
        assert own.startswith(entry.headword + ": ")
        assert text not in own  # the query's definition is held out of its entry's document
        for j, d in enumerate(entry.definitions):
            if j != entry.query_index:
                assert d in own
    assert all(by_id[d].split == "test" for d in task.corpus)
    assert all(by_id[p.positive_id].split == "train" for p in task.train)
    assert {p.positive_id for p in task.train} == set(task.train_corpus)


def test_paraphrase_task_pairs_definitions_of_one_headword(entries):
    task = build_task(entries, name="gcide-paraphrase", train_size=100, eval_queries=15, eval_corpus=40)
    by_id = {e.entry_id: e for e in entries}
    for qid, text in task.queries.items():
        entry = by_id[qid.removeprefix("q:")]
        # Relevant = the other definitions of the same headword (documents "<entry id>#<definition index>").
        expected = {d for d in task.corpus if by_id[d.rsplit("#", 1)[0]].group == entry.group}
        assert task.qrels[qid] == expected and expected
        assert text not in {task.corpus[d] for d in expected}
    for pair in task.train:
        assert pair.positive != pair.query and pair.positive_id in task.train_corpus


def test_task_is_deterministic_and_round_trips(entries):
    shuffled = entries[:]
    random.Random(3).shuffle(shuffled)
    a = build_task(entries, train_size=10, eval_queries=5, eval_corpus=12)
    b = build_task(shuffled, train_size=10, eval_queries=5, eval_corpus=12)
    assert a.to_json() == b.to_json()
    assert RetrievalTask.from_json(a.to_json()).to_json() == a.to_json()


def test_bad_inputs_are_reported():
    no_meta = [Document(text="x", doc_id="gcide:x#1", source="gcide")]
    with pytest.raises(DataError, match="headword"):
        entries_from_documents(no_meta, split_of)
    with pytest.raises(DataError, match="too few"):
        build_task([], train_size=1, eval_queries=1, eval_corpus=1)
    with pytest.raises(ValueError, match="eval_queries"):
        build_task([], eval_queries=5, eval_corpus=2)


@pytest.mark.slow
def test_real_gcide_task(gcide_cache):
    from tests.embed.helpers import SMALL_TASK

    task = load_gcide_task(**SMALL_TASK, cache_dir=gcide_cache)
    assert len(task.train) == SMALL_TASK["train_size"] and len(task.queries) == SMALL_TASK["eval_queries"]
    assert len(task.corpus) == SMALL_TASK["eval_corpus"]
    for qid, rel in task.qrels.items():
        assert rel and rel <= set(task.corpus)
        assert split_of(qid.removeprefix("q:")) == "test"
    assert all(split_of(p.positive_id) == "train" for p in task.train)
    # Headwords shared by several entries make some queries have more than one relevant document.
    assert max(len(r) for r in task.qrels.values()) >= 1
    # The cached copy is identical.
    assert load_gcide_task(**SMALL_TASK, cache_dir=gcide_cache).to_json() == task.to_json()
