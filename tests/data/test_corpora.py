"""The corpora parsed from the real installed Debian files."""

from __future__ import annotations

import collections
import gzip
import random
import re
import struct
from pathlib import Path

import pytest

from lmdistill.data import corpora
from lmdistill.data.corpora import CORPORA, load_documents, read_fortunes, read_gcide, read_jargon, read_kjv
from lmdistill.data.documents import split_key, split_of
from lmdistill.data.gcide import GCIDE_DICT, GCIDE_INDEX, load_gcide_entries
from lmdistill.errors import DataError


def split_counts(docs) -> collections.Counter:
    return collections.Counter(split_of(d.doc_id) for d in docs)


# --------------------------------------------------------------------------------------------- KJV


def test_kjv_chapters_and_verses(kjv_docs):
    assert len(kjv_docs) == 1189
    assert sum(len(d.meta["verses"]) for d in kjv_docs) == 31102
    books = list(dict.fromkeys(d.meta["book"] for d in kjv_docs))
    assert len(books) == 66 and books[0] == "Genesis" and books[-1] == "Revelation"
    chapters = collections.Counter(d.meta["book"] for d in kjv_docs)
    assert chapters["Genesis"] == 50 and chapters["Psalms"] == 150 and chapters["Jude"] == 1
    psalm_119 = next(d for d in kjv_docs if d.meta["book"] == "Psalms" and d.meta["chapter"] == 119)
    assert [n for n, _ in psalm_119.meta["verses"]] == list(range(1, 177))


def test_kjv_text_is_the_verses_joined(kjv_docs):
    genesis_1 = kjv_docs[0]
    assert genesis_1.doc_id == "kjv:Genesis:1" and genesis_1.source == "kjv"
    assert genesis_1.meta["verses"][0] == (1, "In the beginning God created the heaven and the earth.")
    assert genesis_1.text.startswith("In the beginning God created the heaven and the earth. And the earth was")
    for doc in kjv_docs:
        assert doc.text == " ".join(text for _, text in doc.meta["verses"])
        assert not re.search(r"[1-3]?[A-Z][a-z]+\d+:\d+ ", doc.text)  # no verse references left
    assert kjv_docs[-1].text.endswith("The grace of our Lord Jesus Christ be with you all. Amen.")
    assert len({d.doc_id for d in kjv_docs}) == 1189


def test_kjv_splits_are_plausible(kjv_docs):
    counts = split_counts(kjv_docs)
    assert 1000 < counts["train"] < 1120 and 25 < counts["validation"] < 100 and 25 < counts["test"] < 100


def test_kjv_missing_program_names_the_package(monkeypatch):
    monkeypatch.setattr(corpora.shutil, "which", lambda name: None)
    with pytest.raises(DataError, match=r"apt-get install bible-kjv"):
        list(read_kjv())


# ------------------------------------------------------------------------------------------- GCIDE


def _dictd_number(text: str) -> int:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    value = 0
    for char in text:
        value = value * 64 + alphabet.index(char)
    return value


def test_gcide_size_and_ids(gcide_docs):
    assert 100_000 < len(gcide_docs) < 140_000
    assert len({d.doc_id for d in gcide_docs}) == len(gcide_docs)
    assert all(d.source == "gcide" and d.meta["headword"].strip() for d in gcide_docs)
    with_definitions = sum(bool(d.meta["definitions"]) for d in gcide_docs)
    assert with_definitions > 0.99 * len(gcide_docs)


