"""The loss tests work on small tensors: one intra-op thread is fastest for them and, when the suite runs
under xdist (-n 2) on two cores, avoids oversubscribing the machine (OpenMP threads spinning on a busy
core turn microsecond ops into milliseconds). Restored after each test, so other packages' tests are not
affected."""

import itertools

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# the cross-tokenizer pair of the crosstok/projection tests: two byte-level BPEs of other corpora and sizes
@pytest.fixture(scope="module")
def verses(kjv_verses) -> list[str]:
    return [t for _, t in kjv_verses]


@pytest.fixture(scope="module")
def student_tok(verses):
    from lmdistill.data.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(verses[:3000], vocab_size=600)


@pytest.fixture(scope="module")
def teacher_tok():
    """Another corpus, another size: a realistic rung 3 partner for the KJV tokenizer."""
    from lmdistill.data.corpora import read_fortunes
    from lmdistill.data.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer([d.text for d in itertools.islice(read_fortunes(), 3000)], vocab_size=900)


@pytest.fixture(scope="module")
def batcher(student_tok, teacher_tok):
    from lmdistill.losses.alignment import CrossTokenizerBatcher

    return CrossTokenizerBatcher(student_tok, teacher_tok)


@pytest.fixture(scope="module")
def pairing(student_tok, teacher_tok):
    from lmdistill.models.vocab import vocab_ladder

    return vocab_ladder(teacher_tok, student_tok, teacher_rows=len(teacher_tok), student_rows=len(student_tok))
