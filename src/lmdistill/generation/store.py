"""A resumable, append-only store of teacher responses (the dataset of sequence-level KD).

One JSON object per line, keyed by a hash of the request (prompt + teacher + generation settings):

    {"key": "<sha256>", "prompt": "...", "response": "...", "finish_reason": "stop", "teacher": "...",
     "params": {...}, "doc_id": "...", "time": 1718000000.0}

Guarantees:

- a response is appended, flushed and fsync'ed as soon as it is complete, so a crash (even SIGKILL)
  loses no completed response;
- a line cut short by a crash in the middle of a write is not a completed response: it is dropped
  (and the file truncated back to the last complete line) when the store is opened again, so the
  next append cannot be glued onto it;
- a key is stored at most once; a rerun asks only for the keys not yet stored.

Secrets never reach this file: records hold the prompt, the answer and non-secret settings only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from lmdistill.errors import DataError

log = logging.getLogger(__name__)


def request_key(prompt: str, teacher: str, params: Mapping[str, Any]) -> str:
    """SHA-256 of the prompt and everything that decides its answer (teacher identity, settings)."""
    payload = json.dumps({"prompt": prompt, "teacher": teacher, "params": dict(params)}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class ResponseStore:
    """Append-only JSONL store; thread-safe appends (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self._lock = threading.Lock()
        self._records: dict[str, dict[str, Any]] = {}
        self.dropped_partial_line = False
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        good_end = data.rfind(b"\n") + 1  # bytes up to the last complete line
        if good_end < len(data):
            # the tail was cut mid-write by a crash: not a completed response
            log.warning("store %s: dropping an incomplete last line (%d bytes) left by an interrupted write",
                        self.path, len(data) - good_end)
            with open(self.path, "r+b") as f:
                f.truncate(good_end)
                f.flush()
                os.fsync(f.fileno())
            self.dropped_partial_line = True
        for line_no, raw in enumerate(data[:good_end].splitlines(), 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise DataError(f"not a JSON line: {exc}", path=self.path, line=line_no,
                                hint="the store is append-only JSONL; remove or fix this line") from None
            if not isinstance(record, dict) or "key" not in record or "response" not in record:
                raise DataError("a store record needs 'key' and 'response'", path=self.path, line=line_no)
            self._records.setdefault(record["key"], record)

    def __contains__(self, key: str) -> bool:
        return key in self._records

    def __len__(self) -> int:
        return len(self._records)

    def get(self, key: str) -> dict[str, Any] | None:
        return self._records.get(key)

    def records(self) -> Iterator[dict[str, Any]]:
        return iter(list(self._records.values()))

    def add(self, record: dict[str, Any]) -> bool:
        """Append ``record`` (must hold 'key' and 'response') durably; False if the key is already stored."""
        if "key" not in record or "response" not in record:
            raise ValueError("a store record needs 'key' and 'response'")
        record = {**record, "time": record.get("time", time.time())}
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            if record["key"] in self._records:
                return False
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            self._records[record["key"]] = record
        return True