def test_gcide_affect_entries(gcide_docs):
    """Checked by hand against `dict -d gcide Affect`: a verb with nine numbered senses, a noun."""
    affect = [d for d in gcide_docs if d.meta["headword"] == "Affect"]
    by_pos = {d.meta["pos"]: d for d in affect}
    assert set(by_pos) == {"v. t.", "n."}
    verb = by_pos["v. t."].meta["definitions"]
    assert verb[0] == "To act upon; to produce an effect or change upon."
    assert verb[1] == "To influence or move, as the feelings or passions; to touch."
    assert verb[7] == "To make a show of; to put on a pretense of; to feign; to assume; as, to affect ignorance."
    assert len(verb) == 9
    noun = by_pos["n."].meta["definitions"]
    assert noun[0].startswith("Affection; inclination; passion; feeling; disposition.")
    assert len(noun) == 2
    text = by_pos["v. t."].text
    assert text.startswith("Affect, v. t.\n1. To act upon;")
    # Quotations, their authors, source tags and pronunciation markup are not in the clean text.
    for junk in ("Milton", "[1913 Webster]", "\\", "Af*fect", "As might affect the earth"):
        assert junk not in text
    # All entries of one headword share a split (no definition of a test word is trained on).
    assert len({split_of(d.doc_id) for d in affect}) == 1
    assert {split_key(d.doc_id) for d in affect} == {"gcide:affect"}


def test_gcide_phrases_and_labels(gcide_docs):
    apple = next(d for d in gcide_docs if d.meta["headword"] == "Apple" and d.meta["pos"] == "n.")
    phrases = dict(apple.meta["phrases"])
    assert phrases["Apple of the eye"] == "the pupil."
    assert "Apple of the eye: the pupil." in apple.text
    zebra = next(d for d in gcide_docs if d.meta["headword"] == "Zebra" and d.meta["pos"] == "n.")
    assert "Zool." in zebra.meta["labels"]
    assert zebra.meta["definitions"][0].startswith("Any member of three species of African wild horses")


def test_gcide_text_has_no_markup(gcide_docs):
    n = len(gcide_docs)
    assert not any("[1913 Webster]" in d.text or "[WordNet 1.5]" in d.text for d in gcide_docs)
    assert not any(re.search(r"\[[=\-.~`'\"][a-z]\]|\[[a-z]\^\]", d.text) for d in gcide_docs)  # char codes
    assert sum("\\" in d.text for d in gcide_docs) < 0.01 * n
    assert sum("{" in d.text or "}" in d.text for d in gcide_docs) < 0.01 * n


def test_gcide_headwords_match_the_raw_dictionary(gcide_docs):
    """Independent reading of a random sample of index blocks: the headword before the first
    backslash of each block must be among the parsed headwords."""
    spans = set()
    for line in GCIDE_INDEX.read_text(encoding="utf-8", errors="replace").splitlines():
        word, offset, length = line.split("\t")
        if not word.startswith("00-"):
            spans.add((_dictd_number(offset), _dictd_number(length)))
    with gzip.open(GCIDE_DICT, "rb") as handle:
        data = handle.read()
    rng = random.Random(7)
    headwords = {d.meta["headword"] for d in gcide_docs}
    sample = rng.sample(sorted(spans), 400)
    found = checked = 0
    for offset, length in sample:
        first = data[offset : offset + length].decode("utf-8", "replace").lstrip("\n").split("\n", 1)[0]
        match = re.match(r"^([A-Za-z][A-Za-z '\-]*?) \\", first)
        if match is None or "[" in first.split("\\")[0]:
            continue
        checked += 1
        found += match.group(1) in headwords
    assert checked > 300 and found >= 0.98 * checked, (found, checked)


def test_gcide_cache_round_trips(gcide_docs, gcide_cache_dir):
    cached = list(read_gcide(cache_dir=gcide_cache_dir))
    assert len(list((gcide_cache_dir / "corpora").glob("gcide-*.json.gz"))) == 1
    assert cached == gcide_docs


def test_gcide_splits_are_plausible(gcide_docs):
    counts = split_counts(gcide_docs)
    n = len(gcide_docs)
    assert abs(counts["train"] / n - 0.9) < 0.01
    assert abs(counts["validation"] / n - 0.05) < 0.01 and abs(counts["test"] / n - 0.05) < 0.01


def test_gcide_missing_file_names_the_package(tmp_path):
    with pytest.raises(DataError, match=r"apt-get install dict-gcide"):
        load_gcide_entries(tmp_path / "gcide.dict.dz", tmp_path / "gcide.index", use_cache=False)


