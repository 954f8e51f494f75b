"""Where lmdistill keeps derived data (parsed corpora, tokenized streams), and how it writes it safely."""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

CACHE_ENV = "LMDISTILL_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$LMDISTILL_CACHE_DIR`` if set, else ``.cache/lmdistill`` under the working directory.

    Project-local by default so that ``make clean`` (which removes ``.cache``) starts afresh.
    """
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.cwd() / ".cache" / "lmdistill"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and an atomic rename,
    so a reader (or a concurrent process) never sees a half-written file. The bytes are flushed to disk
    before the rename and the directory after it: without the first fsync a power loss can keep the rename
    but not the data, leaving a complete-looking file of zeros under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Flush a directory's entries (a rename into it) to disk; a no-op where directories cannot be opened
    (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def publish_directory(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written temporary directory into place atomically.

    If another process published the same (content-addressed) directory first, keep theirs: both hold
    the same bytes by construction.
    """
    try:
        os.rename(tmp_dir, final_dir)
    except OSError:
        if final_dir.is_dir():
            shutil.rmtree(tmp_dir, ignore_errors=True)
        else:
            raise


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many small objects.

    Building ~10^5 documents with nested lists triggers repeated full collections that walk every
    live object; pausing made reading GCIDE several times faster. Reference counting still frees
    everything that is not in a cycle.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
