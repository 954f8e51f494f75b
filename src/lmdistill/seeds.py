"""Seeds derived from a run's seed and a position (step, rank, shard, ...): one rule for every random draw that
must be reproducible on resume and independent of the number of processes."""

from __future__ import annotations

import hashlib
from typing import Any


def derived_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (stable across processes and Python runs, unlike ``hash``)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1
