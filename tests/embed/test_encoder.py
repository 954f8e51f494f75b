"""The bi-encoder on the real all-MiniLM-L6-v2: same embeddings as sentence-transformers, ST-loadable saves."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, AutoTokenizer

from lmdistill.embed.encoder import TextEncoder, mean_pool

TEXTS = [
    "A small domesticated carnivorous mammal with soft fur.",
    "The renunciation of a high office, dignity, or trust, by its holder.",
    "cat",
    "To shine more brightly than; to surpass in splendor.",
]


@pytest.fixture(scope="module")
def minilm(minilm_path):
    return TextEncoder.from_pretrained(minilm_path)


def test_reads_the_sentence_transformers_setup(minilm):
    assert minilm.pooling == "mean" and minilm.normalize and minilm.max_seq_length == 256
    assert minilm.dim == 384


def test_encode_matches_sentence_transformers(minilm, minilm_path):
    reference = SentenceTransformer(minilm_path, device="cpu").encode(TEXTS, batch_size=3)
    ours = minilm.encode(TEXTS, batch_size=3)
    np.testing.assert_allclose(ours, reference, atol=1e-5)
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_mean_pooling_from_its_definition(minilm_path):
    """Independent float64 reference: sum of token states under the mask / number of tokens."""
    tok = AutoTokenizer.from_pretrained(minilm_path)
    model = AutoModel.from_pretrained(minilm_path).double().eval()
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = model(**batch).last_hidden_state
    for i in range(len(TEXTS)):
        n = int(batch["attention_mask"][i].sum())
        expected = states[i, :n].sum(0) / n
        torch.testing.assert_close(mean_pool(states, batch["attention_mask"])[i], expected)


def test_encode_api_conventions(minilm):
    single = minilm.encode("cat")
    assert single.shape == (384,)
    as_tensor = minilm.encode(TEXTS, convert_to_tensor=True)
    assert isinstance(as_tensor, torch.Tensor) and as_tensor.shape == (4, 384)
    raw = minilm.encode(TEXTS, normalize_embeddings=False)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), as_tensor.numpy(), atol=1e-5)
    # Order is preserved whatever the batch size (texts are batched by length internally).
    np.testing.assert_allclose(minilm.encode(TEXTS, batch_size=1), as_tensor.numpy(), atol=1e-5)


def test_truncated_student_saves_and_loads_in_sentence_transformers(minilm_path, tmp_path):
    student = TextEncoder.from_pretrained(minilm_path, num_layers=2, max_seq_length=64)
    assert student.model.config.num_hidden_layers == 2
    assert student.num_parameters() < TextEncoder.from_pretrained(minilm_path).num_parameters()
    # The kept layers are the teacher's first layers, unchanged.
    full = TextEncoder.from_pretrained(minilm_path)
    torch.testing.assert_close(
        student.model.encoder.layer[1].output.dense.weight, full.model.encoder.layer[1].output.dense.weight
    )
    student.save(tmp_path / "student")
    again = TextEncoder.from_pretrained(tmp_path / "student")
    assert again.max_seq_length == 64 and again.model.config.num_hidden_layers == 2
    st_model = SentenceTransformer(str(tmp_path / "student"), device="cpu")
    np.testing.assert_allclose(st_model.encode(TEXTS), student.encode(TEXTS), atol=1e-5)
    np.testing.assert_allclose(again.encode(TEXTS), student.encode(TEXTS), atol=1e-6)


def test_too_many_layers_is_a_config_error(minilm_path):
    from lmdistill.errors import ConfigError

    with pytest.raises(ConfigError, match="only 6 layers"):
        TextEncoder.from_pretrained(minilm_path, num_layers=9)
