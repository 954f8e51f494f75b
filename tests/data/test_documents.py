"""Documents and deterministic splits."""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmdistill.data.documents import Document, filter_split, split_key, split_of
from lmdistill.errors import ConfigError


def reference_split(doc_id: str, fractions=(0.9, 0.05, 0.05), salt="lmdistill") -> str:
    """The split rule restated from its definition: BLAKE2b-64 of salt\\0group, as u in [0, 1)."""
    group = doc_id.split("#")[0]
    u = int(hashlib.blake2b((salt + "\0" + group).encode(), digest_size=8).hexdigest(), 16) / 2**64
    if u < fractions[0]:
        return "train"
    return "validation" if u < fractions[0] + fractions[1] else "test"


@given(st.text(min_size=0, max_size=40), st.sampled_from([(0.9, 0.05, 0.05), (0.5, 0.25, 0.25), (0.0, 0.0, 1.0)]))
@settings(max_examples=300, deadline=None)
def test_split_matches_reference_and_is_deterministic(doc_id: str, fractions):
    assert split_of(doc_id, fractions) == reference_split(doc_id, fractions)
    assert split_of(doc_id, fractions) == split_of(doc_id, fractions)


def test_split_does_not_depend_on_python_hash_seed():
    ids = [f"kjv:Book{i}:{i % 50}" for i in range(200)]
    expected = [split_of(i) for i in ids]
    code = (
        "import json,sys; from lmdistill.data.documents import split_of; "
        "print(json.dumps([split_of(i) for i in json.loads(sys.stdin.read())]))"
    )
    import json

    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code], input=json.dumps(ids), capture_output=True, text=True, env=env, check=True
        )
        assert json.loads(out.stdout) == expected


def test_split_fractions_are_close_to_requested():
    n = 20000
    counts = {"train": 0, "validation": 0, "test": 0}
    for i in range(n):
        counts[split_of(f"doc-{i}")] += 1
    for split, p in zip(("train", "validation", "test"), (0.9, 0.05, 0.05)):
        sd = math.sqrt(n * p * (1 - p))
        assert abs(counts[split] - n * p) < 5 * sd, (split, counts)


def test_salt_gives_a_different_but_deterministic_split():
    ids = [f"x{i}" for i in range(2000)]
    a = [split_of(i, salt="a") for i in ids]
    b = [split_of(i, salt="b") for i in ids]
    assert a == [split_of(i, salt="a") for i in ids]
    assert a != b


def test_group_members_share_a_split():
    for k in range(300):
        group = f"gcide:word{k}"
        assert split_key(f"{group}#3") == group
        assert len({split_of(f"{group}#{m}") for m in range(1, 6)} | {split_of(group)}) == 1


def test_filter_split_partitions_documents():
    docs = [Document(text=f"t{i}", doc_id=f"d{i}", source="s") for i in range(1000)]
    parts = {s: filter_split(docs, s) for s in ("train", "validation", "test")}
    ids = [d.doc_id for part in parts.values() for d in part]
    assert sorted(ids) == sorted(d.doc_id for d in docs)
    assert all(split_of(d.doc_id) == s for s, part in parts.items() for d in part)
    # order is kept within a split
    assert [d.doc_id for d in parts["train"]] == [d.doc_id for d in docs if split_of(d.doc_id) == "train"]


@pytest.mark.parametrize("fractions", [(0.9, 0.1), (0.5, 0.5, 0.5), (1.2, -0.1, -0.1), (float("nan"), 0.5, 0.5)])
def test_bad_fractions_are_config_errors(fractions):
    with pytest.raises(ConfigError, match="fractions"):
        split_of("a", fractions)


def test_unknown_split_name():
    with pytest.raises(ConfigError, match="unknown split"):
        filter_split([], "dev")  # type: ignore[arg-type]


def test_prompt_response_document_invariants():
    doc = Document.from_prompt_response("Q: hi\nA:", " hello", doc_id="x", source="s")
    assert doc.text == "Q: hi\nA: hello" and doc.is_prompt_response
    with pytest.raises(ValueError, match="prompt \\+ response"):
        Document(text="different", doc_id="y", source="s", prompt="a", response="b")
    with pytest.raises(ValueError, match="both"):
        Document(text="a", doc_id="z", source="s", prompt="a")
