"""Retrieval tasks built from the GCIDE dictionary, with relevance taken from the dictionary itself.

* ``gcide-def2word``: the query is one definition of an entry; the corpus holds one document per entry,
  "headword: its other definitions"; relevant = every corpus entry with the query's headword (a headword
  can have several entries, e.g. a noun and a verb).
* ``gcide-paraphrase``: paraphrase-style pairs — the query is one definition, the corpus holds single
  definitions; relevant = the other definitions of the same headword.

Splits come from `lmdistill.data.documents.split_of` (a deterministic hash of the entry id): training
pairs from "train" entries, the evaluation queries and corpus from "test" entries. Within a split,
entries are taken in the order of a stable hash of their id, so a task is the same on every machine.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from lmdistill.errors import DataError

TASK_VERSION = 1
MIN_DEFINITION_WORDS = 3


@dataclass(frozen=True)
class TrainPair:
    query: str
    positive: str
    positive_id: str
    group: str  # normalised headword: pairs sharing it are relevant to each other


@dataclass
class RetrievalTask:
    name: str
    queries: dict[str, str]  # query id -> text
    corpus: dict[str, str]  # document id -> text, in corpus order
    qrels: dict[str, set[str]]  # query id -> relevant document ids
    train: list[TrainPair]
    train_corpus: dict[str, str] = field(default_factory=dict)  # train-split documents (hard-negative pool)
    train_groups: dict[str, str] = field(default_factory=dict)  # train document id -> group
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["qrels"] = {q: sorted(r) for q, r in self.qrels.items()}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RetrievalTask:
        return cls(
            name=data["name"],
            queries=data["queries"],
            corpus=data["corpus"],
            qrels={q: set(r) for q, r in data["qrels"].items()},
            train=[TrainPair(**p) for p in data["train"]],
            train_corpus=data.get("train_corpus", {}),
            train_groups=data.get("train_groups", {}),
            info=data.get("info", {}),
        )

    def summary(self) -> str:
        return (
            f"{self.name}: {len(self.train)} train pairs, {len(self.queries)} queries, "
            f"{len(self.corpus)} documents"
        )


def stable_hash(text: str) -> int:
    """A hash that does not depend on PYTHONHASHSEED (unlike hash())."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def group_key(headword: str) -> str:
    return " ".join(headword.lower().split())


