"""Flipped KD: a decoder LM read as an encoder through LoRA; only the adapters train."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmdistill.embed.config import TrainConfig
from lmdistill.embed.flipped import CausalLMEncoder, LoraLMEncoder
from lmdistill.embed.mining import build_training_signal
from lmdistill.embed.task import RetrievalTask, TrainPair
from lmdistill.embed.train import train_flipped
from lmdistill.errors import ConfigError

TEXTS = ["In the beginning God created the heaven.", "A cheat; an impostor.", "flowing watercourse"]


def small_task() -> RetrievalTask:
    words = ["river", "cat", "oak", "bank", "acorn", "dog", "wolf", "seed"]
    train, corpus, groups = [], {}, {}
    for w in words:
        doc_id = f"gcide:{w}#1"
        corpus[doc_id] = f"{w}: the {w} is a thing called {w}"
        groups[doc_id] = w
        train.append(TrainPair(f"what is a {w}", corpus[doc_id], doc_id, w))
    return RetrievalTask("toy", {}, {}, {}, train, corpus, groups)


def char_teacher(texts):
    """A fixed, deterministic 'small model': normalised letter histograms."""
    out = np.zeros((len(texts), 26))
    for i, t in enumerate(texts):
        for ch in t.lower():
            if "a" <= ch <= "z":
                out[i, ord(ch) - 97] += 1
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_only_lora_parameters_train(tiny_lm):
    enc = LoraLMEncoder(tiny_lm, r=4, alpha=8)
    trainable = dict(enc.trainable_parameters())
    assert trainable and all("lora_" in name for name in trainable)
    frozen = [n for n, p in enc.lm.named_parameters() if not p.requires_grad]
    assert frozen and not any("lora_" in n for n in frozen)
    assert {n for n, p in enc.named_parameters() if p.requires_grad} == {f"lm.{n}" for n in trainable}


def test_representation_is_the_pooled_lora_a_code(tiny_lm):
    enc = LoraLMEncoder(tiny_lm, r=6, alpha=12)
    family_module = "mlp.c_fc" if enc.lm.config.model_type == "gpt2" else "mlp.up_proj"
    assert enc.representation_name.endswith("layers.1." + family_module) or enc.representation_name.endswith(
        "h.1." + family_module
    )
    emb = enc.encode(TEXTS, batch_size=2)
    assert emb.shape == (3, 6)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # Reference: run the body, take the hooked layer's input, apply A by hand, mean-pool, normalise.
    captured = {}
    layer = enc._rep_layer

    def grab(_module, inputs):
        captured["x"] = inputs[0]  # the hidden state the LoRA layer reads

    handle = layer.register_forward_pre_hook(grab)
    enc.eval()  # the test model's config has dropout; encode() runs in eval mode too
    with torch.no_grad():
        enc.embed(TEXTS[:1])
    handle.remove()
    code = captured["x"] @ layer.lora_A["default"].weight.T
    expected = torch.nn.functional.normalize(code[0].mean(0), dim=-1)
    np.testing.assert_allclose(emb[0], expected.detach().numpy(), atol=1e-5)


def test_training_moves_only_adapters_and_fits_the_teacher(tiny_gpt2):
    torch.manual_seed(0)
    enc = LoraLMEncoder(tiny_gpt2, r=8, alpha=16)
    base_before = {n: p.detach().clone() for n, p in enc.lm.named_parameters() if not p.requires_grad}
    lora_before = {n: p.detach().clone() for n, p in enc.trainable_parameters()}
    task = small_task()
    signal = build_training_signal(task, teacher_encode=char_teacher, negatives_from="teacher", top_k=3)
    cfg = TrainConfig(steps=40, batch_size=4, lr=1e-2, warmup_steps=0, log_every=100)
    result = train_flipped(enc, task, cfg, signal=signal, margin=0.1, pos_threshold=-1.0, neg_threshold=1.0)
    assert np.mean(result.losses[-5:]) < 0.7 * np.mean(result.losses[:5])
    for n, p in enc.lm.named_parameters():
        if n in base_before:
            torch.testing.assert_close(p, base_before[n], rtol=0, atol=0)
    moved = [n for n, p in enc.trainable_parameters() if not torch.equal(p, lora_before[n])]
    assert any("lora_A" in n for n in moved)


def test_save_and_load_round_trip(tiny_lm, tmp_path):
    enc = LoraLMEncoder(tiny_lm, r=4, alpha=8)
    with torch.no_grad():
        for _, p in enc.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))  # make B non-zero too, so the adapters matter
    enc.save(tmp_path / "m")
    again = LoraLMEncoder.load(tmp_path / "m")
    assert again.representation_name == enc.representation_name
    np.testing.assert_allclose(again.encode(TEXTS), enc.encode(TEXTS), atol=1e-6)


def test_zero_shot_reading_and_errors(tiny_lm, tmp_path):
    plain = CausalLMEncoder(tiny_lm)
    emb = plain.encode(TEXTS)
    assert emb.shape == (3, 32)
    last = CausalLMEncoder(tiny_lm, pooling="last").encode(TEXTS)
    assert not np.allclose(emb, last)
    with pytest.raises(ConfigError, match="not a directory"):
        CausalLMEncoder(tmp_path / "missing")
    with pytest.raises(ConfigError, match="representation_module"):
        LoraLMEncoder(tiny_lm, r=4, representation_module="no_such_module")


def test_contrastive_term_is_added_to_mcl(tiny_gpt2):
    torch.manual_seed(0)
    enc = LoraLMEncoder(tiny_gpt2, r=8, alpha=16)
    task = small_task()
    signal = build_training_signal(task, teacher_encode=char_teacher, negatives_from="teacher", top_k=3)
    cfg = TrainConfig(steps=3, batch_size=4, lr=1e-3, warmup_steps=0, log_every=100)
    result = train_flipped(
        enc, task, cfg, signal=signal, margin=0.1, pos_threshold=-1.0, neg_threshold=1.0, mcl_weight=0.5, contrastive_weight=2.0
    )
    x = result.extra
    for total, dist, mcl, nce in zip(result.losses, x["dist"], x["mcl"], x["contrastive"]):
        assert total == pytest.approx(dist + 0.5 * mcl + 2.0 * nce, rel=1e-5)
    # Thresholds that keep every pair: at least each query's own positive (a hard negative drawn for one
    # query can be another query's positive, which then counts as a positive pair too).
    assert all(k >= 4 for k in x["kept_positives"])
    assert all(p + n == 4 * 8 for p, n in zip(x["kept_positives"], x["kept_negatives"]))