# ------------------------------------------------------------------------------------------ Jargon


def test_jargon_entries(jargon_docs):
    with gzip.open(corpora.JARGON_FILE, "rt", encoding="utf-8") as handle:
        expected = sum(1 for line in handle if re.match(r"^   :.+?:", line))
    assert len(jargon_docs) == expected
    assert 2000 < len(jargon_docs) < 2600
    by_head = {d.meta["headword"]: d for d in jargon_docs}
    hack = by_head["hack"]
    assert hack.doc_id == "jargon:hack"
    assert hack.text.startswith("hack\n\n[very common]")
    assert "1. n. Originally, a quick job that produces what is needed, but not well." in hack.text
    assert by_head["zorkmid"].text.startswith("zorkmid: /zork'mid/, n.\n\nThe canonical unit of currency")
    assert "Appendices" not in by_head["zorkmid"].text  # the lexicon ends before the appendices
    # Each letter's table of contents is not glued to the previous entry.
    assert not any("\nABEND\n" in d.text or "\nB1FF\n" in d.text for d in jargon_docs)
    assert "{" not in hack.text


# ---------------------------------------------------------------------------------------- Fortunes


def test_fortunes_match_strfile_counts(fortune_docs):
    """Each fortune file's .dat (built by strfile) stores its record count at bytes 4..8."""
    per_file = collections.Counter(d.meta["file"] for d in fortune_docs)
    expected = {}
    for dat in sorted(corpora.FORTUNES_DIR.glob("*.dat")):
        (count,) = struct.unpack(">I", dat.read_bytes()[4:8])
        expected[dat.stem] = count
    assert per_file == expected
    assert 14_000 < len(fortune_docs) < 16_500
    assert not any(d.meta["file"].endswith((".dat", ".u8")) for d in fortune_docs)


def test_fortunes_text_is_clean(fortune_docs):
    assert not any("\b" in d.text for d in fortune_docs)
    assert not any(re.search(r"^%$", d.text, re.MULTILINE) for d in fortune_docs)
    assert all(d.text.strip() == d.text.strip("\n").strip() and d.text.strip() for d in fortune_docs)
    assert len({d.doc_id for d in fortune_docs}) == len(fortune_docs)
    # "_\b_\b...X" underlining (as in the computers file) renders as the plain word.
    assert any("the notion of *friends*: cooperative classes" in d.text for d in fortune_docs)


def test_identical_fortunes_share_a_split(fortune_docs):
    by_text = collections.defaultdict(set)
    for doc in fortune_docs:
        by_text[" ".join(doc.text.split())].add(split_of(doc.doc_id))
    assert all(len(splits) == 1 for splits in by_text.values())


def test_fortunes_missing_directory_names_the_package(tmp_path):
    with pytest.raises(DataError, match=r"apt-get install fortunes"):
        list(read_fortunes(tmp_path / "none"))


def test_jargon_missing_file_names_the_package(tmp_path):
    with pytest.raises(DataError, match=r"apt-get install jargon-text"):
        list(read_jargon(tmp_path / "jargon.txt.gz"))


# --------------------------------------------------------------------------------- load_documents


def test_load_documents_by_name_and_path(tmp_path):
    assert set(CORPORA) == {"kjv", "gcide", "jargon", "fortunes"}
    assert len(load_documents("jargon")) > 2000
    (tmp_path / "a.txt").write_text("one\n\ntwo\n", encoding="utf-8")
    assert [d.text for d in load_documents(tmp_path / "a.txt")] == ["one", "two"]
    assert [d.text for d in load_documents(str(tmp_path))] == ["one", "two"]


def test_load_documents_unknown_source():
    with pytest.raises(DataError, match=r"neither a corpus nor an existing file.*kjv, gcide, jargon, fortunes"):
        load_documents("no-such-corpus")


def test_missing_path_error(tmp_path: Path):
    with pytest.raises(DataError, match="neither a corpus"):
        load_documents(tmp_path / "missing.jsonl")