def _clip(text: str, max_chars: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= max_chars else text[: max_chars - 1].rsplit(" ", 1)[0] + "…"


@dataclass(frozen=True)
class Entry:
    entry_id: str
    headword: str
    definitions: tuple[str, ...]
    split: str

    @property
    def group(self) -> str:
        return group_key(self.headword)

    @property
    def query_index(self) -> int:
        # Which definition becomes the query: fixed per entry, independent of run and machine.
        return stable_hash("query:" + self.entry_id) % len(self.definitions)


def entries_from_documents(documents: Iterable[Any], split_fn: Callable[[str], str]) -> list[Entry]:
    """Dictionary entries with at least two usable definitions (three words or more each)."""
    entries: list[Entry] = []
    for doc in documents:
        meta = getattr(doc, "meta", None) or {}
        headword = meta.get("headword")
        definitions = meta.get("definitions")
        if headword is None or definitions is None:
            raise DataError(
                "GCIDE document lacks meta['headword'] / meta['definitions']",
                path=getattr(doc, "source", None),
                field="meta",
                hint=f"document id {getattr(doc, 'doc_id', '?')}",
            )
        usable = tuple(" ".join(d.split()) for d in definitions if len(d.split()) >= MIN_DEFINITION_WORDS)
        if len(usable) >= 2 and headword.strip():
            entries.append(Entry(str(doc.doc_id), headword.strip(), usable, split_fn(str(doc.doc_id))))
    return entries


def build_task(
    entries: list[Entry],
    *,
    name: str = "gcide-def2word",
    train_size: int = 2000,
    eval_queries: int = 400,
    eval_corpus: int = 1500,
    max_definitions: int = 4,
    max_chars: int = 400,
) -> RetrievalTask:
    """Build a task from parsed entries (see module docstring for the two task kinds)."""
    if name not in ("gcide-def2word", "gcide-paraphrase"):
        raise ValueError(f"unknown task '{name}'; allowed: gcide-def2word, gcide-paraphrase")
    if eval_queries > eval_corpus:
        raise ValueError("eval_queries cannot exceed eval_corpus (each query's entry is in the corpus)")
    ordered = sorted(entries, key=lambda e: (stable_hash("order:" + e.entry_id), e.entry_id))
    train_entries = [e for e in ordered if e.split == "train"][:train_size]
    test_entries = [e for e in ordered if e.split == "test"][:eval_corpus]
    if not train_entries or not test_entries:
        raise DataError(
            f"too few dictionary entries for task '{name}': {len(train_entries)} train, {len(test_entries)} test",
            hint="the corpus needs entries with two or more definitions in both splits",
        )

    def others(e: Entry) -> list[tuple[int, str]]:
        return [(j, d) for j, d in enumerate(e.definitions) if j != e.query_index][:max_definitions]

    def entry_doc(e: Entry) -> str:
        return _clip(f"{e.headword}: " + " ".join(d for _, d in others(e)), max_chars)

    queries: dict[str, str] = {}
    corpus: dict[str, str] = {}
    doc_group: dict[str, str] = {}
    train: list[TrainPair] = []
    train_corpus: dict[str, str] = {}
    train_groups: dict[str, str] = {}

    if name == "gcide-def2word":
        for e in test_entries:
            corpus[e.entry_id] = entry_doc(e)
            doc_group[e.entry_id] = e.group
        for e in train_entries:
            text = entry_doc(e)
            train.append(TrainPair(_clip(e.definitions[e.query_index], max_chars), text, e.entry_id, e.group))
            train_corpus[e.entry_id] = text
            train_groups[e.entry_id] = e.group
    else:
        for e in test_entries:
            for j, d in others(e):
                doc_id = f"{e.entry_id}#{j}"
                corpus[doc_id] = _clip(d, max_chars)
                doc_group[doc_id] = e.group
        for e in train_entries:
            pool = others(e)
            j, d = pool[stable_hash("positive:" + e.entry_id) % len(pool)]
            doc_id = f"{e.entry_id}#{j}"
            train.append(TrainPair(_clip(e.definitions[e.query_index], max_chars), _clip(d, max_chars), doc_id, e.group))
            for jj, dd in pool:
                train_corpus[f"{e.entry_id}#{jj}"] = _clip(dd, max_chars)
                train_groups[f"{e.entry_id}#{jj}"] = e.group

    by_group: dict[str, set[str]] = {}
    for doc_id, g in doc_group.items():
        by_group.setdefault(g, set()).add(doc_id)
    qrels: dict[str, set[str]] = {}
    for e in test_entries[:eval_queries]:
        qid = f"q:{e.entry_id}"
        queries[qid] = _clip(e.definitions[e.query_index], max_chars)
        qrels[qid] = set(by_group[e.group])
    return RetrievalTask(
        name=name,
        queries=queries,
        corpus=corpus,
        qrels=qrels,
        train=train,
        train_corpus=train_corpus,
        train_groups=train_groups,
        info={
            "version": TASK_VERSION,
            "entries_train_split": sum(e.split == "train" for e in entries),
            "entries_test_split": sum(e.split == "test" for e in entries),
        },
    )


def default_cache_dir() -> Path:
    """The project cache (``$LMDISTILL_CACHE_DIR`` or ``.cache/lmdistill``), subfolder ``embed``."""
    from lmdistill.data.cache import default_cache_dir as project_cache

    return Path(project_cache()) / "embed"


def load_gcide_task(
    *,
    name: str = "gcide-def2word",
    train_size: int = 2000,
    eval_queries: int = 400,
    eval_corpus: int = 1500,
    max_definitions: int = 4,
    max_chars: int = 400,
    cache_dir: str | Path | None = None,
) -> RetrievalTask:
    """The task over the real GCIDE (via `lmdistill.data.corpora.read_gcide`), cached as JSON.

    Parsing the whole dictionary takes a while; the built task is cached under ``cache_dir`` keyed by its
    parameters and the dictionary file's size and mtime.
    """
    settings = dict(
        name=name,
        train_size=train_size,
        eval_queries=eval_queries,
        eval_corpus=eval_corpus,
        max_definitions=max_definitions,
        max_chars=max_chars,
    )
    params: dict[str, Any] = {**settings, "version": TASK_VERSION}
    dict_file = Path("/usr/share/dictd/gcide.dict.dz")
    if dict_file.exists():
        st = dict_file.stat()
        params["source"] = f"{st.st_size}:{int(st.st_mtime)}"
    key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_file = cache / f"task-{name}-{key}.json"
    if cache_file.is_file():
        return RetrievalTask.from_json(json.loads(cache_file.read_text()))

    from lmdistill.data.corpora import read_gcide
    from lmdistill.data.documents import split_of

    task = build_task(entries_from_documents(read_gcide(), split_of), **settings)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(task.to_json()))
    tmp.replace(cache_file)
    return task
