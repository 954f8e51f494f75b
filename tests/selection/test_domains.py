"""Domain-tagged corpora (lmdistill.data.domains): declared domains, deterministic caps, per-domain streams."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lmdistill.data.domains import DomainSpec, builtin_domains, check_domains, domain_documents, prepare_domains
from lmdistill.errors import DataError


def test_a_capped_domain_is_a_deterministic_spread_out_subset_in_corpus_order():
    full = domain_documents(DomainSpec(name="bible", source="kjv"))
    capped = domain_documents(DomainSpec(name="bible", source="kjv", max_documents=50))
    assert len(capped) == 50 and capped == domain_documents(DomainSpec(name="x", source="kjv", max_documents=50))
    position = {d.doc_id: i for i, d in enumerate(full)}
    indices = [position[d.doc_id] for d in capped]
    assert indices == sorted(indices)                       # corpus order kept
    assert indices[-1] > 500                                # not just the first chapters (Genesis, Exodus, ...)
    assert {d.doc_id for d in capped} <= set(position)


def test_domain_specs_are_checked_with_clear_messages(tmp_path):
    with pytest.raises(ValidationError, match="must start with a letter"):
        DomainSpec(name="../x", source="kjv")
    with pytest.raises(ValidationError, match="neither a corpus"):
        DomainSpec(name="x", source=str(tmp_path / "missing.txt"))
    with pytest.raises(ValidationError, match="stands alone"):
        DomainSpec(name="x", source=["kjv"])
    with pytest.raises(DataError, match="at least two domains"):
        check_domains([DomainSpec(name="a", source="kjv")])
    assert [d.name for d in builtin_domains({"gcide": 10})] == ["kjv", "gcide", "jargon", "fortunes"]
    assert builtin_domains({"gcide": 10})[1].max_documents == 10


def test_user_files_become_domains_with_their_own_streams(tmp_path, small_tokenizer, cache_dir):
    from lmdistill.data.corpora import read_fortunes, read_kjv

    bible = tmp_path / "bible.txt"
    bible.write_text("\n\n".join(d.text for d in list(read_kjv())[:30]) + "\n", encoding="utf-8")
    jokes_a, jokes_b = tmp_path / "a.txt", tmp_path / "b.txt"
    fortunes = [" ".join(d.text.split()) for d in read_fortunes() if d.meta["category"] == "computers"][:200]
    jokes_a.write_text("\n\n".join(fortunes[:100]) + "\n", encoding="utf-8")
    jokes_b.write_text("\n\n".join(fortunes[100:]) + "\n", encoding="utf-8")
    specs = [DomainSpec(name="bible", source=str(bible)), DomainSpec(name="jokes", source=[str(jokes_a), str(jokes_b)])]
    data = prepare_domains(specs, block_size=32, tokenizer=small_tokenizer, fractions=(0.6, 0.2, 0.2), cache_dir=cache_dir)
    assert data.names == ["bible", "jokes"]
    assert sum(len(data.documents["jokes"][s]) for s in ("train", "validation", "test")) == 200  # both files
    for split in ("train", "validation", "test"):
        assert data.combined[split].n_tokens == sum(data.streams[n][split].n_tokens for n in data.names)
    assert data.train_tokens() == {n: data.streams[n]["train"].n_targets for n in data.names}
    assert len(data.blocks("jokes", "validation")) > 0
    with pytest.raises(DataError, match="domain 'bible', split validation"):
        prepare_domains(specs, block_size=10**6, tokenizer=small_tokenizer, fractions=(0.6, 0.2, 0.2),
                        cache_dir=cache_dir).blocks("bible", "validation")
