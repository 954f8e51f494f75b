"""One path from documents to training batches, shared by pretraining, distillation and evaluation.

Stream layout
-------------
``tokenize_documents`` writes one token stream per (corpus, tokenizer)::

    doc1 tokens, EOS, doc2 tokens, EOS, ...

with a parallel ``loss_mask`` (1 where the token is a prediction target, i.e. where the model is
trained to predict it from everything before it):

- plain documents: every token and the closing EOS is a target. The first token of a document is
  predicted from the previous document's EOS, which doubles as a BOS; only stream position 0 (nothing
  precedes it) is never a target.
- prompt/response documents: only the response tokens and the EOS that ends the response. Prompt
  and response are tokenized separately and concatenated, so the boundary is exact even where a
  merge could have crossed it.

Streams are cached under ``cache_dir`` by a hash of the tokenizer fingerprint and the documents (ids,
texts, prompt/response boundaries), written through a temporary directory and an atomic rename, and
memory-mapped: a second run with the same inputs does not tokenize again.

Blocks
------
``BlockDataset(stream, L)`` cuts the stream into non-overlapping windows: item i covers stream
positions [i*L, i*L + L] (L + 1 tokens) and returns ``input_ids = tokens[0:L]`` and
``labels = tokens[1:L+1]`` with -100 where ``loss_mask[1:L+1] == 0``. Labels are pre-shifted:
``logits[:, t]`` predicts ``labels[:, t]``; do NOT shift again (Hugging Face models shift internally
when given ``labels=``, so pass these labels to your own loss, or pass ``input_ids`` as HF labels only
for plain LM without masks). Every stream position except 0 is a label exactly once across the
blocks; the tail shorter than L + 1 tokens is dropped (counted in ``n_dropped_tokens``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lmdistill.constants import IGNORE_INDEX
from lmdistill.data.cache import publish_directory
from lmdistill.data.documents import Document
from lmdistill.data.tokenizer import tokenizer_fingerprint
from lmdistill.errors import ConfigError, DataError

log = logging.getLogger(__name__)

STREAM_FORMAT = 1  # bump when the layout or the masking rule changes
_BATCH_DOCS = 512


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocabulary of at most 65,535 tokens), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


@dataclass
class TokenStream:
    """A tokenized corpus: memory-mapped ``ids`` and ``loss_mask`` plus the counts evaluation needs.

    ``n_bytes`` is the UTF-8 size of all tokenized texts; ``n_target_bytes`` the size of the text whose
    tokens are targets (whole text for plain documents, the response for prompt/response ones), the
    denominator of bits per byte. ``doc_starts[k]`` is the stream position of document k's first token.
    """

    ids: np.ndarray
    loss_mask: np.ndarray
    doc_starts: np.ndarray
    n_documents: int
    n_bytes: int
    n_target_bytes: int
    n_tokens: int
    eos_token_id: int
    vocab_size: int
    key: str
    path: Path | None = None
    doc_ids: list[str] = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return self.n_tokens

    @property
    def n_targets(self) -> int:
        return int(np.count_nonzero(self.loss_mask))

    @property
    def bytes_per_target(self) -> float:
        """UTF-8 bytes of target text per target token: turns nats/token into bits per byte."""
        return self.n_target_bytes / max(1, self.n_targets)

    @classmethod
    def load(cls, directory: Path) -> TokenStream:
        """Memory-map a stream written by :func:`tokenize_documents`."""
        meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
        n = meta["n_tokens"]
        dtype = np.dtype(meta["dtype"])
        ids = np.memmap(directory / "ids.bin", dtype=dtype, mode="r", shape=(n,))
        mask = np.memmap(directory / "loss_mask.bin", dtype=np.uint8, mode="r", shape=(n,))
        starts = np.memmap(directory / "doc_starts.bin", dtype=np.int64, mode="r", shape=(meta["n_documents"],))
        doc_ids = json.loads((directory / "doc_ids.json").read_text(encoding="utf-8"))
        return cls(
            ids=ids,
            loss_mask=mask,
            doc_starts=starts,
            n_documents=meta["n_documents"],
            n_bytes=meta["n_bytes"],
            n_target_bytes=meta["n_target_bytes"],
            n_tokens=n,
            eos_token_id=meta["eos_token_id"],
            vocab_size=meta["vocab_size"],
            key=meta["key"],
            path=directory,
            doc_ids=doc_ids,
        )

    # Pickling (DataLoader workers under spawn) re-opens the memory maps instead of copying the arrays.
    def __getstate__(self) -> dict[str, Any]:
        if self.path is None:
            return self.__dict__
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if set(state) == {"path"}:
            self.__dict__.update(TokenStream.load(state["path"]).__dict__)
        else:
            self.__dict__.update(state)


def _stream_key(docs: Sequence[Document], fingerprint: str, eos_id: int) -> str:
    digest = hashlib.sha256()
    digest.update(f"lmdistill-stream-v{STREAM_FORMAT}\x00{fingerprint}\x00{eos_id}\x00{len(docs)}\x00".encode())
    for doc in docs:
        boundary = -1 if doc.prompt is None else len(doc.prompt)
        digest.update(f"{doc.doc_id}\x00{boundary}\x00{len(doc.text)}\x00".encode("utf-8", "surrogatepass"))
        digest.update(doc.text.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:24]


def _encoder(tokenizer: Any):
    """A function list[str] -> list[list[int]] without special tokens, using the fast batch path."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        encode = getattr(backend, "encode_batch_fast", None) or backend.encode_batch

        def encode_fast(texts: list[str]) -> list[list[int]]:
            return [e.ids for e in encode(texts, add_special_tokens=False)]

        return encode_fast

    def encode_slow(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]

    return encode_slow


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "stream"


