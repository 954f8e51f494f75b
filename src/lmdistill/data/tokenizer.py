"""Tokenizers: train a byte-level BPE on a corpus, or load any Hugging Face tokenizer; fingerprint them.

Byte-level BPE (GPT-2's scheme: Radford et al. 2019, "Language Models are Unsupervised Multitask
Learners"; BPE for subwords: Sennrich et al. 2016, "Neural Machine Translation of Rare Words with
Subword Units", arXiv:1508.07909) never needs an unknown token: any UTF-8 byte sequence is covered by
the 256 byte symbols, so bits per byte stay comparable across tokenizers.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lmdistill.errors import ConfigError, DataError

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"  # ends every document; also the BOS (a document starts after an EOS)
PAD_TOKEN = "<|pad|>"
N_BYTE_SYMBOLS = 256


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2, *, show_progress: bool = False
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with ``tokenizers`` and wrap it for ``transformers``.

    Special tokens: ``<|endoftext|>`` (id 0; set as both ``eos_token`` and ``bos_token``) and
    ``<|pad|>`` (id 1). No special tokens are added automatically when encoding: the packer in
    :mod:`lmdistill.data.blocks` appends EOS itself. ``save_pretrained(dir)`` then
    ``AutoTokenizer.from_pretrained(dir)`` gives back the same tokenizer (same fingerprint).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    minimum = N_BYTE_SYMBOLS + 2
    if vocab_size < minimum:
        raise ConfigError(
            f"vocab_size must be at least {minimum} (256 byte symbols + 2 special tokens), got {vocab_size}"
        )
    if min_frequency < 1:
        raise ConfigError(f"min_frequency must be at least 1, got {min_frequency}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,
        clean_up_tokenization_spaces=False,
    )
    return tokenizer


def load_tokenizer(path_or_hub_id: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local directory (or a hub id, when a network or a cache is available).

    The tokenizer must have an EOS token (documents are separated by it). A missing pad token is set
    to the EOS token (the usual choice for GPT-2-style tokenizers; padded positions are masked anyway).
    """
    name = str(path_or_hub_id)
    local = Path(name).expanduser()
    if local.exists() and not local.is_dir():
        raise DataError(
            "a tokenizer is loaded from a directory, not a file",
            path=local,
            hint="pass the directory that holds tokenizer.json / tokenizer_config.json",
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(local) if local.is_dir() else name)
    except (OSError, ValueError, EnvironmentError) as exc:
        hint = (
            "check that the directory holds tokenizer.json or the files of a Hugging Face tokenizer"
            if local.is_dir()
            else "pass a local directory; a hub id needs network access (unset HF_HUB_OFFLINE) or a warm cache"
        )
        raise DataError(f"cannot load tokenizer '{name}': {exc}".splitlines()[0], hint=hint) from None
    if tokenizer.eos_token_id is None:
        raise DataError(
            f"tokenizer '{name}' has no EOS token",
            hint='set "eos_token" in its tokenizer_config.json, or train one with train_bpe_tokenizer',
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
        log.info("tokenizer '%s' has no pad token; using its EOS token %r", name, tokenizer.eos_token)
    return tokenizer


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A stable SHA-256 of what decides token ids: vocabulary, merges, normalizer/pre-tokenizer, special
    tokens. Equal for a tokenizer and its ``save_pretrained``/``from_pretrained`` round trip; different
    as soon as any token or merge differs."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        model = json.loads(backend.to_str())
        # Runtime settings, not vocabulary: transformers toggles these while encoding.
        model.pop("truncation", None)
        model.pop("padding", None)
    else:  # a slow (Python) tokenizer: the vocabulary is what we can see
        model = {"vocab": sorted(tokenizer.get_vocab().items())}
    special = {
        "eos": [tokenizer.eos_token, tokenizer.eos_token_id],
        "bos": [tokenizer.bos_token, tokenizer.bos_token_id],
        "pad": [tokenizer.pad_token, tokenizer.pad_token_id],
        "unk": [tokenizer.unk_token, tokenizer.unk_token_id],
        "added": sorted((str(k), v) for k, v in tokenizer.get_added_vocab().items()),
    }
    payload = json.dumps({"model": model, "special": special}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()
