"""Flipped KD: a decoder LM read as an encoder through LoRA; only the adapters train."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmdistill.embed.config import EmbedTrainConfig
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
    # The only frozen LoRA tensor is the representation module's B: it acts after the code is taken.
    assert frozen and [n for n in frozen if "lora_" in n] == [f"{enc.representation_name}.lora_B.default.weight"]
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
    cfg = EmbedTrainConfig(steps=40, batch_size=4, lr=1e-2, warmup_steps=0, log_every=100)
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
    cfg = EmbedTrainConfig(steps=3, batch_size=4, lr=1e-3, warmup_steps=0, log_every=100)
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


# ------------------------------------------------------------ which adapters exist, and that all of them learn


def bottom_module(lm_dir) -> str:
    """A module reading block 0's normalised token embeddings (the shipped config's choice for GPT-2)."""
    import json

    family = json.loads((lm_dir / "config.json").read_text())["model_type"]
    return "h.0.attn.c_attn" if family == "gpt2" else "layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def gcide_signal(gcide_cache, minilm_path):
    """A real batch source: the small GCIDE task with all-MiniLM-L6-v2 as the teacher (the tiny LMs
    have 64 positions: their encoders cut texts to 32 tokens)."""
    from lmdistill.embed.encoder import TextEncoder
    from lmdistill.embed.task import load_gcide_task
    from tests.embed.helpers import SMALL_TASK

    task = load_gcide_task(**SMALL_TASK, cache_dir=gcide_cache)
    teacher = TextEncoder.from_pretrained(minilm_path)
    signal = build_training_signal(task, teacher_encode=lambda t: teacher.encode(list(t)), negatives_from="teacher", top_k=5)
    return task, signal


def grads_after(enc, task, signal, steps: int) -> dict[str, torch.Tensor | None]:
    """Gradients of the last of ``steps`` training steps on real GCIDE batches (the loop leaves them set)."""
    cfg = EmbedTrainConfig(steps=steps, batch_size=8, lr=1e-3, warmup_steps=0, log_every=100, grad_clip=None)
    train_flipped(enc, task, cfg, signal=signal, margin=0.1, pos_threshold=0.2, neg_threshold=0.6, contrastive_weight=1.0)
    return {n: p.grad for n, p in enc.lm.named_parameters() if "lora_" in n}


def adapted_modules(names) -> set[str]:
    return {n.split(".lora_")[0] for n in names}


def test_auto_adapters_are_exactly_those_that_get_gradients(tiny_lm, gcide_signal):
    """'all-linear' puts adapters everywhere; after two real steps (the first moves B off zero) only some
    have gradients. 'auto' must adapt exactly that set, and freeze only the representation module's B."""
    task, signal = gcide_signal
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="cannot change the representation"):
        everywhere = LoraLMEncoder(tiny_lm, r=4, alpha=8, target_modules="all-linear", max_seq_length=32)
    grads = grads_after(everywhere, task, signal, steps=2)
    live = adapted_modules(n for n, g in grads.items() if g is not None and g.abs().sum() > 0)
    dead = adapted_modules(grads) - live
    assert dead, "all-linear should put some adapters where they cannot act"

    torch.manual_seed(0)
    auto = LoraLMEncoder(tiny_lm, r=4, alpha=8, max_seq_length=32)
    assert adapted_modules(n for n, _ in auto.lm.named_parameters() if "lora_" in n) == live
    rep_b = f"{auto.representation_name}.lora_B.default.weight"
    assert {n for n, p in auto.lm.named_parameters() if "lora_" in n and not p.requires_grad} == {rep_b}


def test_every_trainable_parameter_gets_a_gradient_on_a_real_batch(tiny_lm, gcide_signal):
    task, signal = gcide_signal
    # The configured reading (block 0's input): the representation module's A is the only trainable tensor.
    torch.manual_seed(0)
    bottom = LoraLMEncoder(tiny_lm, r=4, alpha=8, representation_module=bottom_module(tiny_lm), max_seq_length=32)
    trainable = dict(bottom.trainable_parameters())
    assert list(trainable) == [f"{bottom.representation_name}.lora_A.default.weight"]
    grads = grads_after(bottom, task, signal, steps=1)
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in trainable)

    # A deeper reading (the default: the last block's MLP input) has adapters below it. On the first
    # backward their A gets an exactly zero gradient, because LoRA starts with B = 0; every other trainable
    # tensor gets a non-zero one. From the second step on, all of them do.
    torch.manual_seed(0)
    deep = LoraLMEncoder(tiny_lm, r=4, alpha=8, max_seq_length=32)
    trainable = dict(deep.trainable_parameters())
    assert len(trainable) > 1
    first = grads_after(deep, task, signal, steps=1)
    rep_a = f"{deep.representation_name}.lora_A.default.weight"
    for n in trainable:
        assert first[n] is not None, n
        if n == rep_a or ".lora_B." in n:
            assert first[n].abs().sum() > 0, n
        else:
            assert first[n].abs().sum() == 0, n
    torch.manual_seed(0)
    deep = LoraLMEncoder(tiny_lm, r=4, alpha=8, max_seq_length=32)
    second = grads_after(deep, task, signal, steps=2)
    assert all(second[n] is not None and second[n].abs().sum() > 0 for n in dict(deep.trainable_parameters()))


def test_explicit_target_modules_without_the_representation_module_is_an_error(tiny_gpt2):
    with pytest.raises(ConfigError, match="has no LoRA adapter"):
        LoraLMEncoder(tiny_gpt2, r=4, target_modules=["h.0.attn.c_attn"], representation_module="h.1.mlp.c_fc")


# ------------------------------------------------------------------------------------------- centring


def test_centering_subtracts_the_mean_hidden_state(tiny_lm, tmp_path):
    torch.manual_seed(0)
    enc = LoraLMEncoder(tiny_lm, r=6, alpha=12)
    mu = enc.fit_center(TEXTS, batch_size=2)
    layer = enc._rep_layer
    # Reference: the hidden state A reads, for every real token of the fitting texts, in float64.
    captured = []
    handle = layer.register_forward_pre_hook(lambda _m, inputs: captured.append(inputs[0]))
    enc.eval()
    with torch.no_grad():
        for text in TEXTS:
            enc.embed([text])
    handle.remove()
    tokens = torch.cat([x[0] for x in captured]).double()
    torch.testing.assert_close(mu.double(), tokens.mean(0), rtol=0, atol=1e-5)
    # The code is A(h - mu): pooled, normalised, per text.
    a = layer.lora_A["default"].weight.detach().double()
    expected = torch.nn.functional.normalize((captured[0][0].double() - mu.double()).mean(0) @ a.T, dim=-1)
    np.testing.assert_allclose(enc.encode(TEXTS[:1])[0], expected.numpy(), atol=1e-5)
    # Over all tokens of the fitting texts the centred code averages to zero (A is linear).
    codes = (tokens - mu.double()) @ a.T
    assert codes.mean(0).abs().max() < 1e-5
    # The centre is saved with the adapter and restored.
    enc.save(tmp_path / "m")
    again = LoraLMEncoder.load(tmp_path / "m")
    torch.testing.assert_close(again.center, mu)
    np.testing.assert_allclose(again.encode(TEXTS), enc.encode(TEXTS), atol=1e-6)
    # Centring adds no trainable parameter.
    assert all("lora_" in n for n, _ in again.trainable_parameters())