def tokenize_documents(
    docs: Iterable[Document],
    tokenizer: Any,
    cache_dir: Path,
    name: str,
    *,
    show_progress: bool | None = None,
) -> TokenStream:
    """Tokenize ``docs`` into one EOS-separated stream with its loss mask (see the module docstring),
    cached on disk by content; a second call with the same inputs only memory-maps the cache.

    Documents that yield no tokens (empty text, empty response) are skipped, counted and logged.
    ``show_progress``: a tqdm bar; ``None`` shows it only on a terminal.
    """
    docs = list(docs)
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise DataError("the tokenizer has no EOS token", hint="load it with lmdistill.data.load_tokenizer")
    vocab_size = len(tokenizer)
    dtype = token_dtype(vocab_size)
    key = _stream_key(docs, tokenizer_fingerprint(tokenizer), eos_id)
    cache_dir = Path(cache_dir)
    final_dir = cache_dir / f"{_safe_name(name)}-{key}"
    if (final_dir / "meta.json").exists():
        log.info("token stream %s: cached at %s", name, final_dir)
        return TokenStream.load(final_dir)

    from tqdm.auto import tqdm

    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{_safe_name(name)}-tmp-"))
    encode = _encoder(tokenizer)
    n_tokens = n_bytes = n_target_bytes = 0
    doc_starts: list[int] = []
    doc_ids: list[str] = []
    skipped: dict[str, list[str]] = {}
    eos = np.array([eos_id], dtype=dtype)
    try:
        with (
            open(tmp_dir / "ids.bin", "wb") as ids_file,
            open(tmp_dir / "loss_mask.bin", "wb") as mask_file,
            tqdm(
                total=len(docs),
                desc=f"tokenizing {name}",
                unit="doc",
                disable=None if show_progress is None else not show_progress,
                leave=False,
            ) as bar,
        ):
            for start in range(0, len(docs), _BATCH_DOCS):
                batch = docs[start : start + _BATCH_DOCS]
                # One batched call for all segments of the batch: plain texts, prompts, responses.
                segments: list[str] = []
                for doc in batch:
                    if doc.prompt is None:
                        segments.append(doc.text)
                    else:
                        segments.extend((doc.prompt, doc.response))  # type: ignore[arg-type]
                encoded = iter(encode(segments))
                for doc in batch:
                    if doc.prompt is None:
                        body = np.asarray(next(encoded), dtype=dtype)
                        if body.size == 0:
                            skipped.setdefault("no tokens (empty text)", []).append(doc.doc_id)
                            continue
                        tokens = np.concatenate([body, eos])
                        mask = np.ones(tokens.size, dtype=np.uint8)
                        target_bytes = len(doc.text.encode("utf-8"))
                    else:
                        prompt = np.asarray(next(encoded), dtype=dtype)
                        response = np.asarray(next(encoded), dtype=dtype)
                        if response.size == 0:
                            skipped.setdefault("no response tokens (empty response)", []).append(doc.doc_id)
                            continue
                        tokens = np.concatenate([prompt, response, eos])
                        mask = np.concatenate(
                            [np.zeros(prompt.size, dtype=np.uint8), np.ones(response.size + 1, dtype=np.uint8)]
                        )
                        target_bytes = len(doc.response.encode("utf-8"))  # type: ignore[union-attr]
                    if n_tokens == 0:
                        mask[0] = 0  # nothing precedes the stream's first token
                    doc_starts.append(n_tokens)
                    doc_ids.append(doc.doc_id)
                    ids_file.write(tokens.tobytes())
                    mask_file.write(mask.tobytes())
                    n_tokens += tokens.size
                    n_bytes += len(doc.text.encode("utf-8"))
                    n_target_bytes += target_bytes
                bar.update(len(batch))
        for reason, which in skipped.items():
            examples = ", ".join(which[:5]) + (", ..." if len(which) > 5 else "")
            log.warning("token stream %s: skipped %d document(s) with %s: %s", name, len(which), reason, examples)
        if n_tokens == 0:
            raise DataError(f"token stream '{name}': no document produced any token", hint="check the input data")
        np.asarray(doc_starts, dtype=np.int64).tofile(tmp_dir / "doc_starts.bin")
        (tmp_dir / "doc_ids.json").write_text(json.dumps(doc_ids, ensure_ascii=False), encoding="utf-8")
        meta = {
            "format": STREAM_FORMAT,
            "name": name,
            "key": key,
            "dtype": dtype.name,
            "n_tokens": n_tokens,
            "n_documents": len(doc_starts),
            "n_skipped_documents": sum(len(v) for v in skipped.values()),
            "n_bytes": n_bytes,
            "n_target_bytes": n_target_bytes,
            "eos_token_id": int(eos_id),
            "vocab_size": int(vocab_size),
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        }
        # meta.json is written last: its presence marks a complete stream.
        (tmp_dir / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        publish_directory(tmp_dir, final_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    log.info(
        "token stream %s: %d documents, %d tokens, %d bytes -> %s", name, len(doc_starts), n_tokens, n_bytes, final_dir
    )
    return TokenStream.load(final_dir)


class BlockDataset(Dataset):
    """Non-overlapping blocks of ``block_size`` positions over a :class:`TokenStream`.

    Item i: ``input_ids`` = stream[i*L : i*L+L], ``labels`` = stream[i*L+1 : i*L+L+1] with -100 where
    the loss mask is 0 (both int64 tensors of length L). Labels are already shifted: logits at t
    predict labels at t.
    """

    def __init__(self, stream: TokenStream, block_size: int) -> None:
        if block_size < 1:
            raise ConfigError(f"block_size must be at least 1, got {block_size}")
        self.stream = stream
        self.block_size = block_size
        self.n_blocks = max(stream.n_tokens - 1, 0) // block_size
        # Positions never used as labels: the tail that does not fill a whole block.
        self.n_dropped_tokens = max(stream.n_tokens - 1, 0) - self.n_blocks * block_size
        if self.n_blocks == 0:
            raise DataError(
                f"the token stream has {stream.n_tokens} tokens, fewer than block_size + 1 = {block_size + 1}",
                hint="use a smaller block size or more data",
            )
        if self.n_dropped_tokens:
            log.info(
                "BlockDataset: %d blocks of %d; %d tail tokens dropped", self.n_blocks, block_size, self.n_dropped_tokens
            )

    def __len__(self) -> int:
        return self.n_blocks

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index < 0:
            index += self.n_blocks
        if not 0 <= index < self.n_blocks:
            raise IndexError(f"block {index} out of range (0..{self.n_blocks - 1})")
        start = index * self.block_size
        end = start + self.block_size + 1
        tokens = np.asarray(self.stream.ids[start:end], dtype=np.int64)
        targets = np.asarray(self.stream.loss_mask[start + 1 : end]) != 0
        labels = np.where(targets, tokens[1:], IGNORE_INDEX)
        return {"input_ids": torch.from_numpy(tokens[:-1].copy()), "labels": torch.from_numpy(labels)}


def collate(batch: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack a list of :class:`BlockDataset` items into ``[B, L]`` tensors (one per key)."""
    if not batch:
        raise ValueError("collate got an empty batch")
    return {key: torch.stack([item[key] for item in batch]) for key in batch[0]}
