"""Readers of the real corpora installed from Debian packages, plus ``load_documents`` for any source.

Every reader is a generator of :class:`~lmdistill.data.documents.Document` with stable ids:

========== ===================================== ==============================================
corpus     document                              ``doc_id``
========== ===================================== ==============================================
kjv        one chapter (verses joined by " ")    ``kjv:Genesis:1``
gcide      one dictionary entry                  ``gcide:affect#2`` (senses of a word share a split)
jargon     one lexicon entry                     ``jargon:hack``
fortunes   one fortune (``%``-separated record)  ``fortunes:<content hash>#cookie/12``
========== ===================================== ==============================================

Ids containing ``#`` split by the part before it (see :func:`~lmdistill.data.documents.split_key`):
all entries of one GCIDE headword, and identical fortunes that appear in several files, land in the
same split, so no test document has a twin in train.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

from lmdistill.data.cache import gc_paused
from lmdistill.data.documents import Document, Split, filter_split
from lmdistill.data.gcide import GCIDE_DICT, GCIDE_INDEX, load_gcide_entries
from lmdistill.errors import DataError

log = logging.getLogger(__name__)

JARGON_FILE = Path("/usr/share/doc/jargon-text/jargon.txt.gz")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
BIBLE_DATA = Path("/usr/lib/bible.data")

# ---------------------------------------------------------------------------------------------
# KJV (packages bible-kjv + bible-kjv-text): read through the `bible` program, one verse a line.
# ---------------------------------------------------------------------------------------------

# The abbreviations `bible -f` prints, in canonical order, with the books' usual names.
KJV_BOOKS: dict[str, str] = {
    "Ge": "Genesis", "Exo": "Exodus", "Lev": "Leviticus", "Num": "Numbers", "Deu": "Deuteronomy",
    "Josh": "Joshua", "Jdgs": "Judges", "Ruth": "Ruth", "1Sm": "1 Samuel", "2Sm": "2 Samuel",
    "1Ki": "1 Kings", "2Ki": "2 Kings", "1Chr": "1 Chronicles", "2Chr": "2 Chronicles", "Ezra": "Ezra",
    "Neh": "Nehemiah", "Est": "Esther", "Job": "Job", "Psa": "Psalms", "Prv": "Proverbs",
    "Eccl": "Ecclesiastes", "SSol": "Song of Solomon", "Isa": "Isaiah", "Jer": "Jeremiah",
    "Lam": "Lamentations", "Eze": "Ezekiel", "Dan": "Daniel", "Hos": "Hosea", "Joel": "Joel", "Amos": "Amos",
    "Obad": "Obadiah", "Jonah": "Jonah", "Mic": "Micah", "Nahum": "Nahum", "Hab": "Habakkuk",
    "Zep": "Zephaniah", "Hag": "Haggai", "Zec": "Zechariah", "Mal": "Malachi", "Mat": "Matthew",
    "Mark": "Mark", "Luke": "Luke", "John": "John", "Acts": "Acts", "Rom": "Romans", "1Cor": "1 Corinthians",
    "2Cor": "2 Corinthians", "Gal": "Galatians", "Eph": "Ephesians", "Phi": "Philippians", "Col": "Colossians",
    "1Th": "1 Thessalonians", "2Th": "2 Thessalonians", "1Tim": "1 Timothy", "2Tim": "2 Timothy",
    "Titus": "Titus", "Phmn": "Philemon", "Heb": "Hebrews", "Jas": "James", "1Pet": "1 Peter",
    "2Pet": "2 Peter", "1Jn": "1 John", "2Jn": "2 John", "3Jn": "3 John", "Jude": "Jude",
    "Rev": "Revelation",
}  # fmt: skip
_VERSE = re.compile(r"^(?P<book>[1-3]?[A-Za-z]+)(?P<chapter>\d+):(?P<verse>\d+) (?P<text>.*)$")


def _kjv_lines() -> list[str]:
    program = shutil.which("bible")
    if program is None or not BIBLE_DATA.exists():
        raise DataError(
            "the KJV Bible is not installed (the `bible` program and /usr/lib/bible.data are needed)",
            hint="install it with `sudo apt-get install bible-kjv bible-kjv-text` (or run `make corpora`)",
        )
    # stdin from /dev/null: `bible` otherwise waits for interactive input after printing.
    result = subprocess.run(
        [program, "-f", "Gen1:1-Rev22:21"], stdin=subprocess.DEVNULL, capture_output=True, check=False
    )
    if result.returncode != 0 or not result.stdout:
        raise DataError(
            f"`bible -f` failed (exit {result.returncode}): {result.stderr.decode(errors='replace').strip()}",
            hint="reinstall with `sudo apt-get install --reinstall bible-kjv bible-kjv-text`",
        )
    return result.stdout.decode("utf-8", errors="replace").splitlines()


def read_kjv() -> Iterator[Document]:
    """One document per chapter (1,189 of them); text = the chapter's verses joined by a space.

    meta: ``book`` (full name), ``chapter`` (int), ``verses`` (list of (verse number, text)).
    """
    current: tuple[str, int] | None = None
    verses: list[tuple[int, str]] = []

    def emit() -> Document:
        assert current is not None
        book, chapter = current
        return Document(
            text=" ".join(text for _, text in verses),
            doc_id=f"kjv:{book}:{chapter}",
            source="kjv",
            meta={"book": book, "chapter": chapter, "verses": list(verses)},
        )

    for line_no, line in enumerate(_kjv_lines(), 1):
        if not line.strip():
            continue
        match = _VERSE.match(line)
        if match is None or match.group("book") not in KJV_BOOKS:
            raise DataError(f"unexpected line from `bible -f`: {line[:80]!r}", path="bible -f", line=line_no)
        key = (KJV_BOOKS[match.group("book")], int(match.group("chapter")))
        if key != current:
            if current is not None:
                yield emit()
            current, verses = key, []
        # `bible` puts two spaces after some sentences; one is the modern convention.
        verses.append((int(match.group("verse")), " ".join(match.group("text").split())))
    if current is not None:
        yield emit()


# ---------------------------------------------------------------------------------------------
# GCIDE (package dict-gcide)
# ---------------------------------------------------------------------------------------------


def read_gcide(
    dict_path: Path = GCIDE_DICT,
    index_path: Path = GCIDE_INDEX,
    cache_dir: Path | None = None,
    use_cache: bool = True,
) -> Iterator[Document]:
    """One document per dictionary entry (about 126k).

    meta: ``headword``, ``pos`` (e.g. "v. t.", or None), ``definitions`` (list of clean strings, one
    per numbered sense), plus ``variants``, ``labels``, ``etymology``, ``phrases`` ((phrase,
    definition) pairs), ``notes`` and ``synonyms``. text = headword, part of speech, definitions and
    phrase sub-entries, without markup. Parsed entries are cached on disk (see
    :func:`~lmdistill.data.gcide.load_gcide_entries`): the first read takes a few seconds.
    """
    counts: dict[str, int] = {}
    docs: list[Document] = []
    with gc_paused():  # ~126k documents with nested lists: see gc_paused
        for entry in load_gcide_entries(dict_path, index_path, cache_dir=cache_dir, use_cache=use_cache):
            key = entry.headword.casefold()
            counts[key] = counts.get(key, 0) + 1
            docs.append(
                Document(
                    text=entry.render(),
                    doc_id=f"gcide:{key}#{counts[key]}",
                    source="gcide",
                    meta={
                        "headword": entry.headword,
                        "pos": entry.pos,
                        "definitions": list(entry.definitions),
                        "variants": list(entry.variants),
                        "labels": list(entry.labels),
                        "etymology": entry.etymology,
                        "phrases": [tuple(p) for p in entry.phrases],
                        "notes": list(entry.notes),
                        "synonyms": list(entry.synonyms),
                    },
                )
            )
    yield from docs


# ---------------------------------------------------------------------------------------------
# Jargon File (package jargon-text)
# ---------------------------------------------------------------------------------------------

_JARGON_ENTRY = re.compile(r"^   :(?P<headword>.+?):(?:\s+(?P<rest>.*))?$")
_JARGON_LETTER = re.compile(r"^  [0-9A-Z]$")  # "  A": the lexicon's letter headings
_JARGON_END = re.compile(r"^\s*Part\s+III\.\s+Appendices\s*$")  # with no-break spaces
_JARGON_LINK = re.compile(r"\{([^{}]*)\}")


def read_jargon(path: Path = JARGON_FILE) -> Iterator[Document]:
    """One document per lexicon entry of the Jargon File 4.4.7 (about 2,300).

    text = ``headword: pronunciation, part of speech`` then the entry's paragraphs (cross-reference
    braces removed, indentation removed, paragraphs separated by a blank line).
    meta: ``headword``, ``header`` (what follows the headword on its line: pronunciation, POS).
    """
    if not path.exists():
        raise DataError(
            "the Jargon File is not installed",
            path=path,
            hint="install it with `sudo apt-get install jargon-text` (or run `make corpora`)",
        )
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as handle:
        lines = handle.read().splitlines()

    headword: str | None = None
    header = ""
    body: list[str] = []
    seen: dict[str, int] = {}

    def emit() -> Document | None:
        assert headword is not None
        paragraphs = "\n".join(body).strip()
        paragraphs = re.sub(r"\n{3,}", "\n\n", paragraphs)
        paragraphs = _JARGON_LINK.sub(r"\1", paragraphs)
        if not paragraphs:
            return None
        first = f"{headword}: {header}".rstrip() if header else headword
        key = headword.casefold()
        seen[key] = seen.get(key, 0) + 1
        doc_id = f"jargon:{key}" if seen[key] == 1 else f"jargon:{key}#{seen[key]}"
        return Document(
            text=f"{first}\n\n{paragraphs}",
            doc_id=doc_id,
            source="jargon",
            meta={"headword": headword, "header": header},
        )

    in_entry = False
    for line in lines:
        match = _JARGON_ENTRY.match(line)
        if match is not None:
            if in_entry:
                doc = emit()
                if doc is not None:
                    yield doc
            headword = match.group("headword").strip()
            # "//" is the file's placeholder for an unknown pronunciation.
            header = (match.group("rest") or "").strip().removeprefix("//").lstrip(", ").strip()
            body, in_entry = [], True
            continue
        if not in_entry:
            continue
        if _JARGON_LETTER.match(line) or _JARGON_END.match(line):
            # End of a letter section (what follows is the next letter's table of contents).
            doc = emit()
            if doc is not None:
                yield doc
            in_entry = False
            continue
        # Entry paragraphs are indented by three spaces; keep deeper indentation (code, diagrams).
        body.append(line[3:] if line.startswith("   ") else line.strip())
    if in_entry:
        doc = emit()
        if doc is not None:
            yield doc


# ---------------------------------------------------------------------------------------------
# Fortunes (package fortunes)
# ---------------------------------------------------------------------------------------------


def _undo_overstrike(line: str) -> str:
    """Render terminal overstriking (``_\\bX`` underlines X, ``X\\bX`` bolds it) as the visible text."""
    if "\b" not in line:
        return line
    cells: list[str] = []
    cursor = 0
    for char in line:
        if char == "\b":
            cursor = max(cursor - 1, 0)
            continue
        if cursor < len(cells):
            if char != "_":  # an underscore under a letter is an underline: keep the letter
                cells[cursor] = char
        else:
            cells.append(char)
        cursor += 1
    return "".join(cells)


def read_fortunes(directory: Path = FORTUNES_DIR) -> Iterator[Document]:
    """One document per fortune (records separated by a line ``%``; about 15,200 in the offensive-free set).

    Skips the ``*.dat`` indexes and the ``*.u8`` links (same content). meta: ``file`` (e.g.
    "cookie"), ``category`` (same as file), ``index`` (0-based record number within the file).
    """
    if not directory.is_dir() or not any(directory.iterdir()):
        raise DataError(
            "the fortunes are not installed",
            path=directory,
            hint="install them with `sudo apt-get install fortunes` (or run `make corpora`)",
        )
    files = sorted(
        p for p in directory.iterdir() if p.is_file() and p.suffix not in (".dat", ".u8") and not p.is_symlink()
    )
    for path in files:
        raw = path.read_bytes()
        try:
            content = raw.decode("utf-8")
        except UnicodeDecodeError:
            content = raw.decode("latin-1")
            log.warning("fortunes: %s is not UTF-8; read as Latin-1", path)
        records = re.split(r"^%[ \t]*$\n?", content, flags=re.MULTILINE)
        index = 0
        for record in records:
            text = "\n".join(_undo_overstrike(line).rstrip() for line in record.strip("\n").split("\n")).strip("\n")
            if not text.strip():
                continue
            digest = hashlib.blake2b(" ".join(text.split()).encode("utf-8"), digest_size=8).hexdigest()
            yield Document(
                text=text,
                doc_id=f"fortunes:{digest}#{path.name}/{index}",
                source="fortunes",
                meta={"file": path.name, "category": path.name, "index": index},
            )
            index += 1


# ---------------------------------------------------------------------------------------------
# One entry point for every source
# ---------------------------------------------------------------------------------------------

CORPORA: dict[str, Callable[[], Iterator[Document]]] = {
    "kjv": read_kjv,
    "gcide": read_gcide,
    "jargon": read_jargon,
    "fortunes": read_fortunes,
}


def load_documents(source: str | Path, *, txt_mode: str = "paragraph") -> list[Document]:
    """Documents of a named corpus (``kjv``, ``gcide``, ``jargon``, ``fortunes``) or of user files.

    ``source`` may also be a path to a ``.txt``, ``.jsonl``, ``.parquet`` or ``.csv`` file, or to a
    directory of them (see :mod:`lmdistill.data.userfiles`; ``txt_mode`` applies to ``.txt`` files).
    """
    from lmdistill.data.userfiles import read_path  # local import: userfiles imports datasets lazily too

    name = str(source)
    if name in CORPORA:
        return list(CORPORA[name]())
    path = Path(name).expanduser()
    if path.exists():
        return read_path(path, txt_mode=txt_mode)
    raise DataError(
        f"'{name}' is neither a corpus nor an existing file or directory",
        hint=f"use one of {', '.join(CORPORA)} or a path to .txt/.jsonl/.parquet/.csv data",
    )


def load_split(
    source: str | Path,
    split: Split,
    fractions: tuple[float, float, float] = (0.9, 0.05, 0.05),
    *,
    txt_mode: str = "paragraph",
) -> list[Document]:
    """``load_documents`` restricted to one split (the same for every consumer; see ``split_of``)."""
    return filter_split(load_documents(source, txt_mode=txt_mode), split, fractions)
