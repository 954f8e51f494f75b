"""Helpers shared by the embed tests (importable, unlike conftest)."""

from __future__ import annotations

from pathlib import Path

TOKENIZER_TEXTS = [
    "In the beginning God created the heaven and the earth.",
    "A small domesticated carnivorous mammal with soft fur, a short snout, and retractable claws.",
    "The act of abdicating; the renunciation of a high office, dignity, or trust, by its holder.",
    "One who deceives; one who leads into error; a cheat; an impostor.",
    "A river is a natural flowing watercourse, usually freshwater, flowing towards an ocean.",
] * 20


def build_tiny_lm(directory: Path, family: str) -> Path:
    """A random-init causal LM (GPT-2 or Llama style) with a freshly trained byte-level BPE tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from lmdistill.data.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(TOKENIZER_TEXTS, vocab_size=320)
    special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2, **special))
    else:
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, **special,
            )
        )
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory



# One small real-GCIDE task shared by the end-to-end tests (built once per session, then cached on disk).
SMALL_TASK = {"train_size": 48, "eval_queries": 20, "eval_corpus": 80}
